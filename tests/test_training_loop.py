"""The loop end to end on a CPU: resume equality, data-parallel equivalence, skipped samples,
checkpoints the app loads, LoRA adapters, extracted features."""
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.training_helpers import FLOW_RECIPE as RECIPE
from tests.training_helpers import ROOT, WEIGHTS, launch_on_two_processes, precompute_features, tiny_overrides, tiny_world
from training.config import CONFIG_DIR
from training.launch import main



@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    checkpoint, annotations = tiny_world(root, videos=3, images=3, corrupt=1)
    return checkpoint, annotations, *precompute_features(checkpoint, annotations, root / "features")


def run(world, output, steps, *extra, raw=False, resume=None, global_batch=4, accumulation=1):
    checkpoint, annotations, features, empty = world
    data = (annotations, None) if raw else (features, empty)
    overrides = tiny_overrides(checkpoint, data[0], output, global_batch, accumulation, empty_text_fea=data[1])
    args = ["--config", RECIPE, "--max-steps", str(steps), *(["--resume", resume] if resume else []), *overrides, *extra]
    assert main(args) == 0


def losses(output):
    with (Path(output) / "metrics.csv").open() as handle:
        return [float(row["loss"]) for row in csv.DictReader(handle)]


def test_resume_continues_bitwise(world, tmp_path):
    run(world, tmp_path / "straight", 4)
    run(world, tmp_path / "resumed", 2, resume="auto")  # no checkpoint yet: starts fresh
    run(world, tmp_path / "resumed", 4, resume="auto")
    for name in (WEIGHTS, Path("training_state") / "ema.safetensors"):
        straight, resumed = load_file(tmp_path / "straight" / "checkpoint-4" / name), load_file(tmp_path / "resumed" / "checkpoint-4" / name)
        assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    straight_opt = torch.load(tmp_path / "straight" / "checkpoint-4" / "training_state" / "optimizer.pt", weights_only=True)
    resumed_opt = torch.load(tmp_path / "resumed" / "checkpoint-4" / "training_state" / "optimizer.pt", weights_only=True)
    for key, state in straight_opt["state"].items():
        assert torch.equal(state["exp_avg_sq"], resumed_opt["state"][key]["exp_avg_sq"])
    assert losses(tmp_path / "straight") == losses(tmp_path / "resumed")


def test_two_gloo_processes_match_one_process(world, tmp_path):
    """Same global batch (4): 1 process x 2 accumulation steps vs 2 processes x 1."""
    run(world, tmp_path / "one", 3, accumulation=2)
    checkpoint, _, features, empty = world
    overrides = tiny_overrides(checkpoint, features, tmp_path / "two", 4, 1, empty_text_fea=empty)
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
               "-m", "training.launch", "--config", RECIPE, "--max-steps", "3", *overrides]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    state = json.loads((tmp_path / "two" / "checkpoint-3" / "training_state" / "state.json").read_text())
    assert state["world_size"] == 2
    assert losses(tmp_path / "two") == pytest.approx(losses(tmp_path / "one"), rel=1e-5)
    one, two = load_file(tmp_path / "one" / "checkpoint-3" / WEIGHTS), load_file(tmp_path / "two" / "checkpoint-3" / WEIGHTS)
    assert all(torch.allclose(one[k], two[k], atol=1e-5) for k in one)


def test_corrupt_sample_is_skipped_and_counted(world, tmp_path):
    run(world, tmp_path / "raw", 3, "data.clip_schedule=[{seconds: 1}]", raw=True, global_batch=7)
    state = json.loads((tmp_path / "raw" / "checkpoint-3" / "training_state" / "state.json").read_text())
    assert state["skipped_samples"] == 3  # the broken clip is in every 7-sample batch of 7 entries
    with (tmp_path / "raw" / "metrics.csv").open() as handle:
        assert [float(row["skipped_samples"]) for row in csv.DictReader(handle)] == [1, 2, 3]


