"""CausalVideoVAE: the 8x8x8 causal 3-D video autoencoder of Pyramid Flow (official key layout).

A video of 1 + 8k frames maps to 1 + k latent frames: causal convs pad time with zeros in front, so the
first frame is coded on its own and every later latent frame summarises 8 frames.
"""
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.autoencoders.vae import DecoderOutput
from diffusers.models.modeling_outputs import AutoencoderKLOutput
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils.accelerate_utils import apply_forward_hook
from diffusers.utils.torch_utils import randn_tensor
from torch import nn

from .blocks import CausalGroupNorm, DownEncoderBlockCausal3D, MidBlockCausal3D, UpDecoderBlockCausal3D
from .causal_conv import FULL_VIDEO, CausalConv3d, TimeChunk
from .streaming import DecodeStream
from .tiling import run_in_tiles, run_in_time_chunks

CODER_TYPE = "causal_vae_conv"
DOWN_BLOCK = "DownEncoderBlockCausal3D"
UP_BLOCK = "UpDecoderBlockCausal3D"
ACTIVATION = "silu"
LOGVAR_RANGE = (-30.0, 20.0)


class CausalEncoder(nn.Module):
    """conv_in -> down blocks -> mid block -> GroupNorm -> SiLU -> conv_out (2 x latent when double_z)."""

    def __init__(self, in_channels, out_channels, layers_per_block, block_out_channels, spatial_down_sample,
                 temporal_down_sample, block_dropout, norm_num_groups, double_z):
        super().__init__()
        widths = list(block_out_channels)
        self.conv_in = CausalConv3d(in_channels, widths[0])
        self.down_blocks = nn.ModuleList(
            DownEncoderBlockCausal3D(width_in, width, layers, norm_num_groups, dropout, spatial, temporal)
            for width_in, width, layers, dropout, spatial, temporal in zip(
                [widths[0]] + widths[:-1], widths, layers_per_block, block_dropout, spatial_down_sample,
                temporal_down_sample)
        )
        self.mid_block = MidBlockCausal3D(widths[-1], norm_num_groups)
        self.conv_norm_out = CausalGroupNorm(norm_num_groups, widths[-1])
        self.conv_out = CausalConv3d(widths[-1], 2 * out_channels if double_z else out_channels)

    def forward(self, x: torch.Tensor, chunk: TimeChunk = FULL_VIDEO) -> torch.Tensor:
        x = self.conv_in(x, chunk)
        for block in self.down_blocks:
            x = block(x, chunk)
        x = self.mid_block(x, chunk)
        return self.conv_out(self.conv_norm_out(x), chunk, silu_first=True)


class CausalDecoder(nn.Module):
    """conv_in -> mid block -> up blocks -> GroupNorm -> SiLU -> conv_out.

    block_out_channels lists widths shallow to deep (as the encoder does) and is walked in reverse;
    the other per-block lists are read in up-block order, deepest block first.
    """

    def __init__(self, in_channels, out_channels, layers_per_block, block_out_channels, spatial_up_sample,
                 temporal_up_sample, block_dropout, norm_num_groups):
        super().__init__()
        widths = list(reversed(block_out_channels))
        self.conv_in = CausalConv3d(in_channels, widths[0])
        self.up_blocks = nn.ModuleList(
            UpDecoderBlockCausal3D(width_in, width, layers, norm_num_groups, dropout, spatial, temporal)
            for width_in, width, layers, dropout, spatial, temporal in zip(
                [widths[0]] + widths[:-1], widths, layers_per_block, block_dropout, spatial_up_sample,
                temporal_up_sample)
        )
        self.mid_block = MidBlockCausal3D(widths[0], norm_num_groups)
        self.conv_norm_out = CausalGroupNorm(norm_num_groups, widths[-1])
        self.conv_out = CausalConv3d(widths[-1], out_channels)

    def forward(self, z: torch.Tensor, chunk: TimeChunk = FULL_VIDEO) -> torch.Tensor:
        z = self.mid_block(self.conv_in(z, chunk), chunk)
        for block in self.up_blocks:
            z = block(z, chunk)
        return self.conv_out(self.conv_norm_out(z), chunk, silu_first=True)


