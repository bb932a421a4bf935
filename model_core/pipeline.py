"""PyramidFlowPipeline: text-to-video, text-to-image, image-to-video and video extension."""
import json
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NamedTuple, Optional, Union

import numpy as np
import torch
from diffusers import DiffusionPipeline
from diffusers.utils import BaseOutput
from PIL import Image

from . import __version__
from .checkpoints import FAMILIES, SETTINGS_FILE, Family, VariantSpec, describe, from_description
from .loading import ResolvedCheckpoint, load_model, resolve_checkpoint
from .weight_files import MODEL_BUILD_LOCK
from .lora import PyramidLoraLoaderMixin
from .generation_plan import GenerationPlan, check_prompt, plan_generation
from .media import as_frames, to_frames, to_video_tensor
from .memory import (
    apply_fp8,
    bitsandbytes_configs,
    check_memory_options,
    quantize_linear_int8_cpu,
    resolve_device,
    resolve_dtype,
    uses_bitsandbytes,
)
from .parallel import SINGLE_PROCESS
from .sampling import Progress, sample_video
from .speed import apply_speed_options, check_speed_options
from .step_cache import enable_step_cache, reset_step_cache
from .scheduler import PyramidFlowScheduler
from .storyboard import Storyboard, unit_texts
from .temporal import latent_frames
from .text import PROMPT_ENCODERS, PromptEmbeddings



OFFICIAL_PROMPT_SUFFIX = ", hyper quality, Ultra HD, 8K"  # the authors' `generate` appends it to every prompt
OFFICIAL_NEGATIVE_PROMPT = ("cartoon style, worst quality, low quality, blurry, absolute black, absolute white, low res, "
                            "extra limbs, extra digits, misplaced objects, mutated anatomy, monochrome, horror")
OUTPUT_TYPES = ("np", "pil", "pt", "latent")
MODEL_INDEX = "model_index.json"
CUSTOM_PIPELINE_MODULE = (  # what `save_pretrained` writes as pipeline.py, for DiffusionPipeline(custom_pipeline=...)
    '''"""Pyramid Flow Studio's pipeline, for `DiffusionPipeline.from_pretrained(<folder>, custom_pipeline=<folder>, trust_remote_code=True)`."""\n'''
    "from model_core.pipeline import PyramidFlowPipeline  # noqa: F401\n"
)


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


class _Video(NamedTuple):
    """One video of a call: uint8 frames [T, H, W, 3] (None when not decoded), latents [1, C, T, h, w]."""

    frames: Optional[np.ndarray]
    latents: torch.Tensor
    interrupted: bool
    settings: dict


