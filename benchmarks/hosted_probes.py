"""Probe a running studio as a hostile API client would: malformed inputs, foreign models, server files named as
uploads, amplification uploads, a queue flood from fresh sessions, cancel, an oversized upload.

    python -m benchmarks.hosted_probes --app DIR [--hosted] [--model FOLDER] [--out FILE.json]

starts `python app.py` of the checkout in DIR (this one or, through `git worktree`, an earlier release) on a free
port, sends every probe over HTTP (`/gradio_api/call`, and gradio_client for the cancel and the flood), counts the
tracebacks in the server's log, and prints one table.
A probe's answer is *clean* when it is an error sentence (non-empty, no "Traceback"), *accepted* when the request
ran although it should have been refused, *failed* otherwise (an empty error, a traceback, no answer).
"""
import argparse
import concurrent.futures
import json
import math
import os
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pyramid_app.studio.blocks import FILE_INPUTS

ROOT = Path(__file__).resolve().parents[1]
BUNDLED = ROOT / "assets" / "models" / "pyramid-flow-shapes"
ENDPOINTS = ("text_to_video", "image_to_video", "extend_video", "text_to_image")
FAST = dict(guidance_scale=1, video_guidance_scale=1, **{f"{name}_stage_{stage}": 1 for name in
                                                           ("first_frame_steps", "video_steps") for stage in (1, 2, 3)})
STEP_NAMES = [f"{name}_stage_{stage}" for name in ("first_frame_steps", "video_steps") for stage in (1, 2, 3)]
HUGE = 10**6


@dataclass(frozen=True)
class Probe:
    endpoint: str
    what: str
    arguments: dict  # parameter name -> value sent; "!file:NAME" is replaced by an uploaded file
    positional: list = None  # sent as the whole data list instead (too few arguments)


