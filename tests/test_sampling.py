import torch

from model_core import PyramidFlowScheduler
from model_core.sampling import sample_unit


def recording_velocity(calls):
    def velocity(clips, t):
        calls.append((tuple(clips[-1].shape[-2:]), float(t)))
        return torch.zeros_like(clips[-1])

    return velocity


def test_sampling_from_a_later_stage_runs_only_that_stage_and_the_ones_after():
    scheduler = PyramidFlowScheduler()
    calls = []
    start = torch.randn(1, 4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    out = sample_unit(recording_velocity(calls), scheduler, start, [], 0, (2, 3, 4), torch.Generator().manual_seed(1),
                      first_stage=1)
    assert [shape for shape, _ in calls] == [(8, 8)] * 3 + [(16, 16)] * 4
    assert max(t for _, t in calls) <= scheduler.windows[1].timestep_start
    assert out.shape == (1, 4, 1, 16, 16)


def test_sampling_from_the_last_stage_starts_exactly_at_the_given_point():
    """No jump is taken into the first stage sampled: with a zero velocity the start comes back unchanged."""
    start = torch.randn(1, 4, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    out = sample_unit(recording_velocity([]), PyramidFlowScheduler(), start, [], 0, (5, 5, 5),
                      torch.Generator().manual_seed(1), first_stage=2)
    assert torch.equal(out, start)

