"""`official_defaults`: the authors' prompt suffix, negative prompt, guidance rule and uint8 conversion."""
import numpy as np
import pytest
import torch

from model_core import PyramidFlowPipeline
from model_core.checkpoints import SETTINGS_FILE
from model_core.pipeline import OFFICIAL_NEGATIVE_PROMPT, OFFICIAL_PROMPT_SUFFIX
from tiny_checkpoint import build_tiny_checkpoint

FAST = dict(first_frame_steps=(1, 1, 1), video_steps=(1, 1, 1))


@pytest.fixture(scope="module")
def official(checkpoint):
    return PyramidFlowPipeline.from_pretrained(checkpoint, official_defaults=True)


@pytest.fixture
def encoded_prompts(official, monkeypatch):
    seen = []
    encode = official.prompt_encoder.encode

    def recording(prompts, device=None):
        seen.append(prompts)
        return encode(prompts, device)

    monkeypatch.setattr(official.prompt_encoder, "encode", recording)
    official.prompt_encoder._empty_cache = None
    return seen


def test_on_for_checkpoints_as_published_off_for_our_own(tmp_path, checkpoint, pipe, official):
    assert not pipe.official_defaults and official.official_defaults
    published = build_tiny_checkpoint(tmp_path / "published")
    (published / SETTINGS_FILE).unlink()  # the published repos carry no pyramid_flow.json
    assert PyramidFlowPipeline.from_pretrained(published, variant="384p").official_defaults


def test_prompt_suffix_and_default_negative_prompt(official, encoded_prompts):
    out = official.text_to_image("a lighthouse", guidance_scale=3.0, seed=0, **FAST)
    assert encoded_prompts[0] == "a lighthouse" + OFFICIAL_PROMPT_SUFFIX
    assert [OFFICIAL_NEGATIVE_PROMPT] in encoded_prompts
    assert out.settings["official_defaults"] and out.settings["prompt"] == "a lighthouse"
    assert out.settings["negative_prompt"] == OFFICIAL_NEGATIVE_PROMPT
    encoded_prompts.clear()
    official.text_to_image("a lighthouse", negative_prompt="", guidance_scale=3.0, seed=0, **FAST)
    assert OFFICIAL_NEGATIVE_PROMPT not in str(encoded_prompts)  # an explicit empty negative prompt stays empty


def test_guidance_applies_above_zero_as_the_authors_do(pipe, official):
    calls = []
    hooks = [p.transformer.register_forward_hook(lambda m, i, o: calls.append(len(o[0][0]))) for p in (pipe, official)]
    try:
        pipe.text_to_image("x", guidance_scale=0.5, seed=0, **FAST)
        ours = list(calls)
        calls.clear()
        official.text_to_image("x", guidance_scale=0.5, seed=0, **FAST)
    finally:
        for hook in hooks:
            hook.remove()
    assert ours == [1, 1, 1] and calls == [2, 2, 2]  # batch of one vs the guided batch of two


def test_uint8_by_truncation(pipe, official):
    latents = pipe.text_to_video("x", num_frames=9, seed=1, output_type="latent", **FAST).latents
    z = pipe.family.normalization.denormalize(latents)
    pixels = ((pipe.vae.decode(z, temporal_chunk=True).sample[0].clamp(-1, 1) + 1) * 127.5).permute(1, 2, 3, 0)
    assert np.array_equal(official.decode_latents(latents), pixels.floor().to(torch.uint8).numpy())
    assert np.array_equal(pipe.decode_latents(latents), pixels.round().to(torch.uint8).numpy())
