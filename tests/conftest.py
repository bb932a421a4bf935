"""Test-wide environment: offline hub, no analytics, GPU tests skip without CUDA, no model load outliving its test."""
import os
import sys
import threading
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _warm_up_finished():
    """A studio loads its model on a background thread; while a load runs, diffusers builds every new module of
    the process on the meta device, so the next test must not start before it ends."""
    yield
    for thread in threading.enumerate():
        if thread.name == "pyramid-warm-up":
            thread.join()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny miniFLUX checkpoint in the official layout, one per test module (modules may define their own)."""
    from tiny_checkpoint import build_tiny_checkpoint

    return build_tiny_checkpoint(tmp_path_factory.mktemp("miniflux"), "miniflux")


@pytest.fixture(scope="module")
def pipe(checkpoint):
    """The pipeline of `checkpoint`, shared by the tests of one module."""
    from model_core import PyramidFlowPipeline

    return PyramidFlowPipeline.from_pretrained(checkpoint)

