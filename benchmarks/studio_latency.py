"""Time from clicking "Generate video" to a playable video in the studio, in headless Chromium.

    python -m benchmarks.studio_latency [--model PATH] [--repeats 3]

Starts `python app.py` as a fresh process (the default model: --model, else the bundled model, else a
tiny random checkpoint built like the tests'), opens the page, types a prompt, clicks with the default
settings and waits until the <video> element has loaded the mp4. The first click includes whatever
model loading the start-up warm-up has not finished; the later clicks reuse the loaded pipeline.
"""
import argparse
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                  "--disable-sync", "--no-first-run"]
PLAYABLE = "() => { const v = document.querySelector('#result-video video'); return v && v.readyState >= 1 && v.duration > 0; }"
BUDGET_SECONDS = 15.0


def default_model(workdir: Path) -> str:
    sys.path.insert(0, str(ROOT))
    from pyramid_app.options.settings import BUNDLED_MODEL

    if BUNDLED_MODEL.is_dir():
        return str(BUNDLED_MODEL)
    sys.path.insert(0, str(ROOT / "tests"))
    from tiny_checkpoint import build_tiny_checkpoint

    return str(build_tiny_checkpoint(workdir / "tiny"))


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_app(model: str, output_dir: Path, port: int, log) -> subprocess.Popen:
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "app.py", "--model", model, "--port", str(port), "--output-dir", str(output_dir),
               "--no-browser"]
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


def wait_until_serving(url: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"the studio did not answer at {url} within {timeout} s")


def click_to_video(page, prompt: str) -> float:
    page.locator("#t2v-prompt textarea").fill(prompt)
    before = page.locator("#status").inner_text()
    started = time.perf_counter()
    page.locator("#t2v-generate").click()
    page.wait_for_function("previous => { const s = document.querySelector('#status');"
                           " return s && s.innerText.includes('Saved') && s.innerText !== previous; }",
                           arg=before, timeout=300_000)
    page.wait_for_function(PLAYABLE, timeout=300_000)
    return time.perf_counter() - started


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="checkpoint folder (default: bundled, else a tiny random one)")
    parser.add_argument("--repeats", type=int, default=3, help="warm clicks after the first (default: 3)")
    args = parser.parse_args(argv)
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory() as workdir:
        model = args.model or default_model(Path(workdir))
        port = free_port()
        url = f"http://127.0.0.1:{port}/"
        launched = time.perf_counter()
        log_path = Path(workdir) / "app.log"
        app = start_app(model, Path(workdir) / "outputs", port, log_path.open("w"))
        try:
            wait_until_serving(url)
            serving = time.perf_counter() - launched
            with sync_playwright() as playwright:
                browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
                page = browser.new_page()
                page.goto(url)
                page.locator("#t2v-prompt textarea").wait_for()
                first = click_to_video(page, "a blue circle moving right")
                warm = [click_to_video(page, f"a blue square, take {i}") for i in range(args.repeats)]
                browser.close()
        except Exception:
            print(log_path.read_text()[-3000:], file=sys.stderr)
            raise
        finally:
            app.terminate()
            app.wait(timeout=30)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch threads default")
    print(f"model: {model}")
    print(f"app start to serving: {serving:.1f} s")
    print(f"click to playable video, first click: {first:.2f} s")
    print(f"click to playable video, warm: median {statistics.median(warm):.2f} s, max {max(warm):.2f} s "
          f"over {len(warm)} clicks")
    verdict = "within" if max(first, *warm) <= BUDGET_SECONDS else "OVER"
    print(f"{verdict} the {BUDGET_SECONDS:.0f} s budget")


if __name__ == "__main__":
    main()
