"""Closed-form block noise vs a naive per-block sampler, on a 768p-sized latent.

    python -m benchmarks.block_noise [--frames 1] [--repeats 5]

The naive sampler draws one 4-vector from N(0, Sigma') per 2x2 block in a Python loop, as the
official implementation does; ours is one randn and two cheap passes (model_core.pyramid.block_noise).
"""
import argparse
import platform
import time

import torch

from model_core import block_noise


def naive_block_noise(shape, generator):
    """Per-block loop: x[..., 2i:2i+2, 2j:2j+2] = L z with L the Cholesky factor of Sigma'."""
    b, c, t, h, w = shape
    cov = torch.full((4, 4), -1 / 3).fill_diagonal_(1.0)
    factor = torch.linalg.cholesky(cov + 1e-6 * torch.eye(4))
    out = torch.empty(shape)
    for bi in range(b):
        for ci in range(c):
            for ti in range(t):
                for i in range(0, h, 2):
                    for j in range(0, w, 2):
                        block = factor @ torch.randn(4, generator=generator)
                        out[bi, ci, ti, i : i + 2, j : j + 2] = block.view(2, 2)
    return out


def best_time(fn, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=1, help="latent frames (768p latent is 16 x 96 x 160)")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    shape = (1, 16, args.frames, 96, 160)
    blocks = 16 * args.frames * 48 * 80
    g = torch.Generator().manual_seed(0)
    closed = best_time(lambda: block_noise(shape, generator=g), args.repeats)
    plain = best_time(lambda: torch.randn(shape, generator=g), args.repeats)
    naive = best_time(lambda: naive_block_noise(shape, g), 1)
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"latent {list(shape)}: {blocks:,} blocks")
    print(f"naive per-block loop : {naive * 1e3:10.1f} ms")
    print(f"closed form          : {closed * 1e3:10.3f} ms")
    print(f"one randn, same shape: {plain * 1e3:10.3f} ms")
    print(f"speed-up naive/closed: {naive / closed:,.0f}x; closed/randn cost ratio: {closed / plain:.2f}")


if __name__ == "__main__":
    main()
