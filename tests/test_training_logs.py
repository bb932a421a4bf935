"""What a run reports (issue 36): the VAE phase's logged loss is the loss it optimises; tokens/s, MFU and peak
memory per step; trackers chosen by train.report_to."""
import csv
import math
from pathlib import Path

import pytest
from accelerate import Accelerator

from tests.training_helpers import tiny_world
from training.config import CONFIG_DIR
from training.launch import main


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
