"""Runs one video's `GenerationPlan` on a pipeline's models: condition -> prompts -> units -> stages -> steps.

Each piece is a short function of the pipeline and the plan: encoding the given image or clip as history, the
guidance of each unit, the text of each unit (storyboards), the guided velocity the sampler calls (Eq. 17 with
classifier-free guidance), the loop that reports every step to the callback, the progress bar and the streaming
decoder, and the settings record. The step cache is installed for the run and reset at every stage of every unit.
"""
from typing import Callable, NamedTuple, Optional

import numpy as np
import torch

from . import __version__
from .generation_plan import GenerationPlan, step_count
from .media import to_frames, to_video_tensor
from .parallel import SINGLE_PROCESS
from .sampling import Progress, sample_video
from .speed import uses_shape_buckets
from .step_cache import apply_step_cache, reset_step_cache
from .storyboard import unit_texts
from .text import PromptEmbeddings


class GeneratedVideo(NamedTuple):
    """One video of a call: uint8 frames [T, H, W, 3] (None when not decoded), latents [1, C, T, h, w]."""

    frames: Optional[np.ndarray]
    latents: torch.Tensor
    interrupted: bool
    settings: dict


def run_plan(pipe, plan: GenerationPlan, condition_frames, *, generator, negative_prompt=None,
             prompt_embeds: Optional[PromptEmbeddings] = None, negative_prompt_embeds: Optional[PromptEmbeddings] = None,
             callback_on_step_end: Optional[Callable] = None, stream_to=None) -> GeneratedVideo:
    """One video of `plan` with `generator`; uint8 frames unless the plan asks for latents or they were streamed."""
    device = pipe._execution_device
    condition = history = None
    if condition_frames is not None:  # resized once: encoded as history, and spliced back for extensions
        condition = to_video_tensor(condition_frames, plan.height, plan.width, device=device)
        history = pipe.encode_video(condition[:, :, -plan.history_frames:])
    scales, guided = plan.unit_guidance, plan.unit_guided
    text, negative = prompt_pair(pipe, plan.prompt, negative_prompt, prompt_embeds, negative_prompt_embeds, any(guided),
                                 device)
    texts = texts_of_units(pipe, plan, text, len(scales), device)
    decode_unit = None if stream_to is None else stream_start(pipe, plan, stream_to, condition, history)
    prepared = {}  # the transformer's text inputs, made once per generation
    velocity = lambda unit: unit_velocity(pipe, texts[unit], negative if guided[unit] else None, scales[unit],  # noqa: E731
                                          prepared)
    latents, interrupted = run_units(pipe, plan, velocity, history, generator, device, decode_unit, callback_on_step_end,
                                     {"prompt_embeds": text, "negative_prompt_embeds": negative})
    frames = pipe.decode_latents(latents) if plan.output_type != "latent" and stream_to is None else None
    if plan.mode == "extend_video" and frames is not None:
        frames = np.concatenate([to_frames(condition), frames[plan.history_frames:]])
    written = int(frames.shape[0]) if frames is not None else decode_unit.frames_written if decode_unit else None
    settings = settings_record(pipe, plan, negative_prompt, written, interrupted)
    if prompt_embeds is not None:
        settings["prompt_embeds"] = "given"
    return GeneratedVideo(frames, latents, interrupted, settings)


def prompt_pair(pipe, prompt, negative_prompt, prompt_embeds, negative_prompt_embeds, guided: bool, device) -> tuple:
    """(text, negative) embeddings: encoded here, or the given ones (the negative prompt's encoded when guided)."""
    if prompt_embeds is None:
        return pipe.encode_prompt(prompt, negative_prompt, device, guided)
    text, negative = prompt_embeds.to(device), negative_prompt_embeds
    if guided:
        negative = pipe.negative_embeddings(negative_prompt, device) if negative is None else negative.to(device)
    return text, negative


