"""Random-weight Pyramid Flow models at the published sizes (or tiny ones) and a timed text-to-video on them.

Shared by benchmarks.gpu_suite and benchmarks.official_side_by_side. No checkpoint and no text encoder is needed:
the transformer and VAE are built with the published configs (those of the official layouts in
tests/reference/layout_*.json, `config` key) on the meta device, materialised with `to_empty` and filled from a torch.Generator; the prompt
embeddings are random tensors of the published T5 / CLIP sizes.
"""
import math
import time
from dataclasses import dataclass

import torch

from model_core.checkpoints import FAMILIES
from model_core.media import to_frames
from model_core.sampling import sample_video
from model_core.scheduler import PyramidFlowScheduler
from model_core.speed import uses_shape_buckets
from model_core.step_cache import reset_step_cache
from model_core.text import PromptEmbeddings
from model_core.transformers import PyramidFluxTransformer
from model_core.vae import CausalVideoVAE

NORMALIZATION = FAMILIES["miniflux"].normalization
TINY_TRANSFORMER = dict(num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
                        joint_attention_dim=32, pooled_projection_dim=16, axes_dims_rope=[4, 6, 6])
TINY_VAE = dict(encoder_block_out_channels=[8, 16, 16, 16], decoder_block_out_channels=[8, 16, 16, 16],
                encoder_layers_per_block=[1, 1, 1, 1], decoder_layers_per_block=[1, 1, 1, 1],
                encoder_norm_num_groups=4, decoder_norm_num_groups=4)


def published_config(model_class) -> dict:
    """The constructor config of a published model: our classes' defaults are the published sizes (a test checks
    them against the official layouts in tests/reference, which the library need not carry)."""
    with torch.device("meta"):
        config = model_class().config
    return {key: value for key, value in config.items() if not key.startswith("_")}


def model_configs(tiny: bool) -> tuple:
    """(transformer config, VAE config): published, or reduced widths/depths of the same structure."""
    transformer, vae = published_config(PyramidFluxTransformer), published_config(CausalVideoVAE)
    if tiny:
        transformer, vae = {**transformer, **TINY_TRANSFORMER}, {**vae, **TINY_VAE}
    return transformer, vae


@torch.no_grad()
def fill_randomly(module: torch.nn.Module, generator: torch.Generator) -> torch.nn.Module:
    """Overwrite every parameter from `generator`: matrices and kernels N(0, 1/fan_in), 1-D weights (norm scales)
    one, biases zero. Every output layer gets random weights, so every block does real work."""
    for name, parameter in module.named_parameters():
        if parameter.dim() > 1:
            noise = torch.randn(parameter.shape, generator=generator, device=generator.device, dtype=torch.float32)
            parameter.copy_(noise / math.sqrt(parameter[0].numel()))
        else:
            parameter.fill_(1.0 if name.endswith("weight") else 0.0)
    return module


def build_random(model_class, config: dict, device, dtype, seed: int) -> torch.nn.Module:
    """`model_class(**config)` with random weights on `device` in `dtype`, built without a first initialisation."""
    with torch.device("meta"):
        model = model_class(**config)
    model = torch.nn.Module.to(model, dtype).to_empty(device=device)  # nn.Module's cast: nothing to keep in float32 yet
    return fill_randomly(model, torch.Generator(device=device).manual_seed(seed)).eval().requires_grad_(False)


def build_transformer(config: dict, device, dtype, seed: int = 0) -> PyramidFluxTransformer:
    return build_random(PyramidFluxTransformer, config, device, dtype, seed)


def build_vae(config: dict, device, dtype, seed: int = 1) -> CausalVideoVAE:
    return build_random(CausalVideoVAE, config, device, dtype, seed)


def random_prompt(config: dict, valid_tokens: int, seed: int, device, text_tokens: int = 128) -> PromptEmbeddings:
    """Random T5 states [1, 128, D] with the first `valid_tokens` valid, and a random pooled CLIP vector."""
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(1, text_tokens, config["joint_attention_dim"], generator=generator)
    mask = (torch.arange(text_tokens) < valid_tokens).long()[None]
    pooled = torch.randn(1, config["pooled_projection_dim"], generator=generator)
    return PromptEmbeddings(hidden, mask, pooled).to(device)


