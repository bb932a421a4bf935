"""Options a person sets, with one name each across pipeline, CLI and studio, checked before any model loads.

`ModelOptions` says how to load a checkpoint, `GenerationOptions` what to generate with it; both
reject bad values with a sentence naming the option and what it allows. torch is imported only by the methods that
need it, so the command line's `--help` can list these options without loading it.
"""
import importlib.util
import math
import secrets
from dataclasses import asdict, dataclass, replace
from importlib import resources
from pathlib import Path

from model_core.option_names import (ATTENTION_BACKENDS, CACHE_MODES, DEVICES, DTYPE_NAMES, OFFLOAD_CHOICES,
                                     QUANTIZE_CHOICES, canonical_backend_name, check_cache_options, compile_level)

OFFLOAD_MODES = OFFLOAD_CHOICES
QUANTIZE_MODES = QUANTIZE_CHOICES
DTYPES = DTYPE_NAMES
STAGE_COUNT = 3
SEED_LIMIT = 2**63
BUNDLED = "bundled"  # the bundled model's name in settings records and the studio's model menu
BUNDLED_TURBO = "bundled-turbo"  # its few-step distillation (issue 33), named the same way
BUNDLED_FOLDERS = {BUNDLED: "pyramid-flow-shapes", BUNDLED_TURBO: "pyramid-flow-shapes-turbo"}  # under assets/models/


def bundled_model_dir(folder: str = BUNDLED_FOLDERS[BUNDLED]) -> Path:
    """A bundled model: the checkout's assets/ folder, else the installed `pyramid_flow_assets` package data."""
    checkout = Path(__file__).resolve().parents[2] / "assets" / "models" / folder
    if checkout.is_dir() or importlib.util.find_spec("pyramid_flow_assets") is None:
        return checkout
    return Path(str(resources.files("pyramid_flow_assets") / "models" / folder))


BUNDLED_MODELS = {name: bundled_model_dir(folder) for name, folder in BUNDLED_FOLDERS.items()}
BUNDLED_MODEL = BUNDLED_MODELS[BUNDLED]


def parse_steps(value, name: str, most: int = None) -> tuple:
    """'20,20,20' (or a sequence) -> (20, 20, 20): one positive step count per pyramid stage, each at most `most`
    when given."""
    parts = value.split(",") if isinstance(value, str) else list(value)
    try:
        steps = tuple(int(str(part).strip()) for part in parts)
    except ValueError:
        steps = ()
    if len(steps) != STAGE_COUNT or min(steps) < 1 or (most is not None and max(steps) > most):
        bound = "" if most is None else f" from 1 to {most}"
        raise ValueError(f"{name} must be {STAGE_COUNT} positive integers{bound} separated by commas, "
                         f"like 20,20,20; got {value!r}")
    return steps


def parse_lora(spec) -> tuple:
    """'PATH[:WEIGHT]' or (path, weight) -> (path, weight): a LoRA folder (what training writes for recipe lora.yaml,
    or one with pytorch_lora_weights.safetensors) or .safetensors file, at weight 1 unless given."""
    if isinstance(spec, str):
        path, sep, weight = spec.rpartition(":")
        spec = (path, weight) if sep and path and _is_number(weight) else (spec, 1.0)
    path, weight = spec
    if not _is_number(weight) or not math.isfinite(float(weight)):
        raise ValueError(f"a LoRA weight must be a number, like {path}:0.8; got {weight!r}")
    if not Path(path).exists():
        raise FileNotFoundError(f"LoRA {path} does not exist; give a LoRA folder or .safetensors file, as PATH[:WEIGHT]")
    return str(path), float(weight)


def _is_number(value) -> bool:
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return not isinstance(value, bool)


def checked_choice(value: str, allowed: tuple, name: str) -> str:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")
    return value


def fresh_seed() -> int:
    return secrets.randbelow(SEED_LIMIT)


def model_name(model) -> str:
    """How an output's settings name its model: the folder or hub repo id as the person gave it, else BUNDLED (not
    where the bundled model lies on this machine), as the studio's menu and Reuse name it."""
    return str(model) if model else BUNDLED


def model_source(model) -> str:
    """The checkpoint to load: the one named (a bundled model by its name), else the bundled model."""
    if model and model not in BUNDLED_MODELS:
        return str(model)
    folder = BUNDLED_MODELS[model or BUNDLED]
    if not folder.is_dir():
        raise FileNotFoundError(f"no {model or BUNDLED} model is installed (expected {folder}); "
                                "pass --model with a checkpoint folder or a hub repo id "
                                "like rain1011/pyramid-flow-miniflux")
    return str(folder)


def _check_positive_or_none(value, name: str) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"{name} must be a positive whole number; got {value!r}")


