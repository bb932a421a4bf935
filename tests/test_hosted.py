"""A `--hosted` studio driven over HTTP as strangers and hostile clients would: malformed inputs, foreign models,
cancel, oversized uploads, two sessions."""
import os
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from gradio_client import Client, handle_file

from benchmarks import hosted_probes
from pyramid_app.studio import serve, layout as studio
from pyramid_app.options.catalog import ModelMenu
from test_studio import FAST, free_port, local_path, slowed_pipelines
from tiny_checkpoint import build_tiny_checkpoint

SECONDS_PER_STEP = 0.05


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "team-model")


@pytest.fixture(scope="module")
def steps(tiny_model):
    """Transformer calls so far (the transformer slowed by SECONDS_PER_STEP each, so cancel lands mid-unit)."""
    return []


@pytest.fixture(scope="module")
def hosted(tiny_model, steps, tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("outputs")
    pipelines = slowed_pipelines(tiny_model, SECONDS_PER_STEP)
    pipelines.get(next(iter(pipelines._loaded))).transformer.register_forward_hook(
        lambda module, args, output: steps.append(time.monotonic()))
    flags = serve.parse_flags(["--port", str(free_port()), "--output-dir", str(output_dir), "--no-browser",
                               "--hosted", "--model", str(tiny_model)])
    demo = studio.build_studio(output_dir=output_dir, pipelines=pipelines, models=flags.model, hosted=True)
    _, url, _ = serve.launch(demo, flags, block=False)
    yield url.rstrip("/"), output_dir
    demo.close()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return hosted_probes.probe_files(tmp_path_factory.mktemp("probe-files"))


def test_hosted_is_on_by_itself_on_a_space(monkeypatch):
    monkeypatch.setenv("SPACE_ID", "someone/studio")
    assert serve.parse_flags([]).hosted
    monkeypatch.delenv("SPACE_ID")
    assert not serve.parse_flags([]).hosted
    assert serve.parse_flags(["--model", "a", "--model", "b"]).model == ["a", "b"]


def test_logins_come_from_an_auth_file(tmp_path):
    logins = tmp_path / "logins.txt"
    logins.write_text("alice:secret\n\nbob:pa:ss\n")
    assert serve.logins(logins) == [("alice", "secret"), ("bob", "pa:ss")]
    assert serve.logins(None) is None
    logins.write_text("alice\n")
    with pytest.raises(SystemExit, match="one user:password per line"):
        serve.logins(logins)


def test_the_allow_list_offers_operator_folders_by_name(tiny_model):
    menu = ModelMenu([str(tiny_model)], hosted=True)
    values = [value for _, value in menu.choices()]
    assert values == ["team-model", "bundled", "bundled-turbo", "rain1011/pyramid-flow-miniflux", "rain1011/pyramid-flow-sd3"]
    assert menu.source_for("team-model") == str(tiny_model.resolve())
    assert not any(str(tiny_model) in label for label, _ in menu.choices())
    with pytest.raises(ValueError, match="offers only these models"):
        menu.source_for(str(tiny_model))  # its path is not a menu value
    assert ModelMenu([str(tiny_model)]).source_for("/any/folder") == "/any/folder"  # local mode: free choice


def test_every_malformed_input_gets_a_sentence(hosted, files):
    """At least 50 malformed inputs across the four endpoints and every parameter: each refused with a sentence."""
    url, _ = hosted
    samples = {"prompt": "a ball", "image": "!file:ok.png", "video": "!file:ok.mp4"}
    rows = hosted_probes.run_probes(url, files, samples)
    assert len(rows) >= 50 and {row["endpoint"] for row in rows} == set(hosted_probes.ENDPOINTS)
    parameters = {name for names in hosted_probes.parameters(url).values() for name, _ in names}
    probed = {row["what"].split(":")[0] for row in rows}
    assert parameters <= probed
    bad = [row for row in rows if row["verdict"] != "clean"]
    assert not bad, bad


def test_foreign_models_get_the_same_sentence_whether_or_not_they_exist(hosted, tmp_path):
    url, _ = hosted
    params = hosted_probes.parameters(url)["text_to_image"]
    answers = set()
    for model in (str(tmp_path), str(tmp_path / "missing"), "/etc", "someone/arbitrary-repo"):
        values = {name: default for name, default in params} | FAST | {"prompt": "a ball", "model": model}
        answers.add(hosted_probes.classify(*hosted_probes.call(url, "text_to_image", [values[name] for name, _ in params])))
    assert len(answers) == 1
    verdict, message = answers.pop()
    assert verdict == "clean" and message.startswith("This studio offers only these models: bundled,")
    assert "/" + tmp_path.name not in message


def test_strangers_pick_the_step_cache_but_not_the_backend_or_compiling(hosted):
    """Both would rebuild or recompile the one shared model; the per-call step cache is every client's to pick."""
    url, _ = hosted
    params = hosted_probes.parameters(url)["text_to_image"]
    base = {name: default for name, default in params} | FAST | {"prompt": "a ball"}
    for change in ({"compile": True}, {"attention_backend": "flex"}):
        verdict, message = hosted_probes.classify(*hosted_probes.call(
            url, "text_to_image", [(base | change)[name] for name, _ in params]))
        assert verdict == "clean" and "attention backend and compiling are the server's" in message
    verdict, message = hosted_probes.classify(*hosted_probes.call(
        url, "text_to_image", [(base | {"cache": "first-block", "cache_threshold": 0.3})[name] for name, _ in params]))
    assert verdict == "accepted", message


def test_cancel_returns_at_once_and_the_run_stops_within_a_step(hosted, steps):
    url, _ = hosted
    client = Client(url, verbose=False, download_files=False)
    slow = {name: 20 for name in hosted_probes.STEP_NAMES[3:]}  # first unit quick, later units 60 steps
    job = client.submit("a slow ball", seed="1", **FAST | slow, api_name="/text_to_video")
    deadline = time.monotonic() + 60
    while not hosted_probes.frames_streamed(job) and time.monotonic() < deadline:  # the first unit has streamed in
        time.sleep(0.02)
    time.sleep(0.3)  # well inside the second unit
    info_seconds, done = [], threading.Event()

    def watch():
        while not done.is_set():
            started = time.monotonic()
            urllib.request.urlopen(url + "/gradio_api/info", timeout=30).read()
            info_seconds.append(time.monotonic() - started)

    watcher = threading.Thread(target=watch)
    watcher.start()
    started = time.monotonic()
    job.cancel()
    cancel_seconds = time.monotonic() - started
    calls_at_cancel = len(steps)
    time.sleep(1.0)
    done.set()
    watcher.join()
    assert cancel_seconds < 2 and max(info_seconds) < 2
    assert len(steps) - calls_at_cancel <= 1  # the step running at the cancel, no more
    image, *_ = client.predict("a red square", **FAST, api_name="/text_to_image")  # the device is free again
    assert local_path(image).is_file()


def test_an_oversized_clip_is_refused_before_decoding(hosted, files):
    url, _ = hosted
    before = _peak_rss_mib()
    with pytest.raises(Exception) as refused:
        Client(url, verbose=False).predict(handle_file(str(files["huge.mp4"])), "", **FAST, api_name="/extend_video")
    grown = _peak_rss_mib() - before
    assert "2000×2000 pixels; at most 1280×768" in str(refused.value)
    assert grown < 100, f"peak RSS grew {grown:.0f} MiB (decoding it whole takes 458 MiB)"


def test_two_sessions_cannot_see_each_others_outputs(hosted):
    url, output_dir = hosted
    first, second = (Client(url, verbose=False, download_files=False) for _ in range(2))
    shown = [local_path(client.predict(prompt, **FAST, api_name="/text_to_image")[0])
             for client, prompt in ((first, "a blue circle"), (second, "a red circle"))]
    saved = [next(output_dir.resolve().rglob(path.name)) for path in shown]
    folders = {path.parent for path in saved}
    assert len(folders) == 2 and all(folder.parent == output_dir.resolve() and len(folder.name) == 32
                                     for folder in folders)
    assert not {folder.name for folder in folders} & {first.session_hash, second.session_hash}
    for folder in (output_dir.resolve(), *folders):  # no listing of the output folder or of a session's
        with pytest.raises(urllib.error.HTTPError):
            urllib.request.urlopen(f"{url}/gradio_api/file={folder}", timeout=30)


def test_the_app_keeps_its_own_gradio_cache(monkeypatch, tmp_path):
    monkeypatch.delenv("GRADIO_TEMP_DIR", raising=False)
    assert serve.use_own_cache() == serve.CACHE_DIR and serve.CACHE_DIR.name == "pyramid-flow-studio"
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path))
    assert serve.use_own_cache() == tmp_path  # an operator's choice stands


