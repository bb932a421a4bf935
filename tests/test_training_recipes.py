"""The recipes: Table 4 / Appendix B values in the stage configs, and every recipe runs on a CPU."""
import json

import pytest

from tests.training_helpers import precompute_features, tiny_overrides, tiny_world
from training.config import CONFIG_DIR, load_config
from training.launch import main

STAGES = {
    "stage1_image": dict(betas=[0.9, 0.999], batch=1536, lr=1e-4, steps=50_000),
    "stage2_video_lowres": dict(betas=[0.9, 0.95], batch=768, lr=1e-4, steps=200_000),
    "stage3_video_highres": dict(betas=[0.9, 0.95], batch=384, lr=5e-5, steps=50_000),
}


@pytest.mark.parametrize("name", sorted(STAGES))
def test_stage_recipes_carry_table4(name):
    config, expected = load_config(CONFIG_DIR / f"{name}.yaml"), STAGES[name]
    optim, train, objective = config["optim"], config["train"], config["objective"]
    assert optim["betas"] == expected["betas"] and optim["eps"] == 1e-6
    assert optim["lr"] == expected["lr"] and optim["warmup_steps"] == 1000
    assert optim["weight_decay"] == 1e-4 and optim["grad_clip"] == 1.0
    assert train["global_batch_size"] == expected["batch"] and train["max_steps"] == expected["steps"]
    assert train["mixed_precision"] == "bf16"
    assert objective["stages"] == 3 and objective["history_noise_max"] == pytest.approx(1 / 3)
    assert objective["text_dropout"] == 0.1


def test_video_stages_follow_appendix_b():
    stage2 = load_config(CONFIG_DIR / "stage2_video_lowres.yaml")["data"]
    assert stage2["image_ratio"] == 0.125
    assert stage2["clip_schedule"] == [{"until_step": 80_000, "seconds": 2}, {"until_step": None, "seconds": 5}]
    stage3 = load_config(CONFIG_DIR / "stage3_video_highres.yaml")["data"]
    assert stage3["clip_schedule"] == [{"until_step": None, "seconds": [5, 10]}]
    assert stage3["image_ratio"] == 0.125


def test_accelerate_configs_parse():
    import yaml

    folder = CONFIG_DIR / "accelerate"
    configs = {p.stem: yaml.safe_load(p.read_text()) for p in folder.glob("*.yaml")}
    assert configs["fsdp_multinode"]["distributed_type"] == "FSDP"
    assert configs["deepspeed_zero2"]["distributed_type"] == "DEEPSPEED"
    assert configs["deepspeed_zero2"]["deepspeed_config"]["zero_stage"] == 2
    for config in configs.values():  # accumulation comes from the recipe
        assert "gradient_accumulation_steps" not in json.dumps(config)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    checkpoint, annotations = tiny_world(root)
    return checkpoint, annotations, *precompute_features(checkpoint, annotations, root / "features")


@pytest.mark.parametrize("recipe", ["stage1_image", "stage2_video_lowres", "stage3_video_highres", "tiny_shapes_flow", "lora"])
def test_recipe_runs_two_steps_on_precomputed_features(recipe, world, tmp_path):
    checkpoint, _, features, empty = world
    output = tmp_path / "run"
    overrides = tiny_overrides(checkpoint, features, output, empty_text_fea=empty)
    assert main(["--config", str(CONFIG_DIR / f"{recipe}.yaml"), "--max-steps", "2", *overrides]) == 0
    state = json.loads((output / "checkpoint-2" / "training_state" / "state.json").read_text())
    assert state["step"] == 2
    assert (output / "metrics.csv").read_text().count("\n") == 3  # header + 2 steps
    assert (output / "logs").is_dir()


def test_tiny_shapes_runs_on_videos_and_images_encoded_on_the_fly(world, tmp_path):
    checkpoint, annotations, _, _ = world
    output = tmp_path / "run"
    overrides = tiny_overrides(checkpoint, annotations, output, global_batch=2) + ["data.clip_schedule=[{seconds: 1}]"]
    assert main(["--config", str(CONFIG_DIR / "tiny_shapes_flow.yaml"), "--max-steps", "1", *overrides]) == 0
    assert (output / "checkpoint-1" / "diffusion_transformer_384p").is_dir()


def test_vae_recipe_runs(world, tmp_path):
    checkpoint, annotations, _, _ = world
    output = tmp_path / "vae"
    overrides = [f"model.pretrained={checkpoint}", f"data.annotations=[{annotations}]", "data.fps=8",
                 "data.buckets=[[64, 64]]", "data.clip_schedule=[{seconds: 1}]", "data.num_workers=0",
                 "data.image_ratio=0.5", "train.global_batch_size=2", "train.seed=1", "train.mixed_precision=no",
                 f"train.output_dir={output}", "train.checkpoint_every=1"]
    assert main(["--config", str(CONFIG_DIR / "vae.yaml"), "--max-steps", "1", *overrides]) == 0
    from model_core.vae import CausalVideoVAE

    vae = CausalVideoVAE.from_pretrained(output / "checkpoint-1" / "causal_video_vae")
    assert vae.config.encoder_out_channels == 4


def test_sd3_family_trains(tmp_path):
    checkpoint, annotations = tiny_world(tmp_path / "world", family="sd3", videos=2, images=2)
    output = tmp_path / "run"
    overrides = tiny_overrides(checkpoint, annotations, output)
    assert main(["--config", str(CONFIG_DIR / "tiny_shapes_flow.yaml"), "--max-steps", "1", *overrides]) == 0
    config = json.loads((output / "checkpoint-1" / "diffusion_transformer_384p" / "config.json").read_text())
    assert config["_class_name"] == "PyramidMMDiT"


def test_bad_override_is_a_clear_error(capsys):
    assert main(["--config", str(CONFIG_DIR / "tiny_shapes_flow.yaml"), "novalue"]) == 2
    assert "section.key=value" in capsys.readouterr().err


def test_missing_recipe_is_a_clear_error(capsys, tmp_path):
    assert main(["--config", str(tmp_path / "nope.yaml")]) == 2
    assert "no recipe" in capsys.readouterr().err