class DiagonalGaussian:
    """The posterior N(mean, exp(logvar)) read from the raw moments (mean channels first, then logvar)."""

    def __init__(self, moments: torch.Tensor):
        self.moments = moments
        self.mean, logvar = moments.chunk(2, dim=1)
        self.logvar = logvar.clamp(*LOGVAR_RANGE)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def sample(self, generator=None) -> torch.Tensor:
        """generator: one torch.Generator, or a list with one per batch element."""
        noise = randn_tensor(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * noise

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self, other: "DiagonalGaussian" = None) -> torch.Tensor:
        """KL(self || other) per batch element, summed over C, T, H, W; other defaults to N(0, I)."""
        if other is None:
            per_element = self.mean.pow(2) + self.var - 1.0 - self.logvar
        else:
            per_element = ((self.mean - other.mean).pow(2) / other.var + self.var / other.var
                           - 1.0 - self.logvar + other.logvar)
        return 0.5 * per_element.flatten(1).sum(dim=1)


def _require(condition: bool, message: str):
    if not condition:
        raise ValueError(message)


class CausalVideoVAE(ModelMixin, ConfigMixin):
    """Causal 3-D video VAE with the official Pyramid Flow config keys and state-dict layout.

    Videos are [B, 3, T, H, W] in [-1, 1] with T = 1 + 8k and H, W multiples of 8; latents are
    [B, latent, 1 + k, H / 8, W / 8]. Memory options:
    * temporal_chunk=True (per call): code the first frame, then windows of `window_size` frames
      (encode: pixel frames, a multiple of 8; decode: latent frames). Exactly equal to the full pass.
    * enable_tiling(tile_latent_size, tile_latent_overlap): code overlapping spatial tiles and blend
      them linearly (the project's `vae_tiling` option). Approximate near seams; see tiling.py.
    `scaling_factor` is kept for config compatibility; Pyramid Flow normalises latents itself.
    """

    _supports_gradient_checkpointing = False

    @register_to_config
    def __init__(
        self,
        encoder_in_channels: int = 3,
        encoder_out_channels: int = 16,
        encoder_layers_per_block: tuple = (2, 2, 2, 2),
        encoder_down_block_types: tuple = (DOWN_BLOCK,) * 4,
        encoder_block_out_channels: tuple = (128, 256, 512, 512),
        encoder_spatial_down_sample: tuple = (True, True, True, False),
        encoder_temporal_down_sample: tuple = (True, True, True, False),
        encoder_block_dropout: tuple = (0.0, 0.0, 0.0, 0.0),
        encoder_act_fn: str = ACTIVATION,
        encoder_norm_num_groups: int = 32,
        encoder_double_z: bool = True,
        encoder_type: str = CODER_TYPE,
        decoder_in_channels: int = 16,
        decoder_out_channels: int = 3,
        decoder_layers_per_block: tuple = (3, 3, 3, 3),
        decoder_up_block_types: tuple = (UP_BLOCK,) * 4,
        decoder_block_out_channels: tuple = (128, 256, 512, 512),
        decoder_spatial_up_sample: tuple = (True, True, True, False),
        decoder_temporal_up_sample: tuple = (True, True, True, False),
        decoder_block_dropout: tuple = (0.0, 0.0, 0.0, 0.0),
        decoder_act_fn: str = ACTIVATION,
        decoder_norm_num_groups: int = 32,
        decoder_type: str = CODER_TYPE,
        sample_size: int = 256,
        scaling_factor: float = 0.13025,
        add_post_quant_conv: bool = True,
        interpolate: bool = False,
        downsample_scale: int = 8,
    ):
        super().__init__()
        self.spatial_scale = 2 ** sum(encoder_spatial_down_sample)
        self.temporal_scale = 2 ** sum(encoder_temporal_down_sample)
        self._validate_config()
        self.encoder = CausalEncoder(
            encoder_in_channels, encoder_out_channels, encoder_layers_per_block, encoder_block_out_channels,
            encoder_spatial_down_sample, encoder_temporal_down_sample, encoder_block_dropout,
            encoder_norm_num_groups, encoder_double_z,
        )
        self.decoder = CausalDecoder(
            decoder_in_channels, decoder_out_channels, decoder_layers_per_block, decoder_block_out_channels,
            decoder_spatial_up_sample, decoder_temporal_up_sample, decoder_block_dropout, decoder_norm_num_groups,
        )
        moment_channels = 2 * encoder_out_channels if encoder_double_z else encoder_out_channels
        self.quant_conv = CausalConv3d(moment_channels, moment_channels, 1)
        self.post_quant_conv = (
            CausalConv3d(decoder_in_channels, decoder_in_channels, 1) if add_post_quant_conv else None
        )
        self.use_tiling = False
        self.tile_latent_size = 32
        self.tile_latent_overlap = 8

    def _validate_config(self):
        config = self.config
        for side, direction, block_type in (("encoder", "down", DOWN_BLOCK), ("decoder", "up", UP_BLOCK)):
            block_types = list(config[f"{side}_{direction}_block_types"])
            _require(all(t == block_type for t in block_types),
                     f"{side} block types {block_types} are not supported; every block must be {block_type!r}")
            _require(config[f"{side}_act_fn"] == ACTIVATION,
                     f"{side}_act_fn={config[f'{side}_act_fn']!r} is not supported; only {ACTIVATION!r} is")
            _require(config[f"{side}_type"] == CODER_TYPE,
                     f"{side}_type={config[f'{side}_type']!r} is not supported; only {CODER_TYPE!r} is")
            per_block = ("layers_per_block", "block_out_channels", f"spatial_{direction}_sample",
                         f"temporal_{direction}_sample", "block_dropout", f"{direction}_block_types")
            lengths = {name: len(config[f"{side}_{name}"]) for name in per_block}
            _require(len(set(lengths.values())) == 1, f"the {side} per-block lists differ in length: {lengths}")
        _require(not config["interpolate"], "interpolate=True is not supported; the Pyramid Flow VAE upsamples "
                                            "by depth-to-space (interpolate=False)")
        _require(config["downsample_scale"] == self.spatial_scale,
                 f"downsample_scale={config['downsample_scale']} does not match the {self.spatial_scale}x spatial "
                 f"downsampling of encoder_spatial_down_sample")
        _require(sum(config["encoder_spatial_down_sample"]) == sum(config["decoder_spatial_up_sample"])
                 and sum(config["encoder_temporal_down_sample"]) == sum(config["decoder_temporal_up_sample"]),
                 "the decoder must upsample (in space and in time) as often as the encoder downsamples")

    def enable_tiling(self, tile_latent_size: int = 32, tile_latent_overlap: int = 8):
        """Code videos in spatial tiles of tile_latent_size latent cells overlapping by tile_latent_overlap."""
        _require(tile_latent_size > tile_latent_overlap >= 0,
                 f"tiles need tile_latent_size > tile_latent_overlap >= 0, got {tile_latent_size} and "
                 f"{tile_latent_overlap}")
        self.use_tiling = True
        self.tile_latent_size = tile_latent_size
        self.tile_latent_overlap = tile_latent_overlap

    def disable_tiling(self):
        self.use_tiling = False

    def _check_video(self, x: torch.Tensor):
        s, t = self.spatial_scale, self.temporal_scale
        _require(x.ndim == 5 and x.shape[1] == self.config.encoder_in_channels,
                 f"expected a video [B, {self.config.encoder_in_channels}, T, H, W], got shape {list(x.shape)}")
        frames, height, width = x.shape[2:]
        _require((frames - 1) % t == 0,
                 f"a video must have 1 + {t}k frames (1, {1 + t}, {1 + 2 * t}, ...), got {frames}")
        _require(height % s == 0 and width % s == 0,
                 f"video height and width must be multiples of {s}, got {height}x{width}")

    def _check_latents(self, z: torch.Tensor):
        channels = self.config.decoder_in_channels
        _require(z.ndim == 5 and z.shape[1] == channels,
                 f"expected latents [B, {channels}, T, H, W], got shape {list(z.shape)}")

    @staticmethod
    def _check_call(is_init_image: bool, window_size: int, multiple_of: int):
        _require(is_init_image, "is_init_image=False is not supported: each call codes a whole video from its "
                                "first frame; use temporal_chunk=True to stream a long video")
        _require(window_size > 0 and window_size % multiple_of == 0,
                 f"window_size must be a positive multiple of {multiple_of}, got {window_size}")

    def _encode_chunk(self, frames: torch.Tensor, chunk: TimeChunk) -> torch.Tensor:
        frames = frames.contiguous()  # the encoder codes in the contiguous layout, whose rounding its latents carry
        return self.quant_conv(self.encoder(frames, chunk), chunk)

    def _decode_chunk(self, latents: torch.Tensor, chunk: TimeChunk) -> torch.Tensor:
        if latents.device.type == "cpu":  # oneDNN's convs take half the time on channels-last videos of this width
            latents = latents.contiguous(memory_format=torch.channels_last_3d)
        if self.post_quant_conv is not None:
            latents = self.post_quant_conv(latents, chunk)
        return self.decoder(latents, chunk)

    def _code(self, code, x, temporal_chunk: bool, window_size: int, in_scale: int, out_scale: int):
        """code(x, chunk) in one pass or in time chunks, inside spatial tiles when tiling is enabled."""
        def code_all_frames(part):
            return run_in_time_chunks(self, code, part, window_size) if temporal_chunk else code(part, FULL_VIDEO)

        if not self.use_tiling:
            return code_all_frames(x)
        grid = (x.shape[3] // in_scale, x.shape[4] // in_scale)
        return run_in_tiles(code_all_frames, x, grid, self.tile_latent_size, self.tile_latent_overlap,
                            in_scale, out_scale)

    @apply_forward_hook  # model offload moves the VAE to the GPU on encode/decode, not only on forward
    def encode(self, x: torch.Tensor, return_dict: bool = True, is_init_image: bool = True,
               temporal_chunk: bool = False, window_size: int = 8):
        """Video [B, 3, 1 + 8k, H, W] -> AutoencoderKLOutput(latent_dist=DiagonalGaussian).

        temporal_chunk=True encodes the first frame, then windows of window_size frames (a multiple
        of 8), carrying each causal conv's cache; the result equals the full pass.
        """
        self._check_video(x)
        self._check_call(is_init_image, window_size, self.temporal_scale)
        moments = self._code(self._encode_chunk, x, temporal_chunk, window_size, self.spatial_scale, 1)
        posterior = DiagonalGaussian(moments)
        return AutoencoderKLOutput(latent_dist=posterior) if return_dict else (posterior,)

    @apply_forward_hook
    def decode(self, z: torch.Tensor, return_dict: bool = True, is_init_image: bool = True,
               temporal_chunk: bool = False, window_size: int = 2):
        """Latents [B, C, 1 + k, h, w] -> DecoderOutput(sample=[B, 3, 1 + 8k, 8h, 8w]), not clamped.

        temporal_chunk=True decodes the first latent frame, then windows of window_size latent frames;
        the result equals the full pass.
        """
        self._check_latents(z)
        self._check_call(is_init_image, window_size, 1)
        video = self._code(self._decode_chunk, z, temporal_chunk, window_size, 1, self.spatial_scale)
        return DecoderOutput(sample=video) if return_dict else (video,)

    def start_decode_stream(self) -> DecodeStream:
        """A stream for `decode_stream`: decode a video unit by unit as its latents are made."""
        return DecodeStream(self)

    @apply_forward_hook
    def decode_stream(self, z: torch.Tensor, stream: DecodeStream) -> torch.Tensor:
        """The next latent frames of a streamed video -> their pixel frames, equal to the matching frames of one
        `decode` of all the latents; the first call starts the video (its first latent frame gives one frame)."""
        self._check_latents(z)
        return stream.decode(self, z)

    def forward(self, sample: torch.Tensor, sample_posterior: bool = False, generator: torch.Generator = None,
                return_dict: bool = True):
        """Encode, take the posterior mean (or a sample drawn with `generator`), decode."""
        posterior = self.encode(sample).latent_dist
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        return self.decode(z, return_dict=return_dict)
