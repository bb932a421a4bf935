"""What a Pyramid Flow checkpoint is: families, resolution variants, folder names and constants.

The published repos (`rain1011/pyramid-flow-miniflux`, `rain1011/pyramid-flow-sd3`) share one layout:
`causal_video_vae/`, `diffusion_transformer_<variant>/`, text encoders and tokenizers. A checkpoint
of our own may add `pyramid_flow.json` at its root to override sizes, latent statistics and the
sampling settings it is generated with by default.
"""
import json
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Optional

import torch

from .temporal import frames_for_duration, pixel_frames

VAE_FOLDER = "causal_video_vae"
SETTINGS_FILE = "pyramid_flow.json"
LONG_VIDEO_SECONDS = 20.0  # longest video made beyond the published lengths (5 s at 384p, 10 s at 768p)


def transformer_folder(variant: str) -> str:
    return f"diffusion_transformer_{variant}"


@dataclass(frozen=True)
class LatentNormalization:
    """normalized = (z - shift) * scale, separately for the first latent frame and the later ones."""

    first_shift: float
    first_scale: float
    later_shift: float = -0.2343
    later_scale: float = 1 / 3.0986

    def _per_frame(self, z: torch.Tensor, starts_video: bool = True) -> tuple:
        """Shift and scale broadcast over [B, C, T, H, W]: frame 0 uses the first-frame constants when `z` starts
        its video (a later piece of a video, streamed unit by unit, has later frames only)."""
        shift = torch.full((z.shape[2],), self.later_shift, dtype=z.dtype, device=z.device)
        scale = torch.full((z.shape[2],), self.later_scale, dtype=z.dtype, device=z.device)
        if starts_video:
            shift[0], scale[0] = self.first_shift, self.first_scale
        return shift.view(1, 1, -1, 1, 1), scale.view(1, 1, -1, 1, 1)

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        """VAE latents -> the transformer's latent space."""
        shift, scale = self._per_frame(z)
        return (z - shift) * scale

    def denormalize(self, z: torch.Tensor, starts_video: bool = True) -> torch.Tensor:
        """The transformer's latent space -> VAE latents."""
        shift, scale = self._per_frame(z, starts_video)
        return z / scale + shift


@dataclass(frozen=True)
class VariantSpec:
    """Default output size and length limit of one resolution variant."""

    height: int
    width: int
    max_latent_frames: int
    fps: int = 24
    frames_per_latent: int = 8  # pixel frames per later latent frame: the causal VAE's temporal compression

    @property
    def max_frames(self) -> int:
        return self.frames(self.max_latent_frames)

    @property
    def longest_latent_frames(self) -> int:
        """Latent frames of the longest video made: the published length, or LONG_VIDEO_SECONDS if that is longer
        (the history window keeps temporal positions within the published range; quality past the trained length is
        the model's)."""
        long_video = 1 + (frames_for_duration(LONG_VIDEO_SECONDS, self.fps, self.frames_per_latent) - 1) // self.frames_per_latent
        return max(self.max_latent_frames, long_video)

    def frames(self, num_latent_frames: int) -> int:
        """Pixel frames decoded from `num_latent_frames` latent frames."""
        return pixel_frames(num_latent_frames, self.frames_per_latent)


@dataclass(frozen=True)
class SamplingDefaults:
    """Steps per pyramid stage and guidance scales used when a caller gives none (the published models'
    recommended settings unless the checkpoint's `pyramid_flow.json` names its own under "sampling")."""

    first_frame_steps: tuple = (20, 20, 20)
    video_steps: tuple = (10, 10, 10)
    guidance_scale: float = 7.0
    video_guidance_scale: float = 5.0
    cache: str = "none"  # the step cache (model_core.step_cache): none | first-block | taylorseer | mag
    cache_threshold: float = 0.05  # skip the trunk below this change (model_core.step_cache: per mode)

    def filled(self, **given) -> "SamplingDefaults":
        """The given settings, these defaults where a value is None."""
        return replace(self, **{name: value for name, value in given.items() if value is not None})


@dataclass(frozen=True)
class Family:
    name: str
    transformer_class: str  # the official config's _class_name
    text_folders: tuple
    normalization: LatentNormalization
    variants: dict
    sampling: SamplingDefaults = SamplingDefaults()


VARIANTS = {
    "384p": VariantSpec(height=384, width=640, max_latent_frames=16),
    "768p": VariantSpec(height=768, width=1280, max_latent_frames=31),
    "image": VariantSpec(height=1024, width=1024, max_latent_frames=1),
}

