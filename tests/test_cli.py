"""The command line: argument errors before any model loads, then real runs on a tiny checkpoint."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from model_core import speed
from model_core.media_files import read_image, read_metadata, read_video, write_video
from model_core.transformers.attention_backends import installed_attention_backends
from pyramid_app import cli
from pyramid_app.options import settings
from tiny_checkpoint import build_tiny_checkpoint

FAST = ["--first-frame-steps", "1,1,1", "--video-steps", "1,1,1", "--guidance", 1, "--video-guidance", 1, "--quiet"]


def run_cli(capsys, *arguments):
    code = cli.main(["generate", *map(str, arguments)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(code, err, fragment, expected_code=cli.EXIT_USAGE):
    assert code == expected_code
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert fragment in lines[0]


def smooth_clip(frames=9, size=64) -> np.ndarray:
    t, y, x = np.meshgrid(np.arange(frames), np.arange(size), np.arange(size), indexing="ij")
    return np.clip(np.stack([2 * x + 4 * t, 3 * y, 255 - 2 * x - y], axis=-1), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "miniflux")


@pytest.fixture
def no_model_load(monkeypatch):
    """Argument errors must be caught before the (slow) model load."""
    def refuse(model):
        raise AssertionError("the model was loaded although the command line was invalid")

    monkeypatch.setattr(cli, "load_pipeline", refuse)


@pytest.fixture
def load_counter(monkeypatch):
    loads = []
    load = cli.load_pipeline

    def counting(model):
        loads.append(model)
        return load(model)

    monkeypatch.setattr(cli, "load_pipeline", counting)
    return loads


@pytest.fixture
def generated(monkeypatch):
    """The frames of every video the CLI writes, as streamed into the file before encoding, in order."""
    from pyramid_app.jobs.output_file import OutputFile

    outputs = []
    write = OutputFile.write

    def recording(self, frames):
        if not self.frames_written:
            outputs.append([])
        outputs[-1].append(frames.copy())
        write(self, frames)

    monkeypatch.setattr(OutputFile, "write", recording)
    return outputs


# --- argument errors: one line, exit 2, nothing written, no model loaded --------------------------


@pytest.mark.parametrize("arguments, fragment", [
    (["--prompt", "a cat"], "missing --out"),
    (["--prompt", "   ", "--out", "{out}"], "non-empty --prompt"),
    (["--out", "{out}"], "non-empty --prompt"),
    (["--prompt", "a cat", "--out", "{out}", "--num-frames", "0"], "num_frames must be a positive whole number"),
    (["--prompt", "a cat", "--out", "{out}", "--height", "-64"], "height must be a positive whole number"),
    (["--prompt", "a cat", "--out", "{out}", "--video-steps", "10,10"], "video_steps must be 3 positive integers"),
    (["--prompt", "a cat", "--out", "{out}", "--first-frame-steps", "a,b,c"], "first_frame_steps must be 3"),
    (["--prompt", "a cat", "--out", "{out}", "--first-frame-steps", "5,0,5"], "first_frame_steps must be 3"),
    (["--prompt", "a cat", "--out", "{out}", "--offload", "disk"], "choose from 'none', 'model', 'sequential'"),
    (["--prompt", "a cat", "--out", "{out}", "--quantize", "int4"], "choose from 'none', 'int8', 'nf4', 'fp8'"),
    (["--prompt", "a cat", "--out", "{out}", "--num-frames", "many"], "invalid int value"),
    (["--prompt", "a cat", "--out", "{out}", "--num-frames", "9", "--duration", "2"], "not allowed with"),
    (["--prompt", "a cat", "--out", "{out}", "--duration", "-1"], "duration must be a positive number"),
    (["--prompt", "a cat", "--out", "{dir}/clip.avi"], "--out must end in .mp4 or .png"),
    (["--prompt", "a cat", "--out", "{dir}/still.png", "--num-frames", "9"], "a .png holds a single image"),
    (["--prompt", "a cat", "--out", "{out}", "--image", "{dir}/missing.png"], "missing.png"),
    (["--prompt", "a cat", "--out", "{out}", "--extend", "{dir}/missing.mp4"], "missing.mp4"),
    (["--prompt", "a cat", "--out", "{out}", "--image", "{dir}/corrupt.png"], "cannot read image"),
    (["--prompt", "a cat", "--out", "{out}", "--extend", "{dir}/corrupt.mp4"], "cannot read video"),
    (["--prompt", "a cat", "--out", "{out}", "--image", "{dir}/corrupt.png", "--extend", "{dir}/corrupt.mp4"],
     "either --image or --extend"),
    (["--prompt", "a cat", "--prompts-file", "{dir}/prompts.txt", "--out-dir", "{dir}"], "use one of --prompt, --prompts-file and --storyboard"),
    (["--prompts-file", "{dir}/prompts.txt"], "needs --out-dir"),
    (["--prompts-file", "{dir}/blank.txt", "--out-dir", "{dir}/batch"], "holds no prompts"),
    (["--prompts-file", "{dir}/absent.txt", "--out-dir", "{dir}/batch"], "absent.txt"),
    (["--prompt", "a cat", "--out", "{out}", "--lora", "{dir}/no-adapter"], "no-adapter does not exist"),
    (["--prompt", "a cat", "--out", "{out}", "--cache", "tea"], "choose from 'none', 'first-block'"),
    (["--prompt", "a cat", "--out", "{out}", "--cache-threshold", "-0.1"], "cache_threshold must be a finite number >= 0"),
    (["--prompt", "a cat", "--out", "{out}", "--cache-threshold", "nan"], "cache_threshold must be a finite number"),
    (["--prompt", "a cat", "--out", "{out}", "--attention-backend", "eager"], "choose from 'native', 'flex'"),
])
def test_argument_errors_are_one_line_before_loading(tmp_path, capsys, no_model_load, arguments, fragment):
    (tmp_path / "corrupt.png").write_bytes(b"not an image")
    (tmp_path / "corrupt.mp4").write_bytes(b"not a video" * 50)
    (tmp_path / "prompts.txt").write_text("a cat\n")
    (tmp_path / "blank.txt").write_text("\n  \n")
    out = tmp_path / "out.mp4"
    arguments = [a.format(out=out, dir=tmp_path) for a in arguments] + ["--model", tmp_path]
    code, _, err = run_cli(capsys, *arguments)
    assert_one_line_error(code, err, fragment)
    assert not out.exists() and not (tmp_path / "batch").exists()


def test_speed_option_names_are_spelled_either_way(tmp_path, capsys, monkeypatch):
    """`flash-varlen` (the issue's and diffusers' docs' spelling) and `flash_varlen` name one backend, and
    `first_block` the cache `first-block`."""
    asked = []

    def record(model):
        asked.append(model.attention_backend)
        raise ValueError("stop before loading")

    monkeypatch.setattr(cli, "load_pipeline", record)
    for spelling in ("flash-varlen", "Flash_Varlen", " sage-varlen"):
        run_cli(capsys, "--prompt", "a cat", "--out", tmp_path / "out.mp4", "--attention-backend", spelling)
    assert asked == ["flash_varlen", "flash_varlen", "sage_varlen"]
    assert settings.ModelOptions(attention_backend="FLEX").attention_backend == "flex"
    request = cli.plan(cli.build_parser().parse_args(
        ["generate", "--prompt", "a cat", "--out", str(tmp_path / "out.mp4"), "--cache", "First_Block"]))
    assert request.options.cache == "first-block"
    assert settings.GenerationOptions(cache="MAG ").cache == "mag"
    assert settings.GenerationOptions(cache_threshold=0.2).cache is None  # still the model's default


def test_missing_bundled_model_says_to_pass_model(tmp_path, capsys, no_model_load, monkeypatch):
    monkeypatch.setitem(settings.BUNDLED_MODELS, settings.BUNDLED, tmp_path / "not-installed")
    code, _, err = run_cli(capsys, "--prompt", "a cat", "--out", tmp_path / "out.mp4")
    assert_one_line_error(code, err, "no bundled model is installed")
    assert "--model" in err


def test_unavailable_device_is_rejected(tmp_path, capsys, no_model_load):
    accelerator = torch.accelerator.current_accelerator()
    missing = next(d for d in settings.DEVICES[2:] if accelerator is None or d != accelerator.type)
    code, _, err = run_cli(capsys, "--prompt", "a cat", "--out", tmp_path / "o.mp4", "--model", tmp_path, "--device", missing)
    assert_one_line_error(code, err, "not available on this machine")


def test_no_subcommand_is_a_usage_error(capsys):
    assert cli.main([]) == cli.EXIT_USAGE
    assert capsys.readouterr().err.startswith("error: ")


def run_module(*arguments, cwd=None):
    """`python -m pyramid_app generate ...` in a real process, from the repository root (or from `cwd`)."""
    root = settings.BUNDLED_MODEL.parents[2]
    path = os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))  # found from any `cwd`
    return subprocess.run([sys.executable, "-m", "pyramid_app", "generate", *map(str, arguments)],
                          capture_output=True, text=True, cwd=cwd or root, env={**os.environ, "PYTHONPATH": path})


def test_module_entry_point_prints_no_traceback(tiny_model, tmp_path):
    """A request the loaded model rejects, in a real process: one line, exit 2, no traceback."""
    completed = run_module("--prompt", "a cat", "--out", tmp_path / "o.mp4", "--model", tiny_model,
                           "--height", 48, "--quiet")
    assert completed.returncode == cli.EXIT_USAGE
    lines = completed.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: height must be a positive multiple of 64"), completed.stderr
    assert completed.stdout == "" and not (tmp_path / "o.mp4").exists()


@pytest.mark.skipif("flex" not in installed_attention_backends(), reason="torch has no flex attention here")
def test_flex_without_compile_says_so_in_one_line(tiny_model, tmp_path):
    """In a real process: our one sentence instead of torch's multi-line warning and diffusers' experimental notice."""
    out = tmp_path / "o.png"
    completed = run_module("--prompt", "a cat", "--out", out, "--model", tiny_model, "--num-frames", 1,
                           "--first-frame-steps", "1,1,1", "--attention-backend", "flex", "--quiet")
    assert completed.returncode == 0, completed.stderr
    assert completed.stderr.strip().splitlines() == [speed.FLEX_WITHOUT_COMPILE]
    assert out.is_file()


def test_settings_map_one_to_one_onto_pipeline_arguments():
    options = settings.GenerationOptions(num_frames=9, seed=3, first_frame_steps="2, 3,4", video_steps=[1, 1, 1])
    kwargs = options.to_pipeline_kwargs("text_to_video")
    assert kwargs["first_frame_steps"] == (2, 3, 4) and kwargs["video_steps"] == (1, 1, 1) and kwargs["num_frames"] == 9
    assert "num_frames" not in options.to_pipeline_kwargs("text_to_image")
    assert settings.GenerationOptions().seeded().seed is not None
    assert options.seeded() is options


# --- real generation on the tiny checkpoint -------------------------------------------------------


def test_text_to_video_writes_mp4_with_settings(tiny_model, tmp_path, capsys):
    out = tmp_path / "clip.mp4"
    code, stdout, _ = run_cli(capsys, "--model", tiny_model, "--prompt", "a red ball", "--out", out,
                              "--num-frames", 9, "--seed", 11, "--negative-prompt", "blurry", *FAST,
                              "--cache", "first-block", "--cache-threshold", "0.2", "--attention-backend", "native")
    assert code == 0
    assert stdout.strip() == f"{out}\tseed=11"
    frames, fps = read_video(out)
    assert frames.shape == (9, 64, 64, 3)
    metadata = read_metadata(out)
    assert metadata == read_metadata(out.with_suffix(".json"))
    assert fps == metadata["fps"]
    assert {k: metadata[k] for k in ("mode", "prompt", "negative_prompt", "seed", "num_frames", "first_frame_steps")} == {
        "mode": "text_to_video", "prompt": "a red ball", "negative_prompt": "blurry", "seed": 11, "num_frames": 9,
        "first_frame_steps": [1, 1, 1]}
    assert {k: metadata[k] for k in ("cache", "cache_threshold", "attention_backend", "compile")} == {
        "cache": "first-block", "cache_threshold": 0.2, "attention_backend": "native", "compile": False}


def test_duration_becomes_an_allowed_frame_count(tiny_model, tmp_path, capsys):
    out = tmp_path / "clip.mp4"
    code, _, _ = run_cli(capsys, "--model", tiny_model, "--prompt", "a red ball", "--out", out, "--duration", 1.1, *FAST)
    assert code == 0
    assert len(read_video(out)[0]) == 9  # 1.1 s at the tiny model's 8 fps -> nearest 1 + 8k


def test_text_to_image_writes_png(tiny_model, tmp_path, capsys):
    out = tmp_path / "still.png"
    code, _, _ = run_cli(capsys, "--model", tiny_model, "--prompt", "a red ball", "--out", out, *FAST)
    assert code == 0
    assert read_image(out).shape == (64, 64, 3)
    assert read_metadata(out)["mode"] == "text_to_image"


def test_image_to_video_starts_from_the_image(tiny_model, tmp_path, capsys):
    Image.fromarray(smooth_clip(1)[0]).convert("RGBA").save(tmp_path / "start.png")
    out = tmp_path / "animated.mp4"
    code, stdout, _ = run_cli(capsys, "--model", tiny_model, "--image", tmp_path / "start.png",
                              "--out", out, "--num-frames", 9, *FAST)  # the prompt is optional here
    assert code == 0 and "seed=" in stdout
    frames, _ = read_video(out)
    assert frames.shape == (9, 64, 64, 3)
    assert read_metadata(out)["mode"] == "image_to_video" and read_metadata(out)["prompt"] == ""


def test_extend_appends_new_frames_to_the_clip(tiny_model, tmp_path, capsys):
    source = write_video(smooth_clip(9), tmp_path / "source.mp4", fps=8, metadata={})
    out = tmp_path / "longer.mp4"
    code, _, _ = run_cli(capsys, "--model", tiny_model, "--prompt", "it rolls on", "--extend", source,
                         "--out", out, "--num-frames", 8, *FAST)
    assert code == 0
    frames, _ = read_video(out)
    assert frames.shape == (17, 64, 64, 3)
    assert np.abs(frames[:9].astype(int) - read_video(source)[0]).mean() < 4
    assert read_metadata(out)["mode"] == "extend_video"


def test_batch_loads_the_model_once_and_numbers_the_outputs(tiny_model, tmp_path, capsys, load_counter):
    (tmp_path / "prompts.txt").write_text("a red ball\n\n  a blue cube  \n")
    code, stdout, _ = run_cli(capsys, "--model", tiny_model, "--prompts-file", tmp_path / "prompts.txt",
                              "--out-dir", tmp_path / "batch", "--num-frames", 9, "--seed", 4, *FAST)
    assert code == 0 and len(load_counter) == 1
    outputs = [tmp_path / "batch" / "0000.mp4", tmp_path / "batch" / "0001.mp4"]
    assert [line.split("\t")[0] for line in stdout.splitlines()] == list(map(str, outputs))
    assert [read_metadata(p)["prompt"] for p in outputs] == ["a red ball", "a blue cube"]


def test_same_seed_gives_identical_frames(tiny_model, tmp_path, capsys, generated):
    common = ["--model", tiny_model, "--prompt", "a red ball", "--num-frames", 9, *FAST]
    for name, seed in (("a", 7), ("b", 7), ("c", 8)):
        assert run_cli(capsys, *common, "--seed", seed, "--out", tmp_path / f"{name}.mp4")[0] == 0
    first, again, other = (np.concatenate(frames) for frames in generated)
    assert np.array_equal(first, again)
    assert not np.array_equal(first, other)
    a, b = read_video(tmp_path / "a.mp4")[0], read_video(tmp_path / "b.mp4")[0]
    assert np.array_equal(a, b)  # equal frames encode to equal files (x264 kept off its AVX-512 paths)


def test_random_seed_is_recorded_and_reproduces(tiny_model, tmp_path, capsys, generated):
    common = ["--model", tiny_model, "--prompt", "a red ball", "--num-frames", 9, *FAST]
    _, stdout, _ = run_cli(capsys, *common, "--out", tmp_path / "a.mp4")
    seed = read_metadata(tmp_path / "a.mp4")["seed"]
    assert stdout.strip().endswith(f"seed={seed}")
    run_cli(capsys, *common, "--out", tmp_path / "b.mp4", "--seed", seed)
    assert np.array_equal(*(np.concatenate(frames) for frames in generated))


@pytest.mark.parametrize("arguments, fragment", [
    (["--num-frames", 169], "num_frames must be one of 9, 17, 25, 33, ..., 161 for this model"),
    (["--num-frames", 4], "num_frames must be one of 9, 17"),
    (["--height", 48], "multiple of 64"),
    (["--variant", "768p"], "768p"),
    (["--image", "{dir}/still.png", "--num-frames", 1], "num_frames must be one of 9, 17"),
])
def test_requests_the_model_cannot_serve_fail_cleanly(tiny_model, tmp_path, capsys, arguments, fragment):
    Image.fromarray(smooth_clip(1)[0]).save(tmp_path / "still.png")
    out = tmp_path / "out.mp4"
    arguments = [str(a).format(dir=tmp_path) for a in arguments]
    code, stdout, err = run_cli(capsys, "--model", tiny_model, "--prompt", "a cat", "--out", out, *arguments, *FAST)
    assert_one_line_error(code, err, fragment)
    assert stdout == "" and sorted(p.name for p in tmp_path.iterdir()) == ["still.png"]


def test_unknown_model_folder_fails_cleanly(tmp_path, capsys):
    code, _, err = run_cli(capsys, "--model", tmp_path / "nowhere", "--prompt", "a cat", "--out", tmp_path / "o.mp4", *FAST)
    assert_one_line_error(code, err, "nowhere")


def test_failure_mid_batch_keeps_finished_files(tiny_model, tmp_path, capsys, monkeypatch):
    from model_core import PyramidFlowPipeline

    generate = PyramidFlowPipeline.text_to_video

    def fails_on_blue(self, prompt, **options):
        if "blue" in prompt:
            raise ValueError("the blue prompt cannot be drawn")
        return generate(self, prompt, **options)

    monkeypatch.setattr(PyramidFlowPipeline, "text_to_video", fails_on_blue)
    (tmp_path / "prompts.txt").write_text("a red ball\na blue cube\na green cone\n")
    code, _, err = run_cli(capsys, "--model", tiny_model, "--prompts-file", tmp_path / "prompts.txt",
                           "--out-dir", tmp_path / "batch", "--num-frames", 9, *FAST)
    assert_one_line_error(code, err, "the blue prompt cannot be drawn")
    assert sorted(p.name for p in (tmp_path / "batch").iterdir()) == ["0000.json", "0000.mp4"]


def test_out_of_memory_suggests_memory_options(tiny_model, tmp_path, capsys, monkeypatch):
    from model_core import PyramidFlowPipeline

    def out_of_memory(self, prompt, **options):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(PyramidFlowPipeline, "text_to_video", out_of_memory)
    code, _, err = run_cli(capsys, "--model", tiny_model, "--prompt", "a cat", "--out", tmp_path / "o.mp4", *FAST)
    assert_one_line_error(code, err, "--offload model", expected_code=cli.EXIT_FAILED)
    assert not (tmp_path / "o.mp4").exists()


@pytest.mark.parametrize("presses", [1, 2, 3])
def test_ctrl_c_saves_the_finished_units_unless_pressed_three_times(tiny_model, tmp_path, capsys, monkeypatch, presses):
    """Pressed after the second unit: once or twice, the two finished units are saved; a third press aborts and
    leaves nothing behind."""
    class CtrlCAfterSecondUnit(cli.ProgressPrinter):
        def __call__(self, progress):
            super().__call__(progress)
            if progress.kind == "unit" and progress.unit == 1:
                for _ in range(presses):
                    signal.raise_signal(signal.SIGINT)

    monkeypatch.setattr(cli, "ProgressPrinter", CtrlCAfterSecondUnit)
    out = tmp_path / "partial.mp4"
    code, stdout, err = run_cli(capsys, "--model", tiny_model, "--prompt", "a red ball", "--out", out,
                                "--num-frames", 17, *FAST[:-1])
    assert code == cli.EXIT_INTERRUPTED and "unit 2/3 done" in err
    assert ("saving the finished units" in err) == (presses > 1)
    if presses < 3:
        assert "interrupted: saved 9 frames" in err
        assert read_video(out)[0].shape[0] == 9 and read_metadata(out)["interrupted"] is True
        assert stdout.strip() == f"{out}\tseed={read_metadata(out)['seed']}"
    else:
        assert "nothing was saved" in err
        assert sorted(p.name for p in tmp_path.iterdir()) == []  # no video, no sidecar, no staged partial


def test_torchrun_two_ranks_write_one_video_equal_to_one_process(tiny_model, tmp_path, capsys):
    common = ["--model", tiny_model, "--prompt", "a red square", "--num-frames", 9, "--seed", 5,
              "--first-frame-steps", "1,1,1", "--video-steps", "1,1,1", "--guidance", 4, "--video-guidance", 3]
    code, _, _ = run_cli(capsys, *common, "--out", tmp_path / "one.mp4", "--quiet")
    assert code == 0
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "pyramid_app", "generate", *map(str, common), "--out", str(tmp_path / "two.mp4"),
               "--parallel", "2x1"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=Path(__file__).parents[1],
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines() == [f"{tmp_path / 'two.mp4'}\tseed=5"]  # rank 0 alone prints
    one, two = read_video(tmp_path / "one.mp4")[0], read_video(tmp_path / "two.mp4")[0]
    assert one.shape == two.shape == (9, 64, 64, 3)
    difference = np.abs(one.astype(int) - two.astype(int))  # frames within 1/255 (test_parallel), then two x264
    assert difference.mean() < 2, difference.mean()  # encodes of near-equal frames: H.264 noise (0.71 seen here)
    assert read_metadata(tmp_path / "two.mp4")["parallel"] == {"world_size": 2, "guidance": 2, "context": 1}
    assert read_metadata(tmp_path / "one.mp4")["parallel"] == {"world_size": 1, "guidance": 1, "context": 1}


def test_parallel_layout_needs_torchrun(capsys, no_model_load, tmp_path):
    code, _, err = run_cli(capsys, "--prompt", "x", "--out", tmp_path / "a.mp4", "--parallel", "2x1")
    assert_one_line_error(code, err, "torchrun --nproc_per_node")
    code, _, err = run_cli(capsys, "--prompt", "x", "--out", tmp_path / "a.mp4", "--parallel", "two")
    assert_one_line_error(code, err, "GxC")


# --- damaged checkpoints: one line naming the file, before anything is built -------------------


def _truncate(file):
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])


def _drop_half_the_tensors(file):
    from safetensors.torch import load_file, save_file

    tensors = load_file(file)
    save_file(dict(sorted(tensors.items())[::2]), file)


def _absurd_config(file):
    config = json.loads(file.read_text())
    file.write_text(json.dumps({**config, "num_layers": 1_000_000}))


def _link_out(file):
    file.unlink()
    file.symlink_to(file.parents[2] / "elsewhere" / file.name)


TRANSFORMER, VAE = "diffusion_transformer_384p", "causal_video_vae"


@pytest.mark.parametrize("folder, file, damage, fragment", [
    (TRANSFORMER, "diffusion_pytorch_model.safetensors", _truncate, "is not a readable safetensors file (truncated"),
    (TRANSFORMER, "config.json", lambda file: file.write_text("{not json"), "config.json is not valid JSON"),
    (VAE, "config.json", lambda file: file.write_text("[1, 2]"), "config.json holds a JSON list; expected an object"),
    (TRANSFORMER, "diffusion_pytorch_model.safetensors", _drop_half_the_tensors, "lack"),
    (TRANSFORMER, "config.json", _absurd_config, "num_layers = 1000000 is beyond the sane bound of 256"),
    (VAE, "diffusion_pytorch_model.safetensors", _link_out, "is a link to a file that does not exist"),
    ("text_encoder_2", "config.json", lambda file: file.write_text("{not json"), "config.json is not valid JSON"),
    ("tokenizer", "tokenizer_config.json", lambda file: file.write_bytes(b"\xff\xfe"), "is not a text file"),
    ("text_encoder", "config.json", lambda file: file.write_text('{"num_hidden_layers": 100000}'), "sane bound"),
    ("text_encoder", "model.safetensors", _truncate, "is not a readable safetensors file"),
])
def test_damaged_checkpoints_give_one_line_naming_the_file(tiny_model, tmp_path, capsys, folder, file, damage, fragment):
    root = tmp_path / "damaged"
    shutil.copytree(tiny_model, root)
    damage(root / folder / file)
    started = time.monotonic()
    code, _, err = run_cli(capsys, "--model", root, "--prompt", "a cat", "--out", tmp_path / "o.mp4", *FAST)
    assert_one_line_error(code, err, fragment)
    assert folder in err and time.monotonic() - started < 60
    assert not (tmp_path / "o.mp4").exists()


def test_queues_refuse_several_ranks(capsys, no_model_load, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    code, _, err = run_cli(capsys, "--prompt", "x", "--out", tmp_path / "a.mp4", "--save-queue", tmp_path / "q.json")
    assert_one_line_error(code, err, "queues run in one process")
    assert not (tmp_path / "q.json").exists()