class PyramidFlowPipeline(PyramidLoraLoaderMixin, DiffusionPipeline):
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

    @classmethod
    def from_pretrained(cls, source, variant: str = "auto", model: str = "auto", torch_dtype="float32", device=None,
                        offload: str = "none", quantize: str = "none", vae_tiling: bool = False, lora=None,
                        official_defaults: Optional[bool] = None, attention_backend: str = "native", compile: bool = False,
                        tqdm_class=None, parallel=None):
        """Load a checkpoint folder or hub repo id (only the needed subfolders are fetched).

        offload: none | model | sequential | group; quantize: none | int8 | nf4 | fp8 (see model_core.memory);
        lora: LoRAs for the transformer, loaded with `load_lora_weights`: a folder with (what `training` writes for
        recipe lora.yaml) or a path to diffusers' pytorch_lora_weights.safetensors, a peft adapter folder, a hub repo
        id, a (source, weight) pair, or a list of them;
        official_defaults: generate as the authors' code does (prompt suffix, default negative prompt, guidance when the
        scale is > 0, uint8 by truncation, timesteps in the compute dtype); None turns it on for the published
        checkpoints (those without our `pyramid_flow.json`) and off for our own models.
        parallel: split each generation over the ranks of the initialised process group (see `enable_parallelism`).
        attention_backend: native | flex | flash | flash_varlen | sage | sage_varlen where installed (see
        model_core.transformers.attention_backends); compile: torch.compile the transformer's repeated blocks.
        The step cache is chosen per call (`cache`, `cache_threshold`); a call that names none uses the one set with
        `pipe.transformer.enable_cache(FirstBlockCacheConfig(...))` (or TaylorSeer / MagCache), else the model's.
        """
        device, dtype = resolve_device(device), resolve_dtype(torch_dtype)
        check_memory_options(device, dtype, offload, quantize)
        check_speed_options(device, dtype, attention_backend, compile)
        root = Path(source).expanduser()
        if (root / MODEL_INDEX).is_file():
            pipe = cls._from_saved_pipeline(root, device, dtype, quantize, official_defaults)
        else:
            pipe = cls._from_official_layout(source, variant, model, device, dtype, quantize, official_defaults, tqdm_class)
        pipe.compute_dtype = dtype
        pipe.load_loras(lora)  # before quantization and offload hooks change the layers
        pipe._apply_memory_options(device, dtype, offload, quantize, vae_tiling)
        pipe.settings_base.update(apply_speed_options(pipe.transformer, device, dtype, attention_backend, compile))
        if parallel is not None:
            pipe.enable_parallelism(parallel)
        return pipe

    @classmethod
    def _from_official_layout(cls, source, variant, model, device, dtype, quantize, official_defaults, tqdm_class):
        """The published checkpoints' layout (causal_video_vae/, diffusion_transformer_<variant>/, text folders),
        local or fetched from the hub; bitsandbytes quantisation is applied while loading."""
        checkpoint = resolve_checkpoint(source, variant, model, tqdm_class=tqdm_class)
        from .transformers import PyramidFluxTransformer, PyramidMMDiT
        from .vae import CausalVideoVAE

        transformer_class = PyramidMMDiT if checkpoint.family.name == "sd3" else PyramidFluxTransformer
        dit_quant, t5_quant = bitsandbytes_configs(quantize, dtype) if uses_bitsandbytes(quantize, device) else (None, None)
        extra = {"quantization_config": dit_quant, "device_map": {"": device}} if dit_quant else {}
        transformer = load_model(transformer_class, checkpoint.transformer_path, dtype, **extra)
        vae = load_model(CausalVideoVAE, checkpoint.vae_path, dtype)
        prompt_encoder = PROMPT_ENCODERS[checkpoint.family.name].from_pretrained(
            checkpoint.root, torch_dtype=dtype, t5_quantization_config=t5_quant, device=device if t5_quant else None
        )
        components = {**prompt_encoder.encoders, **{k.replace("text_encoder", "tokenizer"): v for k, v in prompt_encoder.tokenizers.items()}}
        pipe = cls(vae=vae, transformer=transformer, scheduler=PyramidFlowScheduler(), **components)
        pipe.checkpoint = checkpoint
        pipe.source = str(source)
        pipe.official_defaults = not (checkpoint.root / SETTINGS_FILE).is_file() if official_defaults is None else bool(official_defaults)
        pipe.register_to_config(pyramid_flow={**describe(checkpoint.family, checkpoint.variant),
                                              "official_defaults": pipe.official_defaults})
        return pipe

    parallel = None  # a model_core.parallel.Parallelism once `enable_parallelism` ran

    def enable_parallelism(self, parallel="auto"):
        """Split every generation over the ranks of the initialised process group (torchrun): "auto" (guidance
        parallel on an even number of ranks, context parallel over the rest) or {"guidance": G, "context": C}
        with G x C = world size. Every rank must make the same calls; they return the same result on each."""
        from .parallel import enable_parallelism

        self.parallel = enable_parallelism(self.transformer, parallel, device=self._execution_device)
        return self.parallel

    @classmethod
    def _from_saved_pipeline(cls, root: Path, device, dtype, quantize, official_defaults):
        """A folder written by `save_pretrained` (diffusers layout: model_index.json and a folder per component)."""
        facts = json.loads((root / MODEL_INDEX).read_text()).get("pyramid_flow")
        if not isinstance(facts, dict):
            raise ValueError(f"{root / MODEL_INDEX} was not written by PyramidFlowPipeline.save_pretrained (no 'pyramid_flow' entry)")
        quantization = None
        if uses_bitsandbytes(quantize, device):
            from diffusers import PipelineQuantizationConfig

            t5 = PROMPT_ENCODERS[facts["family"]].t5_folder
            dit_quant, t5_quant = bitsandbytes_configs(quantize, dtype)
            quantization = PipelineQuantizationConfig(quant_mapping={"transformer": dit_quant, t5: t5_quant})
        with MODEL_BUILD_LOCK:
            pipe = super().from_pretrained(root, dtype=dtype, quantization_config=quantization)
        pipe.source = str(root)
        if official_defaults is not None:
            pipe.official_defaults = bool(official_defaults)
            pipe.register_to_config(pyramid_flow={**facts, "official_defaults": pipe.official_defaults})
        return pipe

    def save_pretrained(self, save_directory, **kwargs):
        """Save in diffusers' layout (model_index.json, a folder per component) with a `pipeline.py` beside it, so
        `PyramidFlowPipeline.from_pretrained(dir)` and `DiffusionPipeline.from_pretrained(dir, custom_pipeline=dir)`
        both load it back. The published checkpoints' official layout stays the one `from_pretrained` reads from the hub."""
        super().save_pretrained(save_directory, **kwargs)
        (Path(save_directory) / "pipeline.py").write_text(CUSTOM_PIPELINE_MODULE)

    def _apply_memory_options(self, device, dtype, offload, quantize, vae_tiling):
        t5 = self.prompt_encoder.encoders[self.prompt_encoder.t5_folder]
        fp8 = None
        if quantize == "fp8":  # the DiT only: T5 casts activations to its weights' storage dtype itself
            fp8 = apply_fp8(self.transformer, dtype, device, offload)
        if quantize == "int8" and device.type == "cpu":
            quantize_linear_int8_cpu(self.transformer)
            quantize_linear_int8_cpu(t5)
        if vae_tiling:
            self.vae.enable_tiling()
        if offload == "model":
            self.enable_model_cpu_offload(device=device)
        elif offload in ("sequential", "group"):
            self._enable_layer_offload(device, offload)
        else:
            for name in ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3"):
                module = getattr(self, name)
                if module is not None and not getattr(module, "is_quantized", False):
                    module.to(device)
        self.settings_base.update(offload=offload, quantize=quantize, vae_tiling=vae_tiling, dtype=str(dtype).replace("torch.", ""))
        if fp8 is not None:
            self.settings_base["fp8"] = fp8  # "compute" (float8 matmuls) or "storage" (float8 weights only)

    def _enable_layer_offload(self, device, offload):
        """Weights stay on the CPU and reach the GPU a layer (`sequential`) or a block (`group`) at a time. The VAE is
        offloaded per layer in both: it runs through encode/decode, which block-level hooks on its forward miss."""
        from diffusers.hooks import apply_group_offloading

        offload_type = "leaf_level" if offload == "sequential" else "block_level"
        blocks = {"num_blocks_per_group": 1} if offload == "group" else {}
        self.enable_group_offload(onload_device=device, offload_type=offload_type, exclude_modules=["vae"], **blocks)
        apply_group_offloading(self.vae, onload_device=device, offload_type="leaf_level")

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
        negative = self._negative_embeddings(negative_prompt, device) if do_classifier_free_guidance else None
        return text, negative

    def _effective_negative_prompt(self, negative_prompt: Optional[str]) -> str:
        if negative_prompt is None and self.official_defaults:
            return OFFICIAL_NEGATIVE_PROMPT
        return negative_prompt or ""

    def _negative_embeddings(self, negative_prompt: Optional[str], device) -> PromptEmbeddings:
        return self.prompt_encoder.encode_negative(self._effective_negative_prompt(negative_prompt), 1, device=device)

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
        prompts, listed = _prompt_batch(prompt, num_videos_per_prompt, options.get("prompt_embeds"))
        for each in prompts if listed else ():  # every prompt checked before the first video is made
            check_prompt(each, required=condition_frames is None)
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {', '.join(map(repr, OUTPUT_TYPES))}; got {output_type!r}")
        if options.get("stream_to") is not None and (output_type != "np" or len(prompts) > 1):
            raise ValueError("stream_to writes the uint8 frames of one video as units finish; leave output_type at "
                             "'np' and make one video")
        options.update(_inference_steps(num_inference_steps, options, self.scheduler.config.stages))
        generators, seed = self._generators(generator, seed, len(prompts))
        self._interrupt = False
        videos = []
        for video_prompt, video_generator in zip(prompts, generators):
            if videos and self._stop_requested():
                break
            videos.append(self._generate_video(mode, video_prompt, condition_frames, generator=video_generator, seed=seed,
                                               decode=output_type != "latent", **options))
        interrupted = len(videos) < len(prompts) or videos[-1].interrupted
        settings = videos[0].settings
        if listed or num_videos_per_prompt != 1:
            settings = {**settings, "num_videos_per_prompt": int(num_videos_per_prompt), "interrupted": interrupted}
            if listed:
                settings["prompt"] = list(prompt)
        latents = _batched([video.latents[0] for video in videos], torch.stack)
        frames = _video_output([video.frames for video in videos], latents, output_type)
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
                seed = self.parallel.agree(seed)
            generator = torch.Generator().manual_seed(seed)
        elif not isinstance(generator, torch.Generator):
            raise ValueError(f"generator must be a torch.Generator or a list of one per video; got {type(generator).__name__}")
        return [generator] * count, seed

    def _generate_video(self, mode, prompt, condition_frames, *, generator, seed, decode: bool, negative_prompt=None,
                        prompt_embeds: Optional[PromptEmbeddings] = None,
                        negative_prompt_embeds: Optional[PromptEmbeddings] = None,
                        callback_on_step_end: Optional[Callable] = None, stream_to=None, **options) -> "_Video":
        """One video with `generator`; uint8 frames unless `decode` is False or they were streamed. `options`: the
        plan's (`model_core.generation_plan.plan_generation`)."""
        plan = plan_generation(self, mode, prompt, condition_frames, prompt_embeds, negative_prompt_embeds, **options)
        device = self._execution_device
        condition = history = None
        if condition_frames is not None:  # resized once: encoded as history, and spliced back for extensions
            condition = to_video_tensor(condition_frames, plan.height, plan.width, device=device)
            history = self._encode_video(condition[:, :, -plan.history_frames:])
        total_units = (history.shape[2] if history is not None else 0) + plan.new_units
        scales = _unit_guidance(plan.guidance_scale, plan.video_guidance_scale, plan.video_guidance_decay, total_units)
        guided = [plan.guidance_scale > 0 if self.official_defaults else s > 1 for s in scales]
        text, negative = self._prompt_pair(plan.prompt, negative_prompt, prompt_embeds, negative_prompt_embeds,
                                           any(guided), device)
        texts = self._unit_texts(plan, text, total_units, device)
        decode_unit = None if stream_to is None else self._stream_start(plan, stream_to, condition, history)
        velocity = lambda unit: self._velocity(texts[unit], negative if guided[unit] else None, scales[unit])  # noqa: E731
        latents, interrupted = self._run_units(plan, velocity, history, generator, device, decode_unit,
                                               callback_on_step_end, {"prompt_embeds": text,
                                                                      "negative_prompt_embeds": negative})
        frames = self.decode_latents(latents) if decode and stream_to is None else None
        if mode == "extend_video" and frames is not None:
            frames = np.concatenate([to_frames(condition), frames[plan.history_frames:]])
        written = int(frames.shape[0]) if frames is not None else decode_unit.frames_written if decode_unit else None
        settings = self._settings_record(plan, negative_prompt, seed, written, interrupted)
        if prompt_embeds is not None:
            settings["prompt_embeds"] = "given"
        return _Video(frames, latents, interrupted, settings)

    def _prompt_pair(self, prompt, negative_prompt, prompt_embeds, negative_prompt_embeds, guided: bool, device) -> tuple:
        """(text, negative) embeddings: encoded here, or the given ones (the negative prompt's encoded when guided)."""
        if prompt_embeds is None:
            return self.encode_prompt(prompt, negative_prompt, device, guided)
        text, negative = prompt_embeds.to(device), negative_prompt_embeds
        if guided:
            negative = self._negative_embeddings(negative_prompt, device) if negative is None else negative.to(device)
        return text, negative

    def _unit_texts(self, plan: GenerationPlan, text, total_units: int, device) -> list:
        """The text embeddings of each unit: the prompt's, or along a storyboard its segments' (blended at cuts)."""
        if plan.storyboard is None:
            return [text] * total_units
        spec = self.spec
        embeddings = [text, *(self.encode_prompt(s.prompt, None, device, False)[0] for s in plan.storyboard.segments[1:])]
        segment_of_unit = plan.storyboard.unit_segments(spec.fps, spec.frames_per_latent,
                                                        continues=plan.mode == "extend_video")
        history_units = total_units - len(segment_of_unit)  # an extension's given clip: not generated, no text
        return [text] * history_units + unit_texts(segment_of_unit, embeddings, plan.storyboard.blend)

    def _stream_start(self, plan: GenerationPlan, stream_to, condition, history):
        """The unit decoder writing to `stream_to`, primed with the given clip (written) or image (its context)."""
        decode_unit = self._streamed_decoder(stream_to.write)
        if plan.mode == "extend_video":
            decode_unit.write(to_frames(condition, truncate=self.official_defaults))
        if history is not None:  # the causal VAE's context: written for an image, only read for an extension
            decode_unit(history, keep=plan.mode != "extend_video")
        return decode_unit

    def _run_units(self, plan: GenerationPlan, velocity_for_unit, history, generator, device, decode_unit,
                   callback_on_step_end, embeddings: dict) -> tuple:
        """(latents, interrupted): the plan's units sampled after `history` (Eq. 17), each step reported to the
        callback and the progress bar, each finished unit to the streaming decoder."""
        scale = self.vae.spatial_scale
        latent_shape = (1, self._latent_channels, plan.new_units, plan.height // scale, plan.width // scale)
        enable_step_cache(self.transformer, plan.cache, plan.cache_threshold)
        self._progress = None
        finished = list(history.split(1, dim=2)) if history is not None else []
        step_index = 0
        total_units = len(finished) + plan.new_units
        progress_bar = self.progress_bar(total=_step_count(len(finished), total_units, plan.first_frame_steps,
                                                           plan.video_steps))

        def on_step(progress: Progress, t, x):
            nonlocal step_index
            self._progress = progress
            if callback_on_step_end is not None:
                available = {"latents": x, **embeddings, "unit_latents": x if progress.kind == "unit" else None,
                             "video_latents": torch.cat([*finished, x], dim=2) if progress.kind == "unit" else None}
                returned = callback_on_step_end(self, step_index, t, {name: available[name] for name in plan.tensor_inputs})
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
                velocity_for_unit, self.scheduler, latent_shape, history, plan.first_frame_steps, plan.video_steps,
                generator=generator, on_step=on_step, stop=self._stop_requested, device=device,
            )
        if latents is None:  # stopped before the first unit was finished
            latents = torch.zeros(*latent_shape[:2], 0, *latent_shape[3:], device=device)
        return latents, interrupted

    def _settings_record(self, plan: GenerationPlan, negative_prompt, seed, num_frames, interrupted: bool) -> dict:
        """What an output records to be made again: the plan, the model and how it ran."""
        settings = {
            **self.settings_base, "mode": plan.mode, "model": getattr(self, "source", None), "family": self.family.name,
            "variant": self.variant, "prompt": plan.prompt,
            "negative_prompt": self._effective_negative_prompt(negative_prompt), "seed": seed,
            "num_frames": num_frames, "height": plan.height, "width": plan.width,
            "fps": self.spec.fps, "first_frame_steps": list(plan.first_frame_steps), "video_steps": list(plan.video_steps),
            "guidance_scale": plan.guidance_scale, "video_guidance_scale": plan.video_guidance_scale,
            "video_guidance_decay": plan.video_guidance_decay, "cache": plan.cache, "cache_threshold": plan.cache_threshold,
            "official_defaults": self.official_defaults,
            "lora": self.lora_settings(), "interrupted": interrupted, "version": __version__,
            "parallel": SINGLE_PROCESS if self.parallel is None else self.parallel.settings(),
        }
        if plan.storyboard is not None:
            settings["storyboard"] = plan.storyboard.to_settings()
        return settings

    @property
    def _latent_channels(self) -> int:
        return self.vae.config.encoder_out_channels

    @property
    def _size_multiple(self) -> int:
        """Pixels per token at the coarsest pyramid level: VAE downsampling x 2x2 patches x 2^(K-1)."""
        return self.vae.spatial_scale * 2 * 2 ** (self.scheduler.config.stages - 1)

    @property
    def _longest_units(self) -> int:
        """Latent frames of the longest video: the variant's long-video length, within the temporal positions the
        transformer's config declares (`max_num_frames`, MM-DiT) where it declares any."""
        declared = getattr(self.transformer.config, "max_num_frames", None)
        return min(self.spec.longest_latent_frames, declared) if declared else self.spec.longest_latent_frames

    def _plan_units(self, mode, num_frames, condition_frames):
        """(conditioning pixel frames used, new latent units), validated against the checkpoint."""
        spec = self.spec
        n = spec.frames_per_latent
        if mode == "extend_video":
            if num_frames is None or num_frames <= 0 or num_frames % n:
                raise ValueError(f"num_frames counts the new frames of an extension and must be a positive multiple of {n}; got {num_frames}")
            new_units = num_frames // n
            if new_units >= self._longest_units:
                longest = spec.frames(self._longest_units)
                raise ValueError(f"this model makes at most {longest} frames in all; ask for at most {longest - 1} new frames")
            room = max(1, spec.max_latent_frames - new_units)  # the given clip's units kept within the trained window
            return min(spec.frames(latent_frames(len(condition_frames), n)), spec.frames(room)), new_units
        if num_frames is None:
            num_frames = 1 if mode == "text_to_image" else spec.max_frames
        longest = spec.frames(self._longest_units)
        if not isinstance(num_frames, (int, np.integer)) or num_frames < 1 or (num_frames - 1) % n or num_frames > longest:
            allowed = ", ".join(str(spec.frames(k)) for k in range(1, min(self._longest_units, 4) + 1))
            allowed += f", ..., {longest}" if self._longest_units > 4 else ""
            raise ValueError(f"num_frames must be 1 + {n}k and at most {longest} for this model ({allowed}; "
                             f"{longest / spec.fps:.0f} s at {spec.fps} fps); got {num_frames}")
        units = latent_frames(num_frames, n)
        if mode == "image_to_video":
            if units < 2:
                raise ValueError(f"image_to_video needs at least {spec.frames(2)} frames (the image plus one unit of motion)")
            return 1, units - 1
        return 0, units

    def _velocity(self, text: PromptEmbeddings, negative: Optional[PromptEmbeddings], scale: float):
        """v(clips, t) from the transformer, with classifier-free guidance when `negative` is given."""
        embeddings = (text if negative is None else negative.followed_by(text)).without_padding_columns()
        dtype = self.compute_dtype
        timestep_dtype = dtype if self.official_defaults else torch.float32  # the authors cast t to the latents' dtype
        split = negative is not None and self.parallel is not None and self.parallel.config.guidance == 2
        if split:  # guidance parallel: this rank predicts one branch, the two ranks swap velocities
            embeddings = PromptEmbeddings(*(self.parallel.guidance_branch(x) for x in (embeddings.hidden_states, embeddings.attention_mask, embeddings.pooled)))
        stage_shape = None

        def velocity(clips, t):
            nonlocal stage_shape
            if clips[-1].shape != stage_shape:  # a new unit or pyramid stage: cached residuals no longer apply
                reset_step_cache(self.transformer)
                stage_shape = clips[-1].shape
            clips = [c.to(dtype) for c in clips]
            if negative is not None and not split:
                clips = [torch.cat([c, c]) for c in clips]
            batch = clips[-1].shape[0]
            v = self.transformer(
                sample=[clips], encoder_hidden_states=embeddings.hidden_states.to(dtype),
                encoder_attention_mask=embeddings.attention_mask, pooled_projections=embeddings.pooled.to(dtype),
                timestep=t.to(clips[-1].device, timestep_dtype).expand(batch), return_dict=False,
            )[0][0].float()
            if split:
                v = self.parallel.gather_guidance(v)
            if negative is None:
                return v
            unconditional, conditional = v.chunk(2)
            return unconditional + scale * (conditional - unconditional)

        return velocity

    def _stop_requested(self) -> bool:
        """`pipe._interrupt`; under parallel, rank 0's on every rank, so all ranks stop after the same step."""
        if self.parallel is not None:
            self._interrupt = self.parallel.agree(bool(self._interrupt))
        return self._interrupt

    @torch.no_grad()
    def _encode_video(self, video: torch.Tensor) -> torch.Tensor:
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

    def _streamed_decoder(self, write: Callable):
        """decode(latents, keep=True): the normalised latents of the next units of a video -> their uint8 frames, passed
        to `write` when kept. The causal VAE keeps its caches between calls, so the frames equal one decode of all."""
        stream = self.vae.start_decode_stream()

        def write_frames(frames):
            write(frames)
            decode.frames_written += len(frames)

        def decode(latents, keep=True):
            z = self.family.normalization.denormalize(latents.float(), starts_video=not stream.started)
            frames = to_frames(self.vae.decode_stream(z.to(self.vae.dtype), stream), truncate=self.official_defaults)
            if keep:
                write_frames(frames)

        decode.frames_written, decode.write = 0, write_frames
        return decode

    def unit_preview(self, video_latents: torch.Tensor) -> np.ndarray:
        """The frames of the last unit of `video_latents` (the callback's "video_latents"): the causal VAE decodes it
        with the unit before it as context; the first unit is one frame, later ones `frames_per_latent`."""
        frames = self.decode_latents(video_latents[:, :, -2:])
        return frames if video_latents.shape[2] == 1 else frames[-self.spec.frames_per_latent:]


