"""PyramidFlowPipeline: text-to-video, text-to-image, image-to-video and video extension.

A call reads top to bottom: check the batch -> plan each video (model_core.generation_plan: every option resolved and
checked once) -> run the plan (model_core.generation_runner: units -> stages -> steps) -> the output. Loading and
saving live in model_core.pipeline_loading; speed and parallel features are applied to the transformer from outside
(model_core.speed, model_core.step_cache, model_core.parallel).
"""
import secrets
from dataclasses import dataclass
from typing import Callable, Optional, Union

import numpy as np
import torch
from diffusers import DiffusionPipeline
from diffusers.utils import BaseOutput
from PIL import Image

from .checkpoints import FAMILIES, Family, VariantSpec, from_description
from .generation_plan import check_output, check_prompt, inference_steps, plan_generation, prompt_batch
from .generation_runner import run_plan
from .loading import ResolvedCheckpoint
from .lora import PyramidLoraLoaderMixin
from .media import as_frames, to_frames
from .parallel import agree, apply_parallel
from .pipeline_loading import PipelineLoading
from .sampling import Progress
from .storyboard import Storyboard
from .text import PROMPT_ENCODERS, PromptEmbeddings

RUN_OPTIONS = ("negative_prompt", "prompt_embeds", "negative_prompt_embeds", "callback_on_step_end", "stream_to")
OFFICIAL_PROMPT_SUFFIX = ", hyper quality, Ultra HD, 8K"  # the authors' `generate` appends it to every prompt
OFFICIAL_NEGATIVE_PROMPT = ("cartoon style, worst quality, low quality, blurry, absolute black, absolute white, low res, "
                            "extra limbs, extra digits, misplaced objects, mutated anatomy, monochrome, horror")


@dataclass
class PyramidFlowPipelineOutput(BaseOutput):
    """A finished (or stopped) generation, batched as in diffusers: `frames[0]` is the first video. Per `output_type`,
    `frames` is uint8 [B, T, H, W, 3] ("np"), a list of lists of PIL images ("pil"), float [B, T, 3, H, W] in [0, 1]
    ("pt": the "np" pixels / 255) or the latents ("latent"); None when the frames were streamed (`stream_to`).
    `latents`: the normalised latents [B, C, T, h, w]. Videos of different lengths (a stop in the middle of a batch)
    come as a list instead of one array or tensor. `settings`: everything needed to reproduce the call."""

    frames: Optional[Union[np.ndarray, torch.Tensor, list]]
    latents: Optional[Union[torch.Tensor, list]]
    fps: int
    interrupted: bool
    settings: dict



