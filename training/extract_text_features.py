"""`[accelerate launch] python -m training.extract_text_features --model ROOT --annotations IN.jsonl --output-dir D
[--shard-size N]`: encode every caption once with the checkpoint's prompt encoder into Arrow shards
`D/shards/text-<s>.arrow` (hidden_states, attention_mask, pooled; see training.shards; the T5 states trimmed after
their last valid token and floats stored in bfloat16 unless --store-dtype float32), D/empty_text.safetensors
(the empty prompt, for text dropout: data.empty_text_fea) and D/annotations.jsonl with a `text_fea` reference
per line. Several processes share the shards; a rerun skips the finished ones."""
import argparse
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from .annotation_index import AnnotationIndex
from .data import annotation_record, stored_text_features
from .models import base_checkpoint, build_prompt_encoder
from .parallel import process_state
from .shards import extract_in_shards
from .tool import run_tool

EMPTY_TEXT_FILE = "empty_text.safetensors"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m training.extract_text_features", description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="checkpoint folder or hub id with the text encoders")
    parser.add_argument("--annotations", required=True, nargs="+", help="input jsonl file(s)")
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--shard-size", type=int, default=1000, help="captions per shard")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--store-dtype", default="bfloat16", choices=["bfloat16", "float32"],
                        help="dtype the features are stored in")
    parser.add_argument("--device", default=None, help="torch device (default: this process's accelerator, else cpu)")
    return parser.parse_args(argv)


@torch.no_grad()
def extract(args) -> tuple:
    state = process_state()
    device = torch.device(args.device) if args.device else state.device
    base = base_checkpoint({"pretrained": args.model})
    encoder = build_prompt_encoder({"frozen_dtype": args.dtype}, base, device)
    store_dtype = getattr(torch, args.store_dtype)
    with state.local_main_process_first():  # one process per node builds the annotation index, the others read it
        entries = AnnotationIndex(args.annotations)
    out = Path(args.output_dir)
    if state.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        save_file(stored_text_features(encoder.encode("", device=device), store_dtype), str(out / EMPTY_TEXT_FILE))

    def encode(line: int):
        try:
            entry = entries[line]
        except ValueError:
            return None
        return annotation_record(entry), stored_text_features(encoder.encode(entry.text, device=device), store_dtype)

    return extract_in_shards(len(entries), args.shard_size, out / "shards", "text", "text_fea", encode)


def main(argv=None) -> int:
    def work():
        written, skipped = extract(parse_args(argv))
        return f"wrote text features of {written} captions, skipped {skipped} malformed lines in this process"

    return run_tool(work)


if __name__ == "__main__":
    sys.exit(main())