def _prompt_batch(prompt, num_videos_per_prompt, prompt_embeds) -> tuple:
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


def _inference_steps(num_inference_steps, options: dict, stages: int) -> dict:
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


def _step_count(first_unit: int, total_units: int, first_frame_steps, video_steps) -> int:
    """Transformer steps of units first_unit..total_units - 1: unit 0 takes first_frame_steps, later ones video_steps."""
    return sum(sum(first_frame_steps if unit == 0 else video_steps) for unit in range(first_unit, total_units))


def _batched(videos: list, stack: Callable):
    """The videos (arrays or tensors) as one batch [B, ...] when their shapes agree, else the list of them."""
    if len(videos) == 1:
        return videos[0][None]
    return stack(videos) if all(video.shape == videos[0].shape for video in videos) else videos


def _video_output(frames: list, latents, output_type: str):
    """The output's `frames` from each video's uint8 frames (None when streamed) and the batched latents."""
    if output_type == "latent":
        return latents
    if frames[0] is None:
        return None
    if output_type == "pil":
        return [[Image.fromarray(frame) for frame in video] for video in frames]
    if output_type == "pt":  # diffusers' video layout: [B, T, C, H, W] in [0, 1]
        return _batched([torch.from_numpy(video).permute(0, 3, 1, 2).float() / 255 for video in frames], torch.stack)
    return _batched(frames, np.stack)


def _unit_guidance(first: float, video: float, decay: bool, units: int) -> list:
    """Guidance per unit: `first` for the first frame, `video` after it, optionally decaying linearly to 1."""
    later = np.linspace(video, min(video, 1.0), max(units - 1, 1)) if decay else [video] * max(units - 1, 1)
    return [first, *[float(g) for g in later]]
