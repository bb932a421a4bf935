"""Building blocks of the causal video VAE: per-frame norm, resnet, samplers, mid block, coder blocks.

Every block takes `(x, chunk)` with x = [B, C, T, H, W] and passes the TimeChunk on to its causal convs.
"""
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from .causal_conv import FULL_VIDEO, CausalConv3d, TimeChunk, memory_format

NORM_EPS = 1e-6


class CausalGroupNorm(nn.GroupNorm):
    """GroupNorm over (channels, H, W) of each frame on its own, so no statistic crosses time."""

    def __init__(self, num_groups: int, num_channels: int):
        super().__init__(num_groups, num_channels, eps=NORM_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if memory_format(x) == torch.channels_last_3d:
            return self._frame_by_frame(x)
        batch, channels, frames, height, width = x.shape
        per_frame = x.transpose(1, 2).reshape(batch * frames, channels, height, width)
        normed = super().forward(per_frame)
        return normed.reshape(batch, frames, channels, height, width).transpose(1, 2)

    def _frame_by_frame(self, x: torch.Tensor) -> torch.Tensor:
        """A channels-last video one frame at a time: the channels-last kernel's reduction order depends on how many
        frames it gets, and a frame must come out the same whatever chunk of the video it is decoded in."""
        out = torch.empty_like(x)
        for frame in range(x.shape[2]):
            out[:, :, frame] = super().forward(x[:, :, frame])
        return out


class ResnetBlockCausal3D(nn.Module):
    """norm1 -> SiLU -> conv1 -> norm2 -> SiLU -> dropout -> conv2, plus a (1x1x1-projected) skip."""

    def __init__(self, in_channels: int, out_channels: int, norm_groups: int, dropout: float):
        super().__init__()
        self.norm1 = CausalGroupNorm(norm_groups, in_channels)
        self.conv1 = CausalConv3d(in_channels, out_channels)
        self.norm2 = CausalGroupNorm(norm_groups, out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = CausalConv3d(out_channels, out_channels)
        self.conv_shortcut = CausalConv3d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor, chunk: TimeChunk = FULL_VIDEO) -> torch.Tensor:
        h = self.norm2(self.conv1(self.norm1(x), chunk, silu_first=True))
        if self.training and self.dropout.p:  # dropout sits between the activation and the conv
            h = self.conv2(self.dropout(F.silu(h)), chunk)
        else:
            h = self.conv2(h, chunk, silu_first=True)
        skip = x if self.conv_shortcut is None else self.conv_shortcut(x, chunk)
        return h.add_(skip)  # the conv's fresh output: equal to skip + h, without another video in memory


class StridedDownsample(nn.Module):
    """A stride-2 causal conv: (1, 2, 2) halves H and W, (2, 1, 1) halves time (1 + 2k frames -> 1 + k)."""

    def __init__(self, channels: int, stride: tuple):
        super().__init__()
        self.conv = CausalConv3d(channels, channels, 3, stride=stride)

    def forward(self, x: torch.Tensor, chunk: TimeChunk = FULL_VIDEO) -> torch.Tensor:
        return self.conv(x, chunk)


SPATIAL_STRIDE, TEMPORAL_STRIDE = (1, 2, 2), (2, 1, 1)


class SpatialUpsample(nn.Module):
    """Double H and W: conv to 4C, then depth-to-space with channel = c * 4 + 2 * p_row + p_col."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = CausalConv3d(channels, channels * 4)

    def forward(self, x: torch.Tensor, chunk: TimeChunk = FULL_VIDEO) -> torch.Tensor:
        h = self.conv(x, chunk)
        batch, channels, frames, height, width = h.shape
        out = empty_in_layout_of(h, batch, channels // 4, frames, height * 2, width * 2)
        rows_cols = h.view(batch, channels // 4, 2, 2, frames, height, width).permute(0, 1, 4, 5, 2, 6, 3)
        out.view(batch, channels // 4, frames, height, 2, width, 2).copy_(rows_cols)  # b, c, t, h, p_row, w, p_col
        return out


class TemporalUpsample(nn.Module):
    """Double the time axis: conv to 2C, then interleave with channel = c * 2 + p.

    The first chunk of a video drops its first output frame, so 1 + k frames become 1 + 2k.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.conv = CausalConv3d(channels, channels * 2)

    def forward(self, x: torch.Tensor, chunk: TimeChunk = FULL_VIDEO) -> torch.Tensor:
        h = self.conv(x, chunk)
        batch, channels, frames, height, width = h.shape
        out = empty_in_layout_of(h, batch, channels // 2, frames * 2, height, width)
        pairs = h.view(batch, channels // 2, 2, frames, height, width).transpose(2, 3)  # b, c, t, p, h, w
        out.view(batch, channels // 2, frames, 2, height, width).copy_(pairs)
        return out[:, :, 1:] if chunk.is_first else out


def empty_in_layout_of(h: torch.Tensor, *shape) -> torch.Tensor:
    """An empty video of `shape` stored as `h` is (channels-last or not), so a depth-to-space into it is one copy."""
    return torch.empty(shape, dtype=h.dtype, device=h.device, memory_format=memory_format(h))


class SpatialAttention(nn.Module):
    """Single-head self-attention over the pixels of each frame, with GroupNorm and a residual."""

    def __init__(self, channels: int, norm_groups: int):
        super().__init__()
        self.group_norm = CausalGroupNorm(norm_groups, channels)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels), nn.Dropout(0.0)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, frames, height, width = x.shape
        tokens = self.group_norm(x).permute(0, 2, 3, 4, 1).reshape(batch * frames, height * width, channels)
        q, k, v = self.to_q(tokens), self.to_k(tokens), self.to_v(tokens)
        if memory_format(x) == torch.channels_last_3d:  # the decoder on the CPU: one head axis reaches the fused
            attended = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]  # kernel (8x faster)
        else:  # 3-D inputs take the reference path, whose rounding the encoder's released latents carry
            attended = F.scaled_dot_product_attention(q, k, v)
        for layer in self.to_out:
            attended = layer(attended)
        attended = attended.reshape(batch, frames, height, width, channels).permute(0, 4, 1, 2, 3)
        return x + attended


class MidBlockCausal3D(nn.Module):
    """resnet -> spatial attention -> resnet, all at the deepest width."""

    def __init__(self, channels: int, norm_groups: int):
        super().__init__()
        self.attentions = nn.ModuleList([SpatialAttention(channels, norm_groups)])
        self.resnets = nn.ModuleList([ResnetBlockCausal3D(channels, channels, norm_groups, 0.0) for _ in range(2)])

    def forward(self, x: torch.Tensor, chunk: TimeChunk = FULL_VIDEO) -> torch.Tensor:
        x = self.resnets[0](x, chunk)
        x = self.attentions[0](x)
        return self.resnets[1](x, chunk)


def resnet_stack(in_channels: int, out_channels: int, num_layers: int, norm_groups: int, dropout: float):
    """num_layers resnets; the first changes the width from in_channels to out_channels."""
    widths = [in_channels] + [out_channels] * num_layers
    return nn.ModuleList(
        ResnetBlockCausal3D(widths[i], out_channels, norm_groups, dropout) for i in range(num_layers)
    )


def optional_layer(layer_class, channels: int, present: bool) -> nn.ModuleList:
    """A one-layer ModuleList, or an empty one (which adds no state-dict keys)."""
    return nn.ModuleList([layer_class(channels)] if present else [])


def run_in_order(x: torch.Tensor, chunk: TimeChunk, *stages: nn.ModuleList) -> torch.Tensor:
    for stage in stages:
        for layer in stage:
            x = layer(x, chunk)
    return x


class DownEncoderBlockCausal3D(nn.Module):
    """Encoder block: resnets -> spatial downsample -> temporal downsample."""

    def __init__(self, in_channels, out_channels, num_layers, norm_groups, dropout, spatial, temporal):
        super().__init__()
        self.resnets = resnet_stack(in_channels, out_channels, num_layers, norm_groups, dropout)
        self.downsamplers = optional_layer(partial(StridedDownsample, stride=SPATIAL_STRIDE), out_channels, spatial)
        self.temporal_downsamplers = optional_layer(partial(StridedDownsample, stride=TEMPORAL_STRIDE), out_channels, temporal)

    def forward(self, x: torch.Tensor, chunk: TimeChunk = FULL_VIDEO) -> torch.Tensor:
        return run_in_order(x, chunk, self.resnets, self.downsamplers, self.temporal_downsamplers)


class UpDecoderBlockCausal3D(nn.Module):
    """Decoder block: resnets -> spatial upsample -> temporal upsample."""

    def __init__(self, in_channels, out_channels, num_layers, norm_groups, dropout, spatial, temporal):
        super().__init__()
        self.resnets = resnet_stack(in_channels, out_channels, num_layers, norm_groups, dropout)
        self.upsamplers = optional_layer(SpatialUpsample, out_channels, spatial)
        self.temporal_upsamplers = optional_layer(TemporalUpsample, out_channels, temporal)

    def forward(self, x: torch.Tensor, chunk: TimeChunk = FULL_VIDEO) -> torch.Tensor:
        return run_in_order(x, chunk, self.resnets, self.upsamplers, self.temporal_upsamplers)
