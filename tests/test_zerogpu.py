"""The hosted studio on a ZeroGPU Space: the real generation handler runs through `tests/zerogpu/spaces.py`, which
forks a worker and pickles what crosses as the `spaces` package does. A video comes back, previews stream, Stop
reaches the worker, and every GPU call sees the visitor's request and asks for a duration."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from gradio_client import Client

from benchmarks import hosted_probes
from model_core.media_files import read_metadata
from test_studio import FAST, free_port, local_path
from tiny_checkpoint import build_tiny_checkpoint

ROOT = Path(__file__).resolve().parents[1]
HARNESS = Path(__file__).resolve().parent / "zerogpu"


@pytest.fixture(scope="module")
def space(tmp_path_factory):
    """`pyramid-flow-studio --hosted` with the stand-in `spaces` importable, as on a ZeroGPU Space."""
    work = tmp_path_factory.mktemp("space")
    model = build_tiny_checkpoint(work / "team-model")
    port, log = free_port(), work / "zerogpu.jsonl"
    environment = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HARNESS), str(ROOT)]), ZEROGPU_HARNESS_LOG=str(log),
                       GRADIO_TEMP_DIR=str(work / "cache"), GRADIO_ANALYTICS_ENABLED="False", HF_HUB_OFFLINE="1")
    server = subprocess.Popen(
        [sys.executable, "app.py", "--hosted", "--no-browser", "--port", str(port), "--model",
         str(model), "--output-dir", str(work / "outputs")], cwd=ROOT, env=environment,
        stdout=open(work / "server.log", "w"), stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while True:
        try:
            hosted_probes.get_json(url + "/gradio_api/info", timeout=5)
            break
        except (OSError, ValueError):
            assert server.poll() is None and time.monotonic() < deadline, (work / "server.log").read_text()[-3000:]
            time.sleep(0.5)
    yield url, log, work
    server.terminate()
    server.wait(timeout=30)


def calls(log: Path) -> list:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.is_file() else []


def test_a_video_comes_back_with_previews_through_the_forked_worker(space):
    url, log, _ = space
    client = Client(url, verbose=False, download_files=False)
    job = client.submit("a red ball", 17, seed="5", **FAST, api_name="/text_to_video")
    video, frames, status, seed = job.result(timeout=300)
    assert status.startswith("Saved") and seed == "5" and len(frames) == 17
    assert read_metadata(local_path(video))["num_frames"] == 17
    previews = [outputs[1] for outputs in job.outputs() if isinstance(outputs[1], list) and outputs[1]]
    assert len(previews) >= 2 and len(previews[0]) < 17  # the first unit's frames came before the end
    call, = calls(log)
    assert call["request"] and call["duration"] >= 60 and call["argument_bytes"] < 100_000  # no model crossed


def test_stop_reaches_the_worker_and_keeps_the_finished_units(space):
    url, log, _ = space
    before = len(calls(log))
    client = Client(url, verbose=False, download_files=False)
    slow = {f"video_steps_stage_{stage}": 30 for stage in (1, 2, 3)}
    job = client.submit("a slow ball", 17, seed="7", **FAST | slow, api_name="/text_to_video")
    deadline = time.monotonic() + 300
    while not hosted_probes.frames_streamed(job) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert client.predict(api_name="/stop").startswith("Stopping")
    video, frames, status, _ = job.result(timeout=300)
    settings = read_metadata(local_path(video))
    assert status.startswith("Stopped") and settings["interrupted"] and settings["num_frames"] < 17
    assert len(calls(log)) == before + 1
