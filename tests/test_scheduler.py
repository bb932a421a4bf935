import numpy as np
import pytest
import torch

from model_core import PyramidFlowScheduler
from model_core.pyramid import coupled_endpoints, interpolate_on_path, velocity_target
from reference import scheduler_tables

TABLES = scheduler_tables()
SCHEDULE_ROWS = [
    pytest.param(row, id=f"{name}-stage{row['stage']}")
    for name, rows in TABLES["set_timesteps"].items()
    for row in rows
]


@pytest.fixture(scope="module")
def scheduler():
    return PyramidFlowScheduler(**TABLES["scheduler_config"])


@pytest.mark.parametrize("row", SCHEDULE_ROWS)
def test_set_timesteps_matches_reference_table(scheduler, row):
    scheduler.set_timesteps(row["num_inference_steps"], stage_index=row["stage"])
    assert scheduler.timesteps.tolist() == row["timesteps"]  # the official float32 grid, exactly
    assert scheduler.sigmas.tolist() == row["sigmas"]
    assert scheduler.timesteps.dtype == torch.float64


def test_stage_windows_match_reference(scheduler):
    for window, ref in zip(scheduler.windows, TABLES["stages"]):
        assert window.original_start_sigma == pytest.approx(ref["ori_start_sigma"], abs=1e-7)
        assert window.start_sigma == pytest.approx(ref["corrected_start_sigma"], abs=1e-7)
        assert window.end_sigma == pytest.approx(ref["end_sigma"], abs=1e-7)
        assert window.timestep(1.0) == pytest.approx(ref["train_timesteps_first"], abs=1e-2)
        assert window.timestep(1e-3) == pytest.approx(ref["train_timesteps_last"], abs=1e-2)


def test_corrected_start_satisfies_eq26(scheduler):
    # e_{k+1} = 2 s_k / (1 + s_k) with gamma = -1/3, in signal levels t = 1 - sigma
    for before, window in zip(scheduler.windows, scheduler.windows[1:]):
        s = window.start_signal
        assert before.end_signal == pytest.approx(2 * s / (1 + s), abs=1e-9)


def test_renoise_coefficients_match_reference(scheduler):
    for ref in TABLES["renoise_at_stage_jump"]:
        scale, noise_std = scheduler.renoise_coefficients(ref["into_stage"])
        assert scale == pytest.approx(ref["alpha"], abs=1e-6)
        assert noise_std == pytest.approx(ref["beta"], abs=1e-6)
        s = scheduler.windows[ref["into_stage"]].start_signal
        assert (scale, noise_std) == pytest.approx(((1 + s) / 2, 3**0.5 * (1 - s) / 2))  # Eq. 15


@pytest.mark.parametrize("stage", [0, 1, 2])
@pytest.mark.parametrize("steps", [1, 3, 10])
def test_euler_on_exact_velocity_lands_on_the_end_point(scheduler, stage, steps):
    """Coupled endpoints make the flow straight (Eq. 11), so Euler with the exact velocity is exact."""
    g = torch.Generator().manual_seed(stage * 10 + steps)
    x1 = torch.randn(2, 4, 1, 16, 16, generator=g)
    window = scheduler.windows[stage]
    noise = torch.randn(2, 4, 1, 16 >> (2 - stage), 16 >> (2 - stage), generator=g)
    start, end = coupled_endpoints(x1, stage, window.start_signal, window.end_signal, noise)
    v = velocity_target(start, end)
    scheduler.set_timesteps(steps, stage_index=stage)
    x = start
    for t in scheduler.timesteps:
        x = scheduler.step(v, t, x).prev_sample
    torch.testing.assert_close(x, end, atol=1e-5, rtol=0)


def test_step_keeps_sample_dtype_and_computes_in_float32(scheduler):
    scheduler.set_timesteps(3, stage_index=1)
    sample = torch.ones(1, 2, 1, 4, 4, dtype=torch.bfloat16)
    out = scheduler.step(torch.ones_like(sample), scheduler.timesteps[0], sample).prev_sample
    assert out.dtype == torch.bfloat16
    assert torch.allclose(out.float(), torch.full_like(out.float(), 1 - 0.4995), atol=1e-2)


