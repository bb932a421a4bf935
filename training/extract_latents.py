"""`python -m training.extract_latents --model ROOT --annotations IN.jsonl --output-dir D [--seconds S]`:
encode every video/image once with the checkpoint's VAE (posterior mean, not normalised) and write
D/latents/<n>.safetensors plus D/annotations.jsonl with a `latent` path per line. Unreadable samples
are skipped and counted."""
import argparse
import logging
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from model_core.temporal import frames_for_duration

from .data import LATENT_KEY, AnnotatedDataset, SampleRequest, annotation_record, read_annotations, write_annotations
from .models import base_checkpoint, build_vae
from .tool import run_tool

logger = logging.getLogger(__name__)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m training.extract_latents", description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="checkpoint folder or hub id whose causal_video_vae/ encodes")
    parser.add_argument("--annotations", required=True, nargs="+", help="input jsonl file(s)")
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--fps", type=float, default=24)
    parser.add_argument("--seconds", type=float, default=5.0, help="longest clip to encode (1 + nk frames at --fps, n the VAE's temporal compression)")
    parser.add_argument("--buckets", default="384x640,640x384,512x512", help="HxW pixel buckets, comma separated")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--device", default=None, help="torch device (default: accelerator if present, else cpu)")
    return parser.parse_args(argv)


def parse_buckets(text: str) -> list:
    try:
        return [tuple(int(v) for v in item.split("x")) for item in text.split(",")]
    except ValueError as error:
        raise ValueError(f"--buckets must look like 384x640,640x384; got {text!r}") from error


@torch.no_grad()
def extract(args) -> tuple:
    from accelerate import PartialState

    device = torch.device(args.device) if args.device else PartialState().device
    base = base_checkpoint({"pretrained": args.model})
    vae = build_vae({"frozen_dtype": args.dtype}, base).to(device)
    entries, malformed = read_annotations(args.annotations)
    dataset = AnnotatedDataset(entries, parse_buckets(args.buckets), args.fps, vae.temporal_scale, use_latents=False,
                               use_text_features=False)
    out = Path(args.output_dir)
    (out / "latents").mkdir(parents=True, exist_ok=True)
    num_frames = frames_for_duration(args.seconds, args.fps, vae.temporal_scale)
    records, skipped = [], malformed
    for index, entry in enumerate(entries):
        sample, error = dataset[SampleRequest(index, 0, index, num_frames, 0.0)]
        if sample is None:
            skipped += 1
            logger.warning("skipping %s", error)
            continue
        latent = vae.encode(sample.pixels.to(device, vae.dtype)).latent_dist.mean[0].float().cpu()
        path = (out / "latents" / f"{index:08d}.safetensors").resolve()
        save_file({LATENT_KEY: latent.contiguous()}, str(path))
        records.append(annotation_record(entry) | {"latent": str(path)})
    write_annotations(out / "annotations.jsonl", records)
    return len(records), skipped


def main(argv=None) -> int:
    def work():
        written, skipped = extract(parse_args(argv))
        return f"wrote {written} latents, skipped {skipped} unreadable samples"

    return run_tool(work)


if __name__ == "__main__":
    sys.exit(main())
