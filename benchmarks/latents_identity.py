"""Are this checkout's latents bit-identical to another checkout's (e.g. the previous release) for every mode?

    python -m benchmarks.latents_identity --baseline CHECKOUT [--out FILE]

Each side runs in its own process with its own model_core: the bundled model, the same prompts, seeds and input
frames, two steps per pyramid stage (five with a step cache, so that it skips), latents only. Cases: text-to-video,
image-to-video, extension, storyboard, and text-to-video under each step cache. A case is identical when the two
sides' latents have the same shape and the same bytes (sha256); the report lists both hashes and the largest
difference where they differ.
"""
import argparse
import sys
import tempfile
from pathlib import Path

import torch

from benchmarks.report import child_figures, report

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "assets" / "models" / "pyramid-flow-shapes"

WORKER = """
import hashlib, json, sys
import numpy as np, torch
from model_core.pipeline import PyramidFlowPipeline
model, out = sys.argv[1:3]
pipe = PyramidFlowPipeline.from_pretrained(model)
pipe.set_progress_bar_config(disable=True)
steps = dict(first_frame_steps=(2, 2, 2), video_steps=(2, 2, 2), output_type="latent")
frames = np.random.default_rng(0).integers(0, 256, (9, 64, 64, 3), dtype=np.uint8)
cases = {
    "text_to_video": lambda: pipe.text_to_video("a red circle moving left", seed=3, num_frames=17, **steps),
    "image_to_video": lambda: pipe.image_to_video(frames[0], "a blue square moving up", seed=4, num_frames=17, **steps),
    "extend_video": lambda: pipe.extend_video(frames, "a green circle moving right", seed=5, num_frames=8, **steps),
    "storyboard": lambda: pipe.text_to_video([(1, "a red circle moving right"), (1, "a red circle moving left")],
                                             seed=6, **steps),
}
cached = dict(steps, first_frame_steps=(5, 5, 5), video_steps=(5, 5, 5), cache_threshold=0.5)  # room to skip
for cache in ("first-block", "taylorseer", "mag"):
    cases[f"cache {cache}"] = (lambda cache=cache: pipe.text_to_video("a yellow square moving down", seed=7,
                                                                      num_frames=25, cache=cache, **cached))
latents = {name: run().latents.contiguous() for name, run in cases.items()}
torch.save(latents, out)
print(json.dumps({name: hashlib.sha256(x.numpy().tobytes()).hexdigest() for name, x in latents.items()}))
"""


def one_side(checkout: Path, out: Path) -> dict:
    return child_figures([sys.executable, "-c", WORKER, MODEL, out], cwd=checkout)


def compare(baseline: dict, this: dict, hashes: tuple) -> dict:
    """Per case: identical or not, both sha256s, and the largest absolute difference when the shapes agree."""
    rows = {}
    for name in baseline:
        a, b = baseline[name], this[name]
        same_shape = a.shape == b.shape
        rows[name] = {"identical": hashes[0][name] == hashes[1][name], "baseline_sha256": hashes[0][name],
                      "this_sha256": hashes[1][name], "shape": list(b.shape),
                      "max_abs_difference": float((a - b).abs().max()) if same_shape and a.numel() else None}
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", required=True, type=Path, help="the checkout to compare with")
    parser.add_argument("--out", help="write the figures as JSON here")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch:
        outputs = {side: Path(scratch) / f"{side}.pt" for side in ("baseline", "this")}
        hashes = (one_side(args.baseline.resolve(), outputs["baseline"]), one_side(ROOT, outputs["this"]))
        baseline, this = (torch.load(outputs[side], weights_only=True) for side in ("baseline", "this"))
    rows = compare(baseline, this, hashes)
    figures = {"model": str(MODEL.relative_to(ROOT)), "baseline": str(args.baseline), "cases": rows,
               "all_identical": all(row["identical"] for row in rows.values())}
    report(figures, args.out)
    for name, row in rows.items():
        print(f"{name:24s} {'identical' if row['identical'] else 'DIFFERENT'}  {row['this_sha256'][:16]}", file=sys.stderr)
    return 0 if figures["all_identical"] else 1


if __name__ == "__main__":
    sys.exit(main())
