"""The shipped model in assets/: official layout within 50 MB, a model card with measured figures, the
default of the CLI, and videos that show what the prompt asks for."""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from model_core.media_files import read_video
from pyramid_app.options import settings
from training.config import CONFIG_DIR, load_config
from training.shapes_detector import read_clip
from training.shapes_world import parse_prompt

MODEL = settings.BUNDLED_MODEL
TURBO = settings.BUNDLED_MODELS[settings.BUNDLED_TURBO]
MAX_BYTES = 50 * 2**20


def test_bundled_model_is_a_small_official_layout_checkpoint():
    names = {p.name for p in MODEL.iterdir()}
    assert {"causal_video_vae", "diffusion_transformer_64p", "text_encoder", "tokenizer", "text_encoder_2",
            "tokenizer_2", "pyramid_flow.json", "README.md"} <= names
    assert sum(p.stat().st_size for p in MODEL.rglob("*") if p.is_file()) <= MAX_BYTES
    assert not any(p.suffix in (".bin", ".pt", ".pth", ".ckpt") for p in MODEL.rglob("*"))
    spec = json.loads((MODEL / "pyramid_flow.json").read_text())["variants"]["64p"]
    assert spec == {"height": 64, "width": 64, "max_latent_frames": 3, "fps": 8}


def test_model_card_states_recipe_time_and_figures():
    card = (MODEL / "README.md").read_text()
    for needed in ("python -m training.launch --config training/configs/tiny_shapes.yaml",
                   "python -m training.evaluate_shapes", "colour", "direction", "measured"):
        assert needed in card, needed


def test_the_turbo_is_a_small_official_layout_checkpoint_with_its_few_step_schedule():
    """The few-step distillation (issue 33): same layout, its transformer in bfloat16, its schedule and grid in
    pyramid_flow.json, and a card with the recipe and the measured figures."""
    names = {p.name for p in TURBO.iterdir()}
    assert {"causal_video_vae", "diffusion_transformer_64p", "pyramid_flow.json", "README.md"} <= names
    assert sum(p.stat().st_size for p in TURBO.rglob("*") if p.is_file()) <= MAX_BYTES
    weights = load_file(TURBO / "diffusion_transformer_64p" / "diffusion_pytorch_model.safetensors")
    assert {tensor.dtype for tensor in weights.values()} == {torch.bfloat16}
    sampling = json.loads((TURBO / "pyramid_flow.json").read_text())["sampling"]
    recipe = load_config(CONFIG_DIR / "distill_shapes_turbo.yaml")["distill"]  # the recipe that made it
    assert (sampling["first_frame_steps"], sampling["video_steps"], sampling["stage_grid"]) == \
        (recipe["first_frame_steps"], recipe["video_steps"], "trailing")
    assert sum(sampling["first_frame_steps"]) + 2 * sum(sampling["video_steps"]) <= 18  # <= 1/10 of the teacher's 180
    assert (sampling["guidance_scale"], sampling["video_guidance_scale"]) == (1.0, 1.0)
    card = (TURBO / "README.md").read_text()
    for needed in ("python -m training.launch --config training/configs/distill_shapes_turbo.yaml",
                   "python -m benchmarks.few_step", "CPU-hours", "speed-up", "colour", "shape", "direction"):
        assert needed in card, needed


@pytest.mark.parametrize("model, prompt, seed", [(None, "a blue circle moving right", 0),
                                                 ("bundled-turbo", "a red square moving up", 3)])
def test_cli_default_model_draws_the_prompt(tmp_path, model, prompt, seed):
    """A real process loads the bundled model (no --model) or its turbo (by name) offline, and the video has the
    prompt's colour, shape and motion."""
    out = tmp_path / "clip.mp4"
    completed = subprocess.run(
        [sys.executable, "-m", "pyramid_app", "generate", "--prompt", prompt, "--seed", str(seed), "--out", str(out),
         "--quiet", *(["--model", model] if model else [])], capture_output=True, text=True, cwd=MODEL.parents[2],
        env=os.environ | {"HF_HUB_OFFLINE": "1"})
    assert completed.returncode == 0, completed.stderr
    frames, fps = read_video(out)
    assert frames.shape == (17, 64, 64, 3) and fps == 8
    reading = read_clip(frames)
    assert (reading.color, reading.shape, reading.direction) == parse_prompt(prompt)


def test_shape_by_stage_reads_first_frames_from_each_stage_start(tmp_path):
    """The diagnostic of benchmarks/shape_by_stage on one pair of a tuning stream: the VAE's own first frame
    keeps its colour and shape, every start stage and every swapped shape word is sampled and read."""
    from benchmarks import shape_by_stage

    out = tmp_path / "figures.json"
    assert shape_by_stage.main(["--model", str(MODEL), "--stream", "2", "--count", "1", "--out", str(out)]) == 0
    figures = json.loads(out.read_text())
    rows = figures["first_frames"]
    assert set(rows) == {"round trip", "from stage 0", "from stage 1", "from stage 2"}
    assert rows["round trip"] == {"colour": 1.0, "shape": 1.0}
    assert all(set(row) == {"colour", "shape"} and all(v in (0.0, 1.0) for v in row.values()) for row in rows.values())
    assert sum(sum(reads.values()) for reads in figures["last_stage_shape_swaps"].values()) == 3


@pytest.mark.parametrize("sweep_file, cache", [("cache_sweep.json", "first-block"), ("cache_sweep.json", "taylorseer"),
                                               ("cache_sweep_mag.json", "mag")])
def test_the_measured_cache_threshold_is_the_bundled_models_default_when_a_cache_is_picked(sweep_file, cache):
    """benchmarks/cache_sweep*.json (28 held-out pairs): each cache mode at 0.3 is at least 1.5x faster with colour,
    shape and direction within 0.05 of uncached; the checkpoint stores 0.3, and the cache stays off by default."""
    from model_core.checkpoints import detect_family, with_overrides

    sweep = json.loads((MODEL.parents[2] / "benchmarks" / sweep_file).read_text())
    chosen = next(row for row in sweep["rows"] if row["cache"] == cache and row["cache_threshold"] == 0.3)
    uncached = sweep["rows"][0]
    assert uncached["cache"] == "none" and sweep["pairs"] >= 28 and chosen["speedup_vs_uncached"] >= 1.5
    assert all(chosen[name] >= uncached[name] - 0.05 for name in ("color_accuracy", "shape_accuracy", "direction_accuracy"))
    sampling = with_overrides(MODEL, detect_family(MODEL)).sampling
    assert (sampling.cache, sampling.cache_threshold) == ("none", 0.3)
