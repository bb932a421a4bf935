"""The bundled model's 17-frame text-to-video, this checkout vs another (e.g. the previous release), side by side.

    python -m benchmarks.cpu_generation --baseline CHECKOUT [--rounds 3] [--repeats 3] [--out FILE]

Each round runs both checkouts one after the other, each in its own process (its own model_core, the same bundled
model folder, prompt and seed, the model's sampling defaults, latents only: no VAE decode, which neither side
changed), timing `--repeats` generations after one untimed warm-up. The figure is the median over rounds of each
side's median, their ratio, and the largest difference between the two sides' latents.
"""
import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import torch

from benchmarks.report import child_figures, report

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "assets" / "models" / "pyramid-flow-shapes"
PROMPT, SEED = "a red circle moving left", 3

WORKER = """
import json, statistics, sys, time
import torch
from model_core.pipeline import PyramidFlowPipeline
model, prompt, seed, repeats, out = sys.argv[1:6]
pipe = PyramidFlowPipeline.from_pretrained(model)
run = lambda: pipe.text_to_video(prompt, seed=int(seed), num_frames=17, output_type="latent").latents
latents = run()
times = []
for _ in range(int(repeats)):
    started = time.perf_counter()
    run()
    times.append(time.perf_counter() - started)
torch.save(latents, out)
print(json.dumps(statistics.median(times)))
"""


def one_side(checkout: Path, repeats: int, out: Path) -> float:
    return child_figures([sys.executable, "-c", WORKER, MODEL, PROMPT, SEED, repeats, out], cwd=checkout)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", required=True, type=Path, help="the checkout to compare with")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", help="write the figures as JSON here")
    args = parser.parse_args(argv)
    seconds = {"baseline": [], "this": []}
    with tempfile.TemporaryDirectory() as scratch:
        outputs = {side: Path(scratch) / f"{side}.pt" for side in seconds}
        for _ in range(args.rounds):
            for side, checkout in (("baseline", args.baseline.resolve()), ("this", ROOT)):
                seconds[side].append(one_side(checkout, args.repeats, outputs[side]))
        baseline, this = (torch.load(outputs[side], weights_only=True) for side in ("baseline", "this"))
    figures = {"model": str(MODEL.relative_to(ROOT)), "prompt": PROMPT, "seed": SEED, "rounds": args.rounds,
               "repeats": args.repeats, "baseline": str(args.baseline),
               "baseline_s": statistics.median(seconds["baseline"]), "this_s": statistics.median(seconds["this"]),
               "per_round_s": seconds, "max_latent_difference": float((this - baseline).abs().max())}
    figures["time_ratio"] = figures["this_s"] / figures["baseline_s"]
    report(figures, args.out)


if __name__ == "__main__":
    main()
