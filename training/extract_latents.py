"""`[accelerate launch] python -m training.extract_latents --model ROOT --annotations IN.jsonl --output-dir D
[--seconds S] [--clips-per-video K] [--shard-size N]`: encode every video/image with the checkpoint's VAE
(posterior mean, not normalised, stored in bfloat16 unless --store-dtype float32) into Arrow shards
`D/shards/latents-<s>.arrow` (see training.shards) plus `D/annotations.jsonl` with a `latent` reference, the
clip's `clip_start` and its pixel `frames` per line.

Each video gives K clips of up to S seconds (S <= 10, stage 3's longest), each from its own random start drawn
from (seed, line, clip) and recorded as `clip_start` (a fraction of the room the video leaves). Several
processes share the shards; a rerun skips the finished ones. Unreadable samples are skipped and counted."""
import argparse
import logging
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from model_core.temporal import frames_for_duration

from .annotation_index import AnnotationIndex
from .data import LATENT_KEY, AnnotatedDataset, SampleRequest, annotation_record
from .models import base_checkpoint, build_vae
from .parallel import process_state
from .shards import extract_in_shards
from .tool import run_tool

logger = logging.getLogger(__name__)
MAX_SECONDS = 10.0


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m training.extract_latents", description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="checkpoint folder or hub id whose causal_video_vae/ encodes")
    parser.add_argument("--annotations", required=True, nargs="+", help="input jsonl file(s)")
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--fps", type=float, default=24)
    parser.add_argument("--seconds", type=float, default=5.0,
                        help=f"longest clip to encode, at most {MAX_SECONDS:g} (1 + nk frames at --fps, n the VAE's temporal compression)")
    parser.add_argument("--clips-per-video", type=int, default=1, help="clips taken from each video, each from a random start")
    parser.add_argument("--seed", type=int, default=0, help="seeds the clip starts")
    parser.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    parser.add_argument("--buckets", default="384x640,640x384,512x512", help="HxW pixel buckets, comma separated")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--store-dtype", default="bfloat16", choices=["bfloat16", "float32"],
                        help="dtype the latents are stored in (the loader reads them as float32)")
    parser.add_argument("--device", default=None, help="torch device (default: this process's accelerator, else cpu)")
    return parser.parse_args(argv)


def parse_buckets(text: str) -> list:
    try:
        return [tuple(int(v) for v in item.split("x")) for item in text.split(",")]
    except ValueError as error:
        raise ValueError(f"--buckets must look like 384x640,640x384; got {text!r}") from error


def clip_start(seed: int, line: int, clip: int) -> float:
    """Where clip `clip` of line `line` starts, uniform in [0, 1) from (seed, line, clip) alone."""
    return float(np.random.default_rng([seed, line, clip]).random())


@torch.no_grad()
def extract(args) -> tuple:
    if not 0 < args.seconds <= MAX_SECONDS:
        raise ValueError(f"--seconds must be in (0, {MAX_SECONDS:g}]; got {args.seconds:g}")
    if args.clips_per_video < 1:
        raise ValueError(f"--clips-per-video must be at least 1; got {args.clips_per_video}")
    device = torch.device(args.device) if args.device else process_state().device
    base = base_checkpoint({"pretrained": args.model})
    vae = build_vae({"frozen_dtype": args.dtype}, base).to(device)
    with process_state().local_main_process_first():  # one process per node builds the annotation index
        entries = AnnotationIndex(args.annotations)
    dataset = AnnotatedDataset(entries, parse_buckets(args.buckets), args.fps, vae.temporal_scale, use_latents=False,
                               use_text_features=False)
    num_frames = frames_for_duration(args.seconds, args.fps, vae.temporal_scale)
    clips = args.clips_per_video

    def encode(unit: int):
        line, clip = divmod(unit, clips)
        start = clip_start(args.seed, line, clip)
        sample, error = dataset[SampleRequest(line, 0, unit, num_frames, start)]
        if sample is None:
            logger.warning("skipping %s", error)
            return None
        entry = entries[line]
        if clip and entry.kind == "image":  # an image has one clip
            return None
        latent = vae.encode(sample.pixels.to(device, vae.dtype)).latent_dist.mean[0].to(getattr(torch, args.store_dtype)).cpu()
        record = annotation_record(replace(entry, clip_start=start if entry.kind == "video" else None,
                                           frames=sample.pixels.shape[2]))
        return record, {LATENT_KEY: latent}

    return extract_in_shards(len(entries) * clips, args.shard_size, Path(args.output_dir) / "shards", "latents",
                             "latent", encode)


def main(argv=None) -> int:
    def work():
        written, skipped = extract(parse_args(argv))
        return f"wrote {written} latents, skipped {skipped} samples (unreadable, or extra clips of images) in this process"

    return run_tool(work)


if __name__ == "__main__":
    sys.exit(main())
