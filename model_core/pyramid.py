"""Spatial pyramid of Pyramidal Flow Matching (Sec. 3.2, Appendix A).

Resolution levels are numbered like the pipeline's stages: level 0 is the coarsest
(1/2^(K-1) of the latent), level K-1 the full latent. Latents are [B, C, T, H, W].
"""
import math

import torch
import torch.nn.functional as F

# Lowest off-diagonal correlation that keeps the 4x4 block covariance semidefinite (Eq. 14 footnote).
MIN_BLOCK_CORRELATION = -1.0 / 3.0


def _check_latent(x_or_shape, what="latent"):
    shape = tuple(x_or_shape.shape if torch.is_tensor(x_or_shape) else x_or_shape)
    if len(shape) != 5:
        raise ValueError(f"{what} must be 5-D [B, C, T, H, W]; got shape {list(shape)}")
    return shape


def _check_even(shape, what):
    if shape[-1] % 2 or shape[-2] % 2:
        raise ValueError(
            f"{what} needs even spatial sizes (H, W divisible by 2); got H={shape[-2]}, W={shape[-1]}"
        )


def downsample(x: torch.Tensor, times: int = 1) -> torch.Tensor:
    """Down(x, 2^times): bilinear 2x downsampling, align_corners=False (= mean of each 2x2 block)."""
    _check_latent(x)
    for _ in range(times):
        _check_even(x.shape, "downsampling")
        x = F.avg_pool3d(x, kernel_size=(1, 2, 2))
    return x


def upsample(x: torch.Tensor, times: int = 1) -> torch.Tensor:
    """Up(x): nearest-neighbour 2x upsampling per frame, applied `times` times."""
    _check_latent(x)
    factor = 2**times
    return x.repeat_interleave(factor, dim=-2).repeat_interleave(factor, dim=-1)


def latent_pyramid(x: torch.Tensor, num_stages: int = 3) -> list:
    """[Down(x, 2^(K-1)), ..., Down(x, 2), x]: the clean latent at every level, coarsest first."""
    levels = [x]
    for _ in range(num_stages - 1):
        levels.insert(0, downsample(levels[0]))
    return levels


def standard_normal(shape, generator=None, device=None) -> torch.Tensor:
    """float32 N(0, I) drawn on the generator's device (so a CPU generator serves any device), then moved."""
    source = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=source, dtype=torch.float32).to(device)


def initial_noise(shape, num_stages: int = 3, generator=None, device=None, dtype=None) -> torch.Tensor:
    """Starting point of stage 0: full-resolution N(0, I) noise taken down K-1 levels, x2 per level
    so every element stays unit-variance (Eq. 5, Down(x_0, 2^K))."""
    shape = _check_latent(shape, "noise shape")
    noise = standard_normal(shape, generator, device)
    for _ in range(num_stages - 1):
        noise = downsample(noise) * 2
    return noise.to(dtype or torch.float32)


def block_noise(shape, generator=None, device=None, dtype=None, correlation: float = MIN_BLOCK_CORRELATION):
    """Corrective noise n' of Eq. 13/14: N(0, Sigma') with Sigma'_block = (1 - g) I + g 11^T over each
    2x2 spatial block (g = `correlation`, row-major block order), independent across blocks.

    Closed form: with P the block-mean projector, Sigma'^(1/2) = sqrt(1 - g)(I - P) + sqrt(1 + 3g) P,
    so n' = sqrt(1 - g) (z - mean_block z) + sqrt(1 + 3g) mean_block z for z ~ N(0, I). For the paper's
    g = -1/3 the second term vanishes. Costs one randn plus two cheap passes; no per-block loop.
    """
    shape = _check_latent(shape, "block noise shape")
    _check_even(shape, "block noise")
    if not MIN_BLOCK_CORRELATION <= correlation <= 0:
        raise ValueError(f"block-noise correlation must lie in [-1/3, 0]; got {correlation}")
    b, c, t, h, w = shape
    noise = standard_normal(shape, generator, device)
    blocks = noise.view(b, c, t, h // 2, 2, w // 2, 2)
    block_mean = F.avg_pool3d(noise, kernel_size=(1, 2, 2)).view(b, c, t, h // 2, 1, w // 2, 1)
    blocks.sub_(block_mean).mul_(math.sqrt(1 - correlation))
    if correlation != MIN_BLOCK_CORRELATION:
        blocks.add_(block_mean * math.sqrt(1 + 3 * correlation))
    return noise.to(dtype or torch.float32)


def renoise_at_jump(x, scale: float, noise_std: float, generator=None, correlation=MIN_BLOCK_CORRELATION):
    """Jump-point renoising (Eqs. 13/15): x_{s_k} = scale * Up(x_{e_{k+1}}) + noise_std * n'."""
    up = upsample(x)
    noise = block_noise(up.shape, generator=generator, device=up.device, dtype=up.dtype, correlation=correlation)
    return scale * up + noise_std * noise


def coupled_endpoints(x1, level: int, start_signal: float, end_signal: float, noise, num_stages: int = 3):
    """Coupled endpoints of stage `level` (Eqs. 9-10), sharing one noise n at that level's resolution:
    end = e Down(x1, 2^k) + (1 - e) n,   start = s Up(Down(x1, 2^(k+1))) + (1 - s) n."""
    steps_down = num_stages - 1 - level
    clean_end = downsample(x1, steps_down)
    if noise.shape != clean_end.shape:
        raise ValueError(f"noise must have the stage's shape {list(clean_end.shape)}; got {list(noise.shape)}")
    clean_start = upsample(downsample(clean_end))
    end = end_signal * clean_end + (1 - end_signal) * noise
    start = start_signal * clean_start + (1 - start_signal) * noise
    return start, end


def interpolate_on_path(start, end, sigma):
    """Point of the piecewise-linear flow inside a stage (Eq. 6), at stage-local noise level
    sigma in [0, 1] (1 = start, 0 = end); sigma broadcasts over the batch."""
    sigma = torch.as_tensor(sigma, dtype=start.dtype, device=start.device).reshape(-1, *[1] * (start.dim() - 1))
    return (1 - sigma) * end + sigma * start


def velocity_target(start, end):
    """Regression target of Eq. 11 in the published checkpoints' sign: the noise-ward velocity
    start - end (= -(x_{e_k} - x_{s_k})), so that an Euler step with decreasing sigma denoises."""
    return start - end
