"""Attention kernel calls and dispatched ops per transformer step: one call per causal group vs the CUDA plan.

    python -m benchmarks.attention_calls [--repeats 5] [--baseline CHECKOUT] [--out FILE]

A guided step (batch 2, one row's text padded to 5 of 128 tokens) of the last unit of a 5-s clip (unit 15, stage 2,
15 history frames) with the published miniFLUX depth (8 dual- + 16 single-stream blocks) at reduced width (4 heads
of 32: the counts do not depend on the width), on the 384p and 768p latent grids. Rows:

- `per group`: this checkout as it runs on the CPU (one attention call per causal group, masks made once per forward);
- `CUDA plan`: this checkout with the calls a CUDA device plans for the published width (model_core/transformers/
  attention_plan.py: ACCELERATOR_CALL_OVERHEAD_MACS, batch x heads x head_dim = 2 x 30 x 64), run here on the CPU;
- `baseline` (with --baseline): the same step with another checkout's model_core, in a subprocess.

Per row: attention (SDPA) calls and all dispatched aten ops (torch.profiler, nested ops included), CPU seconds per
step (384p only; 768p is counted from one step), and the largest difference to the per-group output. A GPU spends
~6 us of host time per op whatever its arithmetic (the H200 baseline: ~27 k ops in 170 ms per guided 384p step), so
the op count is what this CPU can measure of a GPU's host-bound step; GPU seconds are the GPU suite's to measure.
Also, from the plans alone: attention calls of the whole 5-s clip (16 units, [20,20,20] then [10,10,10] steps).
"""
import argparse
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
GRIDS = {"384p": (48, 80), "768p": (96, 160)}
UNIT, STAGE, TEXT_TOKENS = 15, 2, 128
PUBLISHED_BATCH_HEADS_DIM = 2 * 30 * 64


def reduced_published_depth():
    from model_core.transformers import PyramidFluxTransformer

    torch.manual_seed(0)
    return PyramidFluxTransformer(in_channels=64, num_layers=8, num_single_layers=16, attention_head_dim=32,
                                  num_attention_heads=4, joint_attention_dim=64, pooled_projection_dim=32,
                                  axes_dims_rope=(8, 12, 12)).eval()


def late_unit_step(grid):
    """Inputs of a guided step of unit UNIT at stage STAGE: its history clips at their pyramid levels, then the unit."""
    from model_core.temporal import history_layout

    height, width = grid
    generator = torch.Generator().manual_seed(0)
    clips = [torch.randn(2, 16, clip.length, height >> (STAGE - clip.level), width >> (STAGE - clip.level),
                         generator=generator) for clip in history_layout(UNIT, STAGE)]
    clips.append(torch.randn(2, 16, 1, height, width, generator=generator))
    mask = torch.ones(2, TEXT_TOKENS, dtype=torch.long)
    mask[1, 5:] = 0
    return dict(sample=[clips], encoder_hidden_states=torch.randn(2, TEXT_TOKENS, 64, generator=generator),
                encoder_attention_mask=mask, pooled_projections=torch.randn(2, 32, generator=generator),
                timestep=torch.full((2,), 500.0))


def cuda_overhead_pairs() -> float:
    """A call's overhead in query-key pairs as a CUDA device plans the published width."""
    from model_core.transformers.attention_plan import ACCELERATOR_CALL_OVERHEAD_MACS, call_overhead_pairs

    return call_overhead_pairs(ACCELERATOR_CALL_OVERHEAD_MACS, PUBLISHED_BATCH_HEADS_DIM)


def use_cuda_plan():
    """Plan this process's calls as a CUDA device does for the published width."""
    from model_core.transformers import attention_plan

    pairs = cuda_overhead_pairs()
    attention_plan.call_overhead_pairs = lambda macs, batch_heads_dim: pairs


