"""One generation's inputs resolved and validated once: mode, prompt or storyboard, length in units, size, steps per
pyramid stage, guidance, step cache and the callback's tensors — from the call's arguments, the transformer's standing
cache (diffusers' `enable_cache`) and the checkpoint's sampling defaults. The pipeline's runner reads only the plan.
"""
from dataclasses import dataclass
from typing import Optional

import numpy as np

from .option_names import check_cache_options, check_guidance
from .step_cache import standing_cache
from .storyboard import Storyboard
from .temporal import frames_for_duration, latent_frames
from .text import PromptEmbeddings


OUTPUT_TYPES = ("np", "pil", "pt", "latent")


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
    unit_guidance: tuple  # the guidance scale of every unit, the given image's or clip's included
    unit_guided: tuple  # whether each unit runs classifier-free guidance (two branches)
    seed: Optional[int]  # what the output records (None when the caller's generators were given)
    output_type: str

    @property
    def history_units(self) -> int:
        return len(self.unit_guidance) - self.new_units

    def settings(self) -> dict:
        """The plan's part of an output's settings record (what Reuse reads back)."""
        settings = {"prompt": self.prompt, "height": self.height, "width": self.width,
                    "first_frame_steps": list(self.first_frame_steps), "video_steps": list(self.video_steps),
                    "guidance_scale": self.guidance_scale, "video_guidance_scale": self.video_guidance_scale,
                    "video_guidance_decay": self.video_guidance_decay, "cache": self.cache,
                    "cache_threshold": self.cache_threshold, "seed": self.seed}
        if self.storyboard is not None:
            settings["storyboard"] = self.storyboard.to_settings()
        return settings


def plan_generation(pipe, mode, prompt, condition_frames, prompt_embeds=None, negative_prompt_embeds=None, *,
                    seed=None, output_type="np",
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
                               pipe.size_multiple)
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
    history_frames, new_units = plan_units(pipe, mode, num_frames, condition_frames)
    history_units = latent_frames(history_frames, spec.frames_per_latent) if history_frames else 0
    scales = unit_guidance(sampling.guidance_scale, sampling.video_guidance_scale, video_guidance_decay,
                           history_units + new_units)
    guided = tuple(sampling.guidance_scale > 0 if pipe.official_defaults else scale > 1 for scale in scales)
    return GenerationPlan(mode, prompt, storyboard, height, width, first_frame_steps, video_steps,
                          sampling.guidance_scale, sampling.video_guidance_scale, video_guidance_decay, cache,
                          cache_threshold, tensor_inputs, history_frames, new_units, tuple(scales), guided, seed,
                          output_type)


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


def plan_units(pipe, mode, num_frames, condition_frames) -> tuple:
    """(conditioning pixel frames used, new latent units), validated against the checkpoint."""
    spec, longest_units = pipe.spec, pipe.longest_units
    n = spec.frames_per_latent
    if mode == "extend_video":
        if num_frames is None or num_frames <= 0 or num_frames % n:
            raise ValueError(f"num_frames counts the new frames of an extension and must be a positive multiple of {n}; got {num_frames}")
        new_units = num_frames // n
        if new_units >= longest_units:
            longest = spec.frames(longest_units)
            raise ValueError(f"this model makes at most {longest} frames in all; ask for at most {longest - 1} new frames")
        room = max(1, spec.max_latent_frames - new_units)  # the given clip's units kept within the trained window
        return min(spec.frames(latent_frames(len(condition_frames), n)), spec.frames(room)), new_units
    if num_frames is None:
        num_frames = 1 if mode == "text_to_image" else spec.max_frames
    longest = spec.frames(longest_units)
    if not isinstance(num_frames, (int, np.integer)) or num_frames < 1 or (num_frames - 1) % n or num_frames > longest:
        allowed = ", ".join(str(spec.frames(k)) for k in range(1, min(longest_units, 4) + 1))
        allowed += f", ..., {longest}" if longest_units > 4 else ""
        raise ValueError(f"num_frames must be 1 + {n}k and at most {longest} for this model ({allowed}; "
                         f"{longest / spec.fps:.0f} s at {spec.fps} fps); got {num_frames}")
    units = latent_frames(num_frames, n)
    if mode == "image_to_video":
        if units < 2:
            raise ValueError(f"image_to_video needs at least {spec.frames(2)} frames (the image plus one unit of motion)")
        return 1, units - 1
    return 0, units


def prompt_batch(prompt, num_videos_per_prompt, prompt_embeds) -> tuple:
    """(the prompt of each video, whether `prompt` is a list of prompts): a list of strings is a list of prompts (a
    list of (seconds, prompt) pairs stays a storyboard), each repeated `num_videos_per_prompt` times."""
    if isinstance(num_videos_per_prompt, bool) or not isinstance(num_videos_per_prompt, (int, np.integer)) \
            or num_videos_per_prompt < 1:
        raise ValueError(f"num_videos_per_prompt must be a whole number of at least 1; got {num_videos_per_prompt!r}")
    listed = isinstance(prompt, (list, tuple)) and len(prompt) > 0 and all(isinstance(each, str) for each in prompt)
    if listed and prompt_embeds is not None:
        raise ValueError("prompt_embeds hold the embeddings of one prompt; give a list of prompts or prompt_embeds, not both")
    prompts = list(prompt) if listed else [prompt]
    return [each for each in prompts for _ in range(int(num_videos_per_prompt))], listed


def inference_steps(num_inference_steps, options: dict, stages: int) -> dict:
    """first_frame_steps and video_steps from diffusers' `num_inference_steps`: N steps in every stage of every unit."""
    if num_inference_steps is None:
        return {}
    if options.get("first_frame_steps") is not None or options.get("video_steps") is not None:
        raise ValueError("give num_inference_steps or first_frame_steps / video_steps, not both")
    if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, (int, np.integer)) \
            or num_inference_steps < 1:
        raise ValueError(f"num_inference_steps must be a whole number of at least 1 (the steps of every pyramid stage); "
                         f"got {num_inference_steps!r}")
    steps = (int(num_inference_steps),) * stages
    return {"first_frame_steps": steps, "video_steps": steps}


def check_output(output_type: str, stream_to, videos: int) -> None:
    """`output_type` is one of OUTPUT_TYPES; streaming writes one video's uint8 frames."""
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"output_type must be one of {', '.join(map(repr, OUTPUT_TYPES))}; got {output_type!r}")
    if stream_to is not None and (output_type != "np" or videos > 1):
        raise ValueError("stream_to writes the uint8 frames of one video as units finish; leave output_type at "
                         "'np' and make one video")


def step_count(first_unit: int, total_units: int, first_frame_steps, video_steps) -> int:
    """Transformer steps of units first_unit..total_units - 1: unit 0 takes first_frame_steps, later ones video_steps."""
    return sum(sum(first_frame_steps if unit == 0 else video_steps) for unit in range(first_unit, total_units))


def unit_guidance(first: float, video: float, decay: bool, units: int) -> list:
    """Guidance per unit: `first` for the first frame, `video` after it, optionally decaying linearly to 1."""
    later = np.linspace(video, min(video, 1.0), max(units - 1, 1)) if decay else [video] * max(units - 1, 1)
    return [first, *[float(g) for g in later]]
