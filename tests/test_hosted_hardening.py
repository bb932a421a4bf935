"""What a stranger can reach through the studio's API: no server file on a client's word, no upload that costs more
memory than its budget, no queue beyond the server's caps, no other session's queue."""
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from gradio_client import Client, handle_file

from benchmarks import hosted_probes
from model_core.media_files import read_metadata, read_video, write_image, write_video
from pyramid_app.studio import serve, layout as studio
from pyramid_app.studio.queue_panel import ADDRESS_QUEUE_CAP, Admission
from test_studio import FAST, free_port, slowed_pipelines
from tiny_checkpoint import build_tiny_checkpoint

QUEUE_TIMEOUT_S = 120
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "team-model")


def serve_studio(model, output_dir, hosted, pipelines=None):
    flags = serve.parse_flags(["--port", str(free_port()), "--output-dir", str(output_dir), "--no-browser",
                               "--model", str(model)] + (["--hosted"] if hosted else []))
    demo = studio.build_studio(output_dir=output_dir, models=flags.model, hosted=hosted, pipelines=pipelines)
    _, url, _ = serve.launch(demo, flags, block=False)
    return demo, url.rstrip("/")


@pytest.fixture(scope="module", params=["hosted", "local"])
def studio_url(request, tiny_model, tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("outputs")
    demo, url = serve_studio(tiny_model, output_dir, request.param == "hosted")
    yield url, output_dir
    demo.close()


@pytest.fixture(scope="module")
def server_files(tmp_path_factory):
    """Files on the server's disk that no client uploaded: a readable image and clip, and a FIFO."""
    folder = tmp_path_factory.mktemp("server-files")
    ramp = np.ascontiguousarray(np.broadcast_to(np.arange(64, dtype=np.uint8)[None, :, None] * 4, (64, 64, 3)))
    write_image(ramp, folder / "secret.png", {})
    write_video(np.ascontiguousarray(np.broadcast_to(ramp, (9, 64, 64, 3))), folder / "secret.mp4", 8, {})
    os.mkfifo(folder / "pipe")
    return [str(folder / "secret.png"), str(folder / "secret.mp4"), str(folder / "pipe"), "/nope/x.png", "/etc/passwd"]


def call_with(url, endpoint, values) -> tuple:
    params = {name: default for name, default in hosted_probes.endpoint_parameters(url, endpoint)}
    values = params | {name: value for name, value in values.items() if name in params}
    return hosted_probes.call(url, endpoint, [values[name] for name in params])


def test_a_path_without_an_upload_is_refused_on_every_file_input(studio_url, server_files):
    """Every form of naming a server file (a bare path dict, one with Gradio's meta) on every file input of every
    endpoint gets one and the same sentence, whether the file exists, is readable, is a FIFO or is missing."""
    url, output_dir = studio_url
    inputs = hosted_probes.file_inputs(url)
    assert {endpoint for endpoint, _ in inputs} >= {"image_to_video", "extend_video", "queue_image_to_video",
                                                   "queue_extend_video"}
    before = sorted(output_dir.rglob("*"))
    for endpoint, parameter in inputs:
        answers = set()
        for path in server_files:
            for payload in ({"path": path}, {"path": path, "meta": {"_type": "gradio.FileData"}}, path):
                kind, reply = call_with(url, endpoint, {**FAST, "prompt": "a ball", parameter: payload})
                assert kind == "error", (endpoint, payload, reply)
                answers.add(reply["error"])
        assert len(answers) == 1, (endpoint, answers)
        answer = answers.pop()
        assert "uploaded to this studio" in answer and not any(part in answer for part in ("/", "secret", "pipe"))
    assert sorted(output_dir.rglob("*")) == before  # nothing generated, nothing queued


def test_an_upload_on_the_same_input_is_accepted(studio_url, tmp_path):
    url, _ = studio_url
    ramp = np.ascontiguousarray(np.broadcast_to(np.arange(64, dtype=np.uint8)[None, :, None] * 4, (64, 64, 3)))
    write_image(ramp, tmp_path / "mine.png", {})
    kind, _ = call_with(url, "image_to_video", {**FAST, "prompt": "a ball", "num_frames": 9,
                                                "image": hosted_probes.upload(url, tmp_path / "mine.png")})
    assert kind == "complete"


MEMORY_CHILD = """
import json, resource, sys
from pathlib import Path
from model_core.checkpoints import VariantSpec
from pyramid_app.studio.uploads import HOSTED_DECODE_BYTES, DecodeBudget, decoded_upload
mode, path, height, width = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
spec = VariantSpec(height=height, width=width, max_latent_frames=31)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    shape, refused = list(decoded_upload(mode, Path(path), spec, DecodeBudget(HOSTED_DECODE_BYTES)).shape), None
except ValueError as error:
    shape, refused = None, str(error)
grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
print(json.dumps({"shape": shape, "refused": refused, "grown_mib": grown}))
"""


def decode_in_child(mode, path, height, width) -> dict:
    done = subprocess.run([sys.executable, "-c", MEMORY_CHILD, mode, str(path), str(height), str(width)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_an_amplification_clip_is_decoded_at_the_models_size(tmp_path):
    """11 KB on disk, 0.7 GB at its own size: decoded at 64p it costs a few MiB; at 768p it is refused before a
    frame is decoded, since it would exceed the hosted decode budget."""
    clip = hosted_probes.amplification_clip(tmp_path / "flat.mp4")
    small = decode_in_child("extend_video", clip, 64, 64)
    assert small["shape"] == [241, 64, 107, 3] and small["grown_mib"] < 100, small
    large = decode_in_child("extend_video", clip, 768, 1280)
    assert large["shape"] is None and "at most 256 MiB" in large["refused"] and large["grown_mib"] < 30, large


def test_a_huge_image_is_scaled_down_while_decoding(tmp_path):
    image = hosted_probes.amplification_image(tmp_path / "big.png")
    small = decode_in_child("image_to_video", image, 64, 64)
    assert small["shape"] == [64, 64, 3] and small["grown_mib"] < 150, small


def test_admission_caps_the_server_and_each_address_and_expires_old_jobs():
    now = [0.0]
    admission = Admission(server_cap=4, address_cap=2, per_minute=3, max_age=60, clock=lambda: now[0])
    waiting = set()

    def add(address, job):
        admission.admit(address, set(waiting), job)
        waiting.add(job)

    add("1.1.1.1", "a")
    add("1.1.1.1", "b")
    with pytest.raises(ValueError, match="already have 2 jobs waiting"):
        add("1.1.1.1", "c")  # however many sessions it opens
    add("2.2.2.2", "c")
    add("3.3.3.3", "d")
    with pytest.raises(ValueError, match=r"queue is full \(4 jobs waiting\)"):
        add("4.4.4.4", "e")
    waiting -= {"a", "b"}  # ran
    add("1.1.1.1", "f")
    with pytest.raises(ValueError, match="at most 3 jobs may be queued a minute"):
        add("1.1.1.1", "g")
    now[0] = 61.0
    with pytest.raises(ValueError, match="expired: it waited more than 1 minutes"):
        admission.check_fresh("c")
    add("1.1.1.1", "h")  # a minute later the rate allows it again
    admission.check_fresh("h")


def drained(output_dir: Path) -> None:
    """Wait until no queued job under `output_dir` waits or runs (a queue worker still in torch when the test
    process exits would abort it)."""
    deadline = time.monotonic() + QUEUE_TIMEOUT_S
    while time.monotonic() < deadline:
        states = [job["state"] for path in output_dir.rglob("queue.json") for job in json.loads(path.read_text())["jobs"]]
        if all(state in ("done", "failed") for state in states):
            return
        time.sleep(0.3)
    raise AssertionError(f"queued jobs still {states} after {QUEUE_TIMEOUT_S} s")


def test_twelve_fresh_clients_cannot_queue_beyond_the_cap(tiny_model, tmp_path):
    """Each gradio_client is a new session; from one address they share the address's cap."""
    demo, url = serve_studio(tiny_model, tmp_path / "outputs", hosted=True,
                             pipelines=slowed_pipelines(tiny_model, 0.3))
    try:
        accepted, refusals = 0, set()
        for _ in range(12):
            client = Client(url, verbose=False, download_files=False)
            try:
                client.predict("a red ball", num_frames=9, **FAST, api_name="/queue_text_to_video")
                accepted += 1
            except Exception as error:  # gradio_client raises AppError with the sentence
                refusals.add(str(error).splitlines()[0])
        assert accepted <= ADDRESS_QUEUE_CAP + 1, accepted  # the first may already run: it waits no more
        assert refusals and all("jobs" in refusal for refusal in refusals), refusals
        drained(tmp_path / "outputs")
    finally:
        demo.close()


def test_a_hosted_queue_is_not_reachable_by_its_session_hash(tiny_model, tmp_path):
    output_dir = tmp_path / "outputs"
    demo, url = serve_studio(tiny_model, output_dir, hosted=True)
    try:
        client = Client(url, verbose=False, download_files=False)
        rows, _ = client.predict("a red ball", num_frames=9, **FAST, api_name="/queue_text_to_video")
        assert [row[3] for row in rows["data"]] == ["a red ball"]
        session = client.session_hash
        queue_files = list(output_dir.rglob("queue.json"))
        assert len(queue_files) == 1 and session not in str(queue_files[0])
        for guess in (output_dir / "queues" / session / "queue.json", output_dir / session / "queue.json"):
            with pytest.raises(urllib.error.HTTPError):
                urllib.request.urlopen(f"{url}/gradio_api/file={guess}", timeout=30)
        stranger = Client(url, verbose=False, download_files=False)
        rows, _ = stranger.predict("a blue cube", num_frames=9, **FAST, api_name="/queue_text_to_video")
        assert [row[3] for row in rows["data"]] == ["a blue cube"]  # only its own job
        drained(output_dir)
    finally:
        demo.close()


@pytest.mark.parametrize("hosted", [True, False], ids=["hosted", "local"])
def test_queued_image_to_video_and_extension_complete(tiny_model, tmp_path, hosted):
    output_dir = tmp_path / "outputs"
    demo, url = serve_studio(tiny_model, output_dir, hosted=hosted)
    ramp = np.ascontiguousarray(np.broadcast_to(np.arange(64, dtype=np.uint8)[None, :, None] * 4, (64, 64, 3)))
    write_image(ramp, tmp_path / "start.png", {})
    write_video(np.ascontiguousarray(np.broadcast_to(ramp, (9, 64, 64, 3))), tmp_path / "start.mp4", 8, {})
    try:
        client = Client(url, verbose=False, download_files=False)
        client.predict(handle_file(str(tmp_path / "start.png")), "it drifts", num_frames=9, seed="3", **FAST,
                       api_name="/queue_image_to_video")
        client.predict(handle_file(str(tmp_path / "start.mp4")), "it goes on", num_frames=8, seed="4",
                       **FAST, api_name="/queue_extend_video")
        deadline = time.monotonic() + QUEUE_TIMEOUT_S
        while time.monotonic() < deadline:
            jobs = [json.loads(path.read_text())["jobs"] for path in output_dir.rglob("queue.json")]
            states = [job["state"] for queue in jobs for job in queue]
            if len(states) == 2 and all(state in ("done", "failed") for state in states):
                break
            time.sleep(0.3)
        queue, = jobs
        assert [job["state"] for job in queue] == ["done", "done"], [job["error"] for job in queue]
        folder = next(output_dir.rglob("queue.json")).parent
        animated, extended = (folder / job["output"] for job in queue)
        assert read_metadata(animated)["mode"] == "image_to_video" and len(read_video(animated)[0]) == 9
        assert read_metadata(extended)["mode"] == "extend_video" and len(read_video(extended)[0]) == 17
    finally:
        demo.close()


def test_sessions_that_only_look_at_their_queue_are_not_remembered(tiny_model, tmp_path):
    import threading

    from pyramid_app.studio.sessions import PipelineCache
    from pyramid_app.jobs.output_file import save
    from pyramid_app.studio.outputs import SessionOutputs
    from pyramid_app.jobs.runner import read_input_file
    from pyramid_app.studio.queue_panel import StudioQueues

    outputs = SessionOutputs(tmp_path, hosted=True)
    queues = StudioQueues(tmp_path, PipelineCache(), threading.Lock(), save, read_input_file,
                          session_folder=outputs.folder)
    for session in range(200):
        assert queues.queue(f"visitor-{session}").jobs == []
    assert queues._queues == {} and not any(tmp_path.iterdir())
    kept = queues.queue("worker", keep=True)
    assert queues.queue("worker") is kept


def test_concurrent_decodes_share_one_budget():
    from pyramid_app.studio.uploads import DecodeBudget

    budget = DecodeBudget(100, wait=0.1)
    with budget.reserve(70, "clip"):
        with pytest.raises(ValueError, match="decoding other uploads"):
            with budget.reserve(40, "clip"):
                pass
    with budget.reserve(100, "clip"):  # released again
        pass
    with pytest.raises(ValueError, match="at most 0 MiB"):
        with budget.reserve(101, "clip"):
            pass