def probes() -> list:
    """The malformed inputs: every endpoint, every parameter, at least one wrong type or value each."""
    found = []

    def add(endpoints, what, **arguments):
        for endpoint in endpoints:
            found.append(Probe(endpoint, what, arguments))

    text_modes, video_modes = ("text_to_video", "text_to_image"), ("text_to_video", "image_to_video", "extend_video")
    add(text_modes, "prompt: a number", prompt=123)
    add(text_modes, "prompt: a list", prompt=["a ball"])
    add(("text_to_video",), "prompt: a dict", prompt={"text": "a ball"})
    add(text_modes, "prompt: 10^6 characters", prompt="a" * HUGE)
    add(("text_to_image",), "prompt: empty", prompt="")
    add(("image_to_video", "extend_video"), "prompt: a number", prompt=5)
    add(video_modes, "num_frames: 'abc'", num_frames="abc")
    add(video_modes, "num_frames: 9.5", num_frames=9.5)
    add(("text_to_video",), "num_frames: -8", num_frames=-8)
    add(("text_to_video",), "num_frames: 10^9", num_frames=10**9)
    add(("text_to_video",), "num_frames: NaN", num_frames=math.nan)
    add(("text_to_video",), "num_frames: null", num_frames=None)
    add(ENDPOINTS, "model: a server folder (/tmp)", model=tempfile.gettempdir())
    add(("text_to_image",), "model: a missing folder", model="/no/such/folder/anywhere")
    add(("text_to_image",), "model: an arbitrary hub repo", model="someone/arbitrary-repo")
    add(("text_to_image",), "model: a number", model=7)
    add(("text_to_image", "text_to_video"), "variant: '1080p'", variant="1080p")
    add(("text_to_image",), "variant: a number", variant=3)
    add(("text_to_image",), "dtype: 'float64'", dtype="float64")
    add(("text_to_image",), "offload: 'gpu'", offload="gpu")
    add(("text_to_image",), "quantize: 'int3'", quantize="int3")
    add(("text_to_image", "text_to_video"), "vae_tiling: 'yes'", vae_tiling="yes")
    add(("text_to_image",), "negative_prompt: a number", negative_prompt=5)
    add(("text_to_image",), "negative_prompt: 10^6 characters", negative_prompt="b" * HUGE)
    add(("text_to_image",), "seed: 'abc'", seed="abc")
    add(("text_to_image",), "seed: -5", seed="-5")
    add(("text_to_image",), "seed: 2^70", seed=str(2**70))
    add(("text_to_image",), "seed: a list", seed=[1])
    add(("text_to_image", "text_to_video"), "guidance_scale: NaN", guidance_scale=math.nan)
    add(("text_to_image",), "guidance_scale: 'abc'", guidance_scale="abc")
    add(("text_to_image",), "guidance_scale: -1", guidance_scale=-1)
    add(("text_to_image",), "guidance_scale: 10^9", guidance_scale=1e9)
    add(("text_to_video",), "video_guidance_scale: infinity", video_guidance_scale=math.inf)
    add(("text_to_video",), "video_guidance_scale: null", video_guidance_scale=None)
    add(("text_to_video",), "storyboard: a number", storyboard=7)
    add(("text_to_video", "image_to_video"), "storyboard: seconds that are no number", storyboard=[["soon", "a ball"]])
    add(("text_to_video",), "storyboard: negative seconds", storyboard=[[-2, "a ball"]])
    add(("text_to_video",), "storyboard: 10^6 seconds", storyboard=[[1e6, "a ball"]])
    add(("text_to_video",), "storyboard: a row without a prompt", storyboard=[[2]])
    add(("text_to_image", "text_to_video"), "cache: 'tea'", cache="tea")
    add(("text_to_image",), "cache: a number", cache=1)
    add(("text_to_video",), "cache_threshold: NaN", cache_threshold=math.nan)
    add(("text_to_image",), "cache_threshold: -1", cache_threshold=-1)
    add(("text_to_image",), "cache_threshold: 'abc'", cache_threshold="abc")
    add(("text_to_image",), "attention_backend: 'flash3'", attention_backend="flash3")
    add(("text_to_image",), "attention_backend: a list", attention_backend=["native"])
    add(("text_to_image", "text_to_video"), "compile: 'yes'", compile="yes")
    add(("text_to_image",), "lora: a server folder (/etc)", lora="/etc")
    add(("text_to_image",), "lora: a list", lora=["style"])
    add(("text_to_image",), "lora_weight: NaN", lora_weight=math.nan)
    add(("text_to_image",), "lora_weight: 'abc'", lora_weight="abc")
    add(("text_to_image",), "lora_weight: 10^9", lora_weight=1e9)
    for index, name in enumerate(STEP_NAMES):
        bad = [0, 1000, 2.5, "abc", -3, None][index]
        add(("text_to_image" if name.startswith("first") else "text_to_video",), f"{name}: {bad!r}", **{name: bad})
    add(("image_to_video",), "image: bytes that are no image", image="!file:noise.png")
    add(("image_to_video",), "image: a 100000x100000 PNG header", image="!file:huge.png")
    add(("image_to_video",), "image: text instead of a file", image="not a file")
    add(("image_to_video",), "image: none", image=None)
    add(("extend_video",), "video: bytes that are no video", video="!file:noise.mp4")
    add(("extend_video",), "video: a 2000x2000x40-frame mp4", video="!file:huge.mp4")
    add(("extend_video",), "video: a number", video=12)
    add(("extend_video",), "video: none", video=None)
    for endpoint in ENDPOINTS:
        found.append(Probe(endpoint, "too few arguments", {}, positional=[]))
    return found


# --- files the probes upload ------------------------------------------------------------------


def huge_png_header(width=100_000, height=100_000) -> bytes:
    """A tiny PNG file whose header claims `width` x `height` pixels."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def huge_mp4(path: Path, side=2000, frames=40) -> Path:
    """A small H.264 file of `frames` black side x side frames (decoded whole it is side*side*3*frames bytes)."""
    from model_core.media_files import VideoWriter

    black = np.zeros((side, side, 3), np.uint8)
    with VideoWriter(path, 8, side, side) as writer:
        for _ in range(frames):
            writer.write(black)
        writer.close({})
    return path


def amplification_clip(path: Path, width=1280, height=768, frames=241) -> Path:
    """A clip within the caps that is tiny on disk (one colour at crf 51) and 0.7 GB decoded at its own size."""
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=24, options={"crf": "51", "preset": "ultrafast"})
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        frame = av.VideoFrame.from_ndarray(np.full((height, width, 3), 90, np.uint8), format="rgb24")
        for _ in range(frames):
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return path


def amplification_image(path: Path, side=4096) -> Path:
    """A 4096 x 4096 PNG of one colour: 50 KB on disk, 48 MiB decoded, far more as the pipeline's float tensor."""
    from PIL import Image

    Image.new("RGB", (side, side), (30, 90, 200)).save(path, optimize=True)
    return path


