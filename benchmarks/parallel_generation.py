"""The same generation on one process and split over two CPU processes (gloo): guidance and context parallel.

    python -m benchmarks.parallel_generation [--model DIR] [--repeats 3]

One process with two threads and two processes with one thread each use the same two cores, so the
ratio shows what the split costs or saves on a CPU; each layout's latents are checked against one process.
"""
import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from model_core import PyramidFlowPipeline
from pyramid_app.options.settings import BUNDLED_MODEL

LAYOUTS = ({"guidance": 2, "context": 1}, {"guidance": 1, "context": 2})
SETTINGS = dict(prompt="a red square moving right", num_frames=9, seed=0, output_type="latent")


def _timed(pipe, repeats: int) -> tuple:
    """(median seconds of one generation after a warm-up, its latents)."""
    pipe(**SETTINGS)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        latents = pipe(**SETTINGS).latents
        times.append(time.perf_counter() - started)
    return statistics.median(times), latents


def _rank(rank, rendezvous, model, repeats, out):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=2,
                            timeout=timedelta(minutes=5))
    try:
        results = {}
        for layout in LAYOUTS:
            pipe = PyramidFlowPipeline.from_pretrained(model, parallel=layout)
            results[f"{layout['guidance']}x{layout['context']}"] = _timed(pipe, repeats)
        if rank == 0:
            torch.save(results, out)
    finally:
        dist.destroy_process_group()


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=BUNDLED_MODEL)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    report = {"model": str(args.model), "settings": {k: v for k, v in SETTINGS.items() if k != "output_type"}}
    for threads in (1, 2):
        torch.set_num_threads(threads)
        seconds, single = _timed(PyramidFlowPipeline.from_pretrained(args.model), args.repeats)
        report[f"one process, {threads} thread(s) s"] = round(seconds, 3)
        print(f"one process, {threads} thread(s): {seconds:.2f} s", file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory() as folder:
        out = os.path.join(folder, "ranks.pt")
        mp.start_processes(_rank, args=(os.path.join(folder, "rendezvous"), args.model, args.repeats, out),
                           nprocs=2, start_method="spawn")
        ranks = torch.load(out, weights_only=True)
    for name, (seconds, latents) in ranks.items():
        report[f"two processes {name}, 1 thread each s"] = round(seconds, 3)
        report[f"two processes {name} / one process 2 threads"] = round(seconds / report["one process, 2 thread(s) s"], 2)
        report[f"two processes {name} max latent difference"] = float((latents - single).abs().max())
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
