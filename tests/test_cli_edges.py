"""The command line at its edges, in real processes: start-up without the heavy imports, every input checked
before the model loads, files named with what they are, output folders made only where they may be, and the
partial files of a killed run removed at the next start."""
import re
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from model_core import memory, option_names
from model_core.media_files import VideoWriter
from model_core.transformers.attention_backends import MASK_STYLES
from pyramid_app.options.settings import BUNDLED_MODEL
from test_cli import run_module

ROOT = BUNDLED_MODEL.parents[2]
PROMPT = ["--prompt", "a blue circle moving right"]


@pytest.fixture(scope="module")
def hollow_model(tmp_path_factory) -> Path:
    """The bundled model's folder layout and JSON without any weights: its limits read as the real model's, but
    loading it fails, so a refusal that names the input proves the check ran before the load."""
    folder = tmp_path_factory.mktemp("hollow") / "pyramid-flow-shapes"
    for name in ("pyramid_flow.json", "diffusion_transformer_64p/config.json", "causal_video_vae/config.json"):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(BUNDLED_MODEL / name, folder / name)
    return folder


def assert_refused(completed, fragment):
    """Exit 2, nothing on stdout, one `error:` line holding `fragment`, and no model load begun."""
    lines = completed.stderr.strip().splitlines()
    assert completed.returncode == 2 and completed.stdout == "", completed.stderr
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], completed.stderr


def test_help_and_import_load_neither_torch_nor_the_model():
    for command in (["--help"], ["generate", "--help"], ["run-queue", "--help"]):
        completed = subprocess.run([sys.executable, "-m", "pyramid_app", *command], capture_output=True, text=True,
                                   cwd=ROOT)
        assert completed.returncode == 0 and completed.stdout.startswith("usage: "), completed.stderr
    assert "--first-frame-steps A,B,C" in completed.stdout or "QUEUE_FILE" in completed.stdout
    probe = "import sys, pyramid_app, pyramid_app.cli; print(sorted(set(sys.modules) & {'torch', 'diffusers', 'av'}))"
    imported = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT)
    assert imported.stdout.strip() == "[]", imported.stderr


def test_the_names_help_lists_are_the_ones_the_model_side_acts_on():
    assert option_names.ATTENTION_BACKENDS == tuple(MASK_STYLES)
    assert option_names.DTYPE_NAMES == tuple(memory.DTYPES)


def write_inputs(folder: Path) -> None:
    Image.new("L", (6000, 6000)).save(folder / "big.png")  # 36 MP: a small file, refused from its header
    (folder / "binary.txt").write_bytes(bytes(range(256)) * 4)


def with_folder(arguments, folder: Path) -> list:
    return [str(a).format(dir=folder) for a in arguments]


@pytest.mark.parametrize("arguments, fragment", [
    (["--height", 100000, "--width", 100000], "--height 100000 --width 100000 is 10000000000 pixels per frame; "
                                              "the 64p variant makes at most 16384"),
    (["--num-frames", 100000], "num_frames must be one of 9, 17, 25, 33, ..., 161 for this model; got 100000"),
    (["--first-frame-steps", "-5,10,10"], "first_frame_steps must be 3 positive integers from 1 to 50"),
    (["--image", "{dir}/big.png"], "the image big.png is 6000×6000 pixels; at most 16 megapixels"),
    (["--image", "{dir}"], "--image {dir} is a folder, not an image file"),
    (["--image", "/dev/zero"], "--image /dev/zero is a device, not an image file"),
])
def test_inputs_are_refused_before_the_model_loads(hollow_model, tmp_path, arguments, fragment):
    """The cases of issues 34 and 37 in real processes."""
    write_inputs(tmp_path)
    completed = run_module(*PROMPT, "--out", tmp_path / "out.mp4", "--model", hollow_model,
                           *with_folder(arguments, tmp_path))
    assert_refused(completed, fragment.format(dir=tmp_path))
    assert not (tmp_path / "out.mp4").exists()


@pytest.mark.parametrize("arguments, fragment", [
    (["--duration", 1000], "duration must be at most 20.1 s for this model (161 frames at 8 fps); got 1000"),
    (["--video-steps", "10,51,10"], "video_steps must be 3 positive integers from 1 to 50"),
    (["--video-steps", "-1"], "video_steps must be 3 positive integers from 1 to 50"),
    (["--guidance", 40], "guidance_scale must be a number from 0 to 15; got 40"),
    (["--image", "{dir}/absent.png"], "no such image file: {dir}/absent.png"),
    (["--image", "{dir}/binary.txt"], "cannot read image {dir}/binary.txt"),
    (["--extend", "{dir}"], "--extend {dir} is a folder, not a video file"),
])
def test_more_inputs_are_refused_before_the_model_loads(hollow_model, tmp_path, capsys, monkeypatch, arguments,
                                                        fragment):
    """The same checks in this process (a real process each would cost seconds of imports)."""
    from pyramid_app import cli

    monkeypatch.setattr(cli, "load_pipeline", lambda model: pytest.fail("the model was loaded"))
    write_inputs(tmp_path)
    code = cli.main(["generate", *PROMPT, "--out", str(tmp_path / "out.mp4"), "--model", str(hollow_model),
                     *with_folder(arguments, tmp_path)])
    err = capsys.readouterr().err
    assert code == cli.EXIT_USAGE and err.startswith("error: ") and err.count("\n") == 1, err
    assert fragment.format(dir=tmp_path) in err