def probe_files(folder: Path) -> dict:
    """The uploads the probes send: broken, oversized, and a valid image and clip for the other probes."""
    from model_core.media_files import write_image, write_video

    files = {"noise.png": os.urandom(4096), "noise.mp4": os.urandom(4096), "huge.png": huge_png_header()}
    for name, data in files.items():
        (folder / name).write_bytes(data)
    ramp = np.broadcast_to(np.arange(64, dtype=np.uint8)[None, :, None] * 4, (64, 64, 3))
    write_image(np.ascontiguousarray(ramp), folder / "ok.png", {})
    write_video(np.ascontiguousarray(np.broadcast_to(ramp, (9, 64, 64, 3))), folder / "ok.mp4", 8, {})
    huge_mp4(folder / "huge.mp4")
    return {name: folder / name for name in [*files, "ok.png", "ok.mp4", "huge.mp4"]}


# --- a studio in a subprocess ---------------------------------------------------------------


class Studio:
    """`python app.py` of the checkout in `app_dir`, on a free port, with its own output and cache folders."""

    def __init__(self, app_dir: Path, model: Path, hosted: bool, work: Path, extra=()):
        self.app_dir, self.model, self.hosted, self.work, self.extra = app_dir, model, hosted, work, extra
        self.start()

    def start(self) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        flags = ["--port", str(self.port), "--no-browser", "--output-dir", str(self.work / "outputs"),
                 "--model", str(self.model)]
        environment = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False", HF_HUB_OFFLINE="1",
                           GRADIO_TEMP_DIR=str(self.work / "cache"), PYTHONUNBUFFERED="1")
        self.log = open(self.work / "server.log", "a")
        self.process = subprocess.Popen(
            [sys.executable, "app.py", *flags, *(["--hosted"] if self.hosted else []), *self.extra], cwd=self.app_dir,
            env=environment, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)

    def restart(self) -> str:
        """Stop the studio (and whatever it is generating) and start it again; returns its new URL."""
        self.close()
        self.start()
        self.wait_ready()
        return self.url

    def wait_ready(self, timeout=300) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the studio exited with {self.process.returncode}; see {self.log.name}")
            try:
                get_json(self.url + "/gradio_api/info", timeout=5)
                return
            except (OSError, ValueError):
                time.sleep(0.5)
        raise TimeoutError(f"the studio did not answer within {timeout} s")

    def peak_rss_mib(self) -> float:
        """The server process's resident-set high-water mark (VmHWM)."""
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        raise RuntimeError("no VmHWM in /proc")

    def close(self) -> None:
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        self.log.close()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def get_json(url, timeout=30):
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return json.loads(response.read())


def post_json(url, body, timeout=60):
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def upload(url: str, path: Path) -> dict:
    """Upload through /gradio_api/upload; the FileData a call refers to it by."""
    boundary = "probe-boundary"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"{path.name}\"\r\n"
            "Content-Type: application/octet-stream\r\n\r\n").encode() + path.read_bytes() + f"\r\n--{boundary}--\r\n".encode()
    request = urllib.request.Request(url + "/gradio_api/upload", body,
                                     {"Content-Type": f"multipart/form-data; boundary={boundary}"})
    with urllib.request.urlopen(request, timeout=60) as response:
        server_path = json.loads(response.read())[0]
    return {"path": server_path, "orig_name": path.name, "meta": {"_type": "gradio.FileData"}}


