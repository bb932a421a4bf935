"""Step caches on the pyramid transformers: threshold 0 changes nothing, skipped steps reuse (first-block, mag) or
forecast (taylorseer) the trunk's residual per guidance row, and a reset forgets all but mag's calibration."""
import pytest
import torch

from model_core.step_cache import (
    MAG_MAX_SKIPS,
    StepCacheState,
    check_cache_options,
    apply_step_cache,
    relative_change,
    reset_step_cache,
    step_cache_state,
)
from tests.test_transformer_behaviour import TINY, pyramid_column, text_inputs, tiny_model, velocity

ALWAYS_SKIP = 1e9  # any comparable step is skipped
MODES = ["first-block", "taylorseer"]  # the first-block gated modes


def steps(model, timesteps=(900.0, 880.0, 860.0)):
    """Velocities of one pyramid column at a few nearby timesteps (the steps of one stage)."""
    clips, inputs = pyramid_column(), text_inputs(model, 2)
    with torch.no_grad():
        return [velocity(model, clips, {**inputs, "timestep": torch.full((2,), t)}) for t in timesteps]


@pytest.mark.parametrize("mode", [*MODES, "mag"])
@pytest.mark.parametrize("kind", sorted(TINY))
def test_threshold_zero_equals_uncached_exactly(kind, mode):
    model = tiny_model(kind)
    uncached = steps(model)
    apply_step_cache(model, mode, 0.0)
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
        apply_step_cache(model, "first-block", ALWAYS_SKIP)
        first = velocity(model, clips, inputs)
        again = velocity(model, clips, inputs)  # identical inputs: the cached trunk residual is exact
    state = step_cache_state(model)
    assert (state.computed_steps, state.skipped_steps) == (1, 1)
    torch.testing.assert_close(first, full, atol=0, rtol=0)
    torch.testing.assert_close(again, full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", sorted(TINY))
def test_taylorseer_forecasts_a_skipped_step_closer_than_reuse(kind):
    """Two computed steps, then a skipped one, while the current unit moves along a line (as a sampler step moves
    it): the trunk residual changes smoothly, so the first-order forecast lands far closer to the computed step
    than reusing the last residual does."""
    model = tiny_model(kind)
    clips, inputs = pyramid_column(), text_inputs(model, 2)
    direction = torch.randn(clips[-1].shape, generator=torch.Generator().manual_seed(7))
    path = [[*clips[:-1], clips[-1] + 0.01 * index * direction] for index in range(3)]  # small steps: forecast error ~h², reuse ~h
    with torch.no_grad():
        truth = velocity(model, path[-1], inputs)
        errors = {}
        for mode in MODES:
            apply_step_cache(model, mode, 0.0)
            for index, column in enumerate(path):
                step_cache_state(model).threshold = ALWAYS_SKIP if index == 2 else 0.0
                got = velocity(model, column, inputs)
            assert (step_cache_state(model).computed_steps, step_cache_state(model).skipped_steps) == (2, 1)
            errors[mode] = float((got - truth).abs().max())
    assert 0 < errors["taylorseer"] < 0.2 * errors["first-block"], errors


@pytest.mark.parametrize("mode", MODES)
def test_reset_forgets_the_previous_stage(mode):
    """After a reset (a stage jump or a new unit) the first step is computed in full, not patched with
    the residual cached for other inputs; without the reset it would be."""
    model = tiny_model("flux")
    clips, inputs = pyramid_column(), text_inputs(model, 2)
    other = [clip + 0.5 for clip in clips]
    with torch.no_grad():
        expected = velocity(model, other, inputs)
        apply_step_cache(model, mode, ALWAYS_SKIP)
        velocity(model, clips, inputs)
        leaked = velocity(model, other, inputs)
        reset_step_cache(model)
        velocity(model, clips, inputs)
        reset_step_cache(model)
        fresh = velocity(model, other, inputs)
    assert not torch.allclose(leaked, expected, atol=1e-4)
    torch.testing.assert_close(fresh, expected, atol=0, rtol=0)


@pytest.mark.parametrize("mode", MODES)
def test_guidance_rows_are_decided_apart(mode):
    """Rows are the unconditional and conditional branches: a step where only the conditional row changed
    more than the threshold is computed in full, although the change averaged over both rows is below it."""
    model = tiny_model("flux")
    clips, inputs = pyramid_column(), text_inputs(model, 2)
    moved = [clip.clone() for clip in clips]
    moved[-1][1] += 0.3  # the conditional row's current unit changes, the unconditional one does not
    with torch.no_grad():
        expected = velocity(model, moved, inputs)
        apply_step_cache(model, mode, 0.0)
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


@pytest.mark.parametrize("kind", sorted(TINY))
def test_mag_calibrates_on_the_first_unit_and_skips_later_units_with_the_same_schedule(kind):
    model = tiny_model(kind)
    schedule = (900.0, 880.0, 860.0, 840.0, 820.0)
    uncached = steps(model, schedule)
    apply_step_cache(model, "mag", ALWAYS_SKIP)
    state = step_cache_state(model)
    first_unit = steps(model, schedule)  # nothing calibrated yet: every step runs, each consecutive pair is measured
    assert (state.computed_steps, state.skipped_steps) == (5, 0) and len(state.magnitude_ratios) == 4
    assert all(torch.equal(a, b) for a, b in zip(first_unit, uncached))
    reset_step_cache(model)  # the next unit (or stage): residuals go, ratios stay
    later = steps(model, schedule)
    assert (state.computed_steps, state.skipped_steps) == (5 + 2, 3)  # computed, skipped x MAG_MAX_SKIPS, computed, skipped
    assert MAG_MAX_SKIPS == 2 and torch.equal(later[0], uncached[0]) and torch.equal(later[3], uncached[3])
    assert not torch.equal(later[1], uncached[1]) and torch.isfinite(later[1]).all()
    reset_step_cache(model)
    steps(model, (900.0, 870.0, 840.0))  # another schedule: its timestep pairs were never calibrated
    assert (state.computed_steps, state.skipped_steps) == (7 + 3, 3)


def test_mag_skips_while_the_accumulated_error_of_every_row_stays_below_the_threshold():
    state = StepCacheState(threshold=0.15, mode="mag", trunk_residuals=[(0, torch.ones(2, 3, 4))])
    state.magnitude_ratios = {(1.0, 0.9): torch.tensor([0.95, 0.92]), (0.9, 0.8): torch.tensor([0.95, 0.96])}
    state.timesteps = (1.0, 0.9)
    product, error, in_a_row = state.magnitude_allows_skip()  # errors 0.05 / 0.08
    torch.testing.assert_close(error, torch.tensor([0.05, 0.08]))
    state.accumulated, state.timesteps = (product, error, in_a_row), (0.9, 0.8)
    assert state.magnitude_allows_skip() is None  # row 1: 0.08 + |1 - 0.92 x 0.96| = 0.197 > 0.15
    state.threshold = 0.2
    assert state.magnitude_allows_skip()[2] == 2
    state.accumulated = (product, error, MAG_MAX_SKIPS)
    assert state.magnitude_allows_skip() is None  # at most MAG_MAX_SKIPS in a row
    state.timesteps = (0.8, 0.7)
    state.accumulated = (1.0, 0.0, 0)
    assert state.magnitude_allows_skip() is None  # never calibrated


def test_relative_change_is_per_row():
    previous = torch.ones(2, 3, 4)
    current = previous.clone()
    current[1] *= 1.5
    torch.testing.assert_close(relative_change(current, previous), torch.tensor([0.0, 0.5]))


def test_bad_cache_options_are_refused():
    model = tiny_model("mmdit")
    with pytest.raises(ValueError, match="cache must be one of none, first-block, taylorseer, mag"):
        apply_step_cache(model, "tea", 0.1)
    with pytest.raises(ValueError, match="cache_threshold must be a finite number >= 0"):
        apply_step_cache(model, "first-block", -1)
    assert check_cache_options("First_Block", 0.2) == ("first-block", 0.2)
