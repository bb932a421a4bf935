"""Spatial pyramid vs plain full-resolution flow matching, same model and total step count (Sec. 3.2).

A reduced-width miniFLUX (same block structure as the published one, narrower and shallower) generates
one unit at the 384p latent size (48 x 80, 16 channels) with 128 text tokens: pyramidal sampling with
S steps in each of the 3 stages (1/4, 1/2, full resolution, jump renoising in between) against plain
Euler flow matching with 3S steps, all at full resolution. Reports wall time and DiT FLOPs
(torch.utils.flop_counter) and their ratio; the paper predicts about 1/K of the cost for K stages.
`--history N` conditions the unit on N earlier latent frames laid out as the temporal pyramid.

    python benchmarks/spatial_pyramid_cost.py [--steps 4] [--history 0]
"""
import argparse
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from model_core import PyramidFlowScheduler, PyramidFluxTransformer  # noqa: E402
from model_core.pyramid import latent_pyramid  # noqa: E402
from model_core.sampling import sample_unit  # noqa: E402
from model_core.temporal import history_clips  # noqa: E402

LATENT, HEIGHT, WIDTH, TEXT = 16, 48, 80, 128


def reduced_model() -> PyramidFluxTransformer:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return PyramidFluxTransformer.from_config(dict(
            patch_size=1, in_channels=4 * LATENT, num_layers=2, num_single_layers=4, attention_head_dim=64,
            num_attention_heads=4, joint_attention_dim=64, pooled_projection_dim=32, axes_dims_rope=[16, 24, 24],
        )).eval()


def velocity_fn(model, text):
    def velocity(clips, t):
        return model(sample=[clips], encoder_hidden_states=text[0], encoder_attention_mask=text[1],
                     pooled_projections=text[2], timestep=t.float().reshape(1), return_dict=False)[0][0]
    return velocity


def pyramidal(model, text, history, unit, steps, generator):
    scheduler = PyramidFlowScheduler()
    start = torch.randn(1, LATENT, 1, HEIGHT // 4, WIDTH // 4, generator=generator)
    return sample_unit(velocity_fn(model, text), scheduler, start, history, unit, (steps,) * 3, generator)


def plain(model, text, history, unit, steps, generator):
    """Euler flow matching at full resolution from sigma 1 to 0, history at the last stage's layout."""
    velocity = velocity_fn(model, text)
    conditions = history_clips(history, unit, 2) if unit else []
    x = torch.randn(1, LATENT, 1, HEIGHT, WIDTH, generator=generator)
    sigmas = torch.linspace(1, 0, 3 * steps + 1)
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        x = x + (sigma_next - sigma) * velocity([*conditions, x], sigma * 1000)
    return x


def measure(sampler, *args):
    with FlopCounterMode(display=False) as counter:
        sampler(*args)
    start = time.perf_counter()
    sampler(*args)
    return time.perf_counter() - start, counter.get_total_flops()


@torch.no_grad()
def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=4, help="steps per pyramid stage (plain uses 3x)")
    parser.add_argument("--history", type=int, default=0, help="earlier latent frames conditioning the unit")
    args = parser.parse_args()
    model = reduced_model()
    g = torch.Generator().manual_seed(0)
    text = (torch.randn(1, TEXT, 64, generator=g), torch.ones(1, TEXT, dtype=torch.long), torch.randn(1, 32, generator=g))
    history = latent_pyramid(torch.randn(1, LATENT, args.history, HEIGHT, WIDTH, generator=g)) if args.history else []
    run = (model, text, history, args.history, args.steps)
    measure(pyramidal, *run, torch.Generator().manual_seed(1))  # warm-up
    t_pyr, f_pyr = measure(pyramidal, *run, torch.Generator().manual_seed(1))
    t_plain, f_plain = measure(plain, *run, torch.Generator().manual_seed(1))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; reduced miniFLUX {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params")
    print(f"unit with {args.history} history frames, 384p latent {HEIGHT}x{WIDTH}, {TEXT} text tokens")
    print(f"pyramidal {args.steps}+{args.steps}+{args.steps} steps: {t_pyr:7.2f} s  {f_pyr / 1e9:9.1f} GFLOP")
    print(f"plain     {3 * args.steps} steps at full res : {t_plain:7.2f} s  {f_plain / 1e9:9.1f} GFLOP")
    print(f"ratio pyramidal/plain: time {t_pyr / t_plain:.3f}, FLOPs {f_pyr / f_plain:.3f} (1/K = {1 / 3:.3f})")


if __name__ == "__main__":
    main()