def test_checkpoint_loads_in_the_app_and_renders_validation(world, tmp_path):
    from model_core.pipeline import PyramidFlowPipeline
    from model_core.transformers import PyramidFluxTransformer
    from model_core.media_files import read_video

    run(world, tmp_path / "run", 2, "validation.every_steps=2", "validation.num_frames=9",
        "validation.first_frame_steps=[1, 1, 1]", "validation.video_steps=[1, 1, 1]")
    frames, _ = read_video(tmp_path / "run" / "samples" / "step-2" / "00.mp4")
    assert frames.shape == (9, 64, 64, 3)
    folder = tmp_path / "run" / "checkpoint-2"
    assert not list((tmp_path / "run").glob("*.tmp"))
    transformer = PyramidFluxTransformer.from_pretrained(folder / "diffusion_transformer_384p")
    trained = load_file(folder / WEIGHTS)
    assert all(torch.equal(p, trained[k]) for k, p in transformer.state_dict().items())
    for variant in ("384p", "384p_ema"):
        pipe = PyramidFlowPipeline.from_pretrained(folder, variant=variant)
        result = pipe.text_to_video("a red square", num_frames=9, height=64, width=64, first_frame_steps=(1, 1, 1),
                                    video_steps=(1, 1, 1), guidance_scale=1.0, video_guidance_scale=1.0, seed=0)
        assert result.frames[0].shape == (9, 64, 64, 3)


def test_lora_adapter_trains_and_loads(world, tmp_path):
    from model_core.lora import load_lora_adapter
    from model_core.pipeline import PyramidFlowPipeline

    checkpoint = world[0]
    run(world, tmp_path / "lora", 2, "model.lora={rank: 4, alpha: 4}", "optim.lr=0.05", "optim.warmup_steps=1")
    adapter = tmp_path / "lora" / "checkpoint-2" / "lora"
    weights = load_file(adapter / "pytorch_lora_weights.safetensors")  # diffusers' pipeline file
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in weights.items())
    options = dict(num_frames=9, height=64, width=64, first_frame_steps=(1, 1, 1), video_steps=(1, 1, 1),
                   guidance_scale=1.0, video_guidance_scale=1.0, seed=0, output_type="latent")
    pipe = PyramidFlowPipeline.from_pretrained(checkpoint)
    base = pipe.text_to_video("a red square", **options).latents
    load_lora_adapter(pipe.transformer, adapter)
    adapted = pipe.text_to_video("a red square", **options).latents
    assert not torch.allclose(base, adapted)
    loaded = PyramidFlowPipeline.from_pretrained(checkpoint, lora=adapter)  # the option the CLI and studio pass
    torch.testing.assert_close(loaded.text_to_video("a red square", **options).latents, adapted)


def test_extracted_features_are_what_the_loader_reads(world):
    from training.data import AnnotatedDataset, SampleRequest, read_annotations

    entries, _ = read_annotations(world[2])
    assert len(entries) == 6 and all(e.latent and e.text_fea for e in entries)  # the broken clip was skipped
    dataset = AnnotatedDataset(entries, [(64, 64)], 8, 8, use_latents=True, use_text_features=True)
    sample, error = dataset[SampleRequest(0, 0, 0, 17, 0.0)]
    assert error is None and sample.latent.shape == (1, 4, 3, 8, 8)
    assert sample.text_features.hidden_states.shape[:2] == (1, 128)


def test_changed_global_batch_on_resume_is_refused_unless_allowed(world, tmp_path, capsys):
    run(world, tmp_path / "run", 2)
    assert "2/2" in capsys.readouterr().err  # the progress bar: steps done of the total
    checkpoint, _, features, empty = world
    overrides = tiny_overrides(checkpoint, features, tmp_path / "run", 2, empty_text_fea=empty)
    args = ["--config", RECIPE, "--max-steps", "3", "--resume", "auto", *overrides]
    assert main(args) == 2
    assert "global batch 4" in capsys.readouterr().err
    assert main([*args, "--allow-batch-change"]) == 0
    assert (tmp_path / "run" / "checkpoint-3").is_dir()


def test_bucket_the_pyramid_cannot_halve_is_refused_before_training(world, tmp_path, capsys):
    run_args = tiny_overrides(world[0], world[2], tmp_path / "run", empty_text_fea=world[3])
    assert main(["--config", RECIPE, "--max-steps", "1", *run_args, "data.buckets=[[64, 64], [48, 64]]"]) == 2
    assert "multiples of 64" in capsys.readouterr().err
    assert not (tmp_path / "run" / "metrics.csv").exists()