def texts_of_units(pipe, plan: GenerationPlan, text, total_units: int, device) -> list:
    """The text embeddings of each unit: the prompt's, or along a storyboard its segments' (blended at cuts)."""
    if plan.storyboard is None:
        return [text] * total_units
    spec = pipe.spec
    embeddings = [text, *(pipe.encode_prompt(s.prompt, None, device, False)[0] for s in plan.storyboard.segments[1:])]
    segment_of_unit = plan.storyboard.unit_segments(spec.fps, spec.frames_per_latent,
                                                    continues=plan.mode == "extend_video")
    history_units = total_units - len(segment_of_unit)  # an extension's given clip: not generated, no text
    return [text] * history_units + unit_texts(segment_of_unit, embeddings, plan.storyboard.blend)


def unit_velocity(pipe, text: PromptEmbeddings, negative: Optional[PromptEmbeddings], scale: float,
                  prepared: Optional[dict] = None):
    """v(clips, t) of one unit from the transformer, with classifier-free guidance when `negative` is given.
    `prepared`: the generation's transformer text inputs so far (`transformer_text`), shared by its units."""
    dtype = pipe.compute_dtype
    timestep_dtype = dtype if pipe.official_defaults else torch.float32  # the authors cast t to the latents' dtype
    ranks = pipe.parallel
    split = negative is not None and ranks is not None and ranks.config.guidance == 2
    prepared = {} if prepared is None else prepared
    key = (id(text), id(negative))  # both live as long as the generation that holds `prepared`
    if key not in prepared:
        prepared[key] = transformer_text(pipe, text, negative, split)
    embeddings = prepared[key]
    stage_shape = None

    def velocity(clips, t, valid_frames=None):
        nonlocal stage_shape
        if clips[-1].shape != stage_shape:  # a new unit or pyramid stage: cached residuals no longer apply
            reset_step_cache(pipe.transformer)
            stage_shape = clips[-1].shape
        clips = [c.to(dtype) for c in clips]
        if negative is not None and not split:
            clips = [torch.cat([c, c]) for c in clips]
        batch = clips[-1].shape[0]
        v = pipe.transformer(
            sample=[clips], encoder_hidden_states=embeddings.hidden_states,
            encoder_attention_mask=embeddings.attention_mask, pooled_projections=embeddings.pooled,
            timestep=t.to(clips[-1].device, timestep_dtype).expand(batch), return_dict=False, valid_frames=valid_frames,
        )[0][0].float()
        if split:
            v = ranks.gather_guidance(v)
        if negative is None:
            return v
        unconditional, conditional = v.chunk(2)
        return unconditional + scale * (conditional - unconditional)

    return velocity


def transformer_text(pipe, text: PromptEmbeddings, negative: Optional[PromptEmbeddings], split: bool) -> PromptEmbeddings:
    """The prompt embeddings the transformer gets: [negative ; text] when guided, without padding columns, this
    rank's branch when `split` (guidance parallel), states and pooled vector in the compute dtype. Made once per
    generation, the same tensors reach every step, so the transformer reuses its text conditioning
    (transformers/text_conditioning.py)."""
    embeddings = (text if negative is None else negative.followed_by(text)).without_padding_columns()
    if split:  # guidance parallel: this rank predicts one branch, the two ranks swap velocities
        ranks = pipe.parallel
        embeddings = PromptEmbeddings(*(ranks.guidance_branch(x) for x in (embeddings.hidden_states,
                                                                           embeddings.attention_mask, embeddings.pooled)))
    dtype = pipe.compute_dtype
    return PromptEmbeddings(embeddings.hidden_states.to(dtype), embeddings.attention_mask, embeddings.pooled.to(dtype))


def stream_start(pipe, plan: GenerationPlan, stream_to, condition, history):
    """The unit decoder writing to `stream_to`, primed with the given clip (written) or image (its context)."""
    decode_unit = streamed_decoder(pipe, stream_to.write)
    if plan.mode == "extend_video":
        decode_unit.write(to_frames(condition, truncate=pipe.official_defaults))
    if history is not None:  # the causal VAE's context: written for an image, only read for an extension
        decode_unit(history, keep=plan.mode != "extend_video")
    return decode_unit


