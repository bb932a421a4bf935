"""The compile levels (issue 32): off, on (the whole forward compiled, the history padded to shape buckets) and max
(CUDA graphs too, CUDA only), one name across library, CLI and studio, refused with one sentence where they cannot
work; a compiled pipeline's video equals the eager one and records its level."""
import functools
import re

import pytest
import torch
from torch._dynamo.utils import counters

from model_core import PyramidFlowPipeline, speed
from model_core.option_names import compile_level, compile_name
from pyramid_app import cli
from pyramid_app.options import limits, settings
from pyramid_app.studio import gallery
from tests.test_cli import assert_one_line_error, no_model_load, run_cli  # noqa: F401  (no_model_load: a fixture)
from tiny_checkpoint import build_tiny_checkpoint

MAX_ON_CPU = "compile 'max' captures CUDA graphs and needs a CUDA GPU; on this cpu machine compile can be off or on."
NOT_A_LEVEL = re.escape("compile must be off, on or max (False, True or 'max')")
cpu_compiles = pytest.mark.skipif(not speed.compile_available("cpu"), reason="no C compiler for torch.compile here")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "miniflux")


def test_levels_have_one_name_each():
    assert [compile_level(name) for name in ("off", "on", "max", " MAX", False, True)] == [
        False, True, "max", "max", False, True]
    assert [compile_name(level) for level in (False, True, "max", "on")] == ["off", "on", "max", "on"]
    for bad in ("yes", 1, None, "fast"):
        with pytest.raises(ValueError, match=NOT_A_LEVEL):
            compile_level(bad)


@cpu_compiles
def test_the_cpu_offers_off_and_on_only():
    assert speed.speed_choices("cpu")["compile"] == (False, True)
    with pytest.raises(ValueError) as refused:
        speed.check_speed_options("cpu", torch.float32, "native", "max")
    assert str(refused.value) == MAX_ON_CPU


@pytest.mark.parametrize("compile, message", [("max", MAX_ON_CPU), ("yes", NOT_A_LEVEL)])
def test_the_library_refuses_with_one_sentence(tiny_model, compile, message):
    with pytest.raises(ValueError, match=message if message is NOT_A_LEVEL else re.escape(message)):
        PyramidFlowPipeline.from_pretrained(tiny_model, compile=compile)


def test_the_cli_reads_the_level(tmp_path):
    def level(*flag):
        args = cli.build_parser().parse_args(["generate", "--prompt", "a cat", "--out", str(tmp_path / "o.mp4"), *flag])
        return cli.plan(args).model.compile

    assert [level(), level("--compile"), level("--compile", "on"), level("--compile", "max")] == [False, True, True, "max"]


def test_the_cli_refuses_a_bad_level_before_loading(tmp_path, capsys, no_model_load):  # noqa: F811
    code, _, err = run_cli(capsys, "--prompt", "a cat", "--out", tmp_path / "o.mp4", "--compile", "fast")
    assert_one_line_error(code, err, "compile must be off, on or max (False, True or 'max'); got 'fast'.")


def test_the_cli_refuses_max_on_the_cpu_in_one_line(tiny_model, tmp_path, capsys):
    code, _, err = run_cli(capsys, "--model", tiny_model, "--prompt", "a cat", "--out", tmp_path / "o.mp4",
                           "--compile", "max", "--device", "cpu", "--quiet")
    assert_one_line_error(code, err, MAX_ON_CPU)


def test_the_studio_names_the_levels_and_reuses_them():
    assert limits.speed_controls({"compile": "max"})["compile"] == "max"
    assert limits.speed_controls({"compile": "off"}) == limits.SERVER_SPEED
    with pytest.raises(ValueError, match=NOT_A_LEVEL):
        limits.speed_controls({"compile": "fast"})
    assert [gallery.control_values({"compile": level}).get("compile") for level in (False, True, "max", "fast")] == [
        "off", "on", "max", None]
    assert settings.ModelOptions(compile="max").to_load_kwargs()["compile"] == "max"


@cpu_compiles
def test_the_studio_offers_what_compiles_here(tmp_path, tiny_model):
    import gradio

    from pyramid_app.studio import layout

    demo = layout.build_studio(default_model=str(tiny_model), output_dir=tmp_path / "outputs")
    radios = {block.label: [choice[1] for choice in block.choices] for block in demo.blocks.values()
              if isinstance(block, gradio.Radio)}
    assert radios["Compile"] == ["off", "on"]


@pytest.mark.slow  # dynamo traces the whole forward once per input shape (about a minute on 2 busy cores)
@cpu_compiles
def test_a_compiled_pipeline_pads_to_buckets_and_equals_eager(tiny_model, monkeypatch):
    """compile=True through from_pretrained (dynamo's eager backend: tracing only, the graphs do not depend on it):
    one compile per input shape, the video within 1e-5 of the eager one, the level recorded."""
    monkeypatch.setattr(speed, "compile_forward", functools.partial(speed.compile_forward, backend="eager"))
    request = dict(prompt="a red circle", num_frames=33, seed=3, first_frame_steps=(1, 1, 1), video_steps=(1, 1, 1),
                   output_type="latent")
    eager = PyramidFlowPipeline.from_pretrained(tiny_model)(**request)
    torch._dynamo.reset()
    counters.clear()
    compiled = PyramidFlowPipeline.from_pretrained(tiny_model, compile=True)
    shapes = []
    compiled.transformer.register_forward_pre_hook(
        lambda module, args, kwargs: shapes.append(tuple(clip.shape for clip in kwargs["sample"][0])), with_kwargs=True)
    out = compiled(**request)
    torch._dynamo.reset()
    assert out.settings["compile"] is True and eager.settings["compile"] is False
    assert counters["stats"]["unique_graphs"] == len(set(shapes)) and not counters["graph_break"]
    # the padded keys change how the attention's sums are blocked: float32 rounding accumulated over 5 units and
    # 15 steps (9.5e-6 in a plain process, 2.1e-5 under pytest here; one forward: tests/test_shape_buckets.py, 1e-5)
    torch.testing.assert_close(out.latents, eager.latents, atol=5e-5, rtol=0)