class TimeBudgetReached(RuntimeError):
    """Raised from inside a generation when the caller's deadline has passed."""


def check_deadline(deadline, during: str):
    """TimeBudgetReached when `deadline` (time.monotonic() seconds, or None for none) has passed."""
    if deadline is not None and time.monotonic() > deadline:
        raise TimeBudgetReached(f"the time budget ran out {during}")


@dataclass
class Clip:
    """What a text-to-video run should make: size, latent frames (units), steps and guidance."""

    height: int
    width: int
    num_units: int
    first_frame_steps: tuple = (20, 20, 20)
    video_steps: tuple = (10, 10, 10)
    guidance_scale: float = 7.0
    video_guidance_scale: float = 5.0


def guided_velocity(transformer, text: PromptEmbeddings, negative: PromptEmbeddings, scale: float, deadline=None):
    """v(clips, t) with classifier-free guidance over a [negative ; text] batch, as the pipeline computes it for the
    published checkpoints (official defaults: the timestep in the compute dtype)."""
    dtype = transformer.dtype
    both = negative.followed_by(text).without_padding_columns()
    hidden, mask, pooled = both.hidden_states.to(dtype), both.attention_mask, both.pooled.to(dtype)

    shapes = []

    def velocity(clips, t, valid_frames=None):
        check_deadline(deadline, "during sampling")
        if shapes[-1:] != [clips[-1].shape]:  # a new stage or unit: cached residuals no longer apply
            reset_step_cache(transformer)
            shapes.append(clips[-1].shape)
        clips = [torch.cat([c, c]).to(dtype) for c in clips]
        v = transformer(sample=[clips], encoder_hidden_states=hidden, encoder_attention_mask=mask,
                        pooled_projections=pooled, timestep=t.to(hidden.device, dtype).expand(2),
                        return_dict=False, **({} if valid_frames is None else {"valid_frames": valid_frames}))[0][0].float()
        unconditional, conditional = v.chunk(2)
        return unconditional + scale * (conditional - unconditional)

    return velocity


def synchronize(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def text_to_video(transformer, vae, clip: Clip, text, negative, device, seed: int = 0, decode: bool = True,
                  deadline=None, compile=False, **sampling) -> dict:
    """Sample `clip` (Algorithm 1 per unit, Eq. 17 over units) and decode it to uint8 frames; returns the latents,
    the frames and the seconds spent in sampling and in decoding (the device synchronised at each boundary).
    `compile`: the level the transformer's forward was compiled at (model_core.speed.compile_forward); compiled, the
    history is padded to shape buckets as pipelines pad it (speed.uses_shape_buckets).
    `sampling`: further options of model_core.sampling.sample_video (e.g. shape_buckets)."""
    if uses_shape_buckets(compile):
        sampling = {"shape_buckets": True, **sampling}
    device = torch.device(device)
    scheduler = PyramidFlowScheduler()
    generator = torch.Generator().manual_seed(seed)
    scales = [clip.guidance_scale] + [clip.video_guidance_scale] * (clip.num_units - 1)
    shape = (1, transformer.latent_channels, clip.num_units, clip.height // vae.spatial_scale, clip.width // vae.spatial_scale)
    synchronize(device)
    started = time.perf_counter()
    latents, _ = sample_video(lambda unit: guided_velocity(transformer, text, negative, scales[unit], deadline),
                              scheduler, shape, None, clip.first_frame_steps, clip.video_steps,
                              generator=generator, device=device, **sampling)
    synchronize(device)
    sampled = time.perf_counter()
    frames = None
    if decode:
        check_deadline(deadline, "before decoding")
        z = NORMALIZATION.denormalize(latents).to(vae.dtype)
        frames = to_frames(vae.decode(z, temporal_chunk=True).sample)  # uint8 [T, H, W, 3] on the CPU, as users get
    return {"latents": latents, "frames": frames, "sampling_s": sampled - started,
            "decode_s": time.perf_counter() - sampled}