def streamed_decoder(pipe, write: Callable):
    """decode(latents, keep=True): the normalised latents of the next units of a video -> their uint8 frames, passed
    to `write` when kept. The causal VAE keeps its caches between calls, so the frames equal one decode of all."""
    stream = pipe.vae.start_decode_stream()

    def write_frames(frames):
        write(frames)
        decode.frames_written += len(frames)

    def decode(latents, keep=True):
        z = pipe.family.normalization.denormalize(latents.float(), starts_video=not stream.started)
        frames = to_frames(pipe.vae.decode_stream(z.to(pipe.vae.dtype), stream), truncate=pipe.official_defaults)
        if keep:
            write_frames(frames)

    decode.frames_written, decode.write = 0, write_frames
    return decode


def run_units(pipe, plan: GenerationPlan, velocity_for_unit, history, generator, device, decode_unit,
              callback_on_step_end, embeddings: dict) -> tuple:
    """(latents, interrupted): the plan's units sampled after `history` (Eq. 17), each step reported to the callback
    and the progress bar, each finished unit to the streaming decoder."""
    scale = pipe.vae.spatial_scale
    latent_shape = (1, pipe.latent_channels, plan.new_units, plan.height // scale, plan.width // scale)
    apply_step_cache(pipe.transformer, plan.cache, plan.cache_threshold, ranks=pipe.parallel)
    pipe._progress = None
    finished = list(history.split(1, dim=2)) if history is not None else []
    step_index = 0
    progress_bar = pipe.progress_bar(total=step_count(len(finished), len(finished) + plan.new_units,
                                                      plan.first_frame_steps, plan.video_steps))

    def on_step(progress: Progress, t, x):
        nonlocal step_index
        pipe._progress = progress
        if callback_on_step_end is not None:
            available = {"latents": x, **embeddings, "unit_latents": x if progress.kind == "unit" else None,
                         "video_latents": torch.cat([*finished, x], dim=2) if progress.kind == "unit" else None}
            returned = callback_on_step_end(pipe, step_index, t, {name: available[name] for name in plan.tensor_inputs})
            x = (returned or {}).get("latents", x)
        if progress.kind == "unit":
            finished.append(x)
            if decode_unit is not None:
                decode_unit(x)
        step_index += 1
        progress_bar.update()
        return x

    with progress_bar:
        latents, interrupted = sample_video(
            velocity_for_unit, pipe.scheduler, latent_shape, history, plan.first_frame_steps, plan.video_steps,
            generator=generator, on_step=on_step, stop=pipe.stop_requested, device=device,
            shape_buckets=shape_buckets(pipe),
        )
    if latents is None:  # stopped before the first unit was finished
        latents = torch.zeros(*latent_shape[:2], 0, *latent_shape[3:], device=device)
    return latents, interrupted


def shape_buckets(pipe) -> bool:
    """Pad the history to shape buckets when the transformer's forward is compiled (speed.uses_shape_buckets), unless
    ranks share the sequence (context parallel pads it its own way)."""
    context = pipe.parallel is not None and pipe.parallel.context is not None
    return uses_shape_buckets(pipe.settings_base.get("compile")) and not context


def settings_record(pipe, plan: GenerationPlan, negative_prompt, num_frames, interrupted: bool) -> dict:
    """What an output records to be made again: the plan serialised, the model and how it ran."""
    return {
        **pipe.settings_base, "mode": plan.mode, "model": getattr(pipe, "source", None), "family": pipe.family.name,
        "variant": pipe.variant, **plan.settings(), "negative_prompt": pipe.effective_negative_prompt(negative_prompt),
        "num_frames": num_frames, "fps": pipe.spec.fps, "official_defaults": pipe.official_defaults,
        "lora": pipe.lora_settings(), "interrupted": interrupted, "version": __version__,
        "parallel": SINGLE_PROCESS if pipe.parallel is None else pipe.parallel.settings(),
    }
