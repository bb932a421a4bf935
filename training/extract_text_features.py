"""`python -m training.extract_text_features --model ROOT --annotations IN.jsonl --output-dir D`: encode
every caption once with the checkpoint's prompt encoder and write D/text/<n>.safetensors
(hidden_states, attention_mask, pooled), D/empty_text.safetensors (the empty prompt, for text
dropout: data.empty_text_fea) and D/annotations.jsonl with a `text_fea` path per line."""
import argparse
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from .data import TEXT_KEYS, annotation_record, read_annotations, write_annotations
from .models import base_checkpoint, build_prompt_encoder
from .tool import run_tool

EMPTY_TEXT_FILE = "empty_text.safetensors"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m training.extract_text_features", description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="checkpoint folder or hub id with the text encoders")
    parser.add_argument("--annotations", required=True, nargs="+", help="input jsonl file(s)")
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--device", default=None, help="torch device (default: accelerator if present, else cpu)")
    return parser.parse_args(argv)


def save_embeddings(embeddings, path: Path) -> None:
    tensors = (embeddings.hidden_states, embeddings.attention_mask, embeddings.pooled)
    save_file({key: t.float().cpu().contiguous() if t.is_floating_point() else t.cpu().contiguous()
               for key, t in zip(TEXT_KEYS, tensors)}, str(path))


@torch.no_grad()
def extract(args) -> int:
    from accelerate import PartialState

    device = torch.device(args.device) if args.device else PartialState().device
    base = base_checkpoint({"pretrained": args.model})
    encoder = build_prompt_encoder({"frozen_dtype": args.dtype}, base, device)
    entries, _ = read_annotations(args.annotations)
    out = Path(args.output_dir)
    (out / "text").mkdir(parents=True, exist_ok=True)
    save_embeddings(encoder.encode("", device=device), out / EMPTY_TEXT_FILE)
    records = []
    for index, entry in enumerate(entries):
        path = (out / "text" / f"{index:08d}.safetensors").resolve()
        save_embeddings(encoder.encode(entry.text, device=device), path)
        records.append(annotation_record(entry) | {"text_fea": str(path)})
    write_annotations(out / "annotations.jsonl", records)
    return len(records)


def main(argv=None) -> int:
    return run_tool(lambda: f"wrote text features of {extract(parse_args(argv))} captions")


if __name__ == "__main__":
    sys.exit(main())
