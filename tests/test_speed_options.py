"""The speed options through the pipeline: step cache per call, attention backend and compiled blocks at load."""
import json

import pytest
import torch
import torch._dynamo
from diffusers.hooks import (
    FirstBlockCacheConfig,
    MagCacheConfig,
    PyramidAttentionBroadcastConfig,
    TaylorSeerCacheConfig,
)

from model_core import PyramidFlowPipeline
from model_core.checkpoints import SETTINGS_FILE
from model_core.speed import speed_choices
from model_core.step_cache import DEFAULT_CACHE_THRESHOLD, step_cache_state
from model_core.text import PromptEmbeddings
from tests.test_transformer_behaviour import tiny_model
from tiny_checkpoint import build_tiny_checkpoint

STEPS = dict(first_frame_steps=(2, 2, 2), video_steps=(2, 2, 2), output_type="latent")
ONE_STEP = dict(first_frame_steps=(1, 1, 1), video_steps=(1, 1, 1))
UNITS, STAGES = 3, 3  # 17 frames of the tiny checkpoint: three latent units, each over three pyramid stages


def generate(pipe, **options):
    return pipe("a red circle moving left", num_frames=17, seed=3, **{**STEPS, **options})


def test_threshold_zero_equals_uncached_exactly(pipe):
    uncached = generate(pipe, output_type="np")
    cached = generate(pipe, cache="first-block", cache_threshold=0.0, output_type="np")
    assert torch.equal(cached.latents, uncached.latents)
    assert (cached.frames == uncached.frames).all()
    assert step_cache_state(pipe.transformer).skipped_steps == 0
    assert (uncached.settings["cache"], cached.settings["cache"]) == ("none", "first-block")
    assert cached.settings["cache_threshold"] == 0.0


@pytest.mark.parametrize("cache", ["first-block", "taylorseer"])
def test_every_stage_of_every_unit_starts_fresh(pipe, cache):
    """With a threshold nothing stays under, only a reset can force a full step: exactly the first step of each
    stage of each unit is computed. A cache that leaked across a stage jump or a unit would compute fewer."""
    out = generate(pipe, cache=cache, cache_threshold=1e9)
    state = step_cache_state(pipe.transformer)
    total_steps = sum(STEPS["first_frame_steps"]) + (UNITS - 1) * sum(STEPS["video_steps"])
    assert state.computed_steps == UNITS * STAGES
    assert state.computed_steps + state.skipped_steps == total_steps
    assert not torch.equal(out.latents, generate(pipe).latents)


def test_mag_calibrates_on_the_first_unit_and_skips_in_the_later_ones(pipe):
    """Unit 0 runs every step and measures each stage's magnitude ratio; units 1 and 2 share its schedule, so
    each of their stages computes its first step (fresh after the reset) and skips the second."""
    out = generate(pipe, cache="mag", cache_threshold=1e9)
    state = step_cache_state(pipe.transformer)
    per_unit = sum(STEPS["video_steps"])
    assert (state.computed_steps, state.skipped_steps) == (per_unit + (UNITS - 1) * STAGES, (UNITS - 1) * STAGES)
    assert len(state.magnitude_ratios) == STAGES and out.settings["cache"] == "mag"
    assert torch.isfinite(out.latents).all() and not torch.equal(out.latents, generate(pipe).latents)


def test_diffusers_enable_cache_is_the_cache_of_calls_that_name_none(pipe):
    """transformer.enable_cache(FirstBlockCacheConfig(...)) as on diffusers' models: calls naming no cache use it,
    a call naming one wins for that call, and disable_cache goes back to the model's default."""
    uncached, reference = generate(pipe), generate(pipe, cache="first-block", cache_threshold=1e9)
    pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=1e9))
    try:
        assert pipe.transformer.is_cache_enabled
        with pytest.raises(ValueError, match="already enabled; call disable_cache"):
            pipe.transformer.enable_cache(TaylorSeerCacheConfig())
        standing = generate(pipe)
        assert (standing.settings["cache"], standing.settings["cache_threshold"]) == ("first-block", 1e9)
        assert torch.equal(standing.latents, reference.latents) and step_cache_state(pipe.transformer).skipped_steps
        assert torch.equal(generate(pipe, cache="none").latents, uncached.latents)
        assert generate(pipe, cache_threshold=0.0).settings["cache_threshold"] == 0.0
    finally:
        pipe.transformer.disable_cache()
    assert not pipe.transformer.is_cache_enabled and generate(pipe).settings["cache"] == "none"


@pytest.mark.parametrize("config, expected", [
    (TaylorSeerCacheConfig(), ("taylorseer", DEFAULT_CACHE_THRESHOLD)),
    (MagCacheConfig(calibrate=True, threshold=0.5), ("mag", 0.5)),
])
def test_diffusers_cache_configs_map_onto_the_step_caches(config, expected):
    model = tiny_model("flux")
    model.enable_cache(config)
    state = step_cache_state(model)
    assert (state.mode, state.threshold) == expected
    model.disable_cache()
    assert step_cache_state(model) is None


