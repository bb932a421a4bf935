"""What a Pyramid Flow checkpoint is: families, resolution variants, folder names and constants.

The published repos (`rain1011/pyramid-flow-miniflux`, `rain1011/pyramid-flow-sd3`) share one layout:
`causal_video_vae/`, `diffusion_transformer_<variant>/`, text encoders and tokenizers. A checkpoint
of our own may add `pyramid_flow.json` at its root to override sizes, latent statistics and the
sampling settings it is generated with by default.
"""
import json
import math
import os
import re
import stat
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Optional

import torch

from .temporal import frames_for_duration, pixel_frames

VAE_FOLDER = "causal_video_vae"
SETTINGS_FILE = "pyramid_flow.json"
LONG_VIDEO_SECONDS = 20.0  # longest video made beyond the published lengths (5 s at 384p, 10 s at 768p)

# What a checkpoint's JSON may ask for: the published values with generous headroom, so that a damaged or hostile
# pyramid_flow.json (or a saved pipeline's model_index.json) is refused in one sentence instead of running away.
MAX_SIDE = 4096  # pixels; the published variants reach 1280 (768p width) and 1024 (image)
MAX_LATENT_FRAMES = 128  # the published 768p variant makes 31 (241 frames, 10 s at 24 fps)
MAX_FPS = 120  # published: 24
MAX_FRAMES_PER_LATENT = 64  # the published causal VAE codes 8 frames per later latent frame
MAX_STEPS = 1000  # per pyramid stage; the published defaults are 20 (first frame) and 10 (video)
MAX_GUIDANCE = 100.0  # published: 7 and 5
MAX_CACHE_THRESHOLD = 10.0  # published: 0.05; the bundled model 0.3
MAX_NORMALIZATION = 1000.0  # |shift| and scale; the published shifts are within 0.3, the scales within 0.3 to 1.1
MAX_VARIANTS = 64  # the published checkpoints have 3
MAX_JSON_BYTES = 64 * 2**20  # the largest published JSON files (tokenizer.json) are a few MB
VARIANT_RANGES = {"height": (1, MAX_SIDE), "width": (1, MAX_SIDE), "max_latent_frames": (1, MAX_LATENT_FRAMES),
                  "fps": (1, MAX_FPS), "frames_per_latent": (1, MAX_FRAMES_PER_LATENT)}
SAMPLING_RANGES = {"first_frame_steps": (1, MAX_STEPS), "video_steps": (1, MAX_STEPS),
                   "guidance_scale": (0.0, MAX_GUIDANCE), "video_guidance_scale": (0.0, MAX_GUIDANCE),
                   "image_to_video_guidance_scale": (0.0, MAX_GUIDANCE),
                   "cache_threshold": (0.0, MAX_CACHE_THRESHOLD)}
NORMALIZATION_RANGES = {"first_shift": (-MAX_NORMALIZATION, MAX_NORMALIZATION),
                        "first_scale": (1 / MAX_NORMALIZATION, MAX_NORMALIZATION),
                        "later_shift": (-MAX_NORMALIZATION, MAX_NORMALIZATION),
                        "later_scale": (1 / MAX_NORMALIZATION, MAX_NORMALIZATION)}
STAGE_GRIDS = ("official", "trailing")  # where a stage's steps fall (model_core.scheduler.PyramidFlowScheduler)
VARIANT_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")  # part of a folder name: diffusion_transformer_<name>


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
    image_to_video_guidance_scale: Optional[float] = None  # image_to_video's video guidance; None: video_guidance_scale
    stage_grid: str = "official"  # where each stage's steps fall (STAGE_GRIDS): the model's, not a call option

    def filled(self, **given) -> "SamplingDefaults":
        """The given settings, these defaults where a value is None."""
        return replace(self, **{name: value for name, value in given.items() if value is not None})

    def for_mode(self, mode: str) -> "SamplingDefaults":
        """The defaults of one generation mode: image_to_video has its own video guidance where one is set."""
        if mode == "image_to_video" and self.image_to_video_guidance_scale is not None:
            return replace(self, video_guidance_scale=self.image_to_video_guidance_scale)
        return self

    def call_options(self, mode: str) -> dict:
        """These defaults as the keyword arguments of a pipeline call in `mode`."""
        options = asdict(self.for_mode(mode))
        del options["image_to_video_guidance_scale"]  # folded into video_guidance_scale by for_mode
        del options["stage_grid"]  # the pipeline's scheduler is built with it as the model loads
        return options


# The published checkpoints' defaults: the authors' generate_i2v, app and README animate an image with video
# guidance 4 (text-to-video uses 5).
PUBLISHED_SAMPLING = SamplingDefaults(image_to_video_guidance_scale=4.0)


@dataclass(frozen=True)
class Family:
    name: str
    transformer_class: str  # the official config's _class_name
    text_folders: tuple
    normalization: LatentNormalization
    variants: dict
    sampling: SamplingDefaults = PUBLISHED_SAMPLING


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