def test_unreadable_samples_are_left_out_of_the_gradient_not_counted_as_zero(world, tmp_path):
    from training.config import load_config
    from training.loop import Trainer, trainable

    checkpoint, annotations, _, _ = world
    overrides = tiny_overrides(checkpoint, annotations, tmp_path / "run", global_batch=7)
    config = load_config(RECIPE, [*overrides, "data.clip_schedule=[{seconds: 1}]", "train.max_steps=1"])
    trainer = Trainer(config, tmp_path / "run")
    loaded = next(iter(trainer.batches))
    samples = [sample for sample, _ in loaded if sample is not None]
    assert len(loaded) == 7 and len(samples) == 6  # the broken clip is one of the 7 entries
    totals = trainer.accumulate([loaded], stages=3)
    assert int(totals[-2]) == 6 and int(totals[-1]) == 1
    gradients = {name: p.grad.clone() for name, p in trainable(trainer.model)}
    trainer.optimizer.zero_grad(set_to_none=True)
    trainer.task.losses(trainer.model, samples, 0)["loss"].mean().backward()
    for name, p in trainable(trainer.model):
        torch.testing.assert_close(gradients[name], p.grad, rtol=1e-5, atol=1e-7)


def torchrun(world, output, steps, *extra, fsdp=True):
    checkpoint, _, features, empty = world
    overrides = tiny_overrides(checkpoint, features, output, 4, 1, empty_text_fea=empty)
    launch_on_two_processes(["--config", RECIPE, "--max-steps", steps, *overrides, *extra], fsdp=fsdp)


def test_fsdp2_on_two_gloo_processes_writes_sharded_checkpoints_that_resume_and_export(world, tmp_path):
    """FSDP2 (`fully_shard`) on 2 CPU processes: 4 steps equal 1 process x 2 accumulation steps within 1e-5;
    each rank writes only its own shards (torch.distributed.checkpoint, no full state anywhere); 2 steps + resume +
    2 steps equal 4 steps exactly; `training.export` turns a sharded checkpoint into the app-facing weights."""
    from training.export import export

    run(world, tmp_path / "one", 4, accumulation=2)
    torchrun(world, tmp_path / "fsdp", 4)
    checkpoint = tmp_path / "fsdp" / "checkpoint-4"
    state = json.loads((checkpoint / "training_state" / "state.json").read_text())
    assert state["world_size"] == 2 and state["fsdp"] is True
    shards = sorted((checkpoint / "training_state" / "sharded").glob("*.distcp"))
    assert [p.name for p in shards] == ["__0_0.distcp", "__1_0.distcp"]  # one file per rank
    total = sum(p.stat().st_size for p in shards)
    assert all(p.stat().st_size < 0.75 * total for p in shards)  # each holds its part, not the whole state
    assert not (checkpoint / WEIGHTS).exists() and not (checkpoint / "training_state" / "optimizer.pt").exists()
    assert losses(tmp_path / "fsdp") == pytest.approx(losses(tmp_path / "one"), rel=1e-5)
    exported = export(checkpoint, tmp_path / "release")
    ema = Path(str(WEIGHTS.parent) + "_ema") / WEIGHTS.name
    for name in (WEIGHTS, ema):
        one, two = load_file(tmp_path / "one" / "checkpoint-4" / name), load_file(exported / name)
        assert one.keys() == two.keys() and all(torch.allclose(one[k], two[k], atol=1e-5) for k in one)
    torchrun(world, tmp_path / "resumed", 2)
    torchrun(world, tmp_path / "resumed", 4, "--resume", "auto")
    resumed = export(tmp_path / "resumed" / "checkpoint-4", tmp_path / "resumed-release")
    for name in (WEIGHTS, ema):
        straight, again = load_file(exported / name), load_file(resumed / name)
        assert all(torch.equal(straight[k], again[k]) for k in straight)
    assert losses(tmp_path / "resumed") == losses(tmp_path / "fsdp")


def test_export_refuses_a_checkpoint_that_is_not_sharded(world, tmp_path, capsys):
    from training.export import main as export_main

    run(world, tmp_path / "one", 1)
    assert export_main([str(tmp_path / "one" / "checkpoint-1"), "--out", str(tmp_path / "release")]) == 2
    assert "is not a sharded checkpoint" in capsys.readouterr().err and not (tmp_path / "release").exists()


def test_accelerate_launch_cpu_with_several_processes_is_refused(world, tmp_path):
    checkpoint, _, features, empty = world
    overrides = tiny_overrides(checkpoint, features, tmp_path / "run", 4, 1, empty_text_fea=empty)
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(CONFIG_DIR / "accelerate" / "fsdp_single_node.yaml"), "--num_processes", "2", "--cpu",
               "--mixed_precision", "no", "-m", "training.launch", "--config", RECIPE, "--max-steps", "1", *overrides]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and "started one process" in result.stderr
    assert not (tmp_path / "run" / "checkpoint-1").exists()
