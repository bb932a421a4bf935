"""miniFLUX pyramid transformer: dual-stream then single-stream blocks with 3-axis (t, h, w) RoPE."""
from collections import OrderedDict

import torch
from diffusers.configuration_utils import register_to_config
from diffusers.models.modeling_utils import ModelMixin  # noqa: F401  (diffusers' pipeline loader finds the base class here)
from torch import nn

from .attention import AttentionLayout, SelfAttention, join_official_tensors, plain_linear, qkv_rows_as_heads
from .blocks import AdaLayerNorm, AdaLayerNormContinuous, DualStreamBlock, joined_linear
from .embeddings import PATCH, TimestepTextConditioning, patchify, rotary_angles
from .packing import PyramidTransformer, pyramid_positions

QK_NORM_EPS = 1e-6
ROPE_THETA = 10000.0


class SingleStreamBlock(nn.Module):
    """FLUX single-stream block: attention and MLP in parallel over the shared [text ; image] stream.

    Fused (`fuse_projections`, as pipelines load it), the attention's q/k/v and the MLP's input projection are one
    GEMM on the token rows (`to_qkv_mlp`: the rows of QKV_MLP's layers in that order), and the output projection
    runs on those rows too; state_dict() still gives, and load_state_dict() still takes, the official keys.
    """

    def __init__(self, dim: int, heads: int, mlp_ratio: int = 4):
        super().__init__()
        self.norm = AdaLayerNorm(dim, num_chunks=3)
        self.proj_mlp = nn.Linear(dim, mlp_ratio * dim)
        self.proj_out = nn.Linear(dim + mlp_ratio * dim, dim)
        self.attn = SelfAttention(dim, heads, QK_NORM_EPS)
        self.register_state_dict_post_hook(official_single_stream_keys)
        self.register_load_state_dict_pre_hook(fused_single_stream_keys)

    def forward(self, x: torch.Tensor, modulation: dict, layout: AttentionLayout) -> torch.Tensor:
        h, gate = self.norm(x, modulation["norm"])
        attn, mlp = self.attention_and_mlp(h, layout)
        out = self.proj_out(torch.cat([attn, nn.functional.gelu(mlp, approximate="tanh")], dim=-1))
        return x + gate * (out.view_as(x) if out.dim() < x.dim() else out)  # fused, proj_out ran on token rows

    def attention_and_mlp(self, h: torch.Tensor, layout: AttentionLayout) -> tuple:
        """The attention's output and the MLP's input projection of h: [B, L, ·] each, or token rows [B·L, ·]."""
        fused = self._modules.get(FUSED_QKV_MLP)
        if fused is None:
            return self.attn(h, layout), self.proj_mlp(h)
        qkv, mlp = fused(h.flatten(0, 1)).split([3 * h.shape[-1], fused.out_features - 3 * h.shape[-1]], dim=-1)
        q, k, v = qkv_rows_as_heads(qkv, h.shape, self.attn.heads)
        return self.attn.processor(self.attn.norm_q(q), self.attn.norm_k(k), v, layout).flatten(0, 1), mlp

    def official_layers(self) -> list:
        """QKV_MLP's layers (None where one is not there)."""
        return [self.get_submodule(owner)._modules.get(name) for owner, name in QKV_MLP_PLACES]

    @torch.no_grad()
    def fuse_projections(self, fuse: bool = True) -> None:
        """[q ; k ; v ; mlp] as one GEMM (or, with fuse=False, the official layers back); nothing when a layer is
        not a plain nn.Linear with plain weights (a LoRA, a quantised or hooked layer, q/k/v fused on their own)."""
        fused = self._modules.get(FUSED_QKV_MLP)
        if not fuse and fused is not None:
            self.unfuse(fused)
        layers = self.official_layers()
        if fuse and fused is None and all(map(plain_linear, layers)):
            self._official_order = list(self.state_dict(keep_vars=True))
            self.fused_sizes = [layer.out_features for layer in layers]
            for owner, name in QKV_MLP_PLACES:
                delattr(self.get_submodule(owner), name)
            self.add_module(FUSED_QKV_MLP, joined_linear(layers))
        self.fused_projections = FUSED_QKV_MLP in self._modules

    def unfuse(self, fused: nn.Linear) -> None:
        """Each official layer back from its rows of `fused`, the block's children in the official order."""
        rows = zip(fused.weight.split(self.fused_sizes), fused.bias.split(self.fused_sizes))
        for (owner, name), (weight, bias) in zip(QKV_MLP_PLACES, rows):
            layer = nn.Linear(fused.in_features, weight.shape[0], device=weight.device, dtype=weight.dtype)
            layer.weight.copy_(weight)
            layer.bias.copy_(bias)
            self.get_submodule(owner).add_module(name, layer.requires_grad_(fused.weight.requires_grad))
        delattr(self, FUSED_QKV_MLP)
        position = {key.split(".")[0]: index for index, key in reversed(list(enumerate(self._official_order)))}
        self._modules = OrderedDict(sorted(self._modules.items(), key=lambda item: position[item[0]]))


FUSED_QKV_MLP = "to_qkv_mlp"
QKV_MLP = ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")  # the official layers fused, in the fused rows' order
QKV_MLP_PLACES = [(owner, name) for owner, _, name in (layer.rpartition(".") for layer in QKV_MLP)]  # (parent, name)


def official_single_stream_keys(block: SingleStreamBlock, state_dict, prefix: str, local_metadata) -> None:
    """state_dict() of a fused single-stream block: the fused tensors split (copied: files hold no shared storage)
    into QKV_MLP's keys, every key of the block in the official order."""
    if FUSED_QKV_MLP not in block._modules:
        return
    local = {key[len(prefix):]: state_dict.pop(key) for key in [key for key in state_dict if key.startswith(prefix)]}
    for kind in ("weight", "bias"):
        for name, piece in zip(QKV_MLP, local.pop(f"{FUSED_QKV_MLP}.{kind}").split(block.fused_sizes)):
            local[f"{name}.{kind}"] = piece.clone()
    order = {key: index for index, key in enumerate(block._official_order)}
    for key in sorted(local, key=lambda key: order.get(key, len(order))):
        state_dict[prefix + key] = local[key]


def fused_single_stream_keys(block: SingleStreamBlock, state_dict, prefix: str, *_) -> None:
    """load_state_dict() of the official layout into a fused single-stream block: QKV_MLP's tensors concatenated
    under the fused GEMM's key."""
    if FUSED_QKV_MLP in block._modules:
        join_official_tensors(state_dict, prefix, FUSED_QKV_MLP, QKV_MLP)


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

    def position_ids(self, num_text: int, grids, device=None) -> torch.Tensor:
        """(t, h, w) ids [L, 3] of [text ; image]: text at (0, 0, 0), history at pyramid positions (Fig. 3b)."""
        image = pyramid_positions(grids, self.config.interp_condition_pos, device)
        return torch.cat([image.new_zeros(num_text, 3), image])

    def rope_angles(self, num_text: int, grids, device=None):
        """3-axis (t, h, w) RoPE angles of the packed sequence."""
        positions = self.position_ids(num_text, grids, device)
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
