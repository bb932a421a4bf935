"""`pip install <repo>` into a fresh virtualenv outside the checkout: the library and the command line without gradio,
then `<repo>[studio]` and the studio command, offline, with the bundled model and recipes read from the installed
copy (slow: it installs torch and gradio)."""
import json
import os
import shutil
import subprocess
import sys
import time
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def checkout_copy(target: Path) -> Path:
    """The files `pip install <repo>` would see in a clean clone (tracked and not ignored), copied to `target`."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, capture_output=True,
                            check=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        source = ROOT / name
        if source.is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)
    return target


def run(args, cwd, env):
    completed = subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True)
    assert completed.returncode == 0, f"{args[:3]} failed:\n{completed.stdout[-3000:]}\n{completed.stderr[-3000:]}"
    return completed.stdout


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_pip_install_gives_working_commands(tmp_path):
    home = tmp_path / "env"
    venv.create(home, with_pip=True)
    bin_dir = home / "bin"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False",
           "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "PYTHONPATH": ""}
    env.pop("VIRTUAL_ENV", None)
    work = tmp_path / "work"
    work.mkdir()
    started = time.monotonic()
    repo = checkout_copy(tmp_path / "repo")
    run([bin_dir / "pip", "install", "-q", repo], work, env)
    installed = time.monotonic()

    python = bin_dir / "python"
    without_studio = run([python, "-c", "import importlib.util, model_core; model_core.PyramidFlowPipeline; "
                                        "print(importlib.util.find_spec('gradio'))"], work, env)
    assert without_studio == "None\n"  # the library imports, and no dependency of it installed gradio
    where = json.loads(run([python, "-c", "import json, pyramid_app.options.settings as s, training.config as c; "
                                          "print(json.dumps([str(s.BUNDLED_MODEL), str(c.CONFIG_DIR)]))"], work, env))
    assert all(Path(path).is_relative_to(home) and Path(path).is_dir() for path in where), where
    run([python, "-c", "from training.config import load_config; load_config('training/configs/tiny_shapes.yaml')"],
        work, env)

    run([bin_dir / "pyramid-flow", "generate", "--prompt", "a blue circle moving right", "--out", "a.mp4",
         "--seed", "0", "--quiet"], work, env)
    run([bin_dir / "pyramid-flow", "generate", "--model", "bundled-turbo", "--prompt", "a red square moving up",
         "--out", "b.mp4", "--seed", "0", "--quiet"], work, env)  # the few-step model, also from the package data
    for clip in ("a.mp4", "b.mp4"):
        frames = run([python, "-c", f"import av; print(sum(1 for _ in av.open('{clip}').decode(video=0)))"], work, env)
        assert int(frames) == 17
    commands = time.monotonic()
    run([bin_dir / "pip", "install", "-q", f"{repo}[studio]"], work, env)
    assert run([bin_dir / "pyramid-flow-studio", "--help"], work, env).startswith("usage: pyramid-flow-studio")
    print(f"install {installed - started:.0f} s, library and CLI {commands - installed:.0f} s, "
          f"studio extra and command {time.monotonic() - commands:.0f} s", file=sys.stderr)
