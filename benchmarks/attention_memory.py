"""Peak memory and time of blockwise causal attention (Sec. 3.4): grouped prefix SDPA vs a dense mask.

Sequence: the last unit of a 768p video at stage 2 (official token budget), batch 1:
28 history frames at 1/4 resolution (240 tokens each), 1 at 1/2 (960), 1 at full (3840) and the
current unit (3840) = 15,360 image tokens, plus 128 text tokens of which 28 are padding.
One attention layer at reduced width (4 heads x 64) on CPU, float32.

Memory: each method runs in its own subprocess; the figure is the process's resident-set high-water
mark (resource.getrusage ru_maxrss, which does see torch's CPU allocations) minus its resident set
just before the attention call (inputs already allocated).

    .venv/bin/python benchmarks/attention_memory.py
"""
import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.report import child_figures  # noqa: E402
from model_core.transformers.attention import (  # noqa: E402
    blockwise_causal_attention,
    causal_group_ends,
    dense_block_causal_mask,
)

FRAME_TOKENS = [240] * 28 + [960, 3840, 3840]
NUM_TEXT, NUM_PADDED_TEXT = 128, 28
HEADS, HEAD_DIM, BATCH = 4, 64, 1


def inputs():
    """Seeded q, k, v [1, heads, L, 64], per-token frame ids and validity of the packed sequence."""
    length = NUM_TEXT + sum(FRAME_TOKENS)
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(BATCH, HEADS, length, HEAD_DIM, generator=generator) for _ in range(3))
    frames = torch.repeat_interleave(torch.arange(len(FRAME_TOKENS), dtype=torch.float32), torch.tensor(FRAME_TOKENS))
    frame_ids = torch.cat([torch.zeros(NUM_TEXT), frames])
    valid = torch.ones(BATCH, length, dtype=torch.bool)
    valid[:, NUM_TEXT - NUM_PADDED_TEXT : NUM_TEXT] = False
    return q, k, v, frame_ids, valid


def grouped(q, k, v, frame_ids, valid):
    return blockwise_causal_attention(q, k, v, causal_group_ends(NUM_TEXT, FRAME_TOKENS), valid)


def dense(q, k, v, frame_ids, valid):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=dense_block_causal_mask(frame_ids, valid))


def resident_kib() -> int:
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * resource.getpagesize() // 1024


def measure(method: str, output: Path):
    """Child process: run one method once and report time and peak RSS above the pre-call RSS."""
    tensors = inputs()
    before = resident_kib()
    high_water_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    with torch.no_grad():
        result = {"grouped": grouped, "dense": dense}[method](*tensors)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    torch.save(result, output)
    exceeded = peak > high_water_before  # otherwise the call stayed under an earlier peak: an upper bound
    print(json.dumps({"seconds": seconds, "peak_extra_mib": (peak - before) / 1024, "peak_rss_mib": peak / 1024,
                      "exact": exceeded}))


def run_child(method: str, output: Path) -> dict:
    cmd = [sys.executable, __file__, "--child", method, "--output", str(output)]
    return child_figures(cmd)


def main():
    print(f"CPU, {torch.get_num_threads()} threads, torch {torch.__version__}, float32, batch {BATCH}, "
          f"{HEADS} heads x {HEAD_DIM}, text {NUM_TEXT} ({NUM_PADDED_TEXT} padded) + image {sum(FRAME_TOKENS)} tokens")
    with tempfile.TemporaryDirectory() as folder:
        results = {method: run_child(method, Path(folder) / f"{method}.pt") for method in ("grouped", "dense")}
        outputs = {method: torch.load(Path(folder) / f"{method}.pt") for method in results}
    valid_queries = inputs()[4][:, None, :, None].expand_as(outputs["dense"])
    same = torch.allclose(outputs["grouped"][valid_queries], outputs["dense"][valid_queries], atol=1e-5, rtol=1e-4)
    for method, result in results.items():
        print(f"{method:8s} time {result['seconds']:7.2f} s   peak extra RSS {result['peak_extra_mib']:8.1f} MiB"
              f"   (peak RSS {result['peak_rss_mib']:.1f} MiB{'' if result['exact'] else ', upper bound'})")
    print(f"dense / grouped: time x{results['dense']['seconds'] / results['grouped']['seconds']:.2f}, "
          f"peak extra memory x{results['dense']['peak_extra_mib'] / results['grouped']['peak_extra_mib']:.2f}")
    print(f"outputs allclose on valid queries (atol 1e-5): {same}")
    if not same:
        sys.exit(1)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", choices=["grouped", "dense"])
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()
    if args.child:
        measure(args.child, args.output)
    else:
        main()
