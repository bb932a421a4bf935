"""`pyramid-flow-studio` / `python app.py`: flags, then the studio on 127.0.0.1 (no public link unless --share).

`--hosted` (on by itself on a Hugging Face Space, where SPACE_ID is set) makes a studio fit for strangers:
models from an allow-list only, outputs per browser session and swept after a while, smaller uploads.
"""
import argparse
import importlib.util
import os
import sys
import tempfile
from pathlib import Path

from ..jobs import ranks
from ..jobs.output_file import sweep_leftovers

DEFAULT_PORT = 7860
MAX_UPLOAD = {False: "500mb", True: "50mb"}  # local, hosted
CACHE_DIR = Path(tempfile.gettempdir()) / "pyramid-flow-studio"
NO_GRADIO = ("error: the studio needs gradio, which is not installed; install the studio extra: "
             "pip install 'pyramid-flow-studio[studio]'")


def parse_flags(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Pyramid Flow Studio: a local web UI.")
    parser.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
                        help="address to bind (default: 127.0.0.1, this machine only; GRADIO_SERVER_NAME respected)")
    parser.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", DEFAULT_PORT)),
                        help=f"port (default: GRADIO_SERVER_PORT or {DEFAULT_PORT})")
    parser.add_argument("--share", action="store_true", help="also open a public gradio.live link (off by default)")
    parser.add_argument("--model", action="append", metavar="PATH_OR_REPO",
                        help="a model to offer: checkpoint folder or hub repo id; repeat for more, the first is the "
                             "default (default: PYRAMID_FLOW_MODEL, else the bundled model). With --hosted these, the "
                             "bundled model and the two published repos are the only models clients may use")
    parser.add_argument("--hosted", action="store_true", default=bool(os.environ.get("SPACE_ID")),
                        help="multi-user mode for a Space or a shared server: models from the allow-list only, "
                             "outputs per session, old outputs swept, uploads up to 50 MB "
                             "(default: on when SPACE_ID is set)")
    parser.add_argument("--output-dir", type=Path, default=Path("outputs"), metavar="DIR",
                        help="where videos and images are saved; the only folder the app serves (default: outputs)")
    parser.add_argument("--auth-file", type=Path, metavar="FILE",
                        help="ask for a login: FILE holds one user:password per line (Gradio's auth=)")
    parser.add_argument("--lora-dir", type=Path, default=os.environ.get("PYRAMID_FLOW_LORA_DIR"), metavar="DIR",
                        help="LoRAs the studio offers: adapter folders and .safetensors files in DIR "
                             "(default: PYRAMID_FLOW_LORA_DIR, else none); only these can be picked")
    parser.add_argument("--no-browser", action="store_true", help="do not open a browser tab")
    flags = parser.parse_args(argv)
    if not flags.model and os.environ.get("PYRAMID_FLOW_MODEL"):
        flags.model = [os.environ["PYRAMID_FLOW_MODEL"]]
    return flags


def use_own_cache() -> Path:
    """Gradio's upload and file cache in a folder of this app's (unless GRADIO_TEMP_DIR names one), not the
    `gradio` folder every Gradio app on the machine shares. Call before building the studio."""
    os.environ.setdefault("GRADIO_TEMP_DIR", str(CACHE_DIR))
    return Path(os.environ["GRADIO_TEMP_DIR"])


def logins(path) -> list:
    """(user, password) pairs from an --auth-file: one `user:password` per non-empty line."""
    if path is None:
        return None
    if not Path(path).is_file():
        raise SystemExit(f"error: no such --auth-file: {path}")
    pairs = [tuple(line.strip().split(":", 1)) for line in Path(path).read_text().splitlines() if line.strip()]
    if not pairs or any(len(pair) != 2 or not all(pair) for pair in pairs):
        raise SystemExit(f"error: {path} must hold one user:password per line")
    return pairs


def launch(demo, flags: argparse.Namespace, block: bool = True):
    """Serve `demo` with a queue; only `flags.output_dir` (and Gradio's upload cache) is readable over HTTP.
    Every error reaches the client as its message (`show_error`): the handlers raise only sentences."""
    flags.output_dir.mkdir(parents=True, exist_ok=True)
    sweep_leftovers([flags.output_dir, *filter(Path.is_dir, flags.output_dir.iterdir())])  # a killed run's partials
    from .layout import CSS, THEME  # the studio (gradio) is the [studio] extra: loaded once one is served

    demo.queue(default_concurrency_limit=1)
    return demo.launch(server_name=flags.host, server_port=flags.port, share=flags.share,
                       allowed_paths=[str(flags.output_dir.resolve())], inbrowser=not flags.no_browser,
                       prevent_thread_lock=not block, max_file_size=MAX_UPLOAD[flags.hosted], theme=THEME, css=CSS,
                       footer_links=["api"], quiet=not block, show_error=True,
                       auth=logins(getattr(flags, "auth_file", None)))


def main(argv=None) -> int:
    """The `pyramid-flow-studio` command: serve the studio until stopped."""
    flags = parse_flags(argv)
    if importlib.util.find_spec("gradio") is None:
        print(NO_GRADIO, file=sys.stderr)
        return 2
    from .layout import build_studio  # the studio (gradio) is the [studio] extra: loaded once one is served

    use_own_cache()
    if ranks.launched_with_several_ranks():  # torchrun: rank 0 serves, every rank computes
        from .every_rank import serve_on_every_rank

        serve_on_every_rank(flags, build_studio, launch)
    else:
        launch(build_studio(output_dir=flags.output_dir, models=flags.model, hosted=flags.hosted,
                            lora_dir=flags.lora_dir), flags)
    return 0
