"""Stages chain under FSDP (issue 36): a later stage starts from an earlier stage's sharded checkpoint-N directly,
and `training.export` writes a release folder that loads after it is copied elsewhere and the base is gone."""
import shutil

import pytest
import torch
from safetensors.torch import load_file

from tests.test_training_loop import RECIPE, WEIGHTS, torchrun
from tests.training_helpers import precompute_features, tiny_overrides, tiny_world
from training.config import load_config
from training.launch import main


@pytest.fixture(scope="module")
def sharded_run(tmp_path_factory):
    """(world, a base checkpoint of its own, the finished sharded checkpoint-2 of a 2-process FSDP2 run from it)."""
    root = tmp_path_factory.mktemp("stages")
    checkpoint, annotations = tiny_world(root, videos=2, images=2)
    world = (checkpoint, annotations, *precompute_features(checkpoint, annotations, root / "features"))
    base = root / "base"
    shutil.copytree(checkpoint, base)
    torchrun((base, *world[1:]), root / "stage1", 2)
    return world, base, root / "stage1" / "checkpoint-2"


def test_a_stage_starts_from_a_sharded_checkpoint_directly(sharded_run, tmp_path):
    from training.export import export
    from training.loop import Trainer

    world, _, sharded = sharded_run
    checkpoint, _, features, empty = world
    overrides = tiny_overrides(checkpoint, features, tmp_path / "stage2", 4, 1, empty_text_fea=empty)
    config = load_config(RECIPE, [*overrides, f"model.pretrained={sharded}", "train.max_steps=1"])
    started = {k: v.clone() for k, v in Trainer(config, tmp_path / "stage2").task.model.state_dict().items()}
    exported = load_file(export(sharded, tmp_path / "export") / WEIGHTS)
    assert started.keys() == exported.keys() and all(torch.equal(started[k], exported[k]) for k in started)
    base = load_file(checkpoint / WEIGHTS)
    assert not all(torch.equal(started[k], base[k]) for k in started)  # the trained weights, not the base's
    assert main(["--config", RECIPE, *overrides, f"model.pretrained={sharded}", "--max-steps", "1",
                 f"train.output_dir={tmp_path / 'stage2-run'}"]) == 0
    assert (tmp_path / "stage2-run" / "checkpoint-1" / WEIGHTS).is_file()


def test_an_export_copied_elsewhere_loads_without_its_base(sharded_run, tmp_path):
    from model_core.pipeline import PyramidFlowPipeline
    from training.export import export

    _, base, sharded = sharded_run
    release = export(sharded, tmp_path / "release")
    assert not [p for p in release.rglob("*") if p.is_symlink()]
    moved = shutil.copytree(release, tmp_path / "elsewhere" / "release", symlinks=True)
    shutil.rmtree(release)
    shutil.rmtree(base)  # what the run's checkpoints linked to is gone
    pipe = PyramidFlowPipeline.from_pretrained(moved, device="cpu")
    result = pipe.text_to_video("a red square", num_frames=1, height=64, width=64, first_frame_steps=(1, 1, 1), seed=0)
    assert torch.isfinite(torch.as_tensor(result.frames[0], dtype=torch.float32)).all()
