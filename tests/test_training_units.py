"""Pieces of the training package on their own: objective, packing, data helpers, checkpoints, config."""

import pytest
import torch

from model_core.pyramid import coupled_endpoints, standard_normal
from model_core.scheduler import PyramidFlowScheduler
from model_core.temporal import history_layout
from training.checkpointing import latest_checkpoint, write_checkpoint
from training.config import load_config
from training.ema import EMA
from training.data import Annotation, nearest_bucket, resampled_indices
from training.objective import (
    SampleChoices,
    build_column,
    corrupt_history,
    draw_choices,
    sample_generator,
)
from training.packing import BatchPlanner, balanced_bins, clip_seconds

OBJECTIVE = {"stages": 3, "history_noise_max": 1 / 3, "text_dropout": 0.1}


def choices(stage, unit_fraction, sigma, strength=0.0):
    return SampleChoices(stage, unit_fraction, 0.0, 0.0, False, strength, sigma)


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_column_follows_the_pyramid_path(stage):
    scheduler = PyramidFlowScheduler()
    latents = torch.randn(1, 4, 5, 16, 16)
    column = build_column(latents, choices(stage, 0.99, 1.0), torch.Generator().manual_seed(0), scheduler)
    layout = history_layout(4, stage)
    assert [c.shape[2] for c in column.clips[:-1]] == [c.length for c in layout]
    assert [c.shape[-1] for c in column.clips[:-1]] == [16 // 2 ** (2 - c.level) for c in layout]
    assert column.clips[-1].shape[-1] == 16 // 2 ** (2 - stage)
    window = scheduler.windows[stage]
    assert column.timestep == pytest.approx(window.timestep_start)
    # replay the generator: history corruption noise first, then the endpoints' shared noise (Eqs. 9-10)
    replay = torch.Generator().manual_seed(0)
    for clip in column.clips[:-1]:
        standard_normal(clip.shape, replay)
    noise = standard_normal(column.clips[-1].shape, replay)
    start, end = coupled_endpoints(latents[:, :, 4:5], stage, window.start_signal, window.end_signal, noise)
    assert torch.equal(column.clips[-1], start)  # sigma = 1 is the stage's start point
    assert torch.equal(column.target, start - end)  # Eq. 11, noise-ward sign


def test_image_column_has_no_history():
    column = build_column(torch.randn(1, 4, 1, 8, 8), choices(1, 0.7, 0.3), torch.Generator().manual_seed(0),
                          PyramidFlowScheduler())
    assert len(column.clips) == 1


def test_history_corruption_is_flow_interpolation():
    clip = torch.ones(1, 4, 2, 4, 4)
    generator = torch.Generator().manual_seed(3)
    noise = torch.randn(clip.shape, generator=torch.Generator().manual_seed(3))
    assert torch.allclose(corrupt_history(clip, 0.25, generator), 0.75 * clip + 0.25 * noise)


def test_draws_depend_on_seed_step_and_slot_only():
    a = draw_choices(sample_generator(0, 5, 3), 3, 1 / 3, 0.1)
    assert a == draw_choices(sample_generator(0, 5, 3), 3, 1 / 3, 0.1)
    assert a != draw_choices(sample_generator(0, 5, 4), 3, 1 / 3, 0.1)
    assert 0 <= a.history_strength <= 1 / 3


def test_stages_are_uniform():
    stages = [draw_choices(sample_generator(0, 0, slot), 3, 0.0, 0.0).stage for slot in range(3000)]
    assert all(abs(stages.count(k) / 3000 - 1 / 3) < 0.03 for k in range(3))


def test_balanced_bins_cover_all_items_evenly():
    costs = [100, 90, 50, 40, 30, 20, 10, 5]
    bins = balanced_bins(costs, 3)
    assert sorted(i for b in bins for i in b) == list(range(8))
    loads = [sum(costs[i] for i in b) for b in bins]
    assert max(loads) - min(loads) <= max(costs) and all(bins)


def planner(num_bins, ratio=0.25, seconds=2, frames_per_latent=8):
    entries = [Annotation("video", f"v{i}.mp4", "v", height=64, width=64) for i in range(6)]
    entries += [Annotation("image", f"i{i}.png", "i") for i in range(3)]
    data = {"image_ratio": ratio, "fps": 8, "buckets": [[64, 64]], "clip_schedule": [{"seconds": seconds}]}
    return BatchPlanner(entries, data, OBJECTIVE, seed=0, global_batch=8, num_bins=num_bins,
                        frames_per_latent=frames_per_latent)


def test_clip_lengths_follow_the_vaes_temporal_compression():
    for frames_per_latent, clip_frames in ((8, 9), (4, 13)):  # 1.5 s at 8 fps = 12 frames
        requests = planner(1, seconds=1.5, frames_per_latent=frames_per_latent).requests(0)
        assert sorted({r.num_frames for r in requests}) == [1, clip_frames]


def test_global_batch_does_not_depend_on_the_rank_layout():
    one, four = planner(1), planner(4)
    for step in range(3):
        assert one.requests(step) == four.requests(step)
        assert sorted((r.slot for b in four.bins(step) for r in b)) == list(range(8))
    kinds = [planner(1).annotations[r.entry].kind for r in one.requests(0)]
    assert kinds.count("image") == 2  # 25 % of the batch


def test_clip_schedule_and_resampling():
    schedule = [{"until_step": 80_000, "seconds": 2}, {"until_step": None, "seconds": 5}]
    assert clip_seconds(schedule, 79_999, 0.5) == 2 and clip_seconds(schedule, 80_000, 0.5) == 5
    assert clip_seconds([{"seconds": [5, 10]}], 0, 0.5) == 7.5
    assert resampled_indices(49, 24, 8, 17, 0.0, 8) == [3 * j for j in range(17)]
    assert len(resampled_indices(20, 24, 24, 17, 0.5, 8)) == 17
    assert len(resampled_indices(10, 24, 24, 17, 0.5, 8)) == 9
    assert len(resampled_indices(14, 24, 24, 17, 0.5, 8)) == 9 and len(resampled_indices(14, 24, 24, 17, 0.5, 4)) == 13
    assert nearest_bucket(720, 1280, [(384, 640), (640, 384), (512, 512)]) == (384, 640)


def test_checkpoints_are_renamed_into_place(tmp_path):
    def write(folder):
        (folder / "training_state").mkdir()
        (folder / "training_state" / "state.json").write_text("{}")

    for step in (1, 2, 3):
        write_checkpoint(tmp_path, step, write, keep=2)
    (tmp_path / "checkpoint-9.tmp" / "training_state").mkdir(parents=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2", "checkpoint-3", "checkpoint-9.tmp"]
    assert latest_checkpoint(tmp_path).name == "checkpoint-3"


def test_overrides_parse_as_yaml(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("train: {seed: 0}\n")
    config = load_config(recipe, ["train.seed=3", "data.buckets=[[64, 64]]", "model.lora={rank: 4}"])
    assert config["train"]["seed"] == 3 and config["data"]["buckets"] == [[64, 64]]
    assert config["model"]["lora"] == {"rank": 4}


def test_lr_warms_up_then_stays_or_falls_on_a_line():
    from training.loop import lr_schedule

    def factors(**optim):
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
        scheduler = lr_schedule(optimizer, {"lr": 0.1, "warmup_steps": 4, **optim}, max_steps=20)
        out = []
        for _ in range(20):
            out.append(scheduler.get_last_lr()[0] / 0.1)
            optimizer.step()
            scheduler.step()
        return out

    constant = factors()
    assert [constant[step] for step in (0, 1, 3, 4, 10, 19)] == pytest.approx([0.0, 0.25, 0.75, 1.0, 1.0, 1.0])
    decaying = factors(final_lr_ratio=0.2)
    assert decaying[4] == pytest.approx(1.0) and decaying[12] == pytest.approx(0.6) and decaying[19] == pytest.approx(0.25)


def test_ema_is_a_constant_decay_average_from_the_first_step():
    model = torch.nn.Linear(2, 2)
    ema = EMA(model.named_parameters(), decay=0.5)
    start = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(2.0)
    ema.update(model.named_parameters())
    assert torch.allclose(ema.state_dict()["weight"], start + 1.0)
    with torch.no_grad():
        model.weight.add_(2.0)
    ema.update(model.named_parameters())
    assert torch.allclose(ema.state_dict()["weight"], start + 2.5)
    again = EMA(torch.nn.Linear(2, 2).named_parameters(), decay=0.5)
    again.load_state_dict(ema.state_dict())
    assert all(torch.equal(again.state_dict()[k], v) for k, v in ema.state_dict().items())


def test_yaml_numbers_in_scientific_notation_are_numbers(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("optim: {lr: 1e-3, eps: 1.0e-6, big: 5E4}\n")
    config = load_config(recipe, ["optim.wd=1e-4", "optim.name=1e3x"])
    assert config["optim"] == {"lr": 1e-3, "eps": 1e-6, "big": 5e4, "wd": 1e-4, "name": "1e3x"}


def test_overrides_may_follow_the_options():
    from training.launch import parse_args

    args = parse_args(["--config", "r.yaml", "a.b=1", "--max-steps", "4", "c.d=2", "--output-dir", "x", "e.f=3"])
    assert args.max_steps == 4 and args.output_dir == "x" and args.overrides == ["a.b=1", "c.d=2", "e.f=3"]


def test_bucket_that_the_pyramid_cannot_halve_is_refused():
    from training.data import check_buckets

    check_buckets([[384, 640], [512, 512]], 64, "x")
    with pytest.raises(ValueError, match=r"\[\[96, 64\]\].*multiples of 64"):
        check_buckets([[64, 64], [96, 64]], 64, "the VAE")
