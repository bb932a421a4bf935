"""Batch planning cost per step per rank: the stage-2 recipe's global batch (1536 here, Table 4's stage 1) drawn
from a 10 M-line annotation file, as each rank of a `world`-process run plans it.

    python -m benchmarks.plan_cost [--entries 10000000] [--global-batch 1536] [--world 8] [--steps 20] [--work DIR]

The file (synthetic lines: 7 in 8 videos, 1 in 8 images, 384x640 sources, as stage 2 mixes them) is written once
under --work and indexed once (`training.annotation_index`); then `BatchPlanner.rank_bins(step, rank, world)`, what
`RankBatches` runs on every rank each step, is timed in CPU seconds over --steps steps (median over steps, rank 0;
the ranks do the same work). `plan_cpu_s_per_step` (`measure_plan_cost` at 2 processes) is what
`benchmarks.training_scale` reports.
"""
import argparse
import json
import statistics
import sys
import time
from pathlib import Path

RECIPE = "training/configs/stage2_video_lowres.yaml"
FRAMES_PER_LATENT = 8
BLOCK_LINES = 100_000


def synthetic_line(row: int) -> bytes:
    kind = "image" if row % 8 == 0 else "video"
    suffix = "png" if kind == "image" else "mp4"
    record = {kind: f"media/{row:08d}.{suffix}", "text": f"caption of sample {row}", "height": 384, "width": 640}
    return json.dumps(record).encode() + b"\n"


def annotation_file(work: Path, entries: int) -> Path:
    """`entries` synthetic lines under `work` (written once, in blocks, renamed into place)."""
    path = work / f"plan_{entries}.jsonl"
    if path.is_file():
        return path
    work.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".tmp")
    with temporary.open("wb") as handle:
        for start in range(0, entries, BLOCK_LINES):
            handle.write(b"".join(synthetic_line(row) for row in range(start, min(entries, start + BLOCK_LINES))))
    temporary.replace(path)
    return path


def measure_plan_cost(entries: int = 10_000_000, global_batch: int = 1536, world: int = 8, steps: int = 20,
                      work="outputs/plan_cost", rank: int = 0) -> float:
    """Median CPU seconds per step that rank `rank` of `world` spends planning its bins of a `global_batch` batch
    drawn from an `entries`-line annotation file (built and indexed once under `work`; the index opened first)."""
    from training.annotation_index import AnnotationIndex
    from training.config import load_config
    from training.packing import BatchPlanner

    config = load_config(RECIPE)
    index = AnnotationIndex([annotation_file(Path(work), entries)])
    planner = BatchPlanner(index, config["data"], config["objective"], 0, global_batch, world, FRAMES_PER_LATENT)
    seconds = []
    for step in range(steps):
        started = time.process_time()
        planner.rank_bins(step, rank, world)
        seconds.append(time.process_time() - started)
    return statistics.median(seconds)


def plan_cpu_s_per_step(world: int = 2) -> float:
    """The issue's figure, as `benchmarks.training_scale` reports it beside its 2-process ones: 10 M lines, batch
    1536, `world` processes (the file and its index are made under outputs/plan_cost the first time)."""
    return measure_plan_cost(world=world)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.plan_cost", description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=10_000_000)
    parser.add_argument("--global-batch", type=int, default=1536)
    parser.add_argument("--world", type=int, nargs="+", default=[8])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--work", default="outputs/plan_cost")
    args = parser.parse_args(argv)
    for world in args.world:
        cost = measure_plan_cost(args.entries, args.global_batch, world, args.steps, args.work)
        print(json.dumps({"entries": args.entries, "global_batch": args.global_batch, "world": world,
                          "plan_cpu_s_per_step": round(cost, 5)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
