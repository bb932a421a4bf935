"""Training at scale on the CPU (issue 36): packed vs one-by-one micro-batches, per-block vs one-unit FSDP2.

    python -m benchmarks.training_scale --json OUT [--rounds 4]

Every run is a pair of gloo processes (one thread each) with FSDP2 (`training.parallel.shard_model`), the published
MMDiT's depth (24 blocks) at a reduced width, random weights, and one global batch: clips and images whose columns
the training objective builds (`training.objective.build_column`: stages, temporal-pyramid history, targets), with
T5-length text (128 tokens, 8-127 of them valid, the rest padding), split over the ranks in token-balanced bins
(`training.packing.balanced_bins`). Each rank's bin is one micro-batch, packed into one sequence or run column by
column (`training.flow_task.velocity_losses`), forward and backward with activation checkpointing.

- Speed, at width 128: image tokens per second of a micro-step, packed vs column by column in the same processes,
  one FSDP unit, modes interleaved round by round and each timed by its fastest round after a warm-up -> `packed_speedup`
  in CPU seconds of the slower rank (the 2 cores are shared with other work, so wall-clock ratios swing from run to
  run; `packed_speedup_wall` is the wall-clock one). Packed rows leave each caption's padding out (varlen); the `_full_text` pair, whose captions
  fill all 128 tokens, shows what packing gains alone (`packed_speedup_full_text`). Packed with per-block units runs
  in its own pair (`packed_per_block_speedup`, against the column-by-column figure).
- Memory, at width 512 and 4 images: each rank's peak RSS over 2 AdamW steps (its state held; process start and
  model build included), per-block units vs one unit -> `per_block_rss_ratio`.
- `loss_max_abs_difference`: the largest difference between the losses of modes that see the same weights.
- `plan_cpu_s_per_step`: `benchmarks.plan_cost.plan_cpu_s_per_step`, the planning CPU seconds per step of one rank
  of 2 at a 1536 global batch over a 10 M-line annotation file (the file and its index are built once, then reused).
"""
import argparse
import json
import resource
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

from benchmarks.plan_cost import plan_cpu_s_per_step
from benchmarks.random_models import build_random, published_config
from model_core.scheduler import PyramidFlowScheduler
from model_core.text import PromptEmbeddings
from model_core.transformers import PyramidMMDiT
from training.atomic import write_text
from training.flow_task import velocity_losses
from training.objective import build_column, draw_choices, sample_generator
from training.packing import balanced_bins
from training.parallel import shard_model

STAGES, TEXT_TOKENS, LATENT_CHANNELS = 3, 128, 16
WIDTHS = {"speed": 128, "memory": 512}  # 2 and 8 heads of 64
BATCHES = {"speed": dict(clips=12, images=4), "memory": dict(clips=0, images=4)}
MODES = {  # name: (packed, captions fill all 128 text tokens)
    "column_by_column": (False, False),
    "packed": (True, False),
    "column_by_column_full_text": (False, True),
    "packed_full_text": (True, True),
    "packed_per_block": (True, False),
    "memory_one_unit": (True, False),
    "memory_per_block": (True, False),
}
RUNS = {  # one process pair each: (width, per-block FSDP units, its modes, interleaved round by round)
    "one_unit": ("speed", False, ["column_by_column", "packed", "column_by_column_full_text", "packed_full_text"]),
    "per_block": ("speed", True, ["packed_per_block"]),
    "memory_one_unit": ("memory", False, ["memory_one_unit"]),
    "memory_per_block": ("memory", True, ["memory_per_block"]),
}


def model_config(width: str) -> dict:
    heads = WIDTHS[width] // 64
    return {**published_config(PyramidMMDiT), "num_attention_heads": heads, "caption_projection_dim": 64 * heads}


def global_batch(config: dict, clips: int, images: int, full_text: bool, seed: int = 0) -> list:
    """(column, text) of every sample: 128x128-pixel latents, clips of 5 latent frames, text of 128 tokens of which
    8-127 are valid (the rest T5 padding), or all 128 (`full_text`)."""
    scheduler, samples = PyramidFlowScheduler(stages=STAGES), []
    for slot in range(clips + images):
        generator = sample_generator(seed, 0, slot)
        frames = 5 if slot < clips else 1
        latents = torch.randn(1, LATENT_CHANNELS, frames, 16, 16, generator=generator)
        choices = draw_choices(generator, STAGES, 1 / 3, 0.0)
        column = build_column(latents, choices, generator, scheduler)
        valid = TEXT_TOKENS if full_text else int(torch.randint(8, TEXT_TOKENS, (1,), generator=generator))
        mask = (torch.arange(TEXT_TOKENS) < valid).long()[None]
        text = PromptEmbeddings(torch.randn(1, TEXT_TOKENS, config["joint_attention_dim"], generator=generator), mask,
                                torch.randn(1, config["pooled_projection_dim"], generator=generator))
        samples.append((column, text))
    return samples