def call(url: str, endpoint: str, data: list, timeout=120) -> tuple:
    """POST /gradio_api/call/ENDPOINT, then read its event stream: ("complete" | "error" | "timeout", payload)."""
    try:
        event_id = post_json(f"{url}/gradio_api/call/{endpoint}", {"data": data})["event_id"]
    except urllib.error.HTTPError as error:
        return "http-error", error.read().decode(errors="replace")
    kind, deadline = None, time.monotonic() + timeout
    try:
        with urllib.request.urlopen(f"{url}/gradio_api/call/{endpoint}/{event_id}", timeout=timeout) as stream:
            for raw in stream:  # heartbeats keep a running call's stream alive: the deadline ends the wait
                if time.monotonic() > deadline:
                    return "timeout", None
                line = raw.decode(errors="replace").rstrip("\n")
                if line.startswith("event: "):
                    kind = line[len("event: "):]
                elif line.startswith("data: ") and kind in ("complete", "error"):
                    return kind, json.loads(line[len("data: "):])
    except (OSError, ValueError):
        return "timeout", None
    return "timeout", None


def parameters(url: str) -> dict:
    """Endpoint -> [(parameter name, default)] in call order, from the running studio's API description."""
    return {name: endpoint_parameters(url, name) for name in ENDPOINTS}


def endpoint_parameters(url: str, endpoint: str) -> list:
    """[(parameter name, default)] of one endpoint in call order, from the running studio's API description."""
    api = get_json(url + "/gradio_api/info")["named_endpoints"]
    return [(p["parameter_name"], p.get("parameter_default")) for p in api[f"/{endpoint}"]["parameters"]]


def classify(kind: str, payload) -> tuple:
    """(verdict, the message): clean, accepted or failed."""
    if kind == "complete":
        return "accepted", ""
    message = payload.get("error") if isinstance(payload, dict) else payload
    message = message if isinstance(message, str) else None
    if kind == "error" and message and message.strip() and "Traceback" not in message:
        return "clean", message
    return "failed", "" if message is None else message[:200]


def run_probes(url: str, files: dict, samples: dict, timeout: float = 120, restart=None) -> list:
    """Send every probe with the other arguments valid; returns one row per probe. With `restart` (a callable that
    starts the studio afresh and returns its URL), a probe still unanswered after `timeout` seconds is counted as
    accepted (the studio is generating for it) and the studio restarted, so one costly input cannot hold up the rest."""
    uploaded = {name: upload(url, path) for name, path in files.items()}
    params = parameters(url)
    rows = []
    for probe in probes():
        valid = {name: default for name, default in params[probe.endpoint]}
        if not set(probe.arguments) <= set(valid):  # an earlier release without this parameter
            rows.append(dict(endpoint=probe.endpoint, what=probe.what, verdict="n/a", message="no such parameter",
                             seconds=0.0))
            continue
        valid.update({name: value for name, value in FAST.items() if name in valid})
        valid.update({name: value for name, value in samples.items() if name in valid})
        valid.update(probe.arguments)
        data = probe.positional if probe.positional is not None else [
            uploaded[value[len("!file:"):]] if isinstance(value, str) and value.startswith("!file:") else value
            for value in (valid[name] for name, _ in params[probe.endpoint])]
        started = time.monotonic()
        kind, payload = call(url, probe.endpoint, data, timeout=timeout)
        verdict, message = classify(kind, payload)
        if kind == "timeout" and restart is not None:
            verdict, message = "accepted", f"still generating after {timeout:g} s; the studio was restarted"
            url = restart()
            uploaded = {name: upload(url, path) for name, path in files.items()}
        rows.append(dict(endpoint=probe.endpoint, what=probe.what, verdict=verdict, message=message[:300],
                         seconds=round(time.monotonic() - started, 2)))
    return rows


def upload_cap_memory(studio: Studio, video: Path) -> dict:
    """Peak RSS of the server before and after an extension of the 2000x2000x40 clip is asked for."""
    before = studio.peak_rss_mib()
    params = parameters(studio.url)["extend_video"]
    values = {name: default for name, default in params} | FAST | {"video": upload(studio.url, video), "prompt": ""}
    verdict, message = classify(*call(studio.url, "extend_video", [values[name] for name, _ in params]))
    time.sleep(1)
    return dict(verdict=verdict, message=message[:200], peak_rss_before_mib=round(before, 1),
                peak_rss_after_mib=round(studio.peak_rss_mib(), 1))


