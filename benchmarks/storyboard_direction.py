"""Does a storyboard change what happens mid-clip? The bundled model, storyboards that reverse the direction.

For each colour/shape pair, each reversal (right -> left, left -> right, up -> down, down -> up) and each seed, the bundled
model makes "a {c} {s} moving {old}" for 1 s, then "a {c} {s} moving {new}" for 1 s (17 frames: units 0-1, then 2).
The detector of training.evaluate_shapes reads the direction of the later frames (the last frame of the first
segment to the end: frames 8-16). Two references with the same seeds: the old prompt alone for 2 s (what the history
alone does) and the new prompt alone for 2 s (the later frames when the model was asked for the new way from the start).

    python benchmarks/storyboard_direction.py [--seeds 20] [--device cuda] [--out benchmarks/storyboard_direction.json]
"""
import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from model_core import PyramidFlowPipeline  # noqa: E402
from training.shapes_detector import read_clip  # noqa: E402

MODEL = Path(__file__).resolve().parents[1] / "assets" / "models" / "pyramid-flow-shapes"
PAIRS = [("red", "circle"), ("blue", "square"), ("green", "triangle"), ("yellow", "circle")]
REVERSALS = [("right", "left"), ("left", "right"), ("up", "down"), ("down", "up")]
LATER_FRAMES = slice(8, None)  # the first segment's last frame, then the second segment's 8


def later_direction(frames):
    return read_clip(frames[LATER_FRAMES]).direction


def measure(pipe, seeds: int, pairs: list, on_group=None) -> dict:
    readings = {"storyboard": [], "old_only": [], "new_only": []}
    for color, shape in pairs:
        for old, new in REVERSALS:
            before, after = f"a {color} {shape} moving {old}", f"a {color} {shape} moving {new}"
            for seed in range(seeds):
                clips = {
                    "storyboard": pipe.text_to_video([(1, before), (1, after)], seed=seed).frames[0],
                    "old_only": pipe.text_to_video(before, duration=2, seed=seed).frames[0],
                    "new_only": pipe.text_to_video(after, duration=2, seed=seed).frames[0],
                }
                for kind, frames in clips.items():
                    readings[kind].append((later_direction(frames), old, new))
            if on_group is not None:
                on_group(figures_of(readings))
    return figures_of(readings)


def figures_of(readings: dict) -> dict:
    figures = {}
    for kind, read in readings.items():
        count = len(read)
        figures[kind] = {
            "clips": count,
            "later_frames_move_new_way": sum(r == new for r, _, new in read) / count,
            "later_frames_move_old_way": sum(r == old for r, old, _ in read) / count,
            "later_frames_no_clear_motion": sum(r is None for r, _, _ in read) / count,
        }
    return figures


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument("--pairs", type=int, default=len(PAIRS), help="use the first N colour/shape pairs")
    parser.add_argument("--device", default=None)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    pipe = PyramidFlowPipeline.from_pretrained(MODEL, device=args.device)
    started = time.perf_counter()

    def report(figures):
        figures["setup"] = {"seeds": args.seeds, "pairs": PAIRS[: args.pairs], "reversals": REVERSALS, "torch": torch.__version__,
                            "device": str(pipe._execution_device), "seconds": round(time.perf_counter() - started, 1),
                            "sampling": "the model's defaults (10,10,10 steps, guidance 4)"}
        text = json.dumps(figures, indent=1)
        print(text, flush=True)
        if args.out:
            args.out.write_text(text + "\n")

    measure(pipe, args.seeds, PAIRS[: args.pairs], on_group=report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
