"""save_pretrained -> from_pretrained, and DiffusionPipeline.from_pretrained(dir, custom_pipeline=dir)."""
import json

import numpy as np
import pytest
from diffusers import DiffusionPipeline

from model_core import PyramidFlowPipeline
from model_core.checkpoints import SETTINGS_FILE
from tiny_checkpoint import build_tiny_checkpoint

FAST = dict(first_frame_steps=(1, 1, 2), video_steps=(1, 2, 1))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = build_tiny_checkpoint(tmp_path_factory.mktemp("tiny"))
    settings = json.loads((root / SETTINGS_FILE).read_text())
    settings["sampling"] = {"guidance_scale": 2.5, "video_guidance_scale": 1.5}
    (root / SETTINGS_FILE).write_text(json.dumps(settings))
    pipe = PyramidFlowPipeline.from_pretrained(root)
    folder = tmp_path_factory.mktemp("saved") / "pipe"
    pipe.save_pretrained(folder)
    return pipe, folder


def test_round_trip_gives_the_same_video(saved):
    pipe, folder = saved
    assert (folder / "model_index.json").is_file() and (folder / "transformer").is_dir()
    again = PyramidFlowPipeline.from_pretrained(folder)
    assert again.spec == pipe.spec and again.family == pipe.family and not again.official_defaults
    a = pipe.text_to_video("a red circle moving left", num_frames=17, seed=4, **FAST)
    b = again.text_to_video("a red circle moving left", num_frames=17, seed=4, **FAST)
    assert np.array_equal(a.frames, b.frames) and b.settings["guidance_scale"] == 2.5
    assert PyramidFlowPipeline.from_pretrained(folder, official_defaults=True).official_defaults


def test_diffusion_pipeline_loads_it_as_a_custom_pipeline(saved):
    pipe, folder = saved
    loaded = DiffusionPipeline.from_pretrained(folder, custom_pipeline=str(folder), trust_remote_code=True)
    assert type(loaded).__name__ == "PyramidFlowPipeline" and loaded.spec == pipe.spec
    a = pipe.text_to_image("a blue square", seed=1, **FAST)
    b = loaded.text_to_image("a blue square", seed=1, **FAST)
    assert np.array_equal(a.frames, b.frames)


def test_a_foreign_model_index_is_refused(tmp_path):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    with pytest.raises(ValueError, match="not written by PyramidFlowPipeline.save_pretrained"):
        PyramidFlowPipeline.from_pretrained(tmp_path)