def test_old_hosted_outputs_are_swept(tmp_path):
    from pyramid_app.studio.outputs import SessionOutputs

    outputs = SessionOutputs(tmp_path, hosted=True, max_age=60)
    old, new = outputs.folder("a") / "old.mp4", outputs.folder("b") / "new.mp4"
    for path in (old, new):
        path.parent.mkdir()
        path.write_bytes(b"x")
    os.utime(old, (time.time() - 120, time.time() - 120))
    assert outputs.sweep() == 1 and not old.parent.exists() and new.is_file()
    assert outputs.sweep() == 0  # not again before SWEEP_INTERVAL
    assert SessionOutputs(tmp_path).folder("a") == tmp_path.resolve()  # local mode: one folder


def _peak_rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM")


def test_zerogpu_time_grows_with_frames_and_steps():
    from types import SimpleNamespace

    from pyramid_app.studio.sessions import GPU_MAX_SECONDS, GPU_MIN_SECONDS, Job, gpu_seconds
    from pyramid_app.options.settings import GenerationOptions

    spec = SimpleNamespace(max_frames=241, frames_per_latent=8)
    pipe = SimpleNamespace(spec=spec, family=SimpleNamespace(sampling=SimpleNamespace(first_frame_steps=(20, 20, 20),
                                                                                      video_steps=(10, 10, 10))))
    pipelines = SimpleNamespace(get=lambda model: pipe)  # the arguments `spaces` hands the duration function

    def seconds(frames, steps):
        options = GenerationOptions(num_frames=frames, first_frame_steps=(steps,) * 3, video_steps=(steps,) * 3)
        return gpu_seconds(pipelines, None, Job("text_to_video", "x", None, options))

    assert seconds(9, 1) == GPU_MIN_SECONDS and seconds(241, 50) == GPU_MAX_SECONDS
    assert seconds(41, 5) < seconds(81, 5) < seconds(81, 8)
    from model_core.storyboard import Storyboard

    spec.fps = 24
    board = Storyboard.coerce([(2.0, "a"), (3.0, "b")])  # 121 frames: the storyboard's seconds, not the longest clip
    options = GenerationOptions(first_frame_steps=(5,) * 3, video_steps=(5,) * 3)
    assert gpu_seconds(pipelines, None, Job("text_to_video", board, None, options)) == seconds(121, 5) < seconds(241, 5)
