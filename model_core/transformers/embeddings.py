"""Conditioning and position embeddings shared by the pyramid transformers.

Timestep/text conditioning, rotary embeddings, 1-D sincos features, 2x2 patch packing and the
position ids of the temporal pyramid (Fig. 3b): history clips at a lower resolution than the
current unit share the current unit's coordinate frame.
"""
import functools
import math

import torch
from torch import nn

PATCH = 2  # both models patchify latents with 2x2 patches
TIMESTEP_CHANNELS = 256


def timestep_sinusoid(timestep: torch.Tensor, channels: int = TIMESTEP_CHANNELS) -> torch.Tensor:
    """Sinusoidal timestep features in float32: [cos | sin], frequency_i = 10000^(-i / (channels/2))."""
    angles = timestep.float()[:, None] * timestep_frequencies(channels, timestep.device)
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


def timestep_frequencies(channels: int, device: torch.device) -> torch.Tensor:
    """The frequencies [1, channels/2] of `timestep_sinusoid`, made once per device (every step uses them; in the
    graph when compiling)."""
    if torch.compiler.is_compiling():
        return sinusoid_frequencies(channels, device)
    return shared_frequencies(channels, device)


def sinusoid_frequencies(channels: int, device: torch.device) -> torch.Tensor:
    half = channels // 2
    exponent = -math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=device) / half
    return torch.exp(exponent)[None, :]


@functools.cache
def shared_frequencies(channels: int, device: torch.device) -> torch.Tensor:
    with torch.inference_mode(False), torch.no_grad():
        return sinusoid_frequencies(channels, device)


class TwoLayerMLP(nn.Module):
    """Linear - SiLU - Linear (the timestep and pooled-text embedders)."""

    def __init__(self, in_features: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_features, dim)
        self.act = nn.SiLU()
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(x)))


class TimestepTextConditioning(nn.Module):
    """The AdaLN conditioning vector: embedded timestep + projected pooled text (one per sample)."""

    def __init__(self, dim: int, pooled_projection_dim: int):
        super().__init__()
        self.timestep_embedder = TwoLayerMLP(TIMESTEP_CHANNELS, dim)
        self.text_embedder = TwoLayerMLP(pooled_projection_dim, dim)

    def forward(self, timestep: torch.Tensor, pooled: torch.Tensor = None, pooled_embedding: torch.Tensor = None):
        """From the pooled text, or from its embedding text_embedder(pooled) when given (the same at every step:
        text_conditioning.py)."""
        if pooled_embedding is None:
            pooled_embedding = self.text_embedder(pooled)
        features = timestep_sinusoid(timestep).to(pooled_embedding.dtype)
        return self.timestep_embedder(features) + pooled_embedding


def rotary_angles(positions: torch.Tensor, axes_dims, theta: float = 10000.0):
    """cos/sin of the rotary angles for [L, n_axes] positions; each axis owns axes_dims[i] channels."""
    angles = []
    for axis, dim in enumerate(axes_dims):
        inv_freq = theta ** (-torch.arange(0, dim, 2, dtype=torch.float64, device=positions.device) / dim)
        angles.append(positions[:, axis, None].double() * inv_freq[None, :])
    angles = torch.cat(angles, dim=-1).float()
    return torch.cos(angles), torch.sin(angles)


def rotation_tables(cos: torch.Tensor, sin: torch.Tensor) -> tuple:
    """The rotary angles' cos/sin [L, D/2] as what `apply_rope` takes after x: one complex table [L, D/2] of
    cos + i·sin, made once per shape (packing.PyramidTransformer.shared_rope)."""
    return (torch.complex(cos, sin),)


def apply_rope(x: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent channel pairs (2i, 2i+1) of x [B, heads, L, D] by their angles, given as the complex
    `rotation_tables` [L, D/2]: each pair as one complex number times cos + i·sin (one multiply), in float32."""
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))
    return torch.view_as_real(pairs * rotation).flatten(-2).to(x.dtype)


def apply_rope_pair(q: torch.Tensor, k: torch.Tensor, rotation: torch.Tensor) -> tuple:
    """`apply_rope` of queries and keys of one shape in one multiply (stacked, then viewed apart)."""
    return apply_rope(torch.stack([q, k]), rotation).unbind(0)


def apply_rope_joined(qk: torch.Tensor, rotation: torch.Tensor) -> tuple:
    """`apply_rope` of queries and keys held one after the other along the sequence of qk [B, heads, 2·L, D], in
    one multiply without stacking them; returns (q, k) [B, heads, L, D]."""
    b, heads, length, dim = qk.shape
    pairs = torch.view_as_complex(qk.float().view(b, heads, 2, length // 2, dim // 2, 2))
    return torch.view_as_real(pairs * rotation).flatten(-2).to(qk.dtype).unbind(2)


def sincos_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    """[sin | cos] features of 1-D positions with frequencies 10000^(-2i/dim)."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0))
    angles = positions.double().reshape(-1, 1) * omega[None, :]
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


def patchify(clip: torch.Tensor) -> torch.Tensor:
    """[B, C, T, H, W] -> [B, T·H/2·W/2, 4C] tokens, frame-major then rows, columns; (p_row, p_col, c) order."""
    b, c, t, h, w = clip.shape
    patches = clip.reshape(b, c, t, h // PATCH, PATCH, w // PATCH, PATCH)
    return patches.permute(0, 2, 3, 5, 4, 6, 1).reshape(b, t * (h // PATCH) * (w // PATCH), PATCH * PATCH * c)


def unpatchify(tokens: torch.Tensor, frames: int, grid_h: int, grid_w: int) -> torch.Tensor:
    """Inverse of `patchify`: [B, T·h·w, 4C] -> [B, C, T, 2h, 2w]."""
    b = tokens.shape[0]
    patches = tokens.reshape(b, frames, grid_h, grid_w, PATCH, PATCH, -1)
    return patches.permute(0, 6, 1, 2, 4, 3, 5).reshape(b, -1, frames, grid_h * PATCH, grid_w * PATCH)


def resized_coordinates(current: int, size: int, interpolate: bool, device=None) -> torch.Tensor:
    """Coordinates of a grid of `size` cells in the current grid's frame (Fig. 3b).

    With interpolation, the integer coordinates of the current grid are linearly resized to
    `size` cells (centre aligned, i.e. align_corners=False); without, every clip counts its own cells.
    """
    cells = torch.arange(size, dtype=torch.float32, device=device)
    if not interpolate or size == current:
        return cells
    return ((cells + 0.5) * (current / size) - 0.5).clamp(0, current - 1)


def clip_positions(frames: int, grid, current_grid, first_frame: int, interpolate: bool, device=None) -> torch.Tensor:
    """(t, h, w) position ids [frames·h·w, 3] of one clip of the temporal pyramid (Fig. 3b), made on `device`."""
    t = torch.arange(first_frame, first_frame + frames, dtype=torch.float32, device=device)
    h = resized_coordinates(current_grid[0], grid[0], interpolate, device)
    w = resized_coordinates(current_grid[1], grid[1], interpolate, device)
    return torch.stack(torch.meshgrid(t, h, w, indexing="ij"), dim=-1).reshape(-1, 3)
