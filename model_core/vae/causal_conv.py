"""A 3-D convolution that is causal in time and can stream a video chunk by chunk."""
from dataclasses import dataclass

import torch
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

    def forward(self, x: torch.Tensor, chunk: TimeChunk = FULL_VIDEO) -> torch.Tensor:
        if chunk.is_first:
            batch, channels, _, height, width = x.shape
            history = x.new_zeros(batch, channels, self.history_frames, height, width)
        elif self.stream_tail is None:
            raise RuntimeError("a later time chunk arrived before the first one of its video")
        else:
            history = self.stream_tail
        padded = torch.cat([history, x], dim=2) if history.shape[2] else x
        out = conv3d(self.conv, padded)
        if chunk.streaming:
            self.stream_tail = padded[:, :, out.shape[2] * self.conv.stride[0]:].clone()
        return out
