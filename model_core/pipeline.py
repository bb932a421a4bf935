"""PyramidFlowPipeline: text-to-video, text-to-image, image-to-video and video extension."""
import secrets
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import torch
from diffusers import DiffusionPipeline

from . import __version__
from .checkpoints import FAMILIES, Family, VariantSpec
from .loading import ResolvedCheckpoint, load_model, resolve_checkpoint
from .media import as_frames, to_frames, to_video_tensor
from .memory import (
    bitsandbytes_configs,
    check_memory_options,
    quantize_linear_int8_cpu,
    resolve_device,
    resolve_dtype,
    store_in_fp8,
    uses_bitsandbytes,
)
from .sampling import Progress, sample_video
from .scheduler import PyramidFlowScheduler
from .temporal import frames_for_duration, latent_frames
from .text import PROMPT_ENCODERS, PromptEmbeddings



@dataclass
class GenerationResult:
    """A finished (or stopped) generation: uint8 frames [T, H, W, 3] and what made them."""

    frames: np.ndarray
    latents: torch.Tensor
    fps: int
    interrupted: bool
    settings: dict = field(default_factory=dict)


@dataclass(frozen=True)
class PreviewProgress(Progress):
    """A progress event; `preview` holds the finished unit's frames (uint8 [t, H, W, 3]) on unit events."""

    preview: Optional[np.ndarray] = None


