"""This session's outputs, newest first, and the control values to reuse from any output's embedded settings."""
from model_core.media_files import read_metadata
from model_core.option_names import compile_name

from ..options.catalog import choice_for
from ..options.settings import STAGE_COUNT

MODE_LABELS = {
    "text_to_video": "Text → Video",
    "image_to_video": "Image → Video",
    "extend_video": "Extend a video",
    "text_to_image": "Text → Image",
}
CAPTION_PROMPT_CHARS = 60
NO_LORA = "none"  # the LoRA picker's value for no LoRA


def add(history: list, path, settings: dict) -> list:
    """A new history (states are not mutated in place) with `path` first."""
    return [{"path": str(path), "settings": settings}, *history]


def gallery_items(history: list) -> list:
    return [(entry["path"], caption(entry["settings"])) for entry in history]


def caption(settings: dict, prompt_chars: int = CAPTION_PROMPT_CHARS) -> str:
    """'Text → Video · 17 frames · seed 5 — a red ball': what an output is, its prompt cut to `prompt_chars`."""
    prompt = settings.get("prompt") or ""
    if len(prompt) > prompt_chars:
        prompt = prompt[: prompt_chars - 1] + "…"
    label = f"{MODE_LABELS.get(settings.get('mode'), 'output')} · {details(settings)}"
    return f"{label} — {prompt}" if prompt else label


def details(settings: dict) -> str:
    """'17 frames · seed 5' (· stopped): an output's length, seed and whether it was stopped."""
    frames = settings.get("num_frames")
    parts = [f"{frames} frames"] if frames and frames > 1 else []
    parts.append(f"seed {settings.get('seed')}")
    if settings.get("interrupted"):
        parts.append("stopped")
    return " · ".join(parts)


def saved_settings(path) -> dict:
    """The settings embedded in a studio or CLI output (mp4/png, else its JSON sidecar)."""
    settings = read_metadata(path)
    if settings.get("mode") not in MODE_LABELS:
        raise ValueError(f"{path} holds settings, but not from a Pyramid Flow generation (no known 'mode')")
    return settings


def control_values(settings: dict) -> dict:
    """Settings keyed by the studio's control names; only what the output recorded."""
    values = {
        "prompt": settings.get("prompt"),
        "negative_prompt": settings.get("negative_prompt"),
        "model": choice_for(settings.get("model")),
        "variant": settings.get("variant"),
        "num_frames": settings.get("num_frames"),
        "seed": None if settings.get("seed") is None else str(settings["seed"]),
        "offload": settings.get("offload"),
        "quantize": settings.get("quantize"),
        "dtype": settings.get("dtype"),
        "vae_tiling": settings.get("vae_tiling"),
        "storyboard": storyboard_rows(settings.get("storyboard")),
        "attention_backend": settings.get("attention_backend"),
        "compile": recorded_compile(settings.get("compile")),
        "cache": settings.get("cache"),
        "cache_threshold": settings.get("cache_threshold"),
        **sampling_controls(settings),
        **lora_controls(settings.get("lora")),
    }
    return {name: value for name, value in values.items() if value is not None}


def recorded_compile(level):
    """The Speed panel's name of a recorded compile level; None (the control left as it is) when not one."""
    try:
        return compile_name(level)
    except ValueError:
        return None


def storyboard_rows(storyboard) -> list:
    """A recorded storyboard as the studio's segment table rows [seconds, prompt]; None without one."""
    if not storyboard:
        return None
    return [[segment["seconds"], segment["prompt"]] for segment in storyboard["segments"]]


def lora_controls(loras) -> dict:
    """The LoRA picker's values for an output's recorded LoRAs (the studio picks one; none when it had none)."""
    if loras is None or len(loras) > 1:
        return {}
    return {"lora": loras[0]["name"], "lora_weight": loras[0]["weight"]} if loras else {"lora": NO_LORA}


def sampling_controls(settings: dict) -> dict:
    """Guidance and steps per stage keyed by the sampling panel's control names (guidance first)."""
    values = {name: settings.get(name) for name in ("guidance_scale", "video_guidance_scale")}
    for name in ("first_frame_steps", "video_steps"):
        steps = settings.get(name) or ()
        if len(steps) == STAGE_COUNT:
            values.update({step_control(name, stage): count for stage, count in enumerate(steps)})
    return values


def step_control(name: str, stage: int) -> str:
    """'first_frame_steps', 0 -> 'first_frame_steps_stage_1': one slider per pyramid stage."""
    return f"{name}_stage_{stage + 1}"
