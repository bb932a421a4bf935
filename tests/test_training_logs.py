"""What a run reports (issue 36): the VAE phase's logged loss is the loss it optimises; tokens/s, MFU and peak
memory per step; trackers chosen by train.report_to."""
import csv
import logging
import math
import resource
from pathlib import Path

import pytest
from accelerate import Accelerator

from tests.training_helpers import precompute_features, tiny_overrides, tiny_world
from training.config import CONFIG_DIR, load_config
from training.launch import main

RECIPE = str(CONFIG_DIR / "tiny_shapes_flow.yaml")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return tiny_world(tmp_path_factory.mktemp("world"), videos=2, images=2)


def rows(output: Path) -> list:
    with (output / "metrics.csv").open() as handle:
        return list(csv.DictReader(handle))


def vae_overrides(checkpoint, annotations, output) -> list:
    return [f"model.pretrained={checkpoint}", f"data.annotations=[{annotations}]", "data.buckets=[[64, 64]]",
            "data.clip_schedule=[{seconds: 1}]", "train.global_batch_size=2", "train.mixed_precision=no",
            f"train.output_dir={output}", "train.checkpoint_every=100", "train.log_every=1"]


def test_the_vae_phase_reports_the_loss_it_optimises(world, tmp_path, monkeypatch):
    """The tiny bundle's VAE recipe logged loss=nan (its samples carry no stage, and the samples read were counted
    by stage); the logged loss is now the mean loss whose gradient is taken."""
    checkpoint, annotations = world
    optimised, backward = [], Accelerator.backward
    monkeypatch.setattr(Accelerator, "backward", lambda self, loss, **kw: (optimised.append(float(loss.detach())),
                                                                           backward(self, loss, **kw))[1])
    output = tmp_path / "vae"
    assert main(["--config", str(CONFIG_DIR / "tiny_shapes_vae.yaml"), "--max-steps", "2",
                 *vae_overrides(checkpoint, annotations, output)]) == 0
    logged = [float(row["loss"]) for row in rows(output)]
    assert len(logged) == len(optimised) == 2 and all(math.isfinite(v) for v in logged)
    assert logged == pytest.approx(optimised, rel=1e-6)


def flow_run(world, output, *extra) -> list:
    checkpoint, annotations = world
    return ["--config", RECIPE, "--max-steps", "2", *tiny_overrides(checkpoint, annotations, output), *extra]


def test_each_step_logs_tokens_per_second_and_peak_memory_and_says_why_there_is_no_mfu(world, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    assert main(flow_run(world, tmp_path / "run")) == 0
    logged = rows(tmp_path / "run")
    assert len(logged) == 2 and all(float(row["tokens_per_s"]) > 0 for row in logged)
    own_peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    assert all(0.05 < float(row["peak_memory_gib"]) <= own_peak_gib for row in logged)
    assert "mfu" not in logged[0] and "no peak FLOP/s is known for cpu" in caplog.text  # no invented CPU peak


def test_mfu_is_six_n_d_over_the_datasheet_peak(monkeypatch):
    import torch

    import training.logs as logs

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    utilisation = logs.Utilisation(parameters=1_000_000_000, device=torch.device("cuda", 0), world=8)
    assert utilisation(tokens=8 * 989.4e12 / 6e9 / 2, elapsed=1.0) == pytest.approx(0.5)


@pytest.mark.parametrize("report_to, files", [("none", set()), ("csv", {"metrics.csv"}),
                                              ("[tensorboard]", {"logs"}), ("[tensorboard, csv]", {"logs", "metrics.csv"})])
def test_report_to_picks_the_trackers(world, tmp_path, report_to, files):
    assert main(flow_run(world, tmp_path / "run", f"train.report_to={report_to}", "train.checkpoint_every=100")) == 0
    assert {p.name for p in (tmp_path / "run").iterdir()} - {"checkpoint-2"} == files


def test_report_to_wandb_without_the_package_is_a_sentence(world, tmp_path, capsys):
    from accelerate.utils import is_wandb_available

    if is_wandb_available():
        pytest.skip("wandb is installed here")
    assert main(flow_run(world, tmp_path / "run", "train.report_to=wandb")) == 2
    assert "train.report_to names wandb but the wandb package is not installed" in capsys.readouterr().err


def test_validation_under_fsdp_renders_the_ema_weights_gathered_on_rank_0(tmp_path):
    """2 gloo processes, FSDP2: the step-2 render equals one made by the app from the exported EMA weights."""
    from model_core.media_files import read_video, write_video
    from model_core.pipeline import PyramidFlowPipeline
    from tests.test_training_loop import torchrun
    from training.export import export

    checkpoint, annotations = tiny_world(tmp_path / "world", videos=2, images=2)
    features = precompute_features(checkpoint, annotations, tmp_path / "features")
    validation = ["validation.every_steps=2", "validation.num_frames=9", "validation.first_frame_steps=[1, 1, 1]",
                  "validation.video_steps=[1, 1, 1]"]
    torchrun((checkpoint, annotations, *features), tmp_path / "fsdp", 2, *validation)
    rendered, _ = read_video(tmp_path / "fsdp" / "samples" / "step-2" / "00.mp4")
    assert not (tmp_path / "fsdp" / "samples" / "step-2" / "weights").exists()  # the scratch weights are gone
    release = export(tmp_path / "fsdp" / "checkpoint-2", tmp_path / "release")
    recipe = load_config(RECIPE)["validation"]
    pipe = PyramidFlowPipeline.from_pretrained(release, variant="384p_ema")
    result = pipe.text_to_video(recipe["prompts"][0], seed=0, num_frames=9, height=64, width=64,
                                guidance_scale=recipe["guidance_scale"], video_guidance_scale=recipe["video_guidance_scale"],
                                first_frame_steps=(1, 1, 1), video_steps=(1, 1, 1))
    write_video(result.frames[0], tmp_path / "app.mp4", result.fps, result.settings)
    assert (read_video(tmp_path / "app.mp4")[0] == rendered).all()