class PyramidFlowPipeline(DiffusionPipeline):
    """Pyramidal flow matching generation from a published (or our own) checkpoint."""

    model_cpu_offload_seq = "text_encoder->text_encoder_2->text_encoder_3->transformer->vae"
    _optional_components = ["text_encoder_3", "tokenizer_3"]

    def __init__(self, vae, transformer, scheduler, text_encoder, tokenizer, text_encoder_2, tokenizer_2,
                 text_encoder_3=None, tokenizer_3=None):
        super().__init__()
        self.register_modules(vae=vae, transformer=transformer, scheduler=scheduler, text_encoder=text_encoder,
                              tokenizer=tokenizer, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2,
                              text_encoder_3=text_encoder_3, tokenizer_3=tokenizer_3)
        self.checkpoint = ResolvedCheckpoint(None, FAMILIES["sd3" if text_encoder_3 is not None else "miniflux"], "384p")
        self.compute_dtype = next(transformer.parameters()).dtype
        self.source = None
        self.settings_base = {"offload": "none", "quantize": "none", "vae_tiling": False, "dtype": str(self.compute_dtype).replace("torch.", "")}
        names = ["text_encoder", "text_encoder_2", "text_encoder_3"][: 3 if text_encoder_3 is not None else 2]
        self.prompt_encoder = PROMPT_ENCODERS[self.family.name](
            {n: getattr(self, n) for n in names}, {n: getattr(self, n.replace("text_encoder", "tokenizer")) for n in names}
        )

    @property
    def family(self) -> Family:
        return self.checkpoint.family

    @property
    def variant(self) -> str:
        return self.checkpoint.variant

    @property
    def spec(self) -> VariantSpec:
        return self.checkpoint.spec

    @classmethod
    def from_pretrained(cls, source, variant: str = "auto", model: str = "auto", torch_dtype="float32", device=None,
                        offload: str = "none", quantize: str = "none", vae_tiling: bool = False, lora=None,
                        tqdm_class=None):
        """Load a checkpoint folder or hub repo id (only the needed subfolders are fetched).

        offload: none | model | sequential | group; quantize: none | int8 | nf4 | fp8 (see model_core.memory);
        lora: a folder with a LoRA adapter trained by `training` (recipe lora.yaml) to apply to the transformer.
        """
        device, dtype = resolve_device(device), resolve_dtype(torch_dtype)
        check_memory_options(device, dtype, offload, quantize)
        checkpoint = resolve_checkpoint(source, variant, model, tqdm_class=tqdm_class)
        from .transformers import PyramidFluxTransformer, PyramidMMDiT
        from .vae import CausalVideoVAE

        transformer_class = PyramidMMDiT if checkpoint.family.name == "sd3" else PyramidFluxTransformer
        dit_quant, t5_quant = bitsandbytes_configs(quantize, dtype) if uses_bitsandbytes(quantize, device) else (None, None)
        extra = {"quantization_config": dit_quant, "device_map": {"": device}} if dit_quant else {}
        transformer = load_model(transformer_class, checkpoint.transformer_path, dtype, **extra)
        if lora is not None:
            from .lora import load_lora_adapter

            load_lora_adapter(transformer, lora)
        vae = load_model(CausalVideoVAE, checkpoint.vae_path, dtype)
        prompt_encoder = PROMPT_ENCODERS[checkpoint.family.name].from_pretrained(
            checkpoint.root, torch_dtype=dtype, t5_quantization_config=t5_quant, device=device if t5_quant else None
        )
        components = {**prompt_encoder.encoders, **{k.replace("text_encoder", "tokenizer"): v for k, v in prompt_encoder.tokenizers.items()}}
        pipe = cls(vae=vae, transformer=transformer, scheduler=PyramidFlowScheduler(), **components)
        pipe.checkpoint = checkpoint
        pipe.compute_dtype = dtype
        pipe._apply_memory_options(device, dtype, offload, quantize, vae_tiling)
        pipe.source = str(source)
        return pipe

    def _apply_memory_options(self, device, dtype, offload, quantize, vae_tiling):
        t5 = self.prompt_encoder.encoders[self.prompt_encoder.t5_folder]
        if quantize == "fp8":  # the DiT only: T5 casts activations to its weights' storage dtype itself
            store_in_fp8(self.transformer, dtype)
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
        self.settings_base = {"offload": offload, "quantize": quantize, "vae_tiling": vae_tiling, "dtype": str(dtype).replace("torch.", "")}

    def _enable_layer_offload(self, device, offload):
        """Weights stay on the CPU and reach the GPU a layer (`sequential`) or a block (`group`) at a time. The VAE is
        offloaded per layer in both: it runs through encode/decode, which block-level hooks on its forward miss."""
        from diffusers.hooks import apply_group_offloading

        offload_type = "leaf_level" if offload == "sequential" else "block_level"
        blocks = {"num_blocks_per_group": 1} if offload == "group" else {}
        self.enable_group_offload(onload_device=device, offload_type=offload_type, exclude_modules=["vae"], **blocks)
        apply_group_offloading(self.vae, onload_device=device, offload_type="leaf_level")

    # --- the four modes -------------------------------------------------------------------------

    def text_to_video(self, prompt: str, **options) -> GenerationResult:
        """A video from a prompt: first frame with `first_frame_steps`, later units with `video_steps`."""
        return self._generate("text_to_video", prompt, None, **options)

    __call__ = text_to_video

    def text_to_image(self, prompt: str, **options) -> GenerationResult:
        """One frame (a single autoregressive unit)."""
        if options.get("num_frames", 1) != 1:
            raise ValueError("text_to_image makes one frame; leave num_frames unset or 1")
        return self._generate("text_to_image", prompt, None, **{**options, "num_frames": 1})

    def image_to_video(self, image, prompt: str = "", **options) -> GenerationResult:
        """Animate `image` (PIL or uint8 [H, W, 3]): it becomes the first unit, encoded by the VAE."""
        return self._generate("image_to_video", prompt, as_frames(image, "the image")[:1], **options)

    def extend_video(self, video, prompt: str = "", **options) -> GenerationResult:
        """Continue `video` (uint8 [T, H, W, 3]); `num_frames` counts the new frames (a multiple of 8).
        The output is the input followed by the continuation."""
        return self._generate("extend_video", prompt, as_frames(video, "the video"), **options)

    # --- the engine -----------------------------------------------------------------------------

    @torch.no_grad()  # inference: no autograd graph through the sampling loop
    def _generate(self, mode, prompt, condition_frames, *, negative_prompt=None, num_frames=None, duration=None,
                  height=None, width=None, first_frame_steps=None, video_steps=None,
                  guidance_scale=None, video_guidance_scale=None, video_guidance_decay=False, seed=None,
                  generator=None, callback: Callable = None, previews: bool = True, interrupt=None,
                  output_type="frames") -> GenerationResult:
        spec = self.spec
        prompt = _check_prompt(prompt, required=condition_frames is None)
        height, width = _check_size(spec.height if height is None else height, spec.width if width is None else width,
                                    self._size_multiple)
        sampling = self.family.sampling.filled(first_frame_steps=first_frame_steps, video_steps=video_steps,
                                               guidance_scale=guidance_scale, video_guidance_scale=video_guidance_scale)
        first_frame_steps = _check_steps(sampling.first_frame_steps, "first_frame_steps", self.scheduler.config.stages)
        video_steps = _check_steps(sampling.video_steps, "video_steps", self.scheduler.config.stages)
        guidance_scale, video_guidance_scale = sampling.guidance_scale, sampling.video_guidance_scale
        _check_guidance(guidance_scale, "guidance_scale")
        _check_guidance(video_guidance_scale, "video_guidance_scale")
        if output_type not in ("frames", "latents"):
            raise ValueError(f"output_type must be 'frames' or 'latents'; got {output_type!r}")
        if duration is not None:
            num_frames = frames_for_duration(duration, spec.fps, spec.frames_per_latent, new_frames_only=mode == "extend_video")
        history_frames, new_units = self._plan_units(mode, num_frames, condition_frames)
        if generator is None:
            seed = secrets.randbelow(2**63) if seed is None else int(seed)
            generator = torch.Generator().manual_seed(seed)
        device = self._execution_device

        text = self.prompt_encoder.encode(prompt, device=device)
        guided = guidance_scale > 1 or video_guidance_scale > 1
        negative = self.prompt_encoder.encode_negative(negative_prompt, 1, device=device) if guided else None
        history = condition = None
        if condition_frames is not None:  # resized once: encoded as history, and spliced back for extensions
            condition = to_video_tensor(condition_frames, height, width, device=device)
            history = self._encode_video(condition[:, :, -history_frames:])
        scale = self.vae.spatial_scale
        latent_shape = (1, self._latent_channels, new_units, height // scale, width // scale)
        total_units = (history.shape[2] if history is not None else 0) + new_units
        scales = _unit_guidance(guidance_scale, video_guidance_scale, video_guidance_decay, total_units)

        def velocity_for_unit(unit):
            return self._velocity(text, negative if scales[unit] > 1 else None, scales[unit])

        latents, interrupted = sample_video(
            velocity_for_unit, self.scheduler, latent_shape, history, first_frame_steps, video_steps,
            generator=generator, callback=self._with_previews(callback) if previews else callback, interrupt=_as_check(interrupt), device=device,
        )
        frames = self._decode(latents) if output_type == "frames" else None
        if mode == "extend_video" and frames is not None:
            frames = np.concatenate([to_frames(condition), frames[history_frames:]])
        settings = {
            **self.settings_base, "mode": mode, "model": getattr(self, "source", None), "family": self.family.name,
            "variant": self.variant, "prompt": prompt, "negative_prompt": negative_prompt or "", "seed": seed,
            "num_frames": int(frames.shape[0]) if frames is not None else None, "height": height, "width": width,
            "fps": spec.fps, "first_frame_steps": list(first_frame_steps), "video_steps": list(video_steps),
            "guidance_scale": guidance_scale, "video_guidance_scale": video_guidance_scale,
            "video_guidance_decay": video_guidance_decay, "interrupted": interrupted, "version": __version__,
        }
        return GenerationResult(frames, latents, spec.fps, interrupted, settings)

    @property
    def _latent_channels(self) -> int:
        return self.vae.config.encoder_out_channels

    @property
    def _size_multiple(self) -> int:
        """Pixels per token at the coarsest pyramid level: VAE downsampling x 2x2 patches x 2^(K-1)."""
        return self.vae.spatial_scale * 2 * 2 ** (self.scheduler.config.stages - 1)

    def _plan_units(self, mode, num_frames, condition_frames):
        """(conditioning pixel frames used, new latent units), validated against the checkpoint."""
        spec = self.spec
        n = spec.frames_per_latent
        if mode == "extend_video":
            if num_frames is None or num_frames <= 0 or num_frames % n:
                raise ValueError(f"num_frames counts the new frames of an extension and must be a positive multiple of {n}; got {num_frames}")
            new_units = num_frames // n
            room = spec.max_latent_frames - new_units
            if room < 1:
                raise ValueError(f"this model makes at most {spec.max_frames} frames in all; ask for at most {spec.max_frames - 1} new frames")
            return min(spec.frames(latent_frames(len(condition_frames), n)), spec.frames(room)), new_units
        if num_frames is None:
            num_frames = 1 if mode == "text_to_image" else spec.max_frames
        if not isinstance(num_frames, (int, np.integer)) or num_frames < 1 or (num_frames - 1) % n or num_frames > spec.max_frames:
            allowed = ", ".join(str(spec.frames(k)) for k in range(1, min(spec.max_latent_frames, 4) + 1))
            allowed += f", ..., {spec.max_frames}" if spec.max_latent_frames > 4 else ""
            raise ValueError(f"num_frames must be 1 + {n}k and at most {spec.max_frames} for this model ({allowed}); got {num_frames}")
        units = latent_frames(num_frames, n)
        if mode == "image_to_video":
            if units < 2:
                raise ValueError(f"image_to_video needs at least {spec.frames(2)} frames (the image plus one unit of motion)")
            return 1, units - 1
        return 0, units

    def _velocity(self, text: PromptEmbeddings, negative: Optional[PromptEmbeddings], scale: float):
        """v(clips, t) from the transformer, with classifier-free guidance when `negative` is given."""
        embeddings = text if negative is None else _concat(negative, text)
        dtype = self.compute_dtype

        def velocity(clips, t):
            clips = [c.to(dtype) for c in clips]
            if negative is not None:
                clips = [torch.cat([c, c]) for c in clips]
            batch = clips[-1].shape[0]
            v = self.transformer(
                sample=[clips], encoder_hidden_states=embeddings.hidden_states.to(dtype),
                encoder_attention_mask=embeddings.attention_mask, pooled_projections=embeddings.pooled.to(dtype),
                timestep=t.to(clips[-1].device, torch.float32).expand(batch), return_dict=False,
            )[0][0].float()
            if negative is None:
                return v
            unconditional, conditional = v.chunk(2)
            return unconditional + scale * (conditional - unconditional)

        return velocity

    @torch.no_grad()
    def _encode_video(self, video: torch.Tensor) -> torch.Tensor:
        """[1, 3, T, H, W] in [-1, 1] -> normalised latents (posterior mean)."""
        posterior = self.vae.encode(video.to(self.vae.dtype), temporal_chunk=True).latent_dist
        return self.family.normalization.normalize(posterior.mean.float())

    @torch.no_grad()
    def _decode(self, latents: torch.Tensor) -> np.ndarray:
        z = self.family.normalization.denormalize(latents).to(self.vae.dtype)
        return to_frames(self.vae.decode(z, temporal_chunk=True).sample)

    def _with_previews(self, callback):
        """Wrap a user callback so that unit events carry decoded preview frames of that unit."""
        if callback is None:
            return None
        finished = []

        def on_progress(event: Progress):
            if event.kind != "unit":
                callback(PreviewProgress(**vars(event)))
                return
            finished.append(event.latents)
            window = torch.cat(finished[-2:], dim=2)
            frames = self._decode(window)
            preview = frames if len(finished) == 1 else frames[-self.spec.frames_per_latent:]
            callback(PreviewProgress(**vars(event), preview=preview))

        return on_progress


def _check_prompt(prompt, required: bool) -> str:
    if prompt is None:
        prompt = ""
    if not isinstance(prompt, str):
        raise ValueError(f"the prompt must be a string; got {type(prompt).__name__}")
    if required and not prompt.strip():
        raise ValueError("the prompt is empty; describe the video you want")
    return prompt


def _check_size(height, width, multiple: int) -> tuple:
    for name, value in (("height", height), ("width", width)):
        if not isinstance(value, (int, np.integer)) or value < multiple or value % multiple:
            raise ValueError(f"{name} must be a positive multiple of {multiple} pixels (the latent grid); got {value}")
    return int(height), int(width)


def _check_steps(steps, name: str, stages: int) -> tuple:
    steps = tuple(steps) if isinstance(steps, (list, tuple)) else None
    if steps is None or len(steps) != stages or not all(isinstance(s, (int, np.integer)) and s > 0 for s in steps):
        raise ValueError(f"{name} must be {stages} positive integers, one per pyramid stage (e.g. 20,20,20)")
    return tuple(int(s) for s in steps)


def _check_guidance(value, name: str) -> None:
    if not isinstance(value, (int, float)) or value < 0:
        raise ValueError(f"{name} must be a number >= 0 (1 or less turns guidance off); got {value!r}")


def _unit_guidance(first: float, video: float, decay: bool, units: int) -> list:
    """Guidance per unit: `first` for the first frame, `video` after it, optionally decaying linearly to 1."""
    later = np.linspace(video, min(video, 1.0), max(units - 1, 1)) if decay else [video] * max(units - 1, 1)
    return [first, *[float(g) for g in later]]


def _concat(a: PromptEmbeddings, b: PromptEmbeddings) -> PromptEmbeddings:
    return PromptEmbeddings(torch.cat([a.hidden_states, b.hidden_states]), torch.cat([a.attention_mask, b.attention_mask]),
                            torch.cat([a.pooled, b.pooled]))


def _as_check(interrupt):
    """Accept a threading.Event, a callable, or None."""
    if interrupt is None or callable(interrupt):
        return interrupt
    return interrupt.is_set
