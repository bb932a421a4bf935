"""`python app.py`: flags, then the studio on 127.0.0.1 (no public link unless --share)."""
import argparse
import os
from pathlib import Path

from .studio import CSS, THEME

DEFAULT_PORT = 7860
MAX_UPLOAD = "500mb"


def parse_flags(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python app.py", description="Pyramid Flow Studio: a local web UI.")
    parser.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
                        help="address to bind (default: 127.0.0.1, this machine only; GRADIO_SERVER_NAME respected)")
    parser.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", DEFAULT_PORT)),
                        help=f"port (default: GRADIO_SERVER_PORT or {DEFAULT_PORT})")
    parser.add_argument("--share", action="store_true", help="also open a public gradio.live link (off by default)")
    parser.add_argument("--model", default=os.environ.get("PYRAMID_FLOW_MODEL"), metavar="PATH_OR_REPO",
                        help="default model: checkpoint folder or hub repo id (default: PYRAMID_FLOW_MODEL, else bundled)")
    parser.add_argument("--output-dir", type=Path, default=Path("outputs"), metavar="DIR",
                        help="where videos and images are saved; the only folder the app serves (default: outputs)")
    parser.add_argument("--no-browser", action="store_true", help="do not open a browser tab")
    return parser.parse_args(argv)


def launch(demo, flags: argparse.Namespace, block: bool = True):
    """Serve `demo` with a queue; only `flags.output_dir` (and Gradio's upload cache) is readable over HTTP."""
    flags.output_dir.mkdir(parents=True, exist_ok=True)
    demo.queue(default_concurrency_limit=1)
    return demo.launch(server_name=flags.host, server_port=flags.port, share=flags.share,
                       allowed_paths=[str(flags.output_dir.resolve())], inbrowser=not flags.no_browser,
                       prevent_thread_lock=not block, max_file_size=MAX_UPLOAD, theme=THEME, css=CSS,
                       footer_links=["api"], quiet=not block)
