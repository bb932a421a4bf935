"""Step cache sweep on the bundled model: speed-up of a 17-frame text-to-video and adherence, cached vs uncached.

    python -m benchmarks.cache_sweep [--model assets/models/pyramid-flow-shapes] [--count 28]
        [--modes first-block,taylorseer] [--thresholds 0.05,0.1,0.2,0.3] [--out benchmarks/cache_sweep.json]

For each held-out (prompt, seed) pair of the shapes world, every setting (cache none, then each cache mode at each
threshold) generates the same 17-frame clip one after the other, so each speed-up is a ratio of times taken
minutes apart on the same busy machine; the figure is the median over pairs of (uncached seconds / cached
seconds). Adherence: the share of clips whose colour, shape and direction the project's detector reads as the
prompt's (training.evaluate_shapes.score), and the share of steps the cache skipped.
"""
import argparse
import json
import statistics
import time

import numpy as np

from model_core.pipeline import PyramidFlowPipeline
from model_core.step_cache import step_cache_state
from training.atomic import write_text
from training.evaluate_shapes import TEXT_TO_VIDEO_FIGURES
from training.shapes_detector import read_clip
from training.shapes_world import HELDOUT_STREAM, NUM_FRAMES, parse_prompt, world_pairs


def settings_to_compare(modes, thresholds) -> list:
    return [("none", 0.0)] + [(mode, threshold) for mode in modes for threshold in thresholds]


def sweep(pipe, pairs, modes, thresholds) -> dict:
    settings = settings_to_compare(modes, thresholds)
    seconds = {setting: [] for setting in settings}
    hits = {setting: np.zeros(3) for setting in settings}
    skipped = {setting: [] for setting in settings}
    for prompt, seed in pairs:
        for cache, threshold in settings:
            started = time.perf_counter()
            frames = pipe.text_to_video(prompt, seed=seed, num_frames=NUM_FRAMES, cache=cache, cache_threshold=threshold).frames[0]
            seconds[(cache, threshold)].append(time.perf_counter() - started)
            reading = read_clip(frames)
            hits[(cache, threshold)] += [a == b for a, b in zip((reading.color, reading.shape, reading.direction),
                                                                parse_prompt(prompt))]
            state = step_cache_state(pipe.transformer)
            if state is not None:
                skipped[(cache, threshold)].append(state.skipped_steps / (state.skipped_steps + state.computed_steps))
    baseline = seconds[settings[0]]
    rows = []
    for setting in settings:
        ratios = [b / s for b, s in zip(baseline, seconds[setting])]
        rows.append({
            "cache": setting[0], "cache_threshold": setting[1],
            "median_seconds": statistics.median(seconds[setting]),
            "speedup_vs_uncached": statistics.median(ratios),
            "skipped_step_share": statistics.mean(skipped[setting]) if skipped[setting] else 0.0,
            **dict(zip(TEXT_TO_VIDEO_FIGURES, (hits[setting] / len(pairs)).tolist())),
        })
    return {"pairs": len(pairs), "rows": rows}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="assets/models/pyramid-flow-shapes")
    parser.add_argument("--count", type=int, default=28, help="held-out pairs (the first N of the 84)")
    parser.add_argument("--modes", default="first-block", help="cache modes to sweep, comma-separated")
    parser.add_argument("--thresholds", default="0.05,0.1,0.2,0.3")
    parser.add_argument("--out", help="write the figures here as JSON")
    args = parser.parse_args(argv)
    pipe = PyramidFlowPipeline.from_pretrained(args.model)
    pairs = world_pairs(0, HELDOUT_STREAM, args.count)
    modes, thresholds = args.modes.split(","), [float(t) for t in args.thresholds.split(",")]
    figures = {"model": args.model, **sweep(pipe, pairs, modes, thresholds)}
    print(json.dumps(figures, indent=2))
    if args.out:
        write_text(args.out, json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