def sampling_defaults(settings, path) -> SamplingDefaults:
    """The "sampling" entry of `path` (a pyramid_flow.json); unknown names are refused, naming the allowed ones, and
    every number is checked against SAMPLING_RANGES."""
    allowed = [field.name for field in fields(SamplingDefaults)]
    settings = _object(settings, path, "sampling", f"an object with any of {', '.join(allowed)}")
    unknown = sorted(set(settings) - set(allowed))
    if unknown:
        raise ValueError(f"{path}: unknown sampling setting(s) {', '.join(unknown)}; allowed: {', '.join(allowed)}")
    checked = {}
    for name, value in settings.items():
        field = f"sampling.{name}"
        if value is None:  # not set: the default, as `filled` reads None
            continue
        if name == "cache":  # the mode's name is checked with the call's other options (model_core.step_cache)
            if not isinstance(value, str):
                raise ValueError(f"{path}: {field} is {_shown(value)}; allowed: the name of a step cache, like \"none\"")
            checked[name] = value
        elif name == "stage_grid":
            if value not in STAGE_GRIDS:
                raise ValueError(f"{path}: {field} is {_shown(value)}; allowed: {' or '.join(map(json.dumps, STAGE_GRIDS))}")
            checked[name] = value
        elif name.endswith("_steps"):
            if not isinstance(value, (list, tuple)) or not value:
                raise ValueError(f"{path}: {field} is {_shown(value)}; allowed: a list of step counts, one per pyramid stage")
            checked[name] = tuple(_bounded(step, SAMPLING_RANGES[name], path, f"{field}[{index}]", whole=True)
                                  for index, step in enumerate(value))
        else:
            checked[name] = _bounded(value, SAMPLING_RANGES[name], path, field)
    return SamplingDefaults(**checked)


def variant_spec(name, entry, path) -> VariantSpec:
    """One entry of a checkpoint's "variants" (read from `path`), its numbers checked against VARIANT_RANGES."""
    if not isinstance(name, str) or not VARIANT_NAME.fullmatch(name):
        raise ValueError(f"{path}: variant name {_shown(name)} is not allowed; allowed: 1 to 64 letters, digits, '_', '.' "
                         "or '-' (it names the folder diffusion_transformer_<name>)")
    required = ("height", "width", "max_latent_frames")
    wanted = f"an object with {', '.join(required)} (and optionally fps)"
    entry = _object(entry, path, f"variants.{name}", wanted)
    unknown, missing = sorted(set(entry) - set(VARIANT_RANGES)), [key for key in required if key not in entry]
    if unknown or missing:
        what = f"unknown field(s) {', '.join(unknown)}" if unknown else f"no {', '.join(missing)}"
        raise ValueError(f"{path}: variants.{name} has {what}; allowed: {wanted}")
    return VariantSpec(**{key: _bounded(value, VARIANT_RANGES[key], path, f"variants.{name}.{key}", whole=True)
                          for key, value in entry.items()})


def latent_normalization(entry, path) -> LatentNormalization:
    """A checkpoint's "latent_normalization" (read from `path`), its numbers checked against NORMALIZATION_RANGES."""
    wanted = f"an object with {', '.join(NORMALIZATION_RANGES)} (the later ones optional)"
    entry = _object(entry, path, "latent_normalization", wanted)
    unknown, missing = sorted(set(entry) - set(NORMALIZATION_RANGES)), {"first_shift", "first_scale"} - set(entry)
    if unknown or missing:
        what = f"unknown field(s) {', '.join(unknown)}" if unknown else f"no {', '.join(sorted(missing))}"
        raise ValueError(f"{path}: latent_normalization has {what}; allowed: {wanted}")
    return LatentNormalization(**{key: _bounded(value, NORMALIZATION_RANGES[key], path, f"latent_normalization.{key}")
                                  for key, value in entry.items()})


def _object(value, path, field: str, wanted: str) -> dict:
    if not isinstance(value, dict):
        raise ValueError(f"{path}: {field} is {_shown(value)}; allowed: {wanted}")
    return value


def _shown(value) -> str:
    """A JSON value for an error sentence, cut short (a hostile file may hold megabytes in one field)."""
    text = json.dumps(value) if isinstance(value, (str, int, float, bool, type(None))) else f"a JSON {type(value).__name__}"
    return text if len(text) <= 40 else text[:37] + "..."


def _bounded(value, allowed: tuple, path, field: str, whole: bool = False):
    """`value` if it is a number (a whole number when `whole`) within `allowed` = (low, high), else a ValueError
    naming the file, the field, the value and the range."""
    low, high = allowed
    number = not isinstance(value, bool) and isinstance(value, int if whole else (int, float))
    if not (number and low <= value <= high):  # NaN and infinities fail the comparison
        kind = "a whole number" if whole else "a number"
        raise ValueError(f"{path}: {field} is {_shown(value)}; allowed: {kind} from {low:g} to {high:g}")
    return value


