"""Temporal pyramid (Sec. 3.3): which history frames condition a unit, at which resolution, and
what it costs in tokens. One latent frame per autoregressive unit, as in the published models."""
import math
from dataclasses import dataclass

PATCH_SIZE = 2
# History frames a unit sees at most: those of the last unit of the longest published clip (768p, 10 s, 31 latent
# frames). Up to that length the layout is the authors'; past it the oldest frames slide out of the window, so
# tokens, temporal positions and memory per unit stay flat for videos of any length.
HISTORY_WINDOW = 30
# Shape buckets (model_core.sampling): lengths per stage the coarsest history clip is padded to, so that a compiled
# transformer sees a few input shapes per video instead of one per unit and stage.
BUCKETS_PER_STAGE = 3


def latent_frames(num_frames: int, frames_per_latent: int) -> int:
    """Latent frames the causal VAE makes of `num_frames` pixel frames: the first frame alone, then one per
    `frames_per_latent` (its temporal compression)."""
    return 1 + (num_frames - 1) // frames_per_latent


def pixel_frames(num_latent_frames: int, frames_per_latent: int) -> int:
    """Pixel frames decoded from `num_latent_frames` latent frames (the inverse of `latent_frames`)."""
    return 1 + frames_per_latent * (num_latent_frames - 1)


@dataclass(frozen=True)
class HistoryClip:
    """A run of consecutive history latent frames [first, first + length) fed at one pyramid level."""

    first: int
    length: int
    level: int


def history_level(distance: int, stage: int) -> int:
    """Level of the history frame `distance` units back while generating at `stage` (Eqs. 16-17):
    each step back halves the resolution, from the current stage's level down to the coarsest."""
    return max(stage - distance + 1, 0)


def history_start(unit_index: int) -> int:
    """The oldest history frame unit `unit_index` sees: at most HISTORY_WINDOW frames back."""
    return max(0, unit_index - HISTORY_WINDOW)


def history_layout(unit_index: int, stage: int, num_stages: int = 3) -> list:
    """History clips for unit `unit_index` at `stage`, oldest first, within the window; runs of equal level merge."""
    if unit_index < 0:
        raise ValueError(f"unit_index must be >= 0; got {unit_index}")
    if not 0 <= stage < num_stages:
        raise ValueError(f"stage must be in 0..{num_stages - 1}; got {stage}")
    clips = []
    for frame in range(history_start(unit_index), unit_index):
        level = history_level(unit_index - frame, stage)
        if clips and clips[-1].level == level:
            clips[-1] = HistoryClip(clips[-1].first, clips[-1].length + 1, level)
        else:
            clips.append(HistoryClip(frame, 1, level))
    return clips


def coarsest_history_frames(unit_index: int, stage: int, num_stages: int = 3) -> int:
    """Frames of the history clip at level 0 (all but the `stage` most recent frames of the window), the only clip
    whose length grows with the unit; 0 when there is none."""
    clips = history_layout(unit_index, stage, num_stages)
    return clips[0].length if clips and clips[0].level == 0 else 0


def history_buckets(total_units: int, stage: int, per_stage: int = BUCKETS_PER_STAGE) -> tuple:
    """The lengths the coarsest history clip is padded to at `stage` in a video of `total_units` units: `per_stage`
    lengths spread evenly up to the longest such clip of its units (a shorter video needs fewer)."""
    longest = max(min(total_units - 1, HISTORY_WINDOW) - stage, 0)
    return tuple(sorted({math.ceil(longest * k / per_stage) for k in range(1, per_stage + 1)} - {0}))


def bucket_length(frames: int, buckets) -> int:
    """The shortest of `buckets` that holds `frames` frames; `frames` itself when none does or when it is 0 (an
    absent clip is not padded: padding in front of the text's group would change what the text attends to)."""
    return min((length for length in buckets if length >= frames), default=frames) if frames else 0


def history_clips(clean_pyramid: list, unit_index: int, stage: int) -> list:
    """Slice the clean latents (one tensor per level, coarsest first, [B, C, T, H, W]) into the
    history clips that condition unit `unit_index` at `stage`, oldest first (Eq. 17)."""
    layout = history_layout(unit_index, stage, num_stages=len(clean_pyramid))
    available = clean_pyramid[0].shape[2]
    if unit_index > available:
        raise ValueError(f"unit {unit_index} needs {unit_index} history frames; only {available} are given")
    return [clean_pyramid[c.level][:, :, c.first : c.first + c.length] for c in layout]


def _latent_grid(height: int, width: int, num_frames: int, vae_scale: int, vae_temporal_scale: int, num_stages: int):
    multiple = vae_scale * PATCH_SIZE * 2 ** (num_stages - 1)
    if height <= 0 or width <= 0 or height % multiple or width % multiple:
        raise ValueError(
            f"height and width must be positive multiples of {multiple} pixels "
            f"(VAE x{vae_scale}, {num_stages} pyramid levels, 2x2 patches); got {height}x{width}"
        )
    if num_frames < 1 or (num_frames - 1) % vae_temporal_scale:
        raise ValueError(
            f"num_frames must be 1 + {vae_temporal_scale}k (e.g. 1, {1 + vae_temporal_scale}, "
            f"{1 + 2 * vae_temporal_scale}, ...); got {num_frames}"
        )
    return height // vae_scale, width // vae_scale, latent_frames(num_frames, vae_temporal_scale)


def tokens_per_frame(latent_height: int, latent_width: int, level: int, num_stages: int = 3) -> int:
    """Image tokens of one latent frame at pyramid `level` after 2x2 patchify."""
    shrink = 2 ** (num_stages - 1 - level) * PATCH_SIZE
    return (latent_height // shrink) * (latent_width // shrink)


def token_budget(height: int, width: int, num_frames: int, *, num_stages: int = 3, vae_scale: int = 8, vae_temporal_scale: int = 8) -> dict:
    """Image tokens the transformer sees for the last unit of a video, per stage, against
    full-sequence generation of all frames at full resolution (Sec. 4.2)."""
    latent_h, latent_w, latent_t = _latent_grid(height, width, num_frames, vae_scale, vae_temporal_scale, num_stages)
    last = latent_t - 1
    stage_tokens = []
    for stage in range(num_stages):
        clips = history_layout(last, stage, num_stages)
        history = sum(c.length * tokens_per_frame(latent_h, latent_w, c.level, num_stages) for c in clips)
        stage_tokens.append(history + tokens_per_frame(latent_h, latent_w, stage, num_stages))
    return {
        "stage_tokens": stage_tokens,
        "pyramid_max_tokens": max(stage_tokens),
        "full_sequence_tokens": latent_t * tokens_per_frame(latent_h, latent_w, num_stages - 1, num_stages),
    }


def frames_for_duration(seconds: float, fps: int, frames_per_latent: int, new_frames_only: bool = False) -> int:
    """The allowed frame count nearest to `seconds` at `fps`: 1 + nk for a clip, nk (k >= 1) for an extension,
    n = `frames_per_latent` (the causal VAE's temporal compression: 8 in the published models)."""
    if not isinstance(seconds, (int, float)) or seconds <= 0:
        raise ValueError(f"duration must be a positive number of seconds; got {seconds}")
    n = frames_per_latent
    if new_frames_only:
        return n * max(1, round(seconds * fps / n))
    return 1 + n * max(0, round((seconds * fps - 1) / n))