def measure(size: str, repeats: int, output_path: str) -> dict:
    """Counts (and for 384p, seconds) of one step; its output is saved to `output_path`."""
    import statistics
    import time

    from torch.profiler import profile

    model, inputs = reduced_published_depth(), late_unit_step(GRIDS[size])
    with torch.no_grad():
        step = lambda: model(**inputs).sample[0]  # noqa: E731
        output = step()
        with profile() as profiled:
            step()
        times = []
        for _ in range(repeats if size == "384p" else 0):
            started = time.perf_counter()
            step()
            times.append(time.perf_counter() - started)
    seconds = statistics.median(times) if times else None
    events = profiled.key_averages()
    torch.save(output, output_path)
    return {"attention_calls": sum(e.count for e in events if e.key == "aten::scaled_dot_product_attention"),
            "aten_ops": sum(e.count for e in events if e.key.startswith("aten::")),
            "seconds": seconds}


def run_row(row: str, size: str, repeats: int, output_path: str, baseline: str = None) -> dict:
    """One row in its own process: this file's `measure` over this checkout's model_core or `baseline`'s."""
    code = "; ".join([
        f"import sys, json, importlib.util; sys.path[:0] = [{baseline or str(ROOT)!r}]",
        f"spec = importlib.util.spec_from_file_location('attention_calls', {__file__!r})",
        "a = importlib.util.module_from_spec(spec); spec.loader.exec_module(a)",
        "a.use_cuda_plan()" if row == "CUDA plan" else "pass",
        f"print(json.dumps(a.measure({size!r}, {repeats}, {output_path!r})))",
    ])
    from benchmarks.report import child_figures  # not at the top: row processes load this file over other checkouts

    return child_figures([sys.executable, "-c", code], cwd=baseline or ROOT)


def clip_attention_calls(size: str) -> dict:
    """Attention calls of a whole 5-s clip (16 units), per group vs the CUDA plan, from the plans alone."""
    from model_core.temporal import history_layout, tokens_per_frame
    from model_core.transformers.attention import causal_group_ends
    from model_core.transformers.attention_plan import merge_groups

    latent_h, latent_w = (8 * side // 8 for side in GRIDS[size])
    layers, overhead = 24, cuda_overhead_pairs()
    per_group = planned = 0
    for unit in range(16):
        steps = 20 if unit == 0 else 10
        for stage in range(3):
            frames = [tokens_per_frame(latent_h, latent_w, clip.level) for clip in history_layout(unit, stage)
                      for _ in range(clip.length)]
            ends = causal_group_ends(TEXT_TOKENS, [*frames, tokens_per_frame(latent_h, latent_w, stage)])
            per_group += steps * layers * len(ends)
            planned += steps * layers * len(merge_groups(ends, 2, overhead))
    return {"per_group": per_group, "cuda_plan": planned}


def main(argv=None):
    from benchmarks.report import report

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--baseline", help="a checkout (e.g. the previous release) to measure side by side")
    parser.add_argument("--out", help="write the figures as JSON here")
    args = parser.parse_args(argv)
    rows = ["per group", "CUDA plan"] + (["baseline"] if args.baseline else [])
    figures = {"clip_attention_calls": {size: clip_attention_calls(size) for size in GRIDS}, "steps": {}}
    with tempfile.TemporaryDirectory() as scratch:
        for size in GRIDS:
            results = {}
            for row in rows:
                path = str(Path(scratch) / f"{size}-{row.replace(' ', '_')}.pt")
                results[row] = run_row(row, size, args.repeats, path, args.baseline if row == "baseline" else None)
                results[row]["output"] = path
            reference = torch.load(results["per group"]["output"], weights_only=True)
            for row, result in results.items():
                output = torch.load(result.pop("output"), weights_only=True)
                result["max_difference"] = float((output - reference).abs().max())
                result["bit_equal"] = bool(torch.equal(output, reference))
            figures["steps"][size] = results
    report(figures, args.out)


if __name__ == "__main__":
    main()
