"""miniFLUX pyramid transformer: dual-stream then single-stream blocks with 3-axis (t, h, w) RoPE."""
import torch
from diffusers.configuration_utils import register_to_config
from diffusers.models.modeling_utils import ModelMixin  # noqa: F401  (diffusers' pipeline loader finds the base class here)
from torch import nn

from .attention import AttentionLayout, SelfAttention
from .blocks import AdaLayerNorm, AdaLayerNormContinuous, DualStreamBlock
from .embeddings import PATCH, TimestepTextConditioning, patchify, rotary_angles
from .packing import PyramidTransformer, pyramid_positions

QK_NORM_EPS = 1e-6
ROPE_THETA = 10000.0


class SingleStreamBlock(nn.Module):
    """FLUX single-stream block: attention and MLP in parallel over the shared [text ; image] stream."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int = 4):
        super().__init__()
        self.norm = AdaLayerNorm(dim, num_chunks=3)
        self.proj_mlp = nn.Linear(dim, mlp_ratio * dim)
        self.proj_out = nn.Linear(dim + mlp_ratio * dim, dim)
        self.attn = SelfAttention(dim, heads, QK_NORM_EPS)

    def forward(self, x: torch.Tensor, modulation: dict, layout: AttentionLayout) -> torch.Tensor:
        h, gate = self.norm(x, modulation["norm"])
        mlp = nn.functional.gelu(self.proj_mlp(h), approximate="tanh")
        return x + gate * self.proj_out(torch.cat([self.attn(h, layout), mlp], dim=-1))


class PyramidFluxTransformer(PyramidTransformer):
    """miniFLUX for pyramidal flow matching over a packed temporal pyramid (official key layout)."""

    _no_split_modules = ["DualStreamBlock", "SingleStreamBlock"]
    _repeated_blocks = ["DualStreamBlock", "SingleStreamBlock"]

    @register_to_config
    def __init__(
        self,
        patch_size: int = 1,
        in_channels: int = 64,
        num_layers: int = 8,
        num_single_layers: int = 16,
        attention_head_dim: int = 64,
        num_attention_heads: int = 30,
        joint_attention_dim: int = 4096,
        pooled_projection_dim: int = 768,
        axes_dims_rope=(16, 24, 24),
        use_flash_attn: bool = False,
        use_temporal_causal: bool = True,
        interp_condition_pos: bool = True,
        use_gradient_checkpointing: bool = False,
        gradient_checkpointing_ratio: float = 0.6,
    ):
        super().__init__()
        if patch_size != 1:
            raise ValueError(
                f"patch_size must be 1 (tokens are fixed 2x2 patches; it only sizes proj_out); got {patch_size}."
            )
        if in_channels % (PATCH * PATCH):
            raise ValueError(f"in_channels must be 4 x latent channels (2x2 patches); got {in_channels}.")
        if sum(axes_dims_rope) != attention_head_dim or any(dim % 2 for dim in axes_dims_rope):
            raise ValueError(
                f"axes_dims_rope {list(axes_dims_rope)} must be even and sum to attention_head_dim {attention_head_dim}."
            )
        dim = num_attention_heads * attention_head_dim
        self.time_text_embed = TimestepTextConditioning(dim, pooled_projection_dim)
        self.context_embedder = nn.Linear(joint_attention_dim, dim)
        self.x_embedder = nn.Linear(in_channels, dim)
        self.transformer_blocks = nn.ModuleList(
            DualStreamBlock(dim, num_attention_heads, QK_NORM_EPS, "added", text_norms_last=True)
            for _ in range(num_layers)
        )
        self.single_transformer_blocks = nn.ModuleList(
            SingleStreamBlock(dim, num_attention_heads) for _ in range(num_single_layers)
        )
        self.norm_out = AdaLayerNormContinuous(dim)
        self.proj_out = nn.Linear(dim, patch_size * patch_size * in_channels)
        self.gradient_checkpointing = False
        if use_gradient_checkpointing:
            self.enable_gradient_checkpointing()

    @property
    def latent_channels(self) -> int:
        return self.config.in_channels // (PATCH * PATCH)

    def embed_clips(self, clips, grids) -> torch.Tensor:
        return self.x_embedder(torch.cat([patchify(clip) for clip in clips], dim=1))

    def position_ids(self, num_text: int, grids) -> torch.Tensor:
        """(t, h, w) ids [L, 3] of [text ; image]: text at (0, 0, 0), history at pyramid positions (Fig. 3b)."""
        image = pyramid_positions(grids, self.config.interp_condition_pos)
        return torch.cat([image.new_zeros(num_text, 3), image])

    def rope_angles(self, num_text: int, grids):
        """3-axis (t, h, w) RoPE angles of the packed sequence."""
        positions = self.position_ids(num_text, grids)
        return rotary_angles(positions, self.config.axes_dims_rope, ROPE_THETA)

    def run_blocks(self, image, text, modulations, layout) -> torch.Tensor:
        dual = len(self.transformer_blocks)
        for index, block in enumerate(self.transformer_blocks):
            text, image = self.call_block(block, index, dual, image, text, modulations[index], layout)
        stream = torch.cat([text, image], dim=1)
        for index, block in enumerate(self.single_transformer_blocks):
            stream = self.call_block(block, index, len(self.single_transformer_blocks), stream,
                                     modulations[dual + index], layout)
        return stream[:, text.shape[1] :]
