"""`python -m training.evaluate_shapes --model PATH [--count N] [--stream S] [--out FIGURES.json]`: generate from
held-out (prompt, seed) pairs of the shapes world and score the videos with `training.shapes_detector`.

VAE round trip of the world clips (the ceiling for generation) and text-to-video: colour, shape and
direction accuracy; image-to-video (first frame rendered by the world) and extension (9 world frames
+ 8 new ones): whether the subject keeps its colour and shape and moves
in the prompted direction; speed: median seconds of a 17-frame text-to-video over `--speed-runs` runs.
Steps and guidance are the model's sampling defaults unless given; tune them on `--stream 2` or higher (seeds
that neither training nor the held-out pairs use), then report on the held-out stream.
"""
import argparse
import json
import statistics
import sys
import time

import numpy as np
import torch

from model_core.media import to_frames, to_video_tensor
from model_core.step_cache import CACHE_MODES

from .atomic import write_text
from .shapes_detector import read_clip
from .shapes_world import FRAME_SIZE, HELDOUT_STREAM, NUM_FRAMES, PROMPTS, TRAIN_STREAM, parse_prompt, render_clip, world_pairs

EXTENSION_CONTEXT = 9
TEXT_TO_VIDEO_FIGURES = ("color_accuracy", "shape_accuracy", "direction_accuracy")
CONTINUATION_FIGURES = ("keeps_color", "keeps_shape", "direction_accuracy")


def score(frames_of, pairs, names: tuple) -> dict:
    """Shares of clips whose subject has the prompt's colour, shape and direction (named by `names`)."""
    hits = np.zeros(3)
    for prompt, seed in pairs:
        reading = read_clip(frames_of(prompt, seed))
        hits += [a == b for a, b in zip((reading.color, reading.shape, reading.direction), parse_prompt(prompt))]
    return dict(zip(names, (hits / len(pairs)).tolist()))


def text_to_video_frames(pipe, options: dict):
    def frames_of(prompt, seed):
        return pipe.text_to_video(prompt, seed=seed, num_frames=NUM_FRAMES, **options).frames[0]

    return frames_of


def vae_round_trip_frames(pipe):
    """The world clip encoded and decoded by the model's VAE: the ceiling of what generation can reach."""

    @torch.no_grad()
    def frames_of(prompt, seed):
        clip = to_video_tensor(torch.from_numpy(render_clip(prompt, seed)), FRAME_SIZE, FRAME_SIZE)
        return to_frames(pipe.vae.decode(pipe.vae.encode(clip.to(pipe.vae.device, pipe.vae.dtype)).latent_dist.mean).sample)

    return frames_of


def image_to_video_frames(pipe, options: dict):
    def frames_of(prompt, seed):
        first = render_clip(prompt, seed, num_frames=1)[0]
        return pipe.image_to_video(first, prompt, seed=seed, num_frames=NUM_FRAMES, **options).frames[0]

    return frames_of


def extension_frames(pipe, options: dict):
    def frames_of(prompt, seed):
        context = render_clip(prompt, seed)[:EXTENSION_CONTEXT]
        frames = pipe.extend_video(context, prompt, seed=seed, num_frames=NUM_FRAMES - EXTENSION_CONTEXT, **options).frames[0]
        return frames[EXTENSION_CONTEXT - 1 :]  # the last given frame, then the new ones

    return frames_of


def median_seconds(pipe, options: dict, runs: int) -> float:
    durations = []
    for run in range(runs):
        started = time.perf_counter()
        pipe.text_to_video(PROMPTS[run % len(PROMPTS)], seed=run, num_frames=NUM_FRAMES, **options)
        durations.append(time.perf_counter() - started)
    return statistics.median(durations)


def evaluate(pipe, pairs, options: dict, speed_runs: int) -> dict:
    return {
        "pairs": len(pairs),
        "options": {k: list(v) if isinstance(v, tuple) else v for k, v in options.items()},
        "vae_round_trip": score(vae_round_trip_frames(pipe), pairs, TEXT_TO_VIDEO_FIGURES),
        "text_to_video": score(text_to_video_frames(pipe, options), pairs, TEXT_TO_VIDEO_FIGURES),
        "image_to_video": score(image_to_video_frames(pipe, options), pairs, CONTINUATION_FIGURES),
        "extension": score(extension_frames(pipe, options), pairs, CONTINUATION_FIGURES),
        "seconds_per_17_frame_video": median_seconds(pipe, options, speed_runs) if speed_runs else None,
    }


def stream(text: str) -> int:
    value = int(text)
    if value < HELDOUT_STREAM:
        raise argparse.ArgumentTypeError(f"{value} is not an evaluation stream: use {HELDOUT_STREAM} (the held-out pairs) or "
                                         f"{HELDOUT_STREAM + 1} and up (seeds no split uses); {TRAIN_STREAM} is training's")
    return value


def steps(text: str) -> tuple:
    return tuple(int(s) for s in text.split(","))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m training.evaluate_shapes", description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="checkpoint folder (official layout)")
    parser.add_argument("--count", type=int, default=len(PROMPTS), help="(prompt, seed) pairs to generate")
    parser.add_argument("--world-seed", type=int, default=0, help="seed of the world the model was trained on")
    parser.add_argument("--stream", type=stream, default=HELDOUT_STREAM,
                        help=f"seed stream of the pairs: {HELDOUT_STREAM} = the held-out pairs (default), "
                             f"{HELDOUT_STREAM + 1} and up = seeds no split uses (for tuning settings)")
    parser.add_argument("--first-frame-steps", type=steps, help="A,B,C (default: the model's)")
    parser.add_argument("--video-steps", type=steps, help="A,B,C (default: the model's)")
    parser.add_argument("--guidance-scale", type=float, help="default: the model's")
    parser.add_argument("--video-guidance-scale", type=float, help="default: the model's")
    parser.add_argument("--cache", choices=CACHE_MODES, help="step cache (default: the model's)")
    parser.add_argument("--cache-threshold", type=float, help="step cache threshold (default: the model's)")
    parser.add_argument("--speed-runs", type=int, default=5)
    parser.add_argument("--device", default="cpu", help="torch device to generate on, e.g. cuda (default: cpu)")
    parser.add_argument("--out", help="write the figures here as JSON")
    return parser.parse_args(argv)


def write_json(path, figures: dict) -> None:
    write_text(path, json.dumps(figures, indent=2))


def report(figures: dict, out=None) -> None:
    """Print the figures as JSON, and write them to `out` too when given."""
    print(json.dumps(figures, indent=2))
    if out:
        write_json(out, figures)


def main(argv=None) -> int:
    from model_core.pipeline import PyramidFlowPipeline

    args = parse_args(argv)
    pipe = PyramidFlowPipeline.from_pretrained(args.model, device=args.device)
    options = pipe.family.sampling.filled(first_frame_steps=args.first_frame_steps, video_steps=args.video_steps,
                                          guidance_scale=args.guidance_scale, video_guidance_scale=args.video_guidance_scale,
                                          cache=args.cache, cache_threshold=args.cache_threshold).call_options("text_to_video")
    pairs = world_pairs(args.world_seed, args.stream, args.count)
    report({"model": str(args.model), "stream": args.stream, **evaluate(pipe, pairs, options, args.speed_runs)}, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
