"""The sampler: Algorithm 1 inside each unit, autoregressive units over time (Eq. 17).

Pure functions over tensors; the transformer and guidance enter through `velocity(clips, t)`.
Latents are normalised, [B, C, T, H, W], float32.
"""
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .pyramid import initial_noise, latent_pyramid, renoise_at_jump
from .scheduler import PyramidFlowScheduler
from .temporal import bucket_length, coarsest_history_frames, history_buckets, history_clips, history_start


@dataclass(frozen=True)
class Progress:
    """Where a generation is after a transformer step: `kind` is "unit" on the step that finishes a unit."""

    kind: str  # "step" | "unit"
    unit: int
    num_units: int
    stage: int
    step: int
    unit_steps: tuple  # this unit's steps per stage

    @property
    def num_steps(self) -> int:
        """Steps of the current stage."""
        return self.unit_steps[self.stage]

    @property
    def fraction(self) -> float:
        """How far the whole generation is: finished units plus the steps done in this one."""
        done_in_unit = 1.0 if self.kind == "unit" else (sum(self.unit_steps[: self.stage]) + self.step + 1) / sum(self.unit_steps)
        return min(1.0, (self.unit + done_in_unit) / self.num_units)


def padded_history(conditions: list, frames: int, length: int, current: torch.Tensor) -> tuple:
    """Shape buckets: the history clips with the coarsest one (the first, `frames` frames long) padded with zero
    frames to `length`, and the velocity's keyword `valid_frames` ([T] bool: its real frames, the other clips' and
    the current unit's) that keeps the padding out of attention and positions (packing.PaddedColumn)."""
    first = conditions[0]
    padding = first.new_zeros(*first.shape[:2], length - frames, *first.shape[3:])
    total = length + sum(clip.shape[2] for clip in conditions[1:]) + current.shape[2]
    valid = torch.ones(total, dtype=torch.bool, device=current.device)
    valid[frames:length] = False
    return [torch.cat([first, padding], dim=2), *conditions[1:]], {"valid_frames": valid}


def sample_unit(velocity: Callable, scheduler: PyramidFlowScheduler, start, history: list, unit: int,
                steps, generator=None, on_step: Callable = None, first_stage: int = 0, stop: Callable = None,
                buckets=None):
    """Algorithm 1: integrate every stage from `first_stage` (whose start point, at that stage's resolution,
    is `start`), upsampling and renoising at each jump (Eq. 15).

    `on_step(stage, index, t, x)` sees each step's result and returns the latent to go on from. When `stop()`
    turns true before the last step, the unit is abandoned and None returned. `buckets`: per stage, the lengths
    the coarsest history clip is padded to (temporal.history_buckets; the velocity then takes `valid_frames`)."""
    x = start
    last_stage = scheduler.config.stages - 1
    for stage in range(first_stage, scheduler.config.stages):
        if stage > first_stage:
            scale, noise_std = scheduler.renoise_coefficients(stage)
            x = renoise_at_jump(x, scale, noise_std, generator=generator, correlation=-scheduler.config.gamma)
        scheduler.set_timesteps(steps[stage], stage_index=stage, device=x.device)
        scheduler.set_begin_index(0)  # the steps start at the first timestep: no look-up (a device read) in step()
        conditions, padding = history_clips(history, unit, stage) if unit else [], {}
        frames = coarsest_history_frames(unit, stage, scheduler.config.stages) if unit and buckets else 0
        if frames:
            conditions, padding = padded_history(conditions, frames, bucket_length(frames, buckets[stage]), x)
        for index, t in enumerate(scheduler.timesteps):
            x = scheduler.step(velocity([*conditions, x], t, **padding), t, x).prev_sample
            if on_step is not None:
                x = on_step(stage, index, t, x)
            finished = stage == last_stage and index == steps[stage] - 1
            if stop is not None and not finished and stop():
                return None
    return x


def sample_video(velocity_for_unit: Callable, scheduler: PyramidFlowScheduler, shape, history=None,
                 first_frame_steps=(20, 20, 20), video_steps=(10, 10, 10), generator=None,
                 on_step: Callable = None, stop: Callable = None, device=None, shape_buckets: bool = False) -> tuple:
    """Generate latent frames one unit at a time, each conditioned on the clean, temporally
    pyramided history of the ones before it (Eq. 17), at most HISTORY_WINDOW frames back.

    `shape_buckets`: pad the coarsest history clip to a few lengths per stage (temporal.history_buckets), so that
    a compiled transformer sees a few input shapes per video; outputs equal the unpadded ones up to rounding, at
    the cost of the padding tokens. The velocities then take `valid_frames` (see `padded_history`).
    `shape` is [B, C, T_new, H, W] at full latent resolution; `history` [B, C, T_h, H, W] or None.
    `on_step(progress, t, x)` runs after every transformer step and returns the latent to go on from; `stop()` is
    checked after each step: the unit under way is dropped, finished ones are kept.
    Returns (latents of history + finished units, interrupted).
    """
    batch, channels, new_units, height, width = shape
    num_stages = scheduler.config.stages
    noise = initial_noise(shape, num_stages, generator=generator, device=device)
    frames = list(history.split(1, dim=2)) if history is not None else []
    first, total = len(frames), len(frames) + new_units
    buckets = [history_buckets(total, stage) for stage in range(num_stages)] if shape_buckets else None
    for unit in range(first, total):
        steps = tuple(first_frame_steps if unit == 0 else video_steps)
        oldest = history_start(unit)
        pyramid = latent_pyramid(torch.cat(frames[oldest:], dim=2), num_stages) if frames else []

        def report(stage, index, t, x):
            kind = "unit" if stage == num_stages - 1 and index == steps[-1] - 1 else "step"
            return on_step(Progress(kind, unit, total, stage, index, steps), t, x) if on_step else x

        start = noise[:, :, unit - first : unit - first + 1]
        latent = sample_unit(velocity_for_unit(unit), scheduler, start, pyramid, unit - oldest, steps, generator, report,
                             stop=stop, buckets=buckets)
        if latent is None:
            return torch.cat(frames, dim=2) if frames else None, True
        frames.append(latent)
        if stop is not None and unit + 1 < total and stop():
            return torch.cat(frames, dim=2), True
    return torch.cat(frames, dim=2), False
