"""Building blocks shared by miniFLUX and the SD3 MM-DiT: adaLN modulation, feed-forward, dual-stream block."""
from typing import NamedTuple

import torch
from torch import nn

from .attention import AttentionLayout, JointAttention

LAYER_NORM_EPS = 1e-6


class TokenConditioning(NamedTuple):
    """The conditioning of packed samples for one stream: each sample's vector [n, D] and which sample each token
    belongs to, one-hot [L, n] (a matrix product spreads the modulation deterministically; an index's backward
    accumulates in a varying order on the CPU)."""

    per_sample: torch.Tensor
    membership: torch.Tensor


def stream_conditioning(temb, stream: str):
    """temb for the tokens of `stream` ('text', 'image' or 'joint'): a batch's [B, D] as is, or, for packed samples
    (a dict of TokenConditioning per stream), that stream's."""
    return temb[stream] if isinstance(temb, dict) else temb


class AdaLayerNorm(nn.Module):
    """Affine-free LayerNorm whose modulation comes from the conditioning vector (DiT adaLN).

    `linear` maps SiLU(temb) to `num_chunks` vectors; `forward` returns them in the official
    chunk order, e.g. (shift, scale, gate, shift_mlp, scale_mlp, gate_mlp) for six chunks.
    """

    def __init__(self, dim: int, num_chunks: int):
        super().__init__()
        self.num_chunks = num_chunks
        self.act = nn.SiLU()
        self.linear = nn.Linear(dim, num_chunks * dim)
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=LAYER_NORM_EPS)

    def modulation(self, temb):
        if isinstance(temb, TokenConditioning):  # packed samples: each token takes its sample's modulation
            modulation = self.linear(self.act(temb.per_sample))
            return (temb.membership.to(modulation.dtype) @ modulation)[None].chunk(self.num_chunks, dim=-1)
        return self.linear(self.act(temb))[:, None].chunk(self.num_chunks, dim=-1)

    def modulate(self, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return self.norm(x) * (1 + scale) + shift

    def forward(self, x: torch.Tensor, temb: torch.Tensor):
        """Returns (modulated x, gate, *rest of the chunks after shift, scale, gate)."""
        shift, scale, *rest = self.modulation(temb)
        return (self.modulate(x, shift, scale), *rest)


class AdaLayerNormContinuous(AdaLayerNorm):
    """Final/context-only adaLN with two chunks in (scale, shift) order and no gate."""

    def __init__(self, dim: int):
        super().__init__(dim, num_chunks=2)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        scale, shift = self.modulation(temb)
        return self.modulate(x, shift, scale)


class TanhGELUProjection(nn.Module):
    """Linear followed by tanh-approximated GELU."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.gelu(self.proj(x), approximate="tanh")


class FeedForward(nn.Module):
    """Transformer MLP with 4x width and tanh-GELU."""

    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.net = nn.ModuleList([TanhGELUProjection(dim, mult * dim), nn.Dropout(0.0), nn.Linear(mult * dim, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.flatten(0, -2)  # one view for both GEMMs (each Linear on [B, L, D] views its input and output)
        for layer in self.net:
            tokens = layer(tokens)
        return tokens.unflatten(0, x.shape[:-1])


class DualStreamBlock(nn.Module):
    """MM-DiT block: text and image keep their own weights and meet in one joint attention.

    A context-pre-only block (the MMDiT's last) only lets the text condition the image and
    returns no text stream.
    """

    def __init__(self, dim, heads, qk_eps, text_norm_name, text_norms_last, context_pre_only=False):
        super().__init__()
        self.context_pre_only = context_pre_only
        self.norm1 = AdaLayerNorm(dim, num_chunks=6)
        self.norm1_context = AdaLayerNormContinuous(dim) if context_pre_only else AdaLayerNorm(dim, num_chunks=6)
        self.attn = JointAttention(dim, heads, qk_eps, text_norm_name, text_norms_last, context_pre_only)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=LAYER_NORM_EPS)
        self.ff = FeedForward(dim)
        if not context_pre_only:
            self.norm2_context = nn.LayerNorm(dim, elementwise_affine=False, eps=LAYER_NORM_EPS)
            self.ff_context = FeedForward(dim)

    @staticmethod
    def gated_residuals(x, attn_out, norm, ff, gate, shift_mlp, scale_mlp, gate_mlp):
        """x + gate·attn, then + gate_mlp·FF(modulated norm)."""
        x = x + gate * attn_out
        return x + gate_mlp * ff(norm(x) * (1 + scale_mlp) + shift_mlp)

    def forward(self, image, text, temb, layout: AttentionLayout):
        """Returns (text, image); text is None after a context-pre-only block."""
        image_in, *image_mod = self.norm1(image, stream_conditioning(temb, "image"))
        text_temb = stream_conditioning(temb, "text")
        if self.context_pre_only:
            image_out, _ = self.attn(image_in, self.norm1_context(text, text_temb), layout)
            return None, self.gated_residuals(image, image_out, self.norm2, self.ff, *image_mod)
        text_in, *text_mod = self.norm1_context(text, text_temb)
        image_out, text_out = self.attn(image_in, text_in, layout)
        image = self.gated_residuals(image, image_out, self.norm2, self.ff, *image_mod)
        text = self.gated_residuals(text, text_out, self.norm2_context, self.ff_context, *text_mod)
        return text, image
