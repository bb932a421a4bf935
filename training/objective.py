"""The pyramidal flow matching objective for one sample (Sec. 3.2.1, 3.3, 4.1).

Per sample: a unit (latent frame) i, a stage k drawn uniformly, the temporal-pyramid history of the
frames before i at the layout inference uses (`history_clips`), corrupted by noise of strength
s ~ U[0, history_noise_max] as x <- (1 - s) x + s n, coupled endpoints at level k (Eqs. 9-10) with
one noise n, a stage-local sigma u ~ U(0, 1), x_t on the stage's path (Eq. 6) and the velocity
target (Eq. 11). All randomness comes from a generator seeded by (seed, step, slot), so a sample
draws the same numbers whichever rank or micro-batch it lands in.
"""
from dataclasses import dataclass

import numpy as np
import torch

from model_core.pyramid import (
    coupled_endpoints,
    downsample,
    interpolate_on_path,
    latent_pyramid,
    standard_normal,
    velocity_target,
)
from model_core.temporal import history_clips, history_layout, tokens_per_frame


@dataclass(frozen=True)
class SampleChoices:
    """The scalar random choices of one sample, drawn in this order."""

    stage: int
    unit_fraction: float  # unit i = floor(fraction * latent frames)
    duration_fraction: float  # where the clip length falls in the recipe's range
    clip_start: float
    drop_text: bool  # classifier-free guidance: train on the empty prompt
    history_strength: float  # corruptive noise on the history (Sec. 4.1)
    sigma: float  # stage-local noise level, 1 = stage start


@dataclass
class Column:
    """One packed column for the transformer: history clips, the noisy current unit and its target."""

    clips: list
    target: torch.Tensor
    timestep: float
    stage: int
    tokens: int


def sample_generator(seed: int, step: int, slot: int) -> torch.Generator:
    """A CPU generator determined by (seed, step, slot) alone."""
    state = np.random.SeedSequence([seed, step, slot]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def draw_choices(generator: torch.Generator, num_stages: int, history_noise_max: float, text_dropout: float) -> SampleChoices:
    u = torch.rand(6, generator=generator, dtype=torch.float64).tolist()
    stage = int(torch.randint(num_stages, (1,), generator=generator))
    return SampleChoices(stage=stage, unit_fraction=u[0], duration_fraction=u[1], clip_start=u[2],
                         drop_text=u[3] < text_dropout, history_strength=u[4] * history_noise_max, sigma=u[5])


def unit_index(choices: SampleChoices, num_latent_frames: int) -> int:
    return min(int(choices.unit_fraction * num_latent_frames), num_latent_frames - 1)


def corrupt_history(clip: torch.Tensor, strength: float, generator: torch.Generator) -> torch.Tensor:
    """x <- (1 - s) x + s n: the history sits at noise level s on the flow path (Sec. 3.3, Eq. 16)."""
    noise = standard_normal(clip.shape, generator, clip.device)
    return (1 - strength) * clip + strength * noise


def sample_tokens(latent_height: int, latent_width: int, num_latent_frames: int, choices: SampleChoices, num_stages: int) -> int:
    """Image tokens of the sample's column: its pyramid history plus the current unit at its stage."""
    unit = unit_index(choices, num_latent_frames)
    history = sum(c.length * tokens_per_frame(latent_height, latent_width, c.level, num_stages)
                  for c in history_layout(unit, choices.stage, num_stages))
    return history + tokens_per_frame(latent_height, latent_width, choices.stage, num_stages)


def stage_endpoints(clean: torch.Tensor, stage: int, scheduler, generator: torch.Generator) -> tuple:
    """(start, end) of `stage` on the clean latent's coupled path, at that stage's resolution (Eqs. 9-10)."""
    num_stages = scheduler.config.stages
    noise = standard_normal(downsample(clean, num_stages - 1 - stage).shape, generator, clean.device)
    window = scheduler.windows[stage]
    return coupled_endpoints(clean, stage, window.start_signal, window.end_signal, noise, num_stages)


def corrupted_history(latents: torch.Tensor, choices: SampleChoices, generator: torch.Generator, num_stages: int) -> list:
    """The temporal-pyramid history of the sample's unit at its stage (the pipeline's layout), corrupted (Eq. 16)."""
    unit = unit_index(choices, latents.shape[2])
    if not unit:
        return []
    pyramid = latent_pyramid(latents[:, :, :unit], num_stages)
    return [corrupt_history(c, choices.history_strength, generator) for c in history_clips(pyramid, unit, choices.stage)]


def column_tokens(clips: list) -> int:
    """Image tokens of a column's clips (2x2 patches)."""
    return sum(clip.shape[2] * clip.shape[3] * clip.shape[4] // 4 for clip in clips)


def build_column(latents: torch.Tensor, choices: SampleChoices, generator: torch.Generator, scheduler) -> Column:
    """The column of one sample from its normalised clean latents [1, C, T, H, W] (Eqs. 6, 9-11, 16)."""
    stage, unit = choices.stage, unit_index(choices, latents.shape[2])
    history = corrupted_history(latents, choices, generator, scheduler.config.stages)
    window = scheduler.windows[stage]
    start, end = stage_endpoints(latents[:, :, unit : unit + 1], stage, scheduler, generator)
    noisy = interpolate_on_path(start, end, choices.sigma)
    clips = [*history, noisy]
    return Column(clips, velocity_target(start, end), float(window.timestep(choices.sigma)), stage, column_tokens(clips))
