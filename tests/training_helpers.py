"""Tiny synthetic training worlds for the training tests: a tiny official-layout checkpoint, short mp4
clips and PNG images of moving squares, and recipe overrides that make every recipe run on a CPU."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from tests.tiny_checkpoint import build_tiny_checkpoint
from training.config import CONFIG_DIR

ROOT = Path(__file__).resolve().parents[1]
FLOW_RECIPE = str(CONFIG_DIR / "tiny_shapes_flow.yaml")
WEIGHTS = Path("diffusion_transformer_384p") / "diffusion_pytorch_model.safetensors"  # a checkpoint's transformer

COLOURS = [(230, 40, 40), (40, 200, 60), (50, 80, 230), (240, 220, 30)]
CAPTIONS = ["a red square moving right", "a green square", "a blue square moving down", "a yellow square"]


def square_frames(num_frames: int, colour, size: int = 64) -> np.ndarray:
    frames = np.full((num_frames, size, size, 3), 16, np.uint8)
    for t in range(num_frames):
        x = 4 + 2 * t % (size - 20)
        frames[t, 20:36, x : x + 16] = colour
    return frames


def write_synthetic_world(root: Path, videos: int = 4, images: int = 4, corrupt: int = 0) -> Path:
    """mp4 clips (17 frames, 8 fps, 64x64), PNG images and optionally damaged files; returns the jsonl."""
    from model_core.media_files import write_video

    root.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(videos):
        path = root / f"clip{i}.mp4"
        write_video(square_frames(17, COLOURS[i % 4]), path, 8, {})
        lines.append({"video": path.name, "text": CAPTIONS[i % 4], "height": 64, "width": 64})
    for i in range(images):
        path = root / f"image{i}.png"
        Image.fromarray(square_frames(1, COLOURS[(i + 1) % 4])[0]).save(path)
        lines.append({"image": path.name, "text": CAPTIONS[(i + 1) % 4], "height": 64, "width": 64})
    for i in range(corrupt):
        path = root / f"broken{i}.mp4"
        path.write_bytes(b"\x00not a video" * 10)
        lines.append({"video": path.name, "text": "broken"})
    annotations = root / "train.jsonl"
    annotations.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    return annotations


def tiny_world(root: Path, family: str = "miniflux", **world) -> tuple:
    """(checkpoint root, annotations jsonl) under `root`."""
    checkpoint = build_tiny_checkpoint(root / "model", family=family)
    return checkpoint, write_synthetic_world(root / "data", **world)


def tiny_overrides(checkpoint: Path, annotations: Path, output: Path, global_batch: int = 4, accumulation: int = 1,
                   empty_text_fea=None) -> list:
    """Recipe overrides that shrink any flow recipe to the tiny checkpoint, 64x64 clips and a CPU."""
    return [
        f"model.pretrained={checkpoint}", "model.variant=auto", "model.family=auto", "model.save_variant=null",
        "model.frozen_dtype=float32", f"data.annotations=[{annotations}]", f"data.empty_text_fea={empty_text_fea or 'null'}",
        "data.fps=8", "data.buckets=[[64, 64]]", "data.clip_schedule=[{seconds: 2}]", "data.num_workers=0",
        f"train.global_batch_size={global_batch}", f"train.gradient_accumulation_steps={accumulation}",
        "train.tokens_per_gpu=null",  # the accumulation given here, not derived from a published token budget
        "train.mixed_precision=no", f"train.output_dir={output}", "train.checkpoint_every=2", "train.log_every=1",
        "validation.every_steps=null",
    ]


def precompute_features(checkpoint: Path, annotations: Path, out: Path) -> tuple:
    """Run both extraction tools; returns (annotations with latent + text_fea, empty-prompt features)."""
    from training import extract_latents, extract_text_features

    assert extract_latents.main(["--model", str(checkpoint), "--annotations", str(annotations), "--output-dir",
                                 str(out / "latents"), "--fps", "8", "--seconds", "2", "--buckets", "64x64"]) == 0
    assert extract_text_features.main(["--model", str(checkpoint), "--annotations",
                                       str(out / "latents" / "annotations.jsonl"), "--output-dir", str(out / "text")]) == 0
    return out / "text" / "annotations.jsonl", out / "text" / extract_text_features.EMPTY_TEXT_FILE


def launch_on_two_processes(arguments: list, fsdp: bool = True) -> subprocess.CompletedProcess:
    """`python -m training.launch ARGUMENTS` under torchrun on 2 gloo CPU processes (FSDP2 when `fsdp`), one thread
    each; the test fails with the end of stderr unless it exits 0."""
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "ACCELERATE_USE_FSDP": str(fsdp).lower(), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
               "-m", "training.launch", *map(str, arguments)]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result
