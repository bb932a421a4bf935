"""Pre-extracted latents and text features in Arrow shards (Hugging Face `datasets`): one row per sample holding
its tensors as safetensors bytes, memory-mapped on read, addressed from the annotation lines as `<shard>#<row>`.

Arrow is chosen over tar streams (webdataset) and MosaicML `streaming` because the trainer draws samples in a
global seeded order (`training.permutation`), so the format must read any row in O(1) without a shuffle buffer
or a second ordering of its own: a memory-mapped Arrow file does, costs a process only the pages it reads, and
`datasets` brings no torch of its own.

The extraction tools write shards as they go: shard s holds the units [s x size, (s + 1) x size), the processes
of `accelerate launch` take the shards round-robin, and a shard whose jsonl exists is finished and skipped by a
rerun. The jsonl of a shard is written after its Arrow file, so it marks the shard as whole.
"""
import functools
import logging
from pathlib import Path

from safetensors.torch import load, load_file, save

from .atomic import write_annotations

logger = logging.getLogger(__name__)
REFERENCE = "#"  # `<file>.arrow#<row>`
OPEN_SHARDS = 256  # memory maps a process keeps open


def tensor_bytes(tensors: dict) -> bytes:
    return save({key: t.contiguous() for key, t in tensors.items()})


def write_shard(path: Path, blobs: list) -> None:
    """An Arrow file of `blobs` (safetensors bytes), written under `.tmp` and renamed into place."""
    from datasets import Features, Value
    from datasets.arrow_writer import ArrowWriter

    temporary = path.with_suffix(".tmp")
    writer = ArrowWriter(path=str(temporary), features=Features({"tensors": Value("binary")}))
    for blob in blobs:
        writer.write({"tensors": blob})
    writer.finalize()
    writer.close()
    temporary.replace(path)


@functools.lru_cache(maxsize=OPEN_SHARDS)
def open_shard(path: str):
    from datasets import Dataset

    return Dataset.from_file(path)


def load_tensors(reference) -> dict:
    """The tensors of a `.safetensors` file or of one Arrow shard row (`<shard>.arrow#<row>`)."""
    path, sep, row = str(reference).rpartition(REFERENCE)
    if sep and path.endswith(".arrow"):
        return load(open_shard(path)[int(row)]["tensors"])
    return load_file(str(reference))


def extract_in_shards(num_units: int, shard_size: int, folder: Path, prefix: str, key: str, encode) -> tuple:
    """Run `encode(unit) -> (jsonl record, tensors) | None` over this process's shards of [0, num_units) and write
    each shard as `<prefix>-<s>.arrow` + `.jsonl` (records get `key`: the row's reference); then the main process
    joins the shards' lines into `<folder>/../annotations.jsonl`. Returns (written, skipped) of this process."""
    from .parallel import process_state

    if shard_size < 1:
        raise ValueError(f"--shard-size must be a positive number of samples; got {shard_size}")
    state = process_state()
    folder.mkdir(parents=True, exist_ok=True)
    num_shards = -(-num_units // shard_size)
    written = skipped = 0
    for shard in range(state.process_index, num_shards, state.num_processes):
        lines = folder / f"{prefix}-{shard:05d}.jsonl"
        if lines.is_file():
            continue
        arrow = (folder / f"{prefix}-{shard:05d}.arrow").resolve()
        blobs, records = [], []
        for unit in range(shard * shard_size, min(num_units, (shard + 1) * shard_size)):
            encoded = encode(unit)
            if encoded is None:
                skipped += 1
                continue
            record, tensors = encoded
            records.append(record | {key: f"{arrow}{REFERENCE}{len(blobs)}"})
            blobs.append(tensor_bytes(tensors))
        write_shard(arrow, blobs)
        write_annotations(lines, records)
        written += len(records)
        logger.info("shard %d of %d written (%d samples)", shard + 1, num_shards, len(records))
    state.wait_for_everyone()
    if state.is_main_process:
        join_lines([folder / f"{prefix}-{s:05d}.jsonl" for s in range(num_shards)], folder.parent / "annotations.jsonl")
    state.wait_for_everyone()
    return written, skipped


def join_lines(parts: list, target: Path) -> None:
    """Concatenate jsonl files into `target` (streamed, renamed into place)."""
    temporary = target.with_suffix(".tmp")
    with temporary.open("wb") as out:
        for part in parts:
            with part.open("rb") as source:
                while chunk := source.read(1 << 24):
                    out.write(chunk)
    temporary.replace(target)