def test_step_index_follows_the_given_timestep(scheduler):
    scheduler.set_timesteps(3, stage_index=0)
    x = torch.zeros(1, 1, 1, 2, 2)
    out = scheduler.step(torch.ones_like(x), scheduler.timesteps[1], x).prev_sample
    assert torch.allclose(out, torch.full_like(x, 0.001 - 0.5005))


def test_config_round_trip(tmp_path, scheduler):
    scheduler.save_config(tmp_path)
    again = PyramidFlowScheduler.from_pretrained(tmp_path)
    assert again.config.stage_range == scheduler.config.stage_range
    assert again.windows == scheduler.windows


@pytest.mark.parametrize("steps", [0, -3, 2.5, "10"])
def test_non_positive_or_non_integer_steps_are_rejected(scheduler, steps):
    with pytest.raises(ValueError, match="positive integer"):
        scheduler.set_timesteps(steps, stage_index=0)


@pytest.mark.parametrize("stage", [-1, 3, 1.0])
def test_unknown_stage_is_rejected(scheduler, stage):
    with pytest.raises(ValueError, match="0..2"):
        scheduler.set_timesteps(5, stage_index=stage)


def test_step_before_set_timesteps_is_explained():
    with pytest.raises(ValueError, match="set_timesteps"):
        PyramidFlowScheduler().step(torch.zeros(1), 1000.0, torch.zeros(1))


@pytest.mark.parametrize("kwargs", [{"gamma": 0.5}, {"stage_range": [0, 0.5, 1]}])
def test_bad_config_is_rejected(kwargs):
    with pytest.raises(ValueError):
        PyramidFlowScheduler(**kwargs)


def test_interpolation_is_linear_in_sigma():
    start, end = torch.randn(2, 1, 1, 2, 2), torch.randn(2, 1, 1, 2, 2)
    a, b = interpolate_on_path(start, end, 0.7), interpolate_on_path(start, end, 0.2)
    torch.testing.assert_close((a - b) / 0.5, velocity_target(start, end))
    torch.testing.assert_close(interpolate_on_path(start, end, torch.tensor([1.0, 0.0]))[0], start[0])


@pytest.mark.parametrize("steps", [1, 2, 3, 5])
def test_trailing_grid_takes_equal_steps_down_to_zero(steps):
    """n trailing steps are n real ones (the official grid's last goes from 0.001 to 0); one step is the same on both."""
    trailing, official = PyramidFlowScheduler(stage_grid="trailing"), PyramidFlowScheduler()
    for stage in range(3):
        trailing.set_timesteps(steps, stage_index=stage)
        official.set_timesteps(steps, stage_index=stage)
        assert trailing.sigmas.tolist() == pytest.approx([1 - i / steps for i in range(steps + 1)], abs=1e-12)
        window = trailing.windows[stage]
        assert trailing.timesteps.tolist() == pytest.approx([window.timestep(s) for s in trailing.sigmas[:-1].tolist()])
        assert trailing.timesteps[0] == official.timesteps[0]  # both start at the stage's first timestep
        if steps == 1:
            assert torch.equal(trailing.sigmas, official.sigmas)
        else:
            assert official.sigmas[-2] == pytest.approx(0.001) and trailing.sigmas[-2] == pytest.approx(1 / steps)


def test_trailing_grid_survives_a_config_round_trip_and_unknown_grids_are_refused(tmp_path):
    PyramidFlowScheduler(stage_grid="trailing").save_config(tmp_path)
    assert PyramidFlowScheduler.from_pretrained(tmp_path).config.stage_grid == "trailing"
    with pytest.raises(ValueError, match="stage_grid must be one of official, trailing; got 'leading'"):
        PyramidFlowScheduler(stage_grid="leading")
