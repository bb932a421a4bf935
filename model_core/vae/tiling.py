"""Memory savers for the causal VAE: temporal chunking with a causal feature cache, spatial tiling.

Temporal chunking is exact: GroupNorm and attention act per frame and every causal conv carries the
tail of its padded input from one chunk to the next (see CausalConv3d), so a chunked pass equals the
full pass up to float rounding.

Spatial tiling is an approximation. Each tile is coded on its own, so near a tile border the convs see
zero padding instead of the neighbouring pixels, and GroupNorm statistics and the mid-block attention
cover the tile instead of the whole frame. The tiles are blended with linear crossfades over their
overlaps. What is exact: a tile that covers the whole frame gives the full pass; a pixel covered by one
tile only gets that tile's full-pass coding of its own crop; a pixel in an overlap gets a convex
combination of the codings of the tiles covering it, so it is never further from the full pass than the
worst of them. There is no pointwise bound against the full pass itself: how far a tile's coding strays
from it depends on the weights (for the tiny random-weight test model the gap is of the order of the
output itself; a trained VAE is far smoother), so tiling quality must be judged on trained weights.
"""
from contextlib import contextmanager
from typing import Callable

import torch
from torch import nn

from .causal_conv import CausalConv3d, TimeChunk


@contextmanager
def fresh_stream(module: nn.Module):
    """Empty every causal-conv cache on entry and on exit, so no state outlives one video pass."""
    convs = [m for m in module.modules() if isinstance(m, CausalConv3d)]
    for conv in convs:
        conv.reset_stream()
    try:
        yield
    finally:
        for conv in convs:
            conv.reset_stream()


def time_windows(frames: int, window: int) -> list:
    """The first frame on its own, then consecutive windows of `window` frames (the last may be short)."""
    return [slice(0, 1)] + [slice(start, start + window) for start in range(1, frames, window)]


def run_in_time_chunks(module: nn.Module, code: Callable, x: torch.Tensor, window: int) -> torch.Tensor:
    """code(chunk_tensor, TimeChunk) over the time windows of x, outputs concatenated along time."""
    with fresh_stream(module):
        outputs = [
            code(x[:, :, frames], TimeChunk(is_first=index == 0, streaming=True))
            for index, frames in enumerate(time_windows(x.shape[2], window))
        ]
    return torch.cat(outputs, dim=2)


def tile_starts(size: int, tile: int, overlap: int) -> list:
    """Starts of tiles of length `tile` that step by tile - overlap and end flush with `size`."""
    if size <= tile:
        return [0]
    return list(range(0, size - tile, tile - overlap)) + [size - tile]


def crossfade_weights(starts: list, tile: int, size: int, scale: int) -> list:
    """Per tile, a 1-D weight in output units that ramps linearly across each overlap with a neighbour."""
    weights = []
    for index, start in enumerate(starts):
        length = min(tile, size - start) * scale
        position = torch.arange(length, dtype=torch.float64) + 0.5
        weight = torch.ones(length, dtype=torch.float64)
        if index > 0:
            rise = (starts[index - 1] + tile - start) * scale
            weight = weight * (position / rise).clamp(max=1)
        if index + 1 < len(starts):
            fall = (start + tile - starts[index + 1]) * scale
            weight = weight * ((length - position) / fall).clamp(max=1)
        weights.append(weight)
    return weights


def run_in_tiles(code: Callable, x: torch.Tensor, grid: tuple, tile: int, overlap: int, in_scale: int, out_scale: int):
    """Code x tile by tile over a (rows, cols) latent grid and blend the overlaps.

    Tiles are `tile` latent cells wide and overlap by `overlap` cells. One latent cell is in_scale
    pixels of x and out_scale pixels of the output (encode: 8 -> 1, decode: 1 -> 8). Overlaps are
    crossfaded linearly; the weighted sum is divided by the summed weights.
    """
    row_starts, col_starts = (tile_starts(size, tile, overlap) for size in grid)
    row_weights = crossfade_weights(row_starts, tile, grid[0], out_scale)
    col_weights = crossfade_weights(col_starts, tile, grid[1], out_scale)
    blended, weight_sum = None, None
    for row_start, row_weight in zip(row_starts, row_weights):
        for col_start, col_weight in zip(col_starts, col_weights):
            rows = slice(row_start * in_scale, (row_start + tile) * in_scale)
            cols = slice(col_start * in_scale, (col_start + tile) * in_scale)
            coded = code(x[:, :, :, rows, cols])
            if blended is None:
                blended = coded.new_zeros(*coded.shape[:3], grid[0] * out_scale, grid[1] * out_scale)
                weight_sum = torch.zeros(grid[0] * out_scale, grid[1] * out_scale, dtype=torch.float64)
            weight = torch.outer(row_weight, col_weight)
            out_rows = slice(row_start * out_scale, row_start * out_scale + weight.shape[0])
            out_cols = slice(col_start * out_scale, col_start * out_scale + weight.shape[1])
            blended[:, :, :, out_rows, out_cols] += coded * weight.to(coded)
            weight_sum[out_rows, out_cols] += weight
    return blended / weight_sum.to(blended)
