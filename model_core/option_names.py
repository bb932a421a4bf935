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


def canonical_cache_name(name):
    """`first-block`, `First_Block` and `first_block` all name the mode `first-block`; a non-string stays as is."""
    return name.strip().lower().replace("_", "-") if isinstance(name, str) else name


def check_cache_options(cache, threshold) -> tuple:
    """(canonical mode, threshold) validated; a ValueError names what is allowed."""
    cache = canonical_cache_name(cache)
    if cache not in CACHE_MODES:
        raise ValueError(f"cache must be one of {', '.join(CACHE_MODES)}; got {cache!r}.")
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 <= threshold < math.inf:
        raise ValueError(f"cache_threshold must be a finite number >= 0 (0 never skips a step); got {threshold!r}.")
    return cache, float(threshold)


def canonical_backend_name(name) -> str:
    """`flash-varlen`, `Flash_Varlen` and `flash_varlen` all name the backend `flash_varlen`."""
    return str(name).strip().lower().replace("-", "_")