class PyramidFlowPipeline(PyramidLoraLoaderMixin, PipelineLoading, DiffusionPipeline):
    """Pyramidal flow matching generation from a published (or our own) checkpoint.

    Calls follow diffusers' pipeline conventions: `pipe(prompt, ...)` is text-to-video and returns a
    `PyramidFlowPipelineOutput`; `callback_on_step_end(pipe, step_index, timestep, callback_kwargs)` runs after every
    transformer step, `pipe.progress` says where the generation is, and setting `pipe._interrupt = True` stops it
    after that step (finished units are kept). `self.progress_bar` shows the steps of each video unless
    `set_progress_bar_config(disable=True)`. A list of prompts and `num_videos_per_prompt` make several videos, one
    after another. LoRAs: `load_lora_weights(source or hub id, weight_name=, adapter_name=, weight=)`, `set_adapters`,
    `fuse_lora` / `unfuse_lora`, `unload_lora_weights`, `save_lora_weights` (model_core.lora); outputs record them."""

    model_cpu_offload_seq = "text_encoder->text_encoder_2->text_encoder_3->transformer->vae"
    _optional_components = ["text_encoder_3", "tokenizer_3"]
    _callback_tensor_inputs = ["latents", "unit_latents", "video_latents", "prompt_embeds", "negative_prompt_embeds"]

    def __init__(self, vae, transformer, scheduler, text_encoder, tokenizer, text_encoder_2, tokenizer_2,
                 text_encoder_3=None, tokenizer_3=None, pyramid_flow: Optional[dict] = None):
        """`pyramid_flow`: the checkpoint facts (`model_core.checkpoints.describe` plus "official_defaults") that
        `save_pretrained` records in model_index.json; None means a published 384p checkpoint of the family."""
        super().__init__()
        self.register_modules(vae=vae, transformer=transformer, scheduler=scheduler, text_encoder=text_encoder,
                              tokenizer=tokenizer, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2,
                              text_encoder_3=text_encoder_3, tokenizer_3=tokenizer_3)
        self.register_to_config(pyramid_flow=pyramid_flow)
        if pyramid_flow:
            self.checkpoint = ResolvedCheckpoint(None, *from_description(pyramid_flow, "model_index.json"))
        else:
            self.checkpoint = ResolvedCheckpoint(None, FAMILIES["sd3" if text_encoder_3 is not None else "miniflux"], "384p")
        self.compute_dtype = next(transformer.parameters()).dtype
        self.source = None
        self.official_defaults = bool((pyramid_flow or {}).get("official_defaults", False))
        self.settings_base = {"offload": "none", "quantize": "none", "vae_tiling": False, "dtype": str(self.compute_dtype).replace("torch.", ""),
                              "attention_backend": "native", "compile": False}
        names = ["text_encoder", "text_encoder_2", "text_encoder_3"][: 3 if text_encoder_3 is not None else 2]
        self.prompt_encoder = PROMPT_ENCODERS[self.family.name](
            {n: getattr(self, n) for n in names}, {n: getattr(self, n.replace("text_encoder", "tokenizer")) for n in names}
        )
        self._interrupt = False
        self._progress = None

    @property
    def family(self) -> Family:
        return self.checkpoint.family

    @property
    def variant(self) -> str:
        return self.checkpoint.variant

    @property
    def spec(self) -> VariantSpec:
        return self.checkpoint.spec

    @property
    def interrupt(self) -> bool:
        """Set `pipe._interrupt = True` (e.g. in `callback_on_step_end`) to stop after the current step."""
        return self._interrupt

    @property
    def progress(self) -> Optional[Progress]:
        """The step just done (unit, stage, step, fraction), as `callback_on_step_end` sees it."""
        return self._progress

    parallel = None  # a model_core.parallel.Parallelism once `enable_parallelism` ran

    def enable_parallelism(self, parallel="auto"):
        """Split every generation over the ranks of the initialised process group (torchrun): "auto" (guidance
        parallel on an even number of ranks, context parallel over the rest) or {"guidance": G, "context": C}
        with G x C = world size. Every rank must make the same calls; they return the same result on each."""
        self.parallel = apply_parallel(self.transformer, parallel, device=self._execution_device)
        return self.parallel


    # --- the four modes -------------------------------------------------------------------------

    def text_to_video(self, prompt: Optional[Union[str, Storyboard, list]] = None, **options):
        """A video from a prompt: first frame with `first_frame_steps`, later units with `video_steps`.

        `prompt` may be a storyboard (a `Storyboard` or a list of (seconds, prompt) pairs; also `storyboard=`): each
        unit is generated with the text of the segment it starts in, over the history of all units before it; the
        segments' seconds set the length. Every mode but text_to_image takes one.

        Every mode also takes diffusers' batch options (a list of prompts, `num_videos_per_prompt`, a generator per
        video), `num_inference_steps` and `output_type` "np" | "pil" | "pt" | "latent" (see `_generate`)."""
        return self._generate("text_to_video", prompt, None, **options)

    __call__ = text_to_video

    def text_to_image(self, prompt: Optional[str] = None, **options):
        """One frame (a single autoregressive unit)."""
        if options.get("num_frames", 1) != 1:
            raise ValueError("text_to_image makes one frame; leave num_frames unset or 1")
        return self._generate("text_to_image", prompt, None, **{**options, "num_frames": 1})

    def image_to_video(self, image, prompt: Optional[str] = "", **options):
        """Animate `image` (PIL or uint8 [H, W, 3]): it becomes the first unit, encoded by the VAE."""
        return self._generate("image_to_video", prompt, as_frames(image, "the image")[:1], **options)

    def extend_video(self, video, prompt: Optional[str] = "", **options):
        """Continue `video` (uint8 [T, H, W, 3]); `num_frames` counts the new frames (a multiple of 8).
        The output is the input followed by the continuation."""
        return self._generate("extend_video", prompt, as_frames(video, "the video"), **options)

    # --- prompts ---------------------------------------------------------------------------------

    def encode_prompt(self, prompt: str, negative_prompt: Optional[str] = None, device=None,
                      do_classifier_free_guidance: bool = True) -> tuple:
        """(prompt_embeds, negative_prompt_embeds or None) for `prompt_embeds=` / `negative_prompt_embeds=`.
        With `official_defaults` the prompt gets the authors' suffix and a missing negative prompt their default."""
        device = device or self._execution_device
        text = self.prompt_encoder.encode(prompt + OFFICIAL_PROMPT_SUFFIX if self.official_defaults else prompt, device=device)
        negative = self.negative_embeddings(negative_prompt, device) if do_classifier_free_guidance else None
        return text, negative

    def effective_negative_prompt(self, negative_prompt: Optional[str]) -> str:
        if negative_prompt is None and self.official_defaults:
            return OFFICIAL_NEGATIVE_PROMPT
        return negative_prompt or ""

    def negative_embeddings(self, negative_prompt: Optional[str], device) -> PromptEmbeddings:
        return self.prompt_encoder.encode_negative(self.effective_negative_prompt(negative_prompt), 1, device=device)

    # --- the engine -----------------------------------------------------------------------------

    @torch.no_grad()  # inference: no autograd graph through the sampling loop
    def _generate(self, mode, prompt, condition_frames, *, num_videos_per_prompt: int = 1, num_inference_steps=None,
                  generator=None, seed=None, output_type: str = "np", return_dict: bool = True, **options):
        """Every mode's call: the videos of a batch made one after another, returned batched in `output_type`.

        `prompt` may be a list of prompts, each making `num_videos_per_prompt` videos (prompt by prompt, as in
        diffusers). `generator` is a torch.Generator or a list of one per video; one generator (or `seed`, random when
        None, which seeds one) is drawn from by the videos in turn: video i goes on from where video i - 1 left it.
        `num_inference_steps=N` (diffusers' name) gives every pyramid stage of every unit N steps: first_frame_steps =
        video_steps = (N,) * stages; give it or those two, not both. A stop ends the batch: the video under way keeps
        its finished units and later ones are not made. `stream_to` (an object with `write(frames)`, e.g.
        model_core.media_files.VideoWriter; one video, output_type "np"): each finished unit is decoded at once, the
        causal VAE keeping its caches, and its uint8 frames written there, so no more than a unit's frames are held;
        the output's `frames` is then None."""
        prompts, listed = prompt_batch(prompt, num_videos_per_prompt, options.get("prompt_embeds"))
        for each in prompts if listed else ():  # every prompt checked before the first video is made
            check_prompt(each, required=condition_frames is None)
        check_output(output_type, options.get("stream_to"), len(prompts))
        options.update(inference_steps(num_inference_steps, options, self.scheduler.config.stages))
        run_options = {name: options.pop(name, None) for name in RUN_OPTIONS}
        generators, seed = self._generators(generator, seed, len(prompts))
        self._interrupt = False
        videos = []
        for video_prompt, video_generator in zip(prompts, generators):
            if videos and self.stop_requested():
                break
            plan = plan_generation(self, mode, video_prompt, condition_frames, run_options["prompt_embeds"],
                                   run_options["negative_prompt_embeds"], seed=seed, output_type=output_type, **options)
            videos.append(run_plan(self, plan, condition_frames, generator=video_generator, **run_options))
        return self._output(videos, len(prompts), prompt if listed else None, num_videos_per_prompt, output_type,
                            return_dict)

    def _output(self, videos: list, asked: int, prompts: Optional[list], num_videos_per_prompt, output_type: str,
                return_dict: bool):
        """The batch's output: frames in `output_type`, latents, and the first video's settings (of the batch when
        several were asked for)."""
        interrupted = len(videos) < asked or videos[-1].interrupted
        settings = videos[0].settings
        if prompts is not None or num_videos_per_prompt != 1:
            settings = {**settings, "num_videos_per_prompt": int(num_videos_per_prompt), "interrupted": interrupted}
            if prompts is not None:
                settings["prompt"] = list(prompts)
        latents = batched([video.latents[0] for video in videos], torch.stack)
        frames = video_output([video.frames for video in videos], latents, output_type)
        if not return_dict:
            return frames, settings
        return PyramidFlowPipelineOutput(frames=frames, latents=latents, fps=self.spec.fps, interrupted=interrupted,
                                         settings=settings)

    def _generators(self, generator, seed, count: int) -> tuple:
        """(one torch.Generator per video, the seed recorded): the given list, or one generator shared by all."""
        if isinstance(generator, (list, tuple)):
            if len(generator) != count or not all(isinstance(g, torch.Generator) for g in generator):
                raise ValueError(f"a generator list needs one torch.Generator per video ({count}); got {len(generator)} "
                                 f"item(s)")
            return list(generator), seed
        if generator is None:
            seed = secrets.randbelow(2**63) if seed is None else int(seed)
            if self.parallel is not None:  # the same noise on every rank
                seed = agree(seed)
            generator = torch.Generator().manual_seed(seed)
        elif not isinstance(generator, torch.Generator):
            raise ValueError(f"generator must be a torch.Generator or a list of one per video; got {type(generator).__name__}")
        return [generator] * count, seed

    @property
    def latent_channels(self) -> int:
        return self.vae.config.encoder_out_channels

    @property
    def size_multiple(self) -> int:
        """Pixels per token at the coarsest pyramid level: VAE downsampling x 2x2 patches x 2^(K-1)."""
        return self.vae.spatial_scale * 2 * 2 ** (self.scheduler.config.stages - 1)

    @property
    def longest_units(self) -> int:
        """Latent frames of the longest video: the variant's long-video length, within the temporal positions the
        transformer's config declares (`max_num_frames`, MM-DiT) where it declares any."""
        declared = getattr(self.transformer.config, "max_num_frames", None)
        return min(self.spec.longest_latent_frames, declared) if declared else self.spec.longest_latent_frames

    def stop_requested(self) -> bool:
        """`pipe._interrupt`; under parallel, rank 0's on every rank, so all ranks stop after the same step."""
        if self.parallel is not None:
            self._interrupt = agree(bool(self._interrupt))
        return self._interrupt

    @torch.no_grad()
    def encode_video(self, video: torch.Tensor) -> torch.Tensor:
        """[1, 3, T, H, W] in [-1, 1] -> normalised latents (posterior mean)."""
        posterior = self.vae.encode(video.to(self.vae.dtype), temporal_chunk=True).latent_dist
        return self.family.normalization.normalize(posterior.mean.float())

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> np.ndarray:
        """Normalised latents [1, C, T, h, w] -> uint8 frames [1 + n(T - 1), H, W, 3] (decoded in causal time chunks)."""
        if latents.shape[2] == 0:
            scale = self.vae.spatial_scale
            return np.zeros((0, latents.shape[3] * scale, latents.shape[4] * scale, 3), np.uint8)
        z = self.family.normalization.denormalize(latents.float()).to(self.vae.dtype)
        return to_frames(self.vae.decode(z, temporal_chunk=True).sample, truncate=self.official_defaults)

    def unit_preview(self, video_latents: torch.Tensor) -> np.ndarray:
        """The frames of the last unit of `video_latents` (the callback's "video_latents"): the causal VAE decodes it
        with the unit before it as context; the first unit is one frame, later ones `frames_per_latent`."""
        frames = self.decode_latents(video_latents[:, :, -2:])
        return frames if video_latents.shape[2] == 1 else frames[-self.spec.frames_per_latent:]


def batched(videos: list, stack: Callable):
    """The videos (arrays or tensors) as one batch [B, ...] when their shapes agree, else the list of them."""
    if len(videos) == 1:
        return videos[0][None]
    return stack(videos) if all(video.shape == videos[0].shape for video in videos) else videos


def video_output(frames: list, latents, output_type: str):
    """The output's `frames` from each video's uint8 frames (None when streamed) and the batched latents."""
    if output_type == "latent":
        return latents
    if frames[0] is None:
        return None
    if output_type == "pil":
        return [[Image.fromarray(frame) for frame in video] for video in frames]
    if output_type == "pt":  # diffusers' video layout: [B, T, C, H, W] in [0, 1]
        return batched([torch.from_numpy(video).permute(0, 3, 1, 2).float() / 255 for video in frames], torch.stack)
    return batched(frames, np.stack)