def with_overrides(root: Path, family: Family) -> Family:
    """Apply a checkpoint's own settings: its `pyramid_flow.json` (variant sizes, latent normalisation, sampling
    defaults) and its VAE's temporal compression (the frame counts every variant allows); every number is bounded."""
    path = root / SETTINGS_FILE
    settings = read_json(path) if path.exists() else {}
    variants = dict(family.variants)
    own_variants = _object(settings.get("variants", {}), path, "variants", "an object of variant name -> "
                           "{height, width, max_latent_frames, fps}")
    if len(own_variants) > MAX_VARIANTS:
        raise ValueError(f"{path}: variants names {len(own_variants)} variants; allowed: at most {MAX_VARIANTS}")
    for name, entry in own_variants.items():
        variants[name] = variant_spec(name, entry, path)
    frames_per_latent = vae_temporal_scale(root)
    if frames_per_latent is not None:
        variants = {name: replace(spec, frames_per_latent=frames_per_latent) for name, spec in variants.items()}
    normalization = family.normalization
    if "latent_normalization" in settings:
        normalization = latent_normalization(settings["latent_normalization"], path)
    sampling = sampling_defaults(settings["sampling"], path) if "sampling" in settings else family.sampling
    return replace(family, variants=variants, normalization=normalization, sampling=sampling)


def vae_temporal_scale(root: Path) -> Optional[int]:
    """Pixel frames per later latent frame of the checkpoint's causal VAE (from its config); None without one."""
    config = root / VAE_FOLDER / "config.json"
    if not config.exists():
        return None
    downsamples = read_json(config).get("encoder_temporal_down_sample", (True, True, True, False))
    scale = 2 ** sum(downsamples) if isinstance(downsamples, list) and all(isinstance(d, bool) for d in downsamples) else None
    if scale is None or scale > MAX_FRAMES_PER_LATENT:
        raise ValueError(f"{config}: encoder_temporal_down_sample is {_shown(downsamples)}; allowed: a list of true/false, "
                         f"one per block, halving time at most {int(math.log2(MAX_FRAMES_PER_LATENT))} times")
    return scale


def check_regular_file(path: Path) -> os.stat_result:
    """The file's stat; a path that is not a regular file where a checkpoint file is expected is refused without
    opening it: a named pipe or a device would block or never end, a folder is not a file (links to files are fine)."""
    try:
        status = os.stat(path)
    except FileNotFoundError:
        what = "is a link to a file that does not exist" if os.path.islink(path) else "does not exist"
        raise FileNotFoundError(f"{path} {what}") from None
    if not stat.S_ISREG(status.st_mode):
        raise ValueError(f"{path} is {_file_kind(status.st_mode)}, not a regular file; a checkpoint holds plain files only")
    return status


def _file_kind(mode: int) -> str:
    kinds = {stat.S_ISDIR: "a folder", stat.S_ISFIFO: "a named pipe (FIFO)", stat.S_ISCHR: "a character device",
             stat.S_ISBLK: "a block device", stat.S_ISSOCK: "a socket"}
    return next((kind for test, kind in kinds.items() if test(mode)), "a special file")


def read_json(path: Path) -> dict:
    """A checkpoint's JSON file as a dict; a file that is not a regular file of at most MAX_JSON_BYTES holding a JSON
    object is refused, naming it."""
    size = check_regular_file(path).st_size
    if size > MAX_JSON_BYTES:
        raise ValueError(f"{path} is {size / 2**20:.0f} MB; allowed: a JSON file of at most {MAX_JSON_BYTES // 2**20} MB")
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not a text file; expected a JSON object") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON ({error.msg} at line {error.lineno}, column {error.colno})") from None
    except RecursionError:
        raise ValueError(f"{path} nests its JSON too deeply; expected a JSON object with the settings") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path} holds a JSON {type(value).__name__}; expected an object with the settings")
    return value


def describe(family: Family, variant: str) -> dict:
    """The JSON facts that a pipeline saved in the diffusers layout records in its model_index.json, so it loads
    without the official folders: family, the variant's spec, latent normalisation and sampling defaults."""
    return {"family": family.name, "variant": variant, "spec": asdict(family.variants[variant]),
            "latent_normalization": asdict(family.normalization),
            "sampling": {name: value for name, value in asdict(family.sampling).items() if value is not None}}


def from_description(description: dict, where: str) -> tuple:
    """(Family, variant) from `describe`'s output, read from the file named `where`."""
    family = family_named(description.get("family"))
    variant = description.get("variant")
    return replace(
        family,
        variants={**family.variants, variant: variant_spec(variant, description.get("spec"), where)},
        normalization=latent_normalization(description.get("latent_normalization"), where),
        sampling=sampling_defaults(description.get("sampling", {}), where),
    ), variant
