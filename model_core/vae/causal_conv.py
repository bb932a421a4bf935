"""A 3-D convolution that is causal in time and can stream a video chunk by chunk."""
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class TimeChunk:
    """Where a slice of the time axis sits in its video.

    is_first: the slice begins the video, so the causal history in front of it is zeros
        (and the temporal upsampler drops its first output frame).
    streaming: more slices follow, so every causal conv keeps the tail of its padded input
        as the history of the next slice.
    """

    is_first: bool = True
    streaming: bool = False


FULL_VIDEO = TimeChunk(is_first=True, streaming=False)


def conv3d(conv: nn.Conv3d, x: torch.Tensor) -> torch.Tensor:
    """conv(x), with a float32 CPU batch of one sent to oneDNN: PyTorch's heuristic gives single small inputs
    (batch x channels x frames x height <= 20480) its native conv3d, 5-17x slower on this VAE's layers."""
    if x.device.type == "cpu" and x.dtype == torch.float32 and x.shape[0] == 1 and torch.backends.mkldnn.is_available():
        return torch.mkldnn_convolution(x, conv.weight, conv.bias, conv.padding, conv.stride, conv.dilation, conv.groups)
    return conv(x)


def memory_format(x: torch.Tensor) -> torch.memory_format:
    """torch.channels_last_3d for a video stored channels-last (the decoder's layout on the CPU), else contiguous."""
    channels_last = not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last_3d)
    return torch.channels_last_3d if channels_last else torch.contiguous_format


def _triple(value) -> tuple:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,) * 3


class CausalConv3d(nn.Module):
    """nn.Conv3d (kept as `.conv`) padded with k_t - 1 frames in front and symmetric zeros in space.

    Streaming rule: over the padded stream P, a conv with temporal kernel k and stride s that has
    consumed a prefix of length L has produced n = floor((L - k) / s) + 1 frames, and its next output
    starts at P[n * s]. So after each chunk the conv keeps P[n * s:] and puts it in front of the next
    chunk, which makes chunked outputs equal the full pass exactly.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size=3, stride=1):
        super().__init__()
        kernel_size, stride = _triple(kernel_size), _triple(stride)
        self.history_frames = kernel_size[0] - 1
        spatial_padding = (0, kernel_size[1] // 2, kernel_size[2] // 2)
        self.conv = nn.Conv3d(in_channels, out_channels, kernel_size, stride, spatial_padding)
        self.stream_tail = None

    def reset_stream(self):
        self.stream_tail = None

    def forward(self, x: torch.Tensor, chunk: TimeChunk = FULL_VIDEO, silu_first: bool = False) -> torch.Tensor:
        """conv(x), or conv(silu(x)) with `silu_first`: on a channels-last video without autograd (the decoder) the
        activation is written straight into the time-padded input, which saves a pass over the video and a copy."""
        if chunk.is_first:
            history = None
        elif self.stream_tail is None:
            raise RuntimeError("a later time chunk arrived before the first one of its video")
        else:
            history = self.stream_tail
        padded = self._padded(x, history, silu_first)
        out = conv3d(self.conv, padded)
        if chunk.streaming:
            self.stream_tail = padded[:, :, out.shape[2] * self.conv.stride[0]:].clone()
        return out

    def _padded(self, x: torch.Tensor, history, silu_first: bool) -> torch.Tensor:
        """[history ; x or silu(x)] along time in x's memory layout; history None means the video's first chunk
        (k_t - 1 zero frames in front). A strided conv's carried tail may be longer or shorter than k_t - 1."""
        if silu_first and (torch.is_grad_enabled() or memory_format(x) != torch.channels_last_3d):
            x, silu_first = F.silu(x), False  # silu into a strided slice rounds differently: keep the encoder's bits
        front_frames = self.history_frames if history is None else history.shape[2]
        if not front_frames:
            return F.silu(x) if silu_first else x
        batch, channels, frames, height, width = x.shape
        padded = torch.empty((batch, channels, front_frames + frames, height, width), dtype=x.dtype, device=x.device,
                             memory_format=memory_format(x))
        front = padded[:, :, :front_frames]
        front.zero_() if history is None else front.copy_(history)
        rest = padded[:, :, front_frames:]  # a view taken after the front's copy, which may have made it need grad
        torch.ops.aten.silu.out(x, out=rest) if silu_first else rest.copy_(x)
        return padded
