"""SD3 MM-DiT pyramid transformer: 2-D sincos positions plus temporal RoPE over a packed temporal pyramid."""
import torch
import torch.nn.functional as F
from diffusers.configuration_utils import register_to_config
from diffusers.models.modeling_utils import ModelMixin  # noqa: F401  (diffusers' pipeline loader finds the base class here)
from torch import nn

from .blocks import AdaLayerNormContinuous, DualStreamBlock
from .embeddings import PATCH, TimestepTextConditioning, rotary_angles, sincos_1d
from .packing import PyramidTransformer, pyramid_positions

QK_NORM_EPS = 1e-5
ROPE_THETA = 10000.0


class SincosPatchEmbed(nn.Module):
    """2x2 conv patch embedding per frame plus a window of the 2-D sincos table (SD3).

    The window is centred and sized to the current clip; lower-resolution history clips get that
    window bilinearly resized to their grid (temporal pyramid positions, Fig. 3b).
    """

    def __init__(self, in_channels: int, dim: int, max_size: int, base_size: float):
        super().__init__()
        self.max_size = max_size
        self.register_buffer("pos_embed", self.sincos_table(dim, max_size, base_size), persistent=True)
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=PATCH, stride=PATCH)

    @staticmethod
    def sincos_table(dim: int, size: int, base_size: float) -> torch.Tensor:
        """[1, size², dim] table: first half of the channels encodes the column, second half the row."""
        coords = torch.arange(size, dtype=torch.float64) * (base_size / size)
        per_axis = sincos_1d(dim // 2, coords).float()
        columns = per_axis[None, :, :].expand(size, size, -1)
        rows = per_axis[:, None, :].expand(size, size, -1)
        return torch.cat([columns, rows], dim=-1).reshape(1, size * size, dim)

    def window(self, grid, current, interpolate: bool) -> torch.Tensor:
        """Position embeddings [h·w, D] of a clip with token grid `grid` (current clip grid `current`)."""
        crop = current if interpolate else grid
        top, left = (self.max_size - crop.height) // 2, (self.max_size - crop.width) // 2
        table = self.pos_embed.reshape(1, self.max_size, self.max_size, -1)
        window = table[:, top : top + crop.height, left : left + crop.width].permute(0, 3, 1, 2)
        if (crop.height, crop.width) != (grid.height, grid.width):
            window = F.interpolate(window.float(), size=(grid.height, grid.width), mode="bilinear", align_corners=False)
        return window.flatten(2).transpose(1, 2)[0]

    def forward(self, clip: torch.Tensor, grid, current, interpolate: bool) -> torch.Tensor:
        b, c, t, h, w = clip.shape
        frames = clip.transpose(1, 2).reshape(b * t, c, h, w)
        tokens = self.proj(frames).flatten(2).transpose(1, 2)
        tokens = tokens + self.window(grid, current, interpolate).to(tokens.dtype)
        return tokens.reshape(b, t * grid.tokens_per_frame, -1)


class PyramidMMDiT(PyramidTransformer):
    """SD3 MM-DiT for pyramidal flow matching over a packed temporal pyramid (official key layout)."""

    _no_split_modules = ["DualStreamBlock"]
    _repeated_blocks = ["DualStreamBlock"]

    @register_to_config
    def __init__(
        self,
        sample_size: int = 128,
        patch_size: int = 2,
        in_channels: int = 16,
        num_layers: int = 24,
        attention_head_dim: int = 64,
        num_attention_heads: int = 24,
        caption_projection_dim: int = 1536,
        pooled_projection_dim: int = 2048,
        pos_embed_max_size: int = 192,
        max_num_frames: int = 200,
        qk_norm: str = "rms_norm",
        pos_embed_type: str = "sincos",
        temp_pos_embed_type: str = "rope",
        joint_attention_dim: int = 4096,
        use_gradient_checkpointing: bool = False,
        use_flash_attn: bool = False,
        use_temporal_causal: bool = True,
        use_t5_mask: bool = True,
        add_temp_pos_embed: bool = True,
        interp_condition_pos: bool = True,
        gradient_checkpointing_ratio: float = 0.6,
        qk_norm_eps: float = QK_NORM_EPS,  # a converted SD3-Medium may hold near-identity norms (training.convert_sd3)
    ):
        super().__init__()
        dim = num_attention_heads * attention_head_dim
        self.check_options(patch_size, qk_norm, pos_embed_type, temp_pos_embed_type, caption_projection_dim, dim)
        self.pos_embed = SincosPatchEmbed(in_channels, dim, pos_embed_max_size, sample_size / patch_size)
        self.time_text_embed = TimestepTextConditioning(dim, pooled_projection_dim)
        self.context_embedder = nn.Linear(joint_attention_dim, caption_projection_dim)
        self.transformer_blocks = nn.ModuleList(
            DualStreamBlock(
                dim, num_attention_heads, qk_norm_eps, "add", text_norms_last=False,
                context_pre_only=index == num_layers - 1,  # the last block only conditions the image
            )
            for index in range(num_layers)
        )
        self.norm_out = AdaLayerNormContinuous(dim)
        self.proj_out = nn.Linear(dim, patch_size * patch_size * in_channels)
        self.gradient_checkpointing = False
        if use_gradient_checkpointing:
            self.enable_gradient_checkpointing()

    @staticmethod
    def check_options(patch_size, qk_norm, pos_embed_type, temp_pos_embed_type, caption_projection_dim, dim):
        """The settings the pyramid MMDiT implements; anything else is a clear ValueError."""
        allowed = {
            "patch_size": (patch_size, PATCH),
            "qk_norm": (qk_norm, "rms_norm"),
            "pos_embed_type": (pos_embed_type, "sincos"),
            "temp_pos_embed_type": (temp_pos_embed_type, "rope"),
            "caption_projection_dim": (caption_projection_dim, dim),
        }
        for name, (value, expected) in allowed.items():
            if value != expected:
                raise ValueError(f"{name}={value!r} is not supported; the pyramid MMDiT needs {name}={expected!r}.")

    @property
    def latent_channels(self) -> int:
        return self.config.in_channels

    def text_validity(self, encoder_attention_mask: torch.Tensor) -> torch.Tensor:
        if self.config.use_t5_mask:
            return encoder_attention_mask.bool()
        return torch.ones_like(encoder_attention_mask, dtype=torch.bool)

    def embed_clips(self, clips, grids) -> torch.Tensor:
        current = grids[-1]
        if max(current.height, current.width) > self.config.pos_embed_max_size:
            raise ValueError(
                f"The current clip's token grid {current.height}x{current.width} exceeds pos_embed_max_size "
                f"{self.config.pos_embed_max_size}."
            )
        interpolate = self.config.interp_condition_pos
        return torch.cat([self.pos_embed(clip, grid, current, interpolate) for clip, grid in zip(clips, grids)], dim=1)

    def position_ids(self, num_text: int, grids, device=None) -> torch.Tensor:
        """Temporal ids [L, 1] of [text ; image]: frames counted from the oldest, text at 0."""
        frames = pyramid_positions(grids, self.config.interp_condition_pos, device)[:, :1]
        return torch.cat([frames.new_zeros(num_text, 1), frames])

    def rope_angles(self, num_text: int, grids, device=None):
        """Temporal RoPE over the whole head dim, or None without temporal position embedding."""
        if not self.config.add_temp_pos_embed:
            return None
        positions = self.position_ids(num_text, grids, device)
        return rotary_angles(positions, [self.config.attention_head_dim], ROPE_THETA)

    def run_blocks(self, image, text, modulations, layout) -> torch.Tensor:
        for index, block in enumerate(self.transformer_blocks):
            text, image = self.call_block(block, index, len(self.transformer_blocks), image, text, modulations[index],
                                          layout)
        return image
