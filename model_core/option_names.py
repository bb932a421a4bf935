"""The values a person may name for the memory and speed options, one spelling across pipeline, CLI and studio.

Names and their checks only, importing neither torch nor diffusers, so a command line can list them in `--help`
without loading either; `memory`, `step_cache` and `transformers.attention_backends`, which act on them, take
them from here.
"""
import math

DTYPE_NAMES = ("float32", "bfloat16", "float16")
DEVICES = ("auto", "cpu", "cuda", "mps")  # ok: the device names a person may choose
OFFLOAD_CHOICES = ("none", "model", "sequential", "group")
QUANTIZE_CHOICES = ("none", "int8", "nf4", "fp8")
CACHE_MODES = ("none", "first-block", "taylorseer", "mag")
ATTENTION_BACKENDS = ("native", "flex", "flash", "sage", "flash_varlen", "sage_varlen")
DEFAULT_ATTENTION_BACKEND = "native"
COMPILE_LEVELS = (False, True, "max")  # eager; the whole forward compiled; and CUDA graphs per shape (model_core.speed)
COMPILE_NAMES = {"off": False, "on": True, "max": "max"}  # how the CLI and the studio name the levels


def canonical_cache_name(name):
    """`first-block`, `First_Block` and `first_block` all name the mode `first-block`; a non-string stays as is."""
    return name.strip().lower().replace("_", "-") if isinstance(name, str) else name


def check_cache_options(cache, threshold, most_threshold: float = math.inf) -> tuple:
    """(canonical mode, threshold) validated; a ValueError names what is allowed. `most_threshold`: an app's cap."""
    cache = canonical_cache_name(cache)
    if cache not in CACHE_MODES:
        raise ValueError(f"cache must be one of {', '.join(CACHE_MODES)}; got {cache!r}.")
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 <= threshold < math.inf:
        raise ValueError(f"cache_threshold must be a finite number >= 0 (0 never skips a step); got {threshold!r}.")
    return cache, capped(float(threshold), "cache_threshold", most_threshold)


def check_guidance(value, name: str, most: float = math.inf) -> float:
    """A guidance scale (`guidance_scale`, `video_guidance_scale`): a finite number >= 0; `most`: an app's cap."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a number >= 0 (1 or less turns guidance off); got {value!r}")
    return capped(float(value), name, most)


def capped(value: float, name: str, most: float) -> float:
    """`value` within an app's cap on an option the model itself takes larger (the studio's and CLI's ranges)."""
    if value > most:
        raise ValueError(f"{name} must be a number from 0 to {most:g}; got {value:g}")
    return value


def compile_level(value):
    """One of COMPILE_LEVELS, from itself or its name (COMPILE_NAMES); a ValueError says what is allowed."""
    if isinstance(value, str):
        value = COMPILE_NAMES.get(value.strip().lower(), value)
    if isinstance(value, bool) or value == "max":
        return value
    raise ValueError(f"compile must be off, on or max (False, True or 'max'); got {value!r}.")


def compile_name(level) -> str:
    """The CLI's and studio's name of a compile level (the inverse of `compile_level`)."""
    level = compile_level(level)
    return next(name for name, named in COMPILE_NAMES.items() if named == level)


def canonical_backend_name(name) -> str:
    """`flash-varlen`, `Flash_Varlen` and `flash_varlen` all name the backend `flash_varlen`."""
    return str(name).strip().lower().replace("-", "_")