def rank_run(rank: int, run: str, rounds: int, out: str) -> None:
    """One run on this rank: each round, each mode's forward and backward of this rank's bin (timed); the memory runs
    also step AdamW (so its state is held), the speed runs keep the weights (every mode sees the same model)."""
    width, per_block, modes = RUNS[run]
    config = model_config(width)
    model = build_random(PyramidMMDiT, config, "cpu", torch.float32, seed=0).train().requires_grad_(True)
    model.enable_gradient_checkpointing()
    shard_model(model, per_block=per_block)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4) if width == "memory" else None
    world, figures = dist.get_world_size(), {}
    for mode in modes:
        samples = global_batch(config, **BATCHES[width], full_text=MODES[mode][1])
        mine = [samples[i] for i in balanced_bins([column.tokens for column, _ in samples], world)[rank]]
        figures[mode] = {"batch": mine, "size": len(samples), "image_tokens": sum(c.tokens for c, _ in samples),
                         "seconds": [], "cpu_seconds": [], "losses": []}
    for _ in range(rounds):
        for mode in modes:
            row = figures[mode]
            started, cpu_started = time.perf_counter(), time.process_time()
            losses = velocity_losses(model, [c for c, _ in row["batch"]], [t for _, t in row["batch"]], MODES[mode][0])
            (losses.sum() * world / row["size"]).backward()
            if optimizer is not None:
                optimizer.step()
            model.zero_grad(set_to_none=True)
            row["seconds"].append(time.perf_counter() - started)
            row["cpu_seconds"].append(time.process_time() - cpu_started)
            total = losses.detach().sum()
            dist.all_reduce(total)
            row["losses"].append(float(total) / row["size"])
    for mode, row in figures.items():
        fastest = [min(row[key][1:] or row[key]) for key in ("seconds", "cpu_seconds")]  # after the warm-up round
        seconds, cpu_seconds = torch.tensor(fastest).unbind()
        for value in (seconds, cpu_seconds):
            dist.all_reduce(value, op=dist.ReduceOp.MAX)  # a micro-step lasts as long as its slowest rank
        row.update(step_s=float(seconds), tokens_per_s=row["image_tokens"] / float(seconds),
                   step_cpu_s=float(cpu_seconds), tokens_per_cpu_s=row["image_tokens"] / float(cpu_seconds))
        del row["batch"], row["seconds"], row["cpu_seconds"]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    Path(out, f"{run}-{rank}.json").write_text(json.dumps({"modes": figures, "peak_rss_mib": peak}))


def run_ranks_of(run: str, rounds: int, folder: str) -> dict:
    """{mode: figures} of one run on 2 gloo processes; the peak RSS is the larger rank's."""
    from tests.distributed import run_ranks

    run_ranks(rank_run, 2, folder, run, rounds, folder, timeout=1200)
    ranks = [json.loads(Path(folder, f"{run}-{rank}.json").read_text()) for rank in range(2)]
    peak = max(r["peak_rss_mib"] for r in ranks)
    return {mode: {**row, "peak_rss_mib": peak} for mode, row in ranks[0]["modes"].items()}


def largest_difference(rows: dict, names: list) -> float:
    reference = rows[names[0]]["losses"]
    return max(abs(a - b) for name in names[1:] for a, b in zip(rows[name]["losses"], reference))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.training_scale", description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, required=True, help="where to write the figures")
    parser.add_argument("--rounds", type=int, default=4, help="rounds of the speed runs (the first is a warm-up)")
    args = parser.parse_args(argv)
    rows = {}
    with tempfile.TemporaryDirectory() as folder:
        for run, (width, _, _) in RUNS.items():
            rows.update(run_ranks_of(run, args.rounds if width == "speed" else 2, folder))
    for name, row in rows.items():
        print(f"{name:>26}: {row['tokens_per_cpu_s']:6.1f} image tokens per CPU-s ({row['tokens_per_s']:6.1f} per wall s), "
              f"peak RSS {row['peak_rss_mib']:7.0f} MiB per rank, losses {['%.6f' % x for x in row['losses']]}")
    def speedup(name, reference, key="tokens_per_cpu_s"):
        return rows[name][key] / rows[reference][key]

    figures = {
        "packed_speedup": speedup("packed", "column_by_column"),
        "packed_per_block_speedup": speedup("packed_per_block", "column_by_column"),
        "packed_speedup_full_text": speedup("packed_full_text", "column_by_column_full_text"),
        "packed_speedup_wall": speedup("packed", "column_by_column", "tokens_per_s"),
        "per_block_rss_ratio": rows["memory_per_block"]["peak_rss_mib"] / rows["memory_one_unit"]["peak_rss_mib"],
        "loss_max_abs_difference": max(largest_difference(rows, ["column_by_column", "packed", "packed_per_block"]),
                                       largest_difference(rows, ["column_by_column_full_text", "packed_full_text"]),
                                       largest_difference(rows, ["memory_one_unit", "memory_per_block"])),
        "plan_cpu_s_per_step": plan_cpu_s_per_step(world=2),
        "rows": rows,
        "setup": {"processes": 2, "blocks": 24, "widths": WIDTHS, "batches": BATCHES, "text_tokens": TEXT_TOKENS,
                  "plan": {"entries": 10_000_000, "global_batch": 1536, "world": 2}},
    }
    write_text(args.json, json.dumps(figures, indent=2))
    print(json.dumps({k: v for k, v in figures.items() if k not in ("rows", "setup")}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
