"""The tiny shapes world: one filled shape on black, moving in a straight line, captioned
`a {color} {shape} moving {direction}`. Every clip is a pure function of (prompt, seed).

`python -m training.shapes_world --out data/tiny_shapes --count N --seed S [--heldout M]` writes
mp4 clips (8 fps) with `train.jsonl` (what training/data.py reads) and `heldout.jsonl`, (prompt, seed)
pairs that no training clip uses.
"""
import argparse
import itertools
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .atomic import write_annotations

PALETTE = {
    "red": (220, 40, 40), "green": (40, 200, 60), "blue": (50, 90, 230), "yellow": (230, 210, 40),
    "magenta": (210, 50, 200), "cyan": (40, 200, 210), "white": (235, 235, 235),
}
SHAPES = ("circle", "square", "triangle")
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}  # (dx, dy) in image axes
PROMPTS = tuple(f"a {c} {s} moving {d}" for c, s, d in itertools.product(PALETTE, SHAPES, DIRECTIONS))
FPS = 8
NUM_FRAMES = 17
FRAME_SIZE = 64
SUPERSAMPLING = 4
TRAIN_STREAM, HELDOUT_STREAM = 0, 1


@dataclass(frozen=True)
class Motion:
    """Where a shape of side `size` starts (top-left, pixels) and how far it travels over the clip."""

    size: float
    start_x: float
    start_y: float
    travel: float


def parse_prompt(prompt: str) -> tuple:
    """(color, shape, direction) of a world prompt."""
    words = prompt.split()
    if (len(words) != 5 or words[0] != "a" or words[1] not in PALETTE or words[2] not in SHAPES or words[3] != "moving"
            or words[4] not in DIRECTIONS):
        raise ValueError(f"{prompt!r} is not a shapes-world prompt; they read 'a {{color}} {{shape}} moving {{direction}}'")
    return words[1], words[2], words[4]


def draw_motion(rng: np.random.Generator, direction: str, frame_size: int = FRAME_SIZE) -> Motion:
    """A random size (~1/4 of the frame), travel (1/3 to all of the room left) and start that keep the shape in view."""
    size = rng.uniform(0.22, 0.30) * frame_size
    room = frame_size - size
    travel = rng.uniform(max(frame_size / 3, 0.55 * room), room)
    dx, dy = DIRECTIONS[direction]
    along = rng.uniform(0, room - travel)
    across = rng.uniform(0, room)
    start_x = across if dx == 0 else (along if dx > 0 else room - along)
    start_y = across if dy == 0 else (along if dy > 0 else room - along)
    return Motion(size, start_x, start_y, travel)


def inside_shape(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Whether the points (u across, v down; 0..1 over the shape's box) lie inside the filled shape."""
    inside_box = (u >= 0) & (u <= 1) & (v >= 0) & (v <= 1)
    if shape == "square":
        return inside_box
    if shape == "circle":
        return (u - 0.5) ** 2 + (v - 0.5) ** 2 <= 0.25
    return inside_box & (np.abs(u - 0.5) <= v / 2)  # upright triangle: apex at the top centre, base along the bottom


def box_coverage(shape: str, top, left, height, width, frame_height: int, frame_width: int) -> np.ndarray:
    """Fraction of each pixel [..., H, W] the shape drawn in the box covers, by supersampling; the box's
    numbers may be arrays of one shape [...] (one coverage per box)."""
    top, left, height, width = (np.asarray(x, float)[..., None, None] for x in (top, left, height, width))
    v = ((np.arange(frame_height * SUPERSAMPLING) + 0.5) / SUPERSAMPLING)[:, None]
    u = ((np.arange(frame_width * SUPERSAMPLING) + 0.5) / SUPERSAMPLING)[None, :]
    inside = inside_shape(shape, (u - left) / width, (v - top) / height)
    return inside.reshape(*inside.shape[:-2], frame_height, SUPERSAMPLING, frame_width, SUPERSAMPLING).mean(axis=(-3, -1))


def shape_coverage(shape: str, left: float, top: float, size: float, frame_size: int) -> np.ndarray:
    """Fraction of each pixel [H, W] the shape covers, by supersampling."""
    return box_coverage(shape, top, left, size, size, frame_size, frame_size)


def render_clip(prompt: str, seed: int, num_frames: int = NUM_FRAMES, frame_size: int = FRAME_SIZE) -> np.ndarray:
    """uint8 [T, H, W, 3]: the clip of (prompt, seed)."""
    color, shape, direction = parse_prompt(prompt)
    motion = draw_motion(np.random.default_rng(seed), direction, frame_size)
    dx, dy = DIRECTIONS[direction]
    rgb = np.array(PALETTE[color], dtype=np.float32)
    frames = np.zeros((num_frames, frame_size, frame_size, 3), np.uint8)
    for t in range(num_frames):
        progress = motion.travel * t / max(num_frames - 1, 1)
        coverage = shape_coverage(shape, motion.start_x + dx * progress, motion.start_y + dy * progress, motion.size,
                                  frame_size)
        frames[t] = np.round(coverage[..., None] * rgb).astype(np.uint8)
    return frames


def clip_seed(world_seed: int, stream: int, index: int) -> int:
    """The seed of clip `index` of a stream (train or held-out) of a world."""
    return int(np.random.SeedSequence([world_seed, stream, index]).generate_state(1, np.uint64)[0] >> 1)


def world_pairs(world_seed: int, stream: int, count: int) -> list:
    """(prompt, seed) pairs: every prompt equally often, in a seeded order."""
    order = np.random.default_rng([world_seed, stream]).permutation(count) % len(PROMPTS)
    return [(PROMPTS[p], clip_seed(world_seed, stream, i)) for i, p in enumerate(order)]


def write_world(out, count: int, seed: int, heldout: int, num_frames: int = NUM_FRAMES) -> Path:
    """Write the clips and `train.jsonl` / `heldout.jsonl` under `out`; returns the train jsonl."""
    from model_core.media_files import write_video


    out = Path(out)
    (out / "clips").mkdir(parents=True, exist_ok=True)
    train = world_pairs(seed, TRAIN_STREAM, count)
    held = world_pairs(seed, HELDOUT_STREAM, heldout)
    if {s for _, s in train} & {s for _, s in held}:
        raise ValueError(f"world seed {seed} gives a held-out seed that a training clip also uses; pick another seed")
    records = []
    for index, (prompt, clip) in enumerate(train):
        path = out / "clips" / f"{index:06d}.mp4"
        write_video(render_clip(prompt, clip, num_frames), path, FPS, {"prompt": prompt, "seed": clip})
        records.append({"video": str(path.relative_to(out)), "text": prompt, "seed": clip,
                        "height": FRAME_SIZE, "width": FRAME_SIZE})
    write_annotations(out / "heldout.jsonl", [{"text": prompt, "seed": clip} for prompt, clip in held])
    write_annotations(out / "train.jsonl", records)  # last: its presence marks a finished world
    return out / "train.jsonl"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m training.shapes_world", description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder for clips/, train.jsonl and heldout.jsonl")
    parser.add_argument("--count", type=int, required=True, help="training clips")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--heldout", type=int, default=len(PROMPTS), help="held-out (prompt, seed) pairs")
    parser.add_argument("--frames", type=int, default=NUM_FRAMES)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    path = write_world(args.out, args.count, args.seed, args.heldout, args.frames)
    print(f"wrote {args.count} clips and {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
