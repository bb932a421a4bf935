"""Building blocks shared by miniFLUX and the SD3 MM-DiT: adaLN, feed-forward, dual-stream block."""
import torch
from torch import nn

from .attention import AttentionLayout, JointAttention

LAYER_NORM_EPS = 1e-6


def joined_linear(layers: list) -> nn.Linear:
    """One nn.Linear computing `layers` (nn.Linears of one input) side by side: their rows concatenated in order."""
    joined = nn.Linear(layers[0].in_features, sum(layer.out_features for layer in layers),
                       device=layers[0].weight.device, dtype=layers[0].weight.dtype)
    with torch.no_grad():
        joined.weight.copy_(torch.cat([layer.weight for layer in layers]))
        joined.bias.copy_(torch.cat([layer.bias for layer in layers]))
    return joined.requires_grad_(layers[0].weight.requires_grad)


class AdaLayerNorm(nn.Module):
    """Affine-free LayerNorm whose modulation comes from the conditioning vector (DiT adaLN).

    `linear` maps SiLU(temb) to `num_chunks` vectors in the official chunk order, e.g. (shift, scale, gate,
    shift_mlp, scale_mlp, gate_mlp) for six chunks. The model computes every layer's vectors at once
    (modulation.py: one SiLU, and one GEMM once fused) and hands each layer its own, the scales (`SCALES`) as
    factors 1 + scale; `forward` takes them.
    """

    SCALES = (1, 4)  # which chunks are scales
    fused_rows = None  # (the model's fused modulation Linear, first row, end row) once fused (modulation.py)

    def __init__(self, dim: int, num_chunks: int):
        super().__init__()
        self.num_chunks = num_chunks
        self.act = nn.SiLU()
        self.linear = nn.Linear(dim, num_chunks * dim)
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=LAYER_NORM_EPS)
        self.register_state_dict_post_hook(official_modulation_keys)

    def chunks(self, pairs: list) -> tuple:
        """This layer's vectors from (chunk, 1 + chunk) pairs: the factor for a scale, the chunk itself otherwise."""
        return tuple(pair[index in self.SCALES] for index, pair in enumerate(pairs))

    def modulate(self, x: torch.Tensor, shift: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
        return self.norm(x) * factor + shift

    def forward(self, x: torch.Tensor, modulation: tuple):
        """Returns (modulated x, gate, *rest of the chunks after shift, scale, gate)."""
        shift, factor, *rest = modulation
        return (self.modulate(x, shift, factor), *rest)


def official_modulation_keys(norm: AdaLayerNorm, state_dict, prefix: str, local_metadata) -> None:
    """state_dict() of an adaLN whose linear is fused into the model's one modulation GEMM: its official
    `linear.weight` / `linear.bias`, copied out of the fused rows (files hold no shared storage)."""
    if norm.fused_rows is not None:
        fused, start, end = norm.fused_rows
        for kind in ("weight", "bias"):
            state_dict[f"{prefix}linear.{kind}"] = getattr(fused, kind).detach()[start:end].clone()


class AdaLayerNormContinuous(AdaLayerNorm):
    """Final/context-only adaLN with two chunks in (scale, shift) order and no gate."""

    SCALES = (0,)

    def __init__(self, dim: int):
        super().__init__(dim, num_chunks=2)

    def forward(self, x: torch.Tensor, modulation: tuple) -> torch.Tensor:
        factor, shift = modulation
        return self.modulate(x, shift, factor)


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
    def gated_residuals(x, attn_out, norm, ff, gate, shift_mlp, factor_mlp, gate_mlp):
        """x + gate·attn, then + gate_mlp·FF(modulated norm); factor_mlp = 1 + scale_mlp."""
        x = x + gate * attn_out
        return x + gate_mlp * ff(norm(x) * factor_mlp + shift_mlp)

    def forward(self, image, text, modulation: dict, layout: AttentionLayout):
        """Returns (text, image); text is None after a context-pre-only block. modulation: each adaLN's vectors by
        name (modulation.block_modulations)."""
        image_in, *image_mod = self.norm1(image, modulation["norm1"])
        if self.context_pre_only:
            image_out, _ = self.attn(image_in, self.norm1_context(text, modulation["norm1_context"]), layout)
            return None, self.gated_residuals(image, image_out, self.norm2, self.ff, *image_mod)
        text_in, *text_mod = self.norm1_context(text, modulation["norm1_context"])
        image_out, text_out = self.attn(image_in, text_in, layout)
        image = self.gated_residuals(image, image_out, self.norm2, self.ff, *image_mod)
        text = self.gated_residuals(text, text_out, self.norm2_context, self.ff_context, *text_mod)
        return text, image
