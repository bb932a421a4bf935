"""One option, one check: a bad value sent through the CLI, a studio endpoint and the library is refused with the same
sentence, raised by the same function of model_core.option_names."""
import asyncio
import traceback

import gradio
import pytest

from model_core import option_names
from model_core.pipeline import PyramidFlowPipeline
from pyramid_app import cli
from pyramid_app.studio import gallery
from pyramid_app.studio.endpoints import Endpoints
from tiny_checkpoint import build_tiny_checkpoint

CASES = [  # (library keyword, CLI flag, value, the sentence, the function raising it)
    ("guidance_scale", "--guidance", -1.0, "guidance_scale must be a number >= 0 (1 or less turns guidance off); got -1.0",
     option_names.check_guidance),
    ("video_guidance_scale", "--video-guidance", float("nan"),
     "video_guidance_scale must be a number >= 0 (1 or less turns guidance off); got nan", option_names.check_guidance),
    ("cache_threshold", "--cache-threshold", -0.5,
     "cache_threshold must be a finite number >= 0 (0 never skips a step); got -0.5.", option_names.check_cache_options),
]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny"))


def raised_by(error: BaseException):
    """The function whose frame raised `error` (the innermost frame of its traceback)."""
    return traceback.extract_tb(error.__traceback__)[-1].name


def library_refusal(model, name, value) -> ValueError:
    pipe = PyramidFlowPipeline.from_pretrained(model)
    with pytest.raises(ValueError) as refused:
        pipe.text_to_video("a ball", num_frames=9, **{name: value})
    return refused.value


def cli_refusal(model, flag, value, tmp_path, monkeypatch) -> ValueError:
    monkeypatch.setattr(cli, "load_pipeline", lambda options: pytest.fail("the model was loaded"))
    args = cli.build_parser().parse_args(["generate", "--prompt", "a ball", "--out", str(tmp_path / "out.mp4"),
                                          "--model", str(model), flag, str(value)])
    with pytest.raises(ValueError) as refused:
        cli.plan(args)
    return refused.value


def studio_refusal(model, name, value, tmp_path) -> BaseException:
    controls = dict(model=str(model), variant="auto", dtype="float32", offload="none", quantize="none",
                    vae_tiling=False, negative_prompt="", seed="3", guidance_scale=1, video_guidance_scale=1,
                    cache="first-block", cache_threshold=0.1,
                    **{gallery.step_control(step, stage): 2 for step in ("first_frame_steps", "video_steps")
                       for stage in range(3)})
    controls[name] = value

    async def generate():
        async for _ in Endpoints(model, tmp_path).text_to_video("a ball", 9, [], **controls):
            pass

    with pytest.raises(gradio.Error) as refused:
        asyncio.run(generate())
    return refused.value


@pytest.mark.parametrize("name, flag, value, sentence, check", CASES, ids=[case[0] for case in CASES])
def test_a_bad_value_gets_one_sentence_from_one_function_everywhere(tiny_model, tmp_path, monkeypatch, name, flag,
                                                                    value, sentence, check):
    library = library_refusal(tiny_model, name, value)
    command_line = cli_refusal(tiny_model, flag, value, tmp_path, monkeypatch)
    studio = studio_refusal(tiny_model, name, value, tmp_path)
    assert str(library) == str(command_line) == sentence
    assert raised_by(library) == raised_by(command_line) == check.__name__
    cause = studio.__cause__ or studio.__context__  # the studio rewords nothing: its message is the check's sentence
    assert isinstance(cause, ValueError) and raised_by(cause) == check.__name__
    assert sentence.rstrip(".") in str(studio)