@pytest.mark.parametrize("config, refusal", [
    (MagCacheConfig(mag_ratios=[1.0, 0.9]), "calibrates its ratios during each generation"),
    (PyramidAttentionBroadcastConfig(), "not a step cache of the pyramid transformers"),
])
def test_diffusers_cache_configs_that_do_not_fit_are_refused(config, refusal):
    model = tiny_model("flux")
    with pytest.raises(ValueError, match=refusal):
        model.enable_cache(config)
    assert not model.is_cache_enabled and step_cache_state(model) is None


def test_text_columns_that_are_padding_in_every_row_are_dropped():
    mask = torch.tensor([[1, 1, 0, 0, 0, 0], [1, 0, 1, 1, 0, 0]])
    text = PromptEmbeddings(torch.randn(2, 6, 4), mask, torch.randn(2, 3))
    kept = text.without_padding_columns()
    assert torch.equal(kept.attention_mask, mask[:, :4]) and torch.equal(kept.hidden_states, text.hidden_states[:, :4])
    assert torch.equal(kept.pooled, text.pooled)
    assert PromptEmbeddings(torch.randn(1, 3, 4), torch.zeros(1, 3), torch.randn(1, 3)).without_padding_columns(
        ).attention_mask.shape == (1, 1)


def test_the_transformer_sees_only_the_used_text_columns_and_the_result_is_unchanged(pipe, monkeypatch):
    lengths, forward = [], pipe.transformer.forward

    def spy(*args, **kwargs):
        lengths.append(kwargs["encoder_attention_mask"].shape[1])
        return forward(*args, **kwargs)

    monkeypatch.setattr(pipe.transformer, "forward", spy)
    trimmed = generate(pipe)
    used = int(pipe.encode_prompt("a red circle moving left", None, pipe.transformer.device, False)[0]
               .attention_mask.sum())
    assert set(lengths) == {used} and used < 128
    monkeypatch.setattr(PromptEmbeddings, "without_padding_columns", lambda self: self)
    lengths.clear()
    padded = generate(pipe)
    assert set(lengths) == {128}
    torch.testing.assert_close(trimmed.latents, padded.latents, atol=1e-4, rtol=0)  # rounding: 1.5e-5 seen


def test_cache_none_removes_the_hooks_again(pipe):
    uncached = generate(pipe)
    generate(pipe, cache="first-block", cache_threshold=1e9)
    assert torch.equal(generate(pipe, cache="none").latents, uncached.latents)
    assert step_cache_state(pipe.transformer) is None


def test_the_checkpoint_names_its_default_cache(tmp_path):
    root = build_tiny_checkpoint(tmp_path, "miniflux")
    settings = json.loads((root / SETTINGS_FILE).read_text()) if (root / SETTINGS_FILE).is_file() else {}
    settings["sampling"] = {**settings.get("sampling", {}), "cache": "first-block", "cache_threshold": 0.2}
    (root / SETTINGS_FILE).write_text(json.dumps(settings))
    out = generate(PyramidFlowPipeline.from_pretrained(root))
    assert (out.settings["cache"], out.settings["cache_threshold"]) == ("first-block", 0.2)


@pytest.mark.slow  # flex attention runs unfused in eager mode (a minute on 2 busy cores); tests/test_attention_backends.py
@pytest.mark.skipif("flex" not in speed_choices("cpu")["attention_backend"], reason="no flex attention in this torch")
def test_flex_backend_equals_native(checkpoint, pipe):
    flex = PyramidFlowPipeline.from_pretrained(checkpoint, attention_backend="flex")
    out = generate(flex, **ONE_STEP)
    native = generate(pipe, **ONE_STEP)
    torch.testing.assert_close(out.latents, native.latents, atol=1e-5, rtol=1e-5)
    assert (out.settings["attention_backend"], native.settings["attention_backend"]) == ("flex", "native")


@pytest.mark.parametrize("options, message", [
    (dict(attention_backend="flash"), "attention_backend 'flash' is not available"),
    (dict(compile="yes"), "compile must be off, on or max"),
])
def test_bad_speed_options_are_explained(checkpoint, options, message):
    with pytest.raises(ValueError, match=message):
        PyramidFlowPipeline.from_pretrained(checkpoint, **options)


def test_bad_cache_is_explained(pipe):
    with pytest.raises(ValueError, match="cache must be one of none, first-block"):
        generate(pipe, cache="teacache")
    with pytest.raises(ValueError, match="cache_threshold must be a finite number >= 0"):
        generate(pipe, cache="first-block", cache_threshold="high")


