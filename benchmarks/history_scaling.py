"""How the cost of one autoregressive unit grows with its history (Sec. 3.3), 384p token counts.

For units 0..15 of a 384p video (48 x 80 latent), times the DiT calls of one unit (one step per
pyramid stage) with the temporal-pyramid history, against the same unit conditioned on a
full-resolution history (what full-sequence autoregression would feed). Reduced-width miniFLUX on CPU.

    python benchmarks/history_scaling.py [--units 16] [--every 3]
"""
import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from model_core.pyramid import latent_pyramid  # noqa: E402
from model_core.temporal import history_clips, tokens_per_frame  # noqa: E402
from spatial_pyramid_cost import HEIGHT, LATENT, TEXT, WIDTH, reduced_model, velocity_fn  # noqa: E402


def unit_time(velocity, history, unit, full_history: bool) -> tuple:
    """Seconds and image tokens for one step at each of the 3 stages of `unit`."""
    seconds, tokens = 0.0, 0
    for stage in range(3):
        current = torch.zeros(1, LATENT, 1, HEIGHT >> (2 - stage), WIDTH >> (2 - stage))
        if full_history:
            conditions = [history[-1][:, :, :unit]] if unit else []
        else:
            conditions = history_clips(history, unit, stage) if unit else []
        clips = [*conditions, current]
        tokens += sum(c.shape[2] * c.shape[3] * c.shape[4] // 4 for c in clips)
        start = time.perf_counter()
        velocity(clips, torch.tensor(500.0))
        seconds += time.perf_counter() - start
    return seconds, tokens


@torch.no_grad()
def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--units", type=int, default=16)
    parser.add_argument("--every", type=int, default=3, help="measure every n-th unit")
    args = parser.parse_args()
    model = reduced_model()
    g = torch.Generator().manual_seed(0)
    text = (torch.randn(1, TEXT, 64, generator=g), torch.ones(1, TEXT, dtype=torch.long), torch.randn(1, 32, generator=g))
    velocity = velocity_fn(model, text)
    history = latent_pyramid(torch.randn(1, LATENT, args.units, HEIGHT, WIDTH, generator=g))
    unit_time(velocity, history, 1, False)  # warm-up
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; one step per stage, 384p latent; "
          f"{tokens_per_frame(HEIGHT, WIDTH, 2)} tokens per full-res frame")
    print(f"{'unit':>4} {'pyramid tokens':>15} {'pyramid s':>10} {'full-res tokens':>16} {'full-res s':>11} {'time ratio':>10}")
    units = sorted({*range(0, args.units, args.every), args.units - 1})
    for unit in units:
        t_pyr, n_pyr = unit_time(velocity, history, unit, False)
        t_full, n_full = unit_time(velocity, history, unit, True)
        print(f"{unit:>4} {n_pyr:>15,} {t_pyr:>10.2f} {n_full:>16,} {t_full:>11.2f} {t_full / t_pyr:>10.2f}")


if __name__ == "__main__":
    main()
