"""Decoding a video as its latent frames arrive, one autoregressive unit at a time.

The causal decoder is exact under any split of the time axis when every causal conv carries the tail of
its padded input from one chunk to the next (see CausalConv3d). A `DecodeStream` keeps those tails between
calls (one set per spatial tile when tiling is on), so the frames it gives, call after call, equal one decode
of all the latents, while only the latest unit's activations and the convs' few frames of tail are in memory.
"""
from itertools import count

import torch

from .causal_conv import CausalConv3d, TimeChunk
from .tiling import run_in_tiles


class DecodeStream:
    """State of one streamed decode: `vae.decode_stream(z, stream)` decodes the next latent frames of the video."""

    def __init__(self, vae):
        self.convs = [m for m in vae.modules() if isinstance(m, CausalConv3d)]
        self.tails = {}  # spatial tile index -> every causal conv's tail after that tile's last chunk
        self.started = False

    def decode(self, vae, z: torch.Tensor) -> torch.Tensor:
        """Latents [B, C, t, h, w] that continue the stream -> their pixel frames [B, 3, t', 8h, 8w] (the first
        call's first latent frame gives one frame, every other latent frame `vae.temporal_scale`)."""
        chunk = TimeChunk(is_first=not self.started, streaming=True)
        tiles = count()

        def code(part):
            tile = next(tiles)
            for conv, tail in zip(self.convs, self.tails.get(tile, [None] * len(self.convs))):
                conv.stream_tail = tail
            try:
                return vae._decode_chunk(part, chunk)
            finally:
                self.tails[tile] = [conv.stream_tail for conv in self.convs]
                for conv in self.convs:
                    conv.reset_stream()

        if vae.use_tiling:
            grid = (z.shape[3], z.shape[4])
            video = run_in_tiles(code, z, grid, vae.tile_latent_size, vae.tile_latent_overlap, 1, vae.spatial_scale)
        else:
            video = code(z)
        self.started = True
        return video
