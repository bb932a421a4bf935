"""Typed recipes (issue 36): every shipped recipe fits the schema; a typo, a wrong type or a missing key stops the
launch with one sentence naming the key (and the nearest valid name) and exit status 2."""
import pytest

from training import launch
from training.config import CONFIG_DIR, check_recipe, load_config

RECIPES = sorted(p.name for p in CONFIG_DIR.glob("*.yaml"))


@pytest.mark.parametrize("name", RECIPES)
def test_every_shipped_recipe_fits_the_schema(name):
    config = load_config(CONFIG_DIR / name)
    assert check_recipe(config) is config


@pytest.mark.parametrize("override, sentence", [
    ("train.ema_decy=0.999", "unknown key train.ema_decy; did you mean train.ema_decay?"),
    ("optim.learning_rate=1e-4", "unknown key optim.learning_rate; optim takes lr, betas,"),
    ("model.lora={rank: 4, alpah: 8}", "unknown key model.lora.alpah; did you mean model.lora.alpha?"),
    ("data.clip_schedule=[{secs: 2}]", "unknown key data.clip_schedule[0].secs; did you mean data.clip_schedule[0].seconds?"),
    ("train.ema_decay=high", "train.ema_decay must be a number or null; got 'high'"),
    ("train.max_steps=1.5", "train.max_steps must be an integer; got 1.5"),
    ("data.buckets=[[64, wide]]", "data.buckets[0][1] must be an integer; got 'wide'"),
    ("train.mixed_precision=fp32", "train.mixed_precision must be one of 'no', 'fp16', 'bf16'; got 'fp32'"),
    ("train.report_to=[csv, mlflow]", "train.report_to[1] must be one of 'tensorboard', 'wandb', 'csv', 'none'"),
    ("task=train", "task is 'train'; use one of flow, vae, distill, bundle"),
    ("train.max_steps=[1", "the value of override 'train.max_steps=[1' is not valid YAML at line 1, column 3"),
])
def test_launch_refuses_a_bad_key_with_one_sentence_and_exit_2(override, sentence, capsys):
    assert launch.main(["--config", "training/configs/stage2_video_lowres.yaml", override]) == 2
    err = capsys.readouterr().err
    assert sentence in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_a_missing_key_is_named():
    config = load_config(CONFIG_DIR / "lora.yaml")
    del config["train"]["max_steps"]
    with pytest.raises(ValueError, match=r"the recipe lacks train\.max_steps; give it a value \(an integer\)"):
        check_recipe(config)


def test_the_values_yaml_reads_loosely_are_accepted():
    """`no` unquoted is YAML's false (accelerate's "no"); an integer where a number is asked for is a number."""
    config = load_config(CONFIG_DIR / "tiny_shapes_flow.yaml", ["train.mixed_precision=no", "optim.lr=1",
                                                               "train.report_to=none"])
    assert check_recipe(config)["train"]["mixed_precision"] is False


def test_launch_names_the_line_of_a_malformed_recipe(tmp_path, capsys):
    recipe = tmp_path / "broken.yaml"
    recipe.write_text("task: distill\nmodel:\n  pretrained: x\n# a comment\nfirst: `task: distill` here\n")
    assert launch.main(["--config", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert f"{recipe} is not valid YAML at line 5, column 8" in err and "Traceback" not in err