FAMILIES = {
    "miniflux": Family(
        name="miniflux",
        transformer_class="PyramidFluxTransformer",
        text_folders=("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"),
        normalization=LatentNormalization(first_shift=-0.04, first_scale=1 / 1.8726),
        variants=VARIANTS,
    ),
    "sd3": Family(
        name="sd3",
        transformer_class="PyramidDiffusionMMDiT",
        text_folders=("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "text_encoder_3", "tokenizer_3"),
        normalization=LatentNormalization(first_shift=0.1490, first_scale=1 / 1.8415),
        variants={k: v for k, v in VARIANTS.items() if k != "image"},
    ),
}


def family_named(name: str) -> Family:
    if name not in FAMILIES:
        raise ValueError(f"unknown model family {name!r}; allowed: 'auto', {', '.join(map(repr, FAMILIES))}")
    return FAMILIES[name]


def detect_family(root: Path) -> Family:
    """sd3 checkpoints have a third text encoder; otherwise the transformer config names its class."""
    if (root / "text_encoder_3").is_dir():
        return FAMILIES["sd3"]
    for config in sorted(root.glob(f"{transformer_folder('*')}/config.json")):
        class_name = read_json(config).get("_class_name")
        for family in FAMILIES.values():
            if class_name == family.transformer_class:
                return family
    return FAMILIES["miniflux"]


def available_variants(root: Path, family: Family) -> list:
    return [v for v in family.variants if (root / transformer_folder(v)).is_dir()] + sorted(
        p.name[len(transformer_folder("")) :]
        for p in root.glob(transformer_folder("*"))
        if p.is_dir() and p.name[len(transformer_folder("")) :] not in family.variants
    )


def sampling_defaults(settings: dict, path: Path) -> SamplingDefaults:
    """The "sampling" entry of `path` (a pyramid_flow.json); unknown names are refused, naming the allowed ones."""
    allowed = [field.name for field in fields(SamplingDefaults)]
    unknown = sorted(set(settings) - set(allowed))
    if unknown:
        raise ValueError(f"{path}: unknown sampling setting(s) {', '.join(unknown)}; allowed: {', '.join(allowed)}")
    return SamplingDefaults(**{name: tuple(value) if isinstance(value, list) else value for name, value in settings.items()})


def with_overrides(root: Path, family: Family) -> Family:
    """Apply a checkpoint's own settings: its `pyramid_flow.json` (variant sizes, latent normalisation, sampling
    defaults) and its VAE's temporal compression (the frame counts every variant allows)."""
    path = root / SETTINGS_FILE
    settings = read_json(path) if path.is_file() else {}
    variants = dict(family.variants)
    for name, spec in settings.get("variants", {}).items():
        variants[name] = VariantSpec(**spec)
    frames_per_latent = vae_temporal_scale(root)
    if frames_per_latent is not None:
        variants = {name: replace(spec, frames_per_latent=frames_per_latent) for name, spec in variants.items()}
    normalization = family.normalization
    if "latent_normalization" in settings:
        normalization = LatentNormalization(**settings["latent_normalization"])
    sampling = sampling_defaults(settings["sampling"], path) if "sampling" in settings else family.sampling
    return replace(family, variants=variants, normalization=normalization, sampling=sampling)


def vae_temporal_scale(root: Path) -> Optional[int]:
    """Pixel frames per later latent frame of the checkpoint's causal VAE (from its config); None without one."""
    config = root / VAE_FOLDER / "config.json"
    if not config.is_file():
        return None
    return 2 ** sum(read_json(config).get("encoder_temporal_down_sample", (True, True, True, False)))


def read_json(path: Path) -> dict:
    """A checkpoint's JSON file as a dict; a file that is not a JSON object is refused, naming it."""
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not a text file; expected a JSON object") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON ({error.msg} at line {error.lineno}, column {error.colno})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path} holds a JSON {type(value).__name__}; expected an object with the settings")
    return value


def describe(family: Family, variant: str) -> dict:
    """The JSON facts that a pipeline saved in the diffusers layout records in its model_index.json, so it loads
    without the official folders: family, the variant's spec, latent normalisation and sampling defaults."""
    return {"family": family.name, "variant": variant, "spec": asdict(family.variants[variant]),
            "latent_normalization": asdict(family.normalization), "sampling": asdict(family.sampling)}


def from_description(description: dict, where: str) -> tuple:
    """(Family, variant) from `describe`'s output, read from the file named `where`."""
    family = family_named(description.get("family"))
    variant = description["variant"]
    return replace(
        family,
        variants={**family.variants, variant: VariantSpec(**description["spec"])},
        normalization=LatentNormalization(**description["latent_normalization"]),
        sampling=sampling_defaults(description.get("sampling", {}), where),
    ), variant
