"""Tiny random checkpoints in the exact official folder layout, built offline for tests."""
import json
from pathlib import Path

import torch

from model_core.init import reinitialize
from model_core.checkpoints import FAMILIES, SETTINGS_FILE, VAE_FOLDER, transformer_folder
from training.tiny_text import write_tiny_text_stack
from training.initial_checkpoint import name_as_published

OFFICIAL_CLASS = {"miniflux": "PyramidFluxTransformer", "sd3": "PyramidDiffusionMMDiT"}
LATENT_CHANNELS = 4

TINY_VAE = dict(
    encoder_in_channels=3, encoder_out_channels=LATENT_CHANNELS, encoder_layers_per_block=[1, 1, 1, 1],
    encoder_down_block_types=["DownEncoderBlockCausal3D"] * 4, encoder_block_out_channels=[8, 16, 16, 16],
    encoder_spatial_down_sample=[True, True, True, False], encoder_temporal_down_sample=[True, True, True, False],
    encoder_block_dropout=[0.0] * 4, encoder_act_fn="silu", encoder_norm_num_groups=4, encoder_double_z=True,
    encoder_type="causal_vae_conv", decoder_in_channels=LATENT_CHANNELS, decoder_out_channels=3,
    decoder_layers_per_block=[1, 1, 1, 1], decoder_up_block_types=["UpDecoderBlockCausal3D"] * 4,
    decoder_block_out_channels=[8, 16, 16, 16], decoder_spatial_up_sample=[True, True, True, False],
    decoder_temporal_up_sample=[True, True, True, False], decoder_block_dropout=[0.0] * 4, decoder_act_fn="silu",
    decoder_norm_num_groups=4, decoder_type="causal_vae_conv", sample_size=256, scaling_factor=0.13025,
    add_post_quant_conv=True, interpolate=False, downsample_scale=8,
)


def tiny_transformer_config(family: str, joint_dim: int, pooled_dim: int) -> dict:
    if family == "miniflux":
        return dict(patch_size=1, in_channels=4 * LATENT_CHANNELS, num_layers=1, num_single_layers=1,
                    attention_head_dim=16, num_attention_heads=2, joint_attention_dim=joint_dim,
                    pooled_projection_dim=pooled_dim, axes_dims_rope=[4, 6, 6], use_flash_attn=False,
                    use_temporal_causal=True, interp_condition_pos=True, use_gradient_checkpointing=False,
                    gradient_checkpointing_ratio=0.6)
    return dict(sample_size=16, patch_size=2, in_channels=LATENT_CHANNELS, num_layers=2, attention_head_dim=16,
                num_attention_heads=2, caption_projection_dim=32, pooled_projection_dim=pooled_dim,
                pos_embed_max_size=24, max_num_frames=200, qk_norm="rms_norm", pos_embed_type="sincos",
                temp_pos_embed_type="rope", joint_attention_dim=joint_dim, use_gradient_checkpointing=False,
                use_flash_attn=False, use_temporal_causal=True, use_t5_mask=True, add_temp_pos_embed=True,
                interp_condition_pos=True, gradient_checkpointing_ratio=0.6)


def _save(model, folder: Path, class_name: str) -> None:
    model.save_pretrained(folder)
    name_as_published(folder / "config.json", class_name)


def build_tiny_checkpoint(root: Path, family: str = "miniflux", seed: int = 0, variant: str = "384p",
                          frames_per_latent: int = 8) -> Path:
    """Write a tiny checkpoint (64x64 px, 3 latent frames: up to 17 frames, or 9 with `frames_per_latent=4`) in the
    official layout under `root`."""
    from model_core.transformers import PyramidFluxTransformer, PyramidMMDiT
    from model_core.vae import CausalVideoVAE

    if family not in FAMILIES:
        raise ValueError(f"family must be one of {sorted(FAMILIES)}; got {family!r}")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    dims = write_tiny_text_stack(root, family, t5_dim=32, clip_dim=16, seed=seed)
    generator = torch.Generator().manual_seed(seed)
    temporal = [2**i < frames_per_latent for i in range(4)]
    vae_config = dict(TINY_VAE, encoder_temporal_down_sample=temporal, decoder_temporal_up_sample=temporal)
    vae = reinitialize(CausalVideoVAE.from_config(vae_config), generator)
    transformer_class = PyramidMMDiT if family == "sd3" else PyramidFluxTransformer
    transformer = transformer_class.from_config(
        tiny_transformer_config(family, dims["joint_attention_dim"], dims["pooled_projection_dim"])
    )
    with torch.no_grad():
        for parameter in transformer.parameters():  # no zero-initialised output layers: outputs must move
            if parameter.dim() >= 2:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * parameter.shape[-1] ** -0.5)
    _save(vae, root / VAE_FOLDER, "CausalVideoVAE")
    _save(transformer, root / transformer_folder(variant), OFFICIAL_CLASS[family])
    settings = {"variants": {variant: {"height": 64, "width": 64, "max_latent_frames": 3, "fps": 8}}}
    (root / SETTINGS_FILE).write_text(json.dumps(settings, indent=2))
    return root
