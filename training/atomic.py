"""Files and folders written whole or not at all: each is built under a temporary sibling, then renamed into place."""
import json
import os
import shutil
from pathlib import Path


def staging_path(target) -> Path:
    """The temporary sibling `<target>.tmp` that `target` is built in."""
    target = Path(target)
    return target.with_name(target.name + ".tmp")


def private_sibling(target) -> Path:
    """A temporary sibling `<target>.<pid>.tmp` of this process alone, so processes writing the same file at once
    (every rank of a launch building one cache) never write into, or remove, each other's staging file."""
    target = Path(target)
    return target.with_name(f"{target.name}.{os.getpid()}.tmp")


def write_text(path, text: str) -> Path:
    """Write `text` to `path` (creating its folder) so that readers never see a partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = private_sibling(path)
    temporary.write_text(text)
    temporary.replace(path)
    return path


def write_annotations(path, records) -> Path:
    """Write jsonl records (one JSON object a line) so that readers never see a partial file."""
    return write_text(path, "".join(json.dumps(record) + "\n" for record in records))


def fresh_staging(target) -> Path:
    """An empty staging folder for `target` (whatever an interrupted build left there removed)."""
    staging = staging_path(target)
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    return staging


def publish(target) -> Path:
    """Replace `target` with the folder built in its staging sibling."""
    target = Path(target)
    if target.exists():
        shutil.rmtree(target)
    staging_path(target).rename(target)
    return target