def file_inputs(url: str) -> list:
    """(endpoint, parameter) of every file input the running studio's API lists."""
    api = get_json(url + "/gradio_api/info")["named_endpoints"]
    return [(name.lstrip("/"), p["parameter_name"]) for name, endpoint in api.items()
            for p in endpoint["parameters"] if p.get("component") in FILE_INPUTS]


def path_probes(url: str, server_files: list) -> list:
    """Name server files nobody uploaded on every file input: a bare path dict, one with Gradio's meta, a plain
    string. One row per (input, form, file); `answers` counts the distinct replies per input (goal: 1)."""
    rows = []
    for endpoint, parameter in file_inputs(url):
        params = endpoint_parameters(url, endpoint)
        replies = set()
        for path in server_files:
            for form, payload in (("dict", {"path": path}), ("meta", {"path": path, "meta": {"_type": "gradio.FileData"}}),
                                  ("string", path)):
                values = {name: default for name, default in params} | FAST | {"prompt": "a ball", parameter: payload}
                verdict, message = classify(*call(url, endpoint, [values[name] for name, _ in params]))
                replies.add(message)
                rows.append(dict(endpoint=endpoint, what=f"{parameter}: {form} {path}", verdict=verdict, message=message))
        for row in rows[-3 * len(server_files):]:
            row["answers"] = len(replies)
    return rows


def amplification_memory(studio: Studio, endpoint: str, field: str, path: Path) -> dict:
    """Peak RSS of the server before and after `path` is sent to `endpoint` (an upload within the caps)."""
    before = studio.peak_rss_mib()
    params = endpoint_parameters(studio.url, endpoint)
    values = {name: default for name, default in params} | FAST | {field: upload(studio.url, path), "prompt": "",
                                                                   "num_frames": 8 if endpoint == "extend_video" else 9}
    verdict, message = classify(*call(studio.url, endpoint, [values[name] for name, _ in params]))
    time.sleep(1)
    return dict(file=path.name, bytes=path.stat().st_size, verdict=verdict, message=message[:200],
                peak_rss_before_mib=round(before, 1), peak_rss_after_mib=round(studio.peak_rss_mib(), 1))


def queue_flood(url: str, clients: int = 12, jobs_each: int = 2) -> dict:
    """Fresh gradio_client sessions each queueing `jobs_each` text-to-video jobs at once; how many were taken."""
    from gradio_client import Client

    accepted, refusals = 0, {}
    for _ in range(clients):
        client = Client(url, verbose=False, download_files=False)
        for _ in range(jobs_each):
            try:
                client.predict("a red ball", **FAST, api_name="/queue_text_to_video")
                accepted += 1
            except Exception as error:  # the AppError carries the sentence
                text = str(error).splitlines()[0]
                refusals[text] = refusals.get(text, 0) + 1
    return dict(clients=clients, sent=clients * jobs_each, accepted=accepted, refusals=refusals)


def frames_streamed(job) -> bool:
    """Whether a submitted generation has streamed the frames of a finished unit (its status line speaks earlier)."""
    return any(isinstance(outputs[1], list) and outputs[1] for outputs in job.outputs())