@pytest.mark.parametrize("what", ["folder", "binary"])
def test_a_storyboard_file_is_named_with_what_it_is(hollow_model, tmp_path, capsys, what):
    from pyramid_app import cli

    board = tmp_path if what == "folder" else tmp_path / "board.txt"
    if what == "binary":
        board.write_bytes(b"2 | a red ball\n\x00\x00\x00")
    code = cli.main(["generate", "--storyboard", str(board), "--out", str(tmp_path / "out.mp4"),
                     "--model", str(hollow_model)])
    err = capsys.readouterr().err
    said = {"folder": f"--storyboard {board} is a folder, not a storyboard file",
            "binary": f"--storyboard {board} is a binary file, not UTF-8 text"}
    assert code == cli.EXIT_USAGE and err == f"error: {said[what]}\n"


def test_a_binary_prompts_file_is_named(hollow_model, tmp_path):
    (tmp_path / "prompts.txt").write_bytes(b"a red ball\n\xff\xfe\x00 not text\n")
    completed = run_module("--prompts-file", tmp_path / "prompts.txt", "--out-dir", tmp_path / "batch",
                           "--model", hollow_model)
    assert_refused(completed, f"--prompts-file {tmp_path / 'prompts.txt'} is not UTF-8 text (byte 11 cannot be "
                              "decoded); save it as UTF-8")
    assert not (tmp_path / "batch").exists()


def test_a_missing_output_folder_is_made_inside_the_working_folder_or_an_existing_one(hollow_model, tmp_path):
    """Made, and said in one line, once every check has passed (the hollow model then fails to load)."""
    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    work.mkdir()
    for out, said in (("new/deeper/x.mp4", "new/deeper"), (elsewhere / "x.mp4", elsewhere)):
        completed = run_module(*PROMPT, "--out", out, "--model", hollow_model, cwd=work)
        lines = completed.stderr.strip().splitlines()
        assert lines[:2] == [f"created the folder {said}", "loading model ..."], completed.stderr
    assert (work / "new" / "deeper").is_dir() and elsewhere.is_dir()


def test_save_queue_makes_only_the_queue_folder(tmp_path):
    """run-queue makes the outputs' folders as it writes them; the queue file's folder is made now."""
    completed = run_module(*PROMPT, "--out", "clips/x.mp4", "--save-queue", "night/queue.json", cwd=tmp_path)
    assert completed.returncode == 0, completed.stderr
    assert completed.stderr.strip().splitlines() == ["created the folder night"]
    assert (tmp_path / "night" / "queue.json").is_file() and not (tmp_path / "clips").exists()


def test_a_missing_folder_at_the_filesystem_root_is_refused(tmp_path):
    folder = Path("/") / f"nonexistent_{uuid.uuid4().hex[:12]}"
    completed = run_module(*PROMPT, "--out", folder / "x.mp4", "--save-queue", "queue.json", cwd=tmp_path)
    assert_refused(completed, f"--out: the folder {folder} does not exist and is not made at the filesystem root")
    assert not folder.exists() and list(tmp_path.iterdir()) == []


def test_an_output_folder_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "notes").write_text("a file, not a folder")
    completed = run_module(*PROMPT, "--out", tmp_path / "notes" / "x.mp4", "--save-queue", tmp_path / "q.json")
    assert_refused(completed, f"--out: {tmp_path / 'notes'} is a file, not a folder")


def test_partial_files_of_a_killed_run_are_removed_at_the_next_start(hollow_model, tmp_path):
    """Only the app's own staged files that no live writer holds go, before the model loads (which fails here)."""
    killed = tmp_path / ".x.mp4.k2j_x9ab.partial.mp4"
    killed.write_bytes(b"left by a run killed mid-write")
    others = [tmp_path / ".notes.partial", tmp_path / "x.mp4.partial.mp4", tmp_path / "keep.txt"]
    for other in others:
        other.write_bytes(b"not one of the app's staged files")
    with VideoWriter(tmp_path / "live.mp4", fps=8, width=16, height=16) as writer:
        writer.write(np.zeros((1, 16, 16, 3), np.uint8))
        live = [path for path in tmp_path.iterdir() if path.name.startswith(".live.mp4.")]
        completed = run_module(*PROMPT, "--out", tmp_path / "x.mp4", "--model", hollow_model)
        assert completed.returncode != 0 and "loading model" in completed.stderr
        assert len(live) == 1 and live[0].exists()  # a writer in another process still holds it
        writer.abort()
    assert not killed.exists() and all(other.exists() for other in others)


def test_the_studio_removes_partial_files_when_it_starts(tmp_path):
    from pyramid_app.studio import serve

    class Demo:
        def queue(self, **options):
            pass

        def launch(self, **options):
            return options["allowed_paths"]

    session = tmp_path / "0123abcd"
    session.mkdir()
    killed = [tmp_path / ".a.mp4.k2j_x9ab.partial.mp4", session / ".b.png.00aa11bb.partial.png"]
    for path in killed + [session / "b.png"]:
        path.write_bytes(b"x")
    assert serve.launch(Demo(), serve.parse_flags(["--output-dir", str(tmp_path), "--no-browser"]), block=False)
    assert [path.exists() for path in killed] == [False, False] and (session / "b.png").exists()


def test_requirements_point_to_a_readme_section_that_exists():
    comment = re.search(r'README, section "([^"]+)"', (ROOT / "requirements.txt").read_text())
    assert comment, "requirements.txt names no README section"
    readme = (ROOT / "README.md").read_text()
    section = readme.split(f"\n## {comment.group(1)}\n", 1)
    assert len(section) == 2, f"README.md has no section '## {comment.group(1)}'"
    assert "--index-url https://download.pytorch.org/whl/" in section[1].split("\n## ", 1)[0]
