"""Checks on what a studio request sends, before any model loads or any frame is decoded.

Every value arrives as the client sent it (the endpoints take raw payloads), so each check names the
setting, says what was wrong and what is allowed. The caps are stated in the UI and the README.
"""
import math
from pathlib import Path

from model_core.option_names import (CACHE_MODES, DEFAULT_ATTENTION_BACKEND, check_cache_options, check_guidance,
                                     compile_level)

from .settings import ATTENTION_BACKENDS, DTYPES, OFFLOAD_MODES, QUANTIZE_MODES, SEED_LIMIT

PROMPT_CHARS = 1000
STEPS_RANGE = (1, 50)
GUIDANCE_RANGE = (0.0, 15.0)
CACHE_THRESHOLD_RANGE = (0.0, 1.0)  # a relative change (first-block, taylorseer) or accumulated error (mag)
IMAGE_MAX_PIXELS = 4096 * 4096
VIDEO_MAX_PIXELS = 1280 * 768  # per frame: the largest published variant's size
VIDEO_MAX_FRAMES = 241  # the most frames any published variant makes
VIDEO_MAX_SECONDS = 20.0
CAPS_TEXT = (f"Prompts up to {PROMPT_CHARS} characters; images up to {IMAGE_MAX_PIXELS // 10**6} megapixels "
             f"(e.g. 4096×4096); clips up to 1280×768, {VIDEO_MAX_FRAMES} frames and {VIDEO_MAX_SECONDS:g} s.")


def prompt(value, name: str = "the prompt") -> str:
    """Text up to PROMPT_CHARS characters (None is empty)."""
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ValueError(f"{name} must be text; got {_kind(value)}")
    if len(value) > PROMPT_CHARS:
        raise ValueError(f"{name} is {len(value)} characters long; at most {PROMPT_CHARS} are allowed")
    return value


def number(value, name: str, low: float, high: float) -> float:
    """A finite number from `low` to `high` (a numeric string is accepted, as a slider may send one)."""
    if isinstance(value, bool) or value is None:
        raise ValueError(f"{name} must be a number from {low:g} to {high:g}; got {_kind(value)}")
    try:
        result = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number from {low:g} to {high:g}; got {_kind(value)}") from None
    if not math.isfinite(result) or not low <= result <= high:
        raise ValueError(f"{name} must be a number from {low:g} to {high:g}; got {result:g}")
    return result


def whole(value, name: str, low: int, high: int) -> int:
    """A whole number from `low` to `high` (9.0 is 9; 9.5 is refused)."""
    result = number(value, name, low, high)
    if result != int(result):
        raise ValueError(f"{name} must be a whole number from {low} to {high}; got {result:g}")
    return int(result)


def seed(value):
    """A seed from 0 to 2^63 - 1 as digits, or empty/None for a random one."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    text = str(value).strip() if isinstance(value, (str, int)) and not isinstance(value, bool) else None
    if text is None or not (text.isascii() and text.isdigit()) or int(text) >= SEED_LIMIT:
        raise ValueError(f"the seed must be a whole number from 0 to {SEED_LIMIT - 1} (or empty for a random one); "
                         f"got {shown(value)}")
    return int(text)


def flag(value, name: str) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false; got {shown(value)}")
    return value


def choice(value, allowed, name: str) -> str:
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(allowed)}; got {shown(value)}")
    return value


def memory_controls(controls: dict) -> dict:
    """dtype, offload, quantize and vae_tiling, checked."""
    return {"dtype": choice(controls["dtype"], DTYPES, "dtype"),
            "offload": choice(controls["offload"], OFFLOAD_MODES, "offload"),
            "quantize": choice(controls["quantize"], QUANTIZE_MODES, "quantize"),
            "vae_tiling": flag(controls["vae_tiling"], "vae_tiling")}


SERVER_SPEED = {"attention_backend": DEFAULT_ATTENTION_BACKEND, "compile": False}  # the defaults; hosted: the only ones


def speed_controls(controls: dict) -> dict:
    """attention_backend and compile (its level, from the studio's names off / on / max too), checked (whether they
    run on this device is checked as the model loads)."""
    values = SERVER_SPEED | controls
    return {"attention_backend": choice(values["attention_backend"], ATTENTION_BACKENDS, "attention_backend"),
            "compile": compile_level(values["compile"])}


def cache_controls(controls: dict) -> dict:
    """cache and cache_threshold, checked by the model's own check, within the app's threshold cap."""
    cache, threshold = check_cache_options(choice(controls.get("cache", CACHE_MODES[0]), CACHE_MODES, "cache"),
                                           numeric(controls.get("cache_threshold", 0.0)), CACHE_THRESHOLD_RANGE[1])
    return {"cache": cache, "cache_threshold": threshold}


def guidance(value, name: str) -> float:
    """A guidance scale, checked by the model's own check, within the app's cap (GUIDANCE_RANGE)."""
    return check_guidance(numeric(value), name, GUIDANCE_RANGE[1])


def numeric(value):
    """A numeric string as a slider or a command line may send it, as a float; anything else as it came."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def frame_count(value, low: int, high: int, step: int, what: str = "num_frames") -> int:
    """A length the model can make: low, low + step, ..., high."""
    allowed = ", ".join(str(n) for n in range(low, min(high, low + 3 * step) + 1, step))
    allowed += f", ..., {high}" if high > low + 3 * step else ""
    try:
        count = whole(value, what, low, high)
    except ValueError:
        count = None
    if count is None or (count - low) % step:
        raise ValueError(f"{what} must be one of {allowed} for this model; got {shown(value)}")
    return count


def image_upload(info, path) -> None:
    """Refuse an image larger than IMAGE_MAX_PIXELS from its header."""
    width, height = info
    if width * height > IMAGE_MAX_PIXELS:
        raise ValueError(f"the image {Path(path).name} is {width}×{height} pixels; at most "
                         f"{IMAGE_MAX_PIXELS // 10**6} megapixels (e.g. 4096×4096) are allowed")


def video_upload(info, path) -> None:
    """Refuse a clip beyond the size, frame and duration caps from its header."""
    name = Path(path).name
    if info.width * info.height > VIDEO_MAX_PIXELS:
        raise ValueError(f"the clip {name} is {info.width}×{info.height} pixels; at most 1280×768 "
                         f"({VIDEO_MAX_PIXELS} pixels per frame) are allowed")
    if info.num_frames > VIDEO_MAX_FRAMES:
        raise ValueError(f"the clip {name} has {info.num_frames} frames; at most {VIDEO_MAX_FRAMES} are allowed")
    if info.duration > VIDEO_MAX_SECONDS:
        raise ValueError(f"the clip {name} lasts {info.duration:.1f} s; at most {VIDEO_MAX_SECONDS:g} s are allowed")


def _kind(value) -> str:
    return "nothing" if value is None else type(value).__name__ if not isinstance(value, str) else repr(value[:40])


def shown(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:39] + "…"