@dataclass(frozen=True)
class ModelOptions:
    """How to load the pipeline: `model` is a checkpoint folder or hub repo id (None: the bundled model)."""

    model: str = None
    variant: str = "auto"
    dtype: str = "float32"
    device: str = "auto"
    offload: str = "none"
    quantize: str = "none"
    vae_tiling: bool = False
    lora: tuple = ()  # (path, weight) pairs, or 'PATH[:WEIGHT]' strings (see `parse_lora`)
    attention_backend: str = "native"
    compile: object = False  # False, True or "max" (or their names off / on / max), see model_core.speed

    def __post_init__(self):
        object.__setattr__(self, "lora", tuple(parse_lora(spec) for spec in self.lora or ()))
        object.__setattr__(self, "compile", compile_level(self.compile))
        checked_choice(self.dtype, DTYPES, "dtype")
        checked_choice(self.device, DEVICES, "device")
        checked_choice(self.offload, OFFLOAD_MODES, "offload")
        checked_choice(self.quantize, QUANTIZE_MODES, "quantize")
        object.__setattr__(self, "attention_backend", canonical_backend_name(self.attention_backend))
        checked_choice(self.attention_backend, ATTENTION_BACKENDS, "attention_backend")

    def check_device_available(self) -> None:
        if self.device in ("auto", "cpu"):
            return
        import torch

        accelerator = torch.accelerator.current_accelerator()
        if accelerator is None or accelerator.type != torch.device(self.device).type:
            present = ", ".join(["auto", "cpu"] + ([accelerator.type] if accelerator is not None else []))
            raise ValueError(f"device {self.device!r} is not available on this machine; available: {present}")

    def to_load_kwargs(self) -> dict:
        """Keyword arguments for `PyramidFlowPipeline.from_pretrained` after the source."""
        import torch

        return dict(
            variant=self.variant,
            torch_dtype=getattr(torch, self.dtype),
            device=None if self.device == "auto" else self.device,
            offload=self.offload,
            quantize=self.quantize,
            vae_tiling=self.vae_tiling,
            lora=list(self.lora),
            attention_backend=self.attention_backend,
            compile=self.compile,
        )


@dataclass(frozen=True)
class GenerationOptions:
    """Sampling settings shared by every mode; None lets the pipeline pick the model's default (its length
    and size from the variant, steps and guidance from the checkpoint's sampling defaults)."""

    negative_prompt: str = None
    num_frames: int = None
    duration: float = None  # seconds; the pipeline turns it into frames at the model's fps
    height: int = None
    width: int = None
    seed: int = None
    first_frame_steps: tuple = None
    video_steps: tuple = None
    guidance_scale: float = None
    video_guidance_scale: float = None
    cache: str = None  # the step cache: none | first-block | taylorseer | mag (None: the model's default)
    cache_threshold: float = None

    def __post_init__(self):
        for name in ("num_frames", "height", "width"):
            _check_positive_or_none(getattr(self, name), name)
        if self.duration is not None and not (math.isfinite(self.duration) and self.duration > 0):
            raise ValueError(f"duration must be a positive number of seconds; got {self.duration}")
        if self.duration is not None and self.num_frames is not None:
            raise ValueError("give num_frames or duration, not both")
        if self.seed is not None and not (isinstance(self.seed, int) and 0 <= self.seed < SEED_LIMIT):
            raise ValueError(f"seed must be a whole number from 0 to {SEED_LIMIT - 1}; got {self.seed!r}")
        if self.cache is not None or self.cache_threshold is not None:
            cache, _ = check_cache_options(CACHE_MODES[0] if self.cache is None else self.cache,
                                           0.0 if self.cache_threshold is None else self.cache_threshold)
            object.__setattr__(self, "cache", None if self.cache is None else cache)
        for name in ("first_frame_steps", "video_steps"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, parse_steps(getattr(self, name), name))

    def seeded(self) -> "GenerationOptions":
        """These options with a concrete seed: the given one, else a fresh random one to record."""
        return self if self.seed is not None else replace(self, seed=fresh_seed())

    def to_pipeline_kwargs(self, mode: str) -> dict:
        """Keyword arguments for the pipeline method `mode`; text_to_image takes no length."""
        kwargs = asdict(self)
        if mode == "text_to_image":
            del kwargs["num_frames"], kwargs["duration"]
        return kwargs


def memory_choices(device) -> dict:
    """The dtype, offload and quantize values that can work on `device` (a torch.device; each checked with the
    others at their defaults), so a UI offers only those."""
    import torch

    from model_core.memory import check_memory_options

    def works(dtype="float32", offload="none", quantize="none") -> bool:
        try:
            check_memory_options(device, getattr(torch, dtype), offload, quantize)
        except ValueError:
            return False
        return True

    return {
        "dtype": tuple(name for name in DTYPES if works(dtype=name)),
        "offload": tuple(mode for mode in OFFLOAD_MODES if works(offload=mode)),
        "quantize": tuple(mode for mode in QUANTIZE_MODES if works(quantize=mode)),
    }
