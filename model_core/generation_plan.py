"""One generation's inputs resolved and validated once: mode, prompt or storyboard, length in units, size, steps per
pyramid stage, guidance, step cache and the callback's tensors — from the call's arguments, the transformer's standing
cache (diffusers' `enable_cache`) and the checkpoint's sampling defaults. The pipeline's runner reads only the plan.
"""
import math
from dataclasses import dataclass
from typing import Optional

import numpy as np

from .step_cache import check_cache_options, standing_cache
from .storyboard import Storyboard
from .temporal import frames_for_duration
from .text import PromptEmbeddings


@dataclass(frozen=True)
class GenerationPlan:
    """Everything one video's generation needs besides its generator and the pipeline's models."""

    mode: str
    prompt: str
    storyboard: Optional[Storyboard]
    height: int
    width: int
    first_frame_steps: tuple
    video_steps: tuple
    guidance_scale: float
    video_guidance_scale: float
    video_guidance_decay: bool
    cache: str
    cache_threshold: float
    tensor_inputs: tuple  # what `callback_on_step_end` is handed
    history_frames: int  # pixel frames of the given image or clip encoded as history (0 without one)
    new_units: int  # latent units to generate


def plan_generation(pipe, mode, prompt, condition_frames, prompt_embeds=None, negative_prompt_embeds=None, *,
                    num_frames=None, duration=None, height=None, width=None, first_frame_steps=None, video_steps=None,
                    guidance_scale=None, video_guidance_scale=None, video_guidance_decay=False, cache=None,
                    cache_threshold=None, callback_on_step_end_tensor_inputs=("latents",),
                    storyboard=None) -> GenerationPlan:
    """The plan of one video of `pipe` (a PyramidFlowPipeline), every value checked with a sentence saying what is
    allowed; None takes the model's default (a storyboard's seconds set the length)."""
    spec = pipe.spec
    storyboard = storyboard_of(prompt, storyboard)
    if storyboard is not None:
        if mode == "text_to_image":
            raise ValueError("text_to_image makes one frame; a storyboard needs a video mode")
        if num_frames is not None or duration is not None:
            raise ValueError("a storyboard sets the length from its segments' seconds; leave num_frames and duration unset")
        if prompt_embeds is not None:
            raise ValueError("give a storyboard or prompt_embeds, not both")
        prompt = storyboard.segments[0].prompt
        num_frames = storyboard.num_frames(spec.fps, spec.frames_per_latent, continues=mode == "extend_video")
    prompt = check_prompt(prompt, required=condition_frames is None and prompt_embeds is None)
    check_embeddings(prompt_embeds, "prompt_embeds")
    check_embeddings(negative_prompt_embeds, "negative_prompt_embeds")
    height, width = check_size(spec.height if height is None else height, spec.width if width is None else width,
                               pipe._size_multiple)
    standing = standing_cache(pipe.transformer)  # transformer.enable_cache(...): used when this call names no cache
    if cache is None and standing is not None:
        cache = standing[0]
        cache_threshold = standing[1] if cache_threshold is None else cache_threshold
    sampling = pipe.family.sampling.for_mode(mode).filled(
        first_frame_steps=first_frame_steps, video_steps=video_steps, guidance_scale=guidance_scale,
        video_guidance_scale=video_guidance_scale, cache=cache, cache_threshold=cache_threshold)
    cache, cache_threshold = check_cache_options(sampling.cache, sampling.cache_threshold)
    first_frame_steps = check_steps(sampling.first_frame_steps, "first_frame_steps", pipe.scheduler.config.stages)
    video_steps = check_steps(sampling.video_steps, "video_steps", pipe.scheduler.config.stages)
    check_guidance(sampling.guidance_scale, "guidance_scale")
    check_guidance(sampling.video_guidance_scale, "video_guidance_scale")
    tensor_inputs = tuple(callback_on_step_end_tensor_inputs or ())
    unknown = [name for name in tensor_inputs if name not in pipe._callback_tensor_inputs]
    if unknown:
        raise ValueError(f"callback_on_step_end_tensor_inputs may name {', '.join(pipe._callback_tensor_inputs)}; got {unknown}")
    if duration is not None:
        num_frames = frames_for_duration(duration, spec.fps, spec.frames_per_latent, new_frames_only=mode == "extend_video")
    history_frames, new_units = pipe._plan_units(mode, num_frames, condition_frames)
    return GenerationPlan(mode, prompt, storyboard, height, width, first_frame_steps, video_steps,
                          sampling.guidance_scale, sampling.video_guidance_scale, video_guidance_decay, cache,
                          cache_threshold, tensor_inputs, history_frames, new_units)


def storyboard_of(prompt, storyboard) -> Optional[Storyboard]:
    """The storyboard given as `storyboard=` or as the prompt (a Storyboard or (seconds, prompt) pairs), else None."""
    if storyboard is not None:
        if prompt:
            raise ValueError("give the prompt or a storyboard, not both (a storyboard holds a prompt per segment)")
        return Storyboard.coerce(storyboard)
    if isinstance(prompt, (Storyboard, list, tuple)):
        return Storyboard.coerce(prompt)
    return None


def check_prompt(prompt, required: bool) -> str:
    if prompt is None:
        prompt = ""
    if not isinstance(prompt, str):
        raise ValueError(f"the prompt must be a string; got {type(prompt).__name__}")
    if required and not prompt.strip():
        raise ValueError("the prompt is empty; describe the video you want")
    return prompt


def check_embeddings(embeddings, name: str) -> None:
    if embeddings is not None and not (isinstance(embeddings, PromptEmbeddings) and embeddings.hidden_states.shape[0] == 1):
        raise ValueError(f"{name} must be the PromptEmbeddings of one prompt, as `encode_prompt` returns them")


def check_size(height, width, multiple: int) -> tuple:
    for name, value in (("height", height), ("width", width)):
        if not isinstance(value, (int, np.integer)) or value < multiple or value % multiple:
            raise ValueError(f"{name} must be a positive multiple of {multiple} pixels (the latent grid); got {value}")
    return int(height), int(width)


def check_steps(steps, name: str, stages: int) -> tuple:
    steps = tuple(steps) if isinstance(steps, (list, tuple)) else None
    if steps is None or len(steps) != stages or not all(isinstance(s, (int, np.integer)) and s > 0 for s in steps):
        raise ValueError(f"{name} must be {stages} positive integers, one per pyramid stage (e.g. 20,20,20)")
    return tuple(int(s) for s in steps)


def check_guidance(value, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a number >= 0 (1 or less turns guidance off); got {value!r}")
