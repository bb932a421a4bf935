"""Per-block FSDP2 (issue 36): 2 gloo processes, each transformer block its own unit, train as one process does."""
import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.training_helpers import precompute_features, tiny_overrides, tiny_world
from training.config import CONFIG_DIR
from training.launch import main

ROOT = Path(__file__).resolve().parents[1]
RECIPE = str(CONFIG_DIR / "tiny_shapes_flow.yaml")
WEIGHTS = Path("diffusion_transformer_384p") / "diffusion_pytorch_model.safetensors"


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
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "ACCELERATE_USE_FSDP": "true", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone", "-m",
               "training.launch", "--config", RECIPE, "--max-steps", "3", *overrides(world, tmp_path / "two", 1)]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "FSDP2: 2 block units and the root" in result.stderr  # the tiny miniFLUX: 1 dual + 1 single block
    assert losses(tmp_path / "two") == pytest.approx(losses(tmp_path / "one"), rel=1e-5)
    one = load_file(tmp_path / "one" / "checkpoint-3" / WEIGHTS)
    two = load_file(export(tmp_path / "two" / "checkpoint-3", tmp_path / "release") / WEIGHTS)
    assert one.keys() == two.keys()
    assert all(torch.allclose(one[k], two[k], atol=1e-5) for k in one)
