"""Per-block FSDP2 (issue 36): 2 gloo processes, each transformer block its own unit, train as one process does."""
import csv
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.training_helpers import FLOW_RECIPE as RECIPE
from tests.training_helpers import WEIGHTS, launch_on_two_processes, precompute_features, tiny_overrides, tiny_world
from training.launch import main


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    checkpoint, annotations = tiny_world(root, videos=3, images=3)
    return checkpoint, *precompute_features(checkpoint, annotations, root / "features")


def losses(output):
    with (Path(output) / "metrics.csv").open() as handle:
        return [float(row["loss"]) for row in csv.DictReader(handle)]


def overrides(world, output, accumulation, *extra):
    checkpoint, features, empty = world
    return [*tiny_overrides(checkpoint, features, output, 4, accumulation, empty_text_fea=empty),
            "model.gradient_checkpointing=true", *extra]  # activation checkpointing per block, inside the units


def test_per_block_fsdp_on_two_gloo_processes_matches_one_process(world, tmp_path):
    from training.export import export

    assert main(["--config", RECIPE, "--max-steps", "3", *overrides(world, tmp_path / "one", 2)]) == 0
    result = launch_on_two_processes(["--config", RECIPE, "--max-steps", 3, *overrides(world, tmp_path / "two", 1)])
    assert "FSDP2: 2 block units and the root" in result.stderr  # the tiny miniFLUX: 1 dual + 1 single block
    assert losses(tmp_path / "two") == pytest.approx(losses(tmp_path / "one"), rel=1e-5)
    one = load_file(tmp_path / "one" / "checkpoint-3" / WEIGHTS)
    two = load_file(export(tmp_path / "two" / "checkpoint-3", tmp_path / "release") / WEIGHTS)
    assert one.keys() == two.keys()
    assert all(torch.allclose(one[k], two[k], atol=1e-5) for k in one)
