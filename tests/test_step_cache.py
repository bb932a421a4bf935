"""First Block Cache on the pyramid transformers: threshold 0 changes nothing, skipped steps reuse the
trunk's residual per guidance row, and a reset forgets everything."""
import pytest
import torch

from model_core.step_cache import enable_step_cache, relative_change, reset_step_cache, step_cache_state
from tests.test_transformer_behaviour import TINY, pyramid_column, text_inputs, tiny_model, velocity

ALWAYS_SKIP = 1e9  # any comparable step is skipped


def steps(model, timesteps=(900.0, 880.0, 860.0)):
    """Velocities of one pyramid column at a few nearby timesteps (the steps of one stage)."""
    clips, inputs = pyramid_column(), text_inputs(model, 2)
    with torch.no_grad():
        return [velocity(model, clips, {**inputs, "timestep": torch.full((2,), t)}) for t in timesteps]


@pytest.mark.parametrize("kind", sorted(TINY))
def test_threshold_zero_equals_uncached_exactly(kind):
    model = tiny_model(kind)
    uncached = steps(model)
    enable_step_cache(model, "first-block", 0.0)
    cached = steps(model)
    for a, b in zip(cached, uncached):
        assert torch.equal(a, b)
    assert step_cache_state(model).skipped_steps == 0


@pytest.mark.parametrize("kind", sorted(TINY))
def test_a_skipped_step_reuses_the_trunk_residual(kind):
    model = tiny_model(kind)
    clips, inputs = pyramid_column(), text_inputs(model, 2)
    with torch.no_grad():
        full = velocity(model, clips, inputs)
        enable_step_cache(model, "first-block", ALWAYS_SKIP)
        first = velocity(model, clips, inputs)
        again = velocity(model, clips, inputs)  # identical inputs: the cached trunk residual is exact
    state = step_cache_state(model)
    assert (state.computed_steps, state.skipped_steps) == (1, 1)
    torch.testing.assert_close(first, full, atol=0, rtol=0)
    torch.testing.assert_close(again, full, atol=1e-5, rtol=1e-5)


def test_reset_forgets_the_previous_stage():
    """After a reset (a stage jump or a new unit) the first step is computed in full, not patched with
    the residual cached for other inputs; without the reset it would be."""
    model = tiny_model("flux")
    clips, inputs = pyramid_column(), text_inputs(model, 2)
    other = [clip + 0.5 for clip in clips]
    with torch.no_grad():
        expected = velocity(model, other, inputs)
        enable_step_cache(model, "first-block", ALWAYS_SKIP)
        velocity(model, clips, inputs)
        leaked = velocity(model, other, inputs)
        reset_step_cache(model)
        velocity(model, clips, inputs)
        reset_step_cache(model)
        fresh = velocity(model, other, inputs)
    assert not torch.allclose(leaked, expected, atol=1e-4)
    torch.testing.assert_close(fresh, expected, atol=0, rtol=0)


def test_guidance_rows_are_decided_apart():
    """Rows are the unconditional and conditional branches: a step where only the conditional row changed
    more than the threshold is computed in full, although the change averaged over both rows is below it."""
    model = tiny_model("flux")
    clips, inputs = pyramid_column(), text_inputs(model, 2)
    moved = [clip.clone() for clip in clips]
    moved[-1][1] += 0.3  # the conditional row's current unit changes, the unconditional one does not
    with torch.no_grad():
        expected = velocity(model, moved, inputs)
        enable_step_cache(model, "first-block", 0.0)
        state = step_cache_state(model)
        velocity(model, clips, inputs)
        before = state.head_residual
        velocity(model, moved, inputs)
        per_row = relative_change(state.head_residual, before)
        averaged = relative_change(state.head_residual.flatten()[None], before.flatten()[None])[0]
        assert per_row[0] == 0 and averaged < per_row[1]
        reset_step_cache(model)
        state.threshold = float(averaged + per_row[1]) / 2
        velocity(model, clips, inputs)
        got = velocity(model, moved, inputs)
    assert (state.computed_steps, state.skipped_steps) == (4, 0)
    torch.testing.assert_close(got, expected, atol=0, rtol=0)


def test_relative_change_is_per_row():
    previous = torch.ones(2, 3, 4)
    current = previous.clone()
    current[1] *= 1.5
    torch.testing.assert_close(relative_change(current, previous), torch.tensor([0.0, 0.5]))


def test_bad_cache_options_are_refused():
    model = tiny_model("mmdit")
    with pytest.raises(ValueError, match="cache must be one of none, first-block"):
        enable_step_cache(model, "tea", 0.1)
    with pytest.raises(ValueError, match="cache_threshold must be a number >= 0"):
        enable_step_cache(model, "first-block", -1)
