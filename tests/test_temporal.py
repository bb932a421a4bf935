import pytest

from model_core import token_budget
from model_core.temporal import history_layout, tokens_per_frame
from reference import scheduler_tables

BUDGET = scheduler_tables()["token_budget"]
ROWS = [pytest.param(res, row, id=f"{res}-temp{row['temp']}") for res in ("384p", "768p") for row in BUDGET[res]["rows"]]


@pytest.mark.parametrize("res,row", ROWS)
def test_token_budget_matches_reference(res, row):
    table = BUDGET[res]
    budget = token_budget(table["height"], table["width"], 1 + 8 * (row["temp"] - 1))
    assert budget["stage_tokens"] == [stage["image_tokens"] for stage in row["stages"]]
    assert budget["pyramid_max_tokens"] == row["max_over_stages"]
    assert budget["full_sequence_tokens"] == row["full_sequence_tokens"]


def test_ten_second_768p_budget_from_the_paper():
    budget = token_budget(768, 1280, 241)
    assert (budget["pyramid_max_tokens"], budget["full_sequence_tokens"]) == (15_360, 119_040)


def frame_heights(clips):
    """Per-frame latent heights of a clip list, oldest first (what the transformer sees)."""
    return [h for clip in clips for h in [clip[-2]] * clip[1]]


@pytest.mark.parametrize("res,row", ROWS)
def test_history_layout_matches_reference_clips(res, row):
    latent_h = BUDGET[res]["latent_hw"][0]
    for stage in row["stages"]:
        layout = history_layout(row["last_unit_index"], stage["stage"])
        ours = [latent_h >> (2 - clip.level) for clip in layout for _ in range(clip.length)]
        reference = frame_heights(stage["clips_oldest_to_current_[C,T,H,W]_latent"])
        assert ours + [latent_h >> (2 - stage["stage"])] == reference


def test_history_layout_merges_runs_and_covers_every_frame():
    layout = history_layout(6, 2)
    assert [(c.first, c.length, c.level) for c in layout] == [(0, 4, 0), (4, 1, 1), (5, 1, 2)]
    assert history_layout(0, 1) == []


def test_tokens_per_frame():
    assert [tokens_per_frame(96, 160, level) for level in range(3)] == [240, 960, 3840]


@pytest.mark.parametrize(
    "args,message",
    [
        ((384, 640, 0), "1 \\+ 8k"),
        ((384, 640, 10), "1 \\+ 8k"),
        ((380, 640, 9), "multiples of 64"),
        ((384, 0, 9), "multiples of 64"),
    ],
)
def test_token_budget_rejects_bad_sizes(args, message):
    with pytest.raises(ValueError, match=message):
        token_budget(*args)


def test_history_layout_rejects_unknown_stage():
    with pytest.raises(ValueError, match="0..2"):
        history_layout(3, 3)


def test_history_clips_slice_the_clean_pyramid():
    import torch

    from model_core.pyramid import latent_pyramid
    from model_core.temporal import history_clips

    video = torch.randn(1, 4, 5, 16, 16)
    clips = history_clips(latent_pyramid(video), unit_index=4, stage=2)
    assert [tuple(c.shape[2:]) for c in clips] == [(2, 4, 4), (1, 8, 8), (1, 16, 16)]
    torch.testing.assert_close(clips[-1], video[:, :, 3:4])
    with pytest.raises(ValueError, match="only 5 are given"):
        history_clips(latent_pyramid(video), unit_index=6, stage=0)


def test_history_is_the_authors_up_to_ten_seconds_and_flat_after():
    """Up to the longest published clip (31 latent frames) every frame before a unit is history; past it the
    window slides, so the last unit's tokens stop growing (flat time and memory per unit for long videos)."""
    from model_core.temporal import HISTORY_WINDOW

    assert HISTORY_WINDOW == 30
    assert sum(c.length for c in history_layout(30, 2)) == 30
    budgets = [token_budget(384, 640, 1 + 8 * (latent - 1))["pyramid_max_tokens"] for latent in range(29, 62)]
    assert budgets[0] < budgets[2] == budgets[-1]  # grows to 31 latent frames (10 s), then stays
    later = history_layout(50, 2)
    assert (later[0].first, sum(c.length for c in later)) == (20, 30)
    assert [(c.length, c.level) for c in later] == [(c.length, c.level) for c in history_layout(30, 2)]


def test_the_sampler_feeds_at_most_the_window_of_history():
    import torch

    from model_core.sampling import sample_video
    from model_core.scheduler import PyramidFlowScheduler
    from model_core.temporal import HISTORY_WINDOW

    seen = []

    def velocity_for_unit(unit):
        def velocity(clips, t):
            seen.append((unit, sum(c.shape[2] for c in clips[:-1])))
            return torch.zeros_like(clips[-1])
        return velocity

    units = HISTORY_WINDOW + 4
    latents, interrupted = sample_video(velocity_for_unit, PyramidFlowScheduler(), (1, 2, units, 8, 8),
                                        first_frame_steps=(1, 1, 1), video_steps=(1, 1, 1),
                                        generator=torch.Generator().manual_seed(0))
    history = dict(seen)
    assert latents.shape[2] == units and not interrupted
    assert [history[u] for u in (0, 1, 29, 30, 31, units - 1)] == [0, 1, 29, 30, 30, 30]