def cancel_latency(url: str, steps: int = 50, wait: float = 180) -> dict:
    """Start a long text-to-video, cancel it mid-run as `job.cancel()` does; time the cancel, the slowest
    /gradio_api/info answer meanwhile, and a 1-step text-to-image sent right after (it waits for the device),
    beside the same text-to-image timed before with nothing to wait for. A call with no answer within `wait`
    seconds is reported as None."""
    from gradio_client import Client

    client = Client(url, verbose=False, download_files=False)
    started = time.monotonic()
    client.predict("a red square", seed="2", **FAST, api_name="/text_to_image")
    idle_seconds = time.monotonic() - started  # the same short generation with nothing to wait for
    slow = FAST | {name: steps for name in STEP_NAMES[3:]}  # the first unit quick, the later ones long
    job = client.submit("a blue circle moving right", seed="1", **slow, api_name="/text_to_video")
    deadline = time.monotonic() + 300
    while not frames_streamed(job) and time.monotonic() < deadline:  # mid-run: the first unit has streamed in
        time.sleep(0.05)
    info_times, done = [], threading.Event()

    def watch():
        while not done.is_set():
            started = time.monotonic()
            try:
                get_json(url + "/gradio_api/info", timeout=wait)
            except OSError:  # no answer: counted as the time waited
                pass
            info_times.append(time.monotonic() - started)
            time.sleep(0.1)

    def timed(call):  # seconds `call` took; None when it gave no answer within `wait` seconds; or how it failed
        started = time.monotonic()
        try:
            pool.submit(call).result(timeout=wait)
        except concurrent.futures.TimeoutError:
            return None
        except Exception as error:  # e.g. the client's own timeout on the cancel request
            return f"{type(error).__name__} after {time.monotonic() - started:.1f} s"
        return round(time.monotonic() - started, 2)

    pool = concurrent.futures.ThreadPoolExecutor(3)
    watcher = pool.submit(watch)
    cancel_seconds = timed(job.cancel)
    next_seconds = timed(lambda: Client(url, verbose=False, download_files=False).predict(
        "a red square", seed="2", **FAST, api_name="/text_to_image"))
    done.set()
    pool.shutdown(wait=False, cancel_futures=True)  # a call that never answered is left behind with its server
    return dict(cancel_s=cancel_seconds, slowest_info_s=round(max(info_times or [0]), 2), next_generation_s=next_seconds,
                same_generation_idle_s=round(idle_seconds, 2), no_answer_after_s=wait)


def summary(rows: list) -> dict:
    return {verdict: sum(row["verdict"] == verdict for row in rows) for verdict in ("clean", "accepted", "failed", "n/a")}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--app", type=Path, default=ROOT, help="checkout whose app.py to start (default: this one)")
    parser.add_argument("--model", type=Path, default=BUNDLED, help="model folder to serve (default: the bundled model)")
    parser.add_argument("--hosted", action="store_true", help="start it with --hosted")
    parser.add_argument("--out", type=Path, help="write the rows and figures as JSON here")
    parser.add_argument("--probe-timeout", type=float, default=30,
                        help="seconds a probe may run before it counts as accepted and the studio is restarted")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="hosted-probes-") as work:
        work = Path(work)
        files = probe_files(work)
        studio = Studio(args.app.resolve(), args.model.resolve(), args.hosted, work)
        try:
            studio.wait_ready()
            time.sleep(2)  # the warm-up load
            memory = upload_cap_memory(studio, files["huge.mp4"])
            amplification = [amplification_memory(studio, "extend_video", "video", amplification_clip(work / "flat.mp4")),
                             amplification_memory(studio, "image_to_video", "image", amplification_image(work / "big.png"))]
            rows = run_probes(studio.url, files, {"prompt": "a ball", "image": "!file:ok.png", "video": "!file:ok.mp4"},
                              timeout=args.probe_timeout, restart=studio.restart)
            server_files = [str(files["ok.png"]), str(files["ok.mp4"]), "/etc/passwd", "/nope/x.png"]
            paths = path_probes(studio.url, server_files)
            flood = queue_flood(studio.url)
            cancel = cancel_latency(studio.url)
        finally:
            studio.close()
        tracebacks = (work / "server.log").read_text(errors="replace").count("Traceback (most recent call last)")
    report = dict(app=str(args.app), hosted=args.hosted, counts=summary(rows), path_counts=summary(paths),
                  server_tracebacks=tracebacks,
                  most_answers_per_input=max([row["answers"] for row in paths] or [0]), upload_cap=memory,
                  amplification=amplification, queue_flood=flood, cancel=cancel, rows=rows, path_rows=paths)
    for row in rows + paths:
        print(f"{row['verdict']:8s} {row['endpoint']:15s} {row['what'][:60]:60s} {row['message'][:90]!r}")
    print(json.dumps({key: report[key] for key in ("counts", "path_counts", "most_answers_per_input", "server_tracebacks", "upload_cap",
                                                   "amplification", "queue_flood", "cancel")}, indent=1))
    if args.out:
        args.out.write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
