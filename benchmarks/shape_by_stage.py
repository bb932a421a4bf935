"""Where text-to-video loses the subject's shape: first frames sampled from ground-truth pyramid stage starts.

    python -m benchmarks.shape_by_stage --model assets/models/pyramid-flow-shapes [--stream 2] [--count 42]
        [--guidance 4] [--out FIGURES.json]

For each (prompt, seed) pair of a shapes-world stream, the world's first frame is encoded (x1) and the unit is
sampled from the start of stage k on the path the transformer was trained on (Eqs. 9-10: s_k Up(Down(x1)) +
(1 - s_k) n; from stage 0 that is pure noise, i.e. plain generation), then decoded and read by the project's
detector. A stage whose start already fixes the subject but whose output misses its shape is where the shape is
lost. From the last stage's start, the prompt's shape word is also swapped for each of the three shapes: the
table of asked against read shapes says whether the last stage draws what the prompt asks or what the coarse
start suggests. Use a tuning stream (2 or higher), not the held-out one.
"""
import argparse
import json
from collections import Counter

import torch

from model_core.media import to_video_tensor
from model_core.generation_runner import unit_velocity
from model_core.pipeline import PyramidFlowPipeline
from model_core.sampling import sample_unit
from training.atomic import write_text
from training.objective import stage_endpoints
from training.shapes_detector import read_frame
from training.shapes_world import FRAME_SIZE, SHAPES, parse_prompt, render_clip, world_pairs

STEPS_PER_STAGE = 10


def guided_velocity(pipe, prompt: str, guidance: float):
    text = pipe.prompt_encoder.encode(prompt)
    negative = pipe.prompt_encoder.encode_negative(None, 1) if guidance > 1 else None
    return unit_velocity(pipe, text, negative, guidance)


def first_frame_from(pipe, velocity, x1: torch.Tensor, stage: int, seed: int):
    """The detector's reading of the first frame sampled from `stage`'s ground-truth start."""
    generator = torch.Generator().manual_seed(seed)
    steps = (STEPS_PER_STAGE,) * pipe.scheduler.config.stages
    start = stage_endpoints(x1, stage, pipe.scheduler, generator)[0]
    latent = sample_unit(velocity, pipe.scheduler, start, [], 0, steps, generator, first_stage=stage)
    return read_frame(pipe.decode_latents(latent)[0])


@torch.no_grad()
def measure(pipe, pairs, guidance: float) -> dict:
    stages = pipe.scheduler.config.stages
    hits = Counter()
    asked_read = Counter()
    for prompt, seed in pairs:
        color, shape, direction = parse_prompt(prompt)
        frame = to_video_tensor(torch.from_numpy(render_clip(prompt, seed)[:1]), FRAME_SIZE, FRAME_SIZE)
        x1 = pipe.encode_video(frame)
        readings = {"round trip": read_frame(pipe.decode_latents(x1)[0])}
        velocity, seed = guided_velocity(pipe, prompt, guidance), seed % 2**63
        for stage in range(stages):
            readings[f"from stage {stage}"] = first_frame_from(pipe, velocity, x1, stage, seed)
        for name, reading in readings.items():
            hits[name, "colour"] += reading.color == color
            hits[name, "shape"] += reading.shape == shape
        for asked in SHAPES:
            reading = readings[f"from stage {stages - 1}"] if asked == shape else first_frame_from(
                pipe, guided_velocity(pipe, f"a {color} {asked} moving {direction}", guidance), x1, stages - 1, seed)
            asked_read[shape, asked, str(reading.shape)] += 1
    rows = {name: {"colour": hits[name, "colour"] / len(pairs), "shape": hits[name, "shape"] / len(pairs)}
            for name in readings}
    swaps = {f"{true} asked {asked}": {read: asked_read[true, asked, read] for read in (*SHAPES, "None")
                                       if asked_read[true, asked, read]}
             for true in SHAPES for asked in SHAPES}
    return {"pairs": len(pairs), "guidance": guidance, "first_frames": rows, "last_stage_shape_swaps": swaps}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.shape_by_stage", description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a shapes-world checkpoint folder")
    parser.add_argument("--stream", type=int, default=2, help="seed stream of the pairs (2 or higher: tuning)")
    parser.add_argument("--count", type=int, default=42, help="(prompt, seed) pairs")
    parser.add_argument("--guidance", type=float, default=4.0, help="classifier-free guidance scale")
    parser.add_argument("--out", help="also write the figures here as JSON")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    pipe = PyramidFlowPipeline.from_pretrained(args.model, device="cpu")
    figures = measure(pipe, world_pairs(0, args.stream, args.count), args.guidance)
    text = json.dumps(figures, indent=1)
    print(text)
    if args.out:
        write_text(args.out, text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
