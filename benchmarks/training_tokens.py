"""Tokens per training sample and training-step time: temporal pyramid vs full-sequence training.

    python -m benchmarks.training_tokens [--seconds 10] [--height 192] [--width 320] [--repeats 3]

Tokens: image tokens the transformer sees for one training sample of a 10-s 768p video (241 frames,
31 latent frames): the pyramid's largest column (last unit, its history at the temporal-pyramid
layout inference uses) and the mean over the objective's uniform unit and stage draws, against
full-sequence training of all frames at full resolution (Sec. 4.2: <= 15,360 vs 119,040).

Step time: forward + backward of the same small miniFLUX transformer on one pyramid column (last
unit, each stage) against one full-sequence column of every latent frame at full resolution,
at a resolution a CPU can run (--height/--width; the latent is 1/8 of it).
"""
import argparse
import platform
import time

import torch

from model_core.scheduler import PyramidFlowScheduler
from model_core.temporal import frames_for_duration, latent_frames, token_budget
from model_core.transformers import PyramidFluxTransformer
from training.objective import SampleChoices, build_column, sample_tokens

TEXT_DIM, POOLED_DIM, TEXT_TOKENS = 64, 32, 128
SMALL_MODEL = dict(in_channels=64, num_layers=2, num_single_layers=2, attention_head_dim=32, num_attention_heads=4,
                   joint_attention_dim=TEXT_DIM, pooled_projection_dim=POOLED_DIM, axes_dims_rope=[8, 12, 12])


def token_report(height: int, width: int, seconds: float, fps: int = 24) -> dict:
    frames = frames_for_duration(seconds, fps, 8)
    budget = token_budget(height, width, frames)
    latent_t, latent_h, latent_w = latent_frames(frames, 8), height // 8, width // 8
    draws = [sample_tokens(latent_h, latent_w, latent_t, SampleChoices(k, (i + 0.5) / latent_t, 0, 0, False, 0, 0), 3)
             for i in range(latent_t) for k in range(3)]
    return {"frames": frames, "latent_frames": latent_t, **budget, "pyramid_mean_tokens": sum(draws) / len(draws)}


def time_step(model, clips, target, timestep, repeats: int) -> float:
    text = torch.randn(1, TEXT_TOKENS, TEXT_DIM)
    mask = torch.ones(1, TEXT_TOKENS, dtype=torch.long)
    pooled = torch.randn(1, POOLED_DIM)
    best = float("inf")
    for _ in range(repeats):
        model.zero_grad(set_to_none=True)
        start = time.perf_counter()
        v = model(sample=[clips], encoder_hidden_states=text, encoder_attention_mask=mask, pooled_projections=pooled,
                  timestep=torch.tensor([timestep]), return_dict=False)[0][0]
        torch.nn.functional.mse_loss(v, target).backward()
        best = min(best, time.perf_counter() - start)
    return best


def step_times(height: int, width: int, seconds: float, repeats: int) -> dict:
    generator = torch.Generator().manual_seed(0)
    frames = frames_for_duration(seconds, 24, 8)
    latents = torch.randn(1, 16, latent_frames(frames, 8), height // 8, width // 8, generator=generator)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = PyramidFluxTransformer(**SMALL_MODEL)
    scheduler = PyramidFlowScheduler()
    pyramid = []
    for stage in range(3):
        choices = SampleChoices(stage, 1.0 - 1e-9, 0.0, 0.0, False, 0.1, 0.5)
        column = build_column(latents, choices, generator, scheduler)
        pyramid.append((column.tokens, time_step(model, column.clips, column.target, column.timestep, repeats)))
    noisy = 0.5 * latents + 0.5 * torch.randn(latents.shape, generator=generator)
    full_tokens = latents.shape[2] * latents.shape[3] * latents.shape[4] // 4
    full = time_step(model, [noisy], latents, 500.0, repeats)
    return {"pyramid": pyramid, "full_tokens": full_tokens, "full_s": full}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--height", type=int, default=192)
    parser.add_argument("--width", type=int, default=320)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    for height, width in ((768, 1280), (args.height, args.width)):
        report = token_report(height, width, args.seconds)
        print(f"{args.seconds:g}-s {height}x{width} ({report['frames']} frames, {report['latent_frames']} latent frames): "
              f"pyramid per-stage tokens {report['stage_tokens']}, max {report['pyramid_max_tokens']}, "
              f"mean over training draws {report['pyramid_mean_tokens']:.0f}; full sequence {report['full_sequence_tokens']}")
    times = step_times(args.height, args.width, args.seconds, args.repeats)
    print(f"step time (fwd+bwd, small miniFLUX, {args.height}x{args.width}, best of {args.repeats}):")
    for stage, (tokens, seconds) in enumerate(times["pyramid"]):
        print(f"  pyramid stage {stage}: {tokens} tokens, {seconds * 1000:.0f} ms")
    mean = sum(s for _, s in times["pyramid"]) / 3
    print(f"  pyramid mean over stages: {mean * 1000:.0f} ms")
    print(f"  full sequence: {times['full_tokens']} tokens, {times['full_s'] * 1000:.0f} ms ({times['full_s'] / mean:.1f}x)")


if __name__ == "__main__":
    main()
