"""jsonl annotations at any size: a byte-offset index built once per file and cached beside it
(`<file>.index/`: the [start, end) of every non-blank line and the rows that are images or videos, as .npy
files opened memory-mapped), so a line is read with one `pread` and a process keeps only the pages it touched.
The index is rebuilt when the file's size or modification time changes."""
import json
import logging
import os
import re
import shutil
from contextlib import ExitStack
from pathlib import Path

import numpy as np

from .atomic import private_sibling, write_text

logger = logging.getLogger(__name__)
CHUNK = 1 << 26  # bytes scanned at a time while building
# what parse_annotation reads as an image: an "image" key, or "kind": "image" (each literal-led, so `re` scans fast)
IMAGE_MARKS = (re.compile(rb'"image"\s*:'), re.compile(rb'"kind"\s*:\s*"image"'))
BACKSLASH = ord("\\")
INDEX_FILES = ("lines", "images", "videos")


def index_folder(path: Path) -> Path:
    return path.with_name(path.name + ".index")


def scan_blocks(path: Path):
    """Per block of about `CHUNK` bytes of whole lines: ([k, 2] int64 byte ranges of its non-blank lines, bool [k]
    image flags)."""
    base, carry = 0, b""
    with path.open("rb") as handle:
        while True:
            chunk = handle.read(CHUNK)
            buffer = carry + chunk
            if not chunk:  # the last line may lack its newline
                buffer += b"\n" if buffer else b""
            last = buffer.rfind(b"\n")
            whole, carry = buffer[: last + 1], buffer[last + 1 :]
            if whole:
                text = np.frombuffer(whole, np.uint8)
                ends = np.flatnonzero(text == 10)
                starts = np.concatenate([[0], ends[:-1] + 1])
                flags = np.zeros(len(ends), bool)
                flags[np.searchsorted(ends, image_marks(whole, text))] = True
                keep = ends - starts > 0
                yield (np.stack([starts[keep], ends[keep]], 1) + base).astype(np.int64), flags[keep]
                base += len(whole)
            if not chunk:
                break


def index_arrays(path: Path) -> dict:
    """{lines, images, videos} of `path` held in memory (when the index cannot be cached beside the file)."""
    blocks = list(scan_blocks(path))
    lines = np.concatenate([ranges for ranges, _ in blocks]) if blocks else np.zeros((0, 2), np.int64)
    is_image = np.concatenate([flags for _, flags in blocks]) if blocks else np.zeros(0, bool)
    return {"lines": lines, "images": np.flatnonzero(is_image), "videos": np.flatnonzero(~is_image)}


def write_index(path: Path, folder: Path) -> None:
    """The index files of `path` in `folder` from one scan, holding one block in memory, not N lines: each block is
    appended to a raw file per array, then each .npy is its header (the row count known only now) and that raw data,
    written under a name of this process alone and renamed (every rank of a launch may build the same index)."""
    raw = {name: private_sibling(folder / f"{name}.raw") for name in INDEX_FILES}
    rows = 0
    with ExitStack() as files:
        out = {name: files.enter_context(raw[name].open("wb")) for name in INDEX_FILES}
        for ranges, flags in scan_blocks(path):
            numbers = np.arange(rows, rows + len(ranges), dtype=np.int64)
            ranges.tofile(out["lines"])
            numbers[flags].tofile(out["images"])
            numbers[~flags].tofile(out["videos"])
            rows += len(ranges)
    for name in INDEX_FILES:
        length = raw[name].stat().st_size // 8
        shape = (length // 2, 2) if name == "lines" else (length,)
        staged = private_sibling(folder / f"{name}.npy")
        with staged.open("wb") as target, raw[name].open("rb") as source:
            np.lib.format.write_array_header_1_0(target, {"descr": "<i8", "fortran_order": False, "shape": shape})
            shutil.copyfileobj(source, target, CHUNK)
        raw[name].unlink()
        staged.replace(folder / f"{name}.npy")


def image_marks(whole: bytes, text: np.ndarray) -> np.ndarray:
    """Offsets of the image marks in `whole` (its bytes also as `text`), a mark after a backslash (inside an escaped
    string) left out: two literal searches and a vectorised check, 30x faster than one look-behind pattern."""
    hits = np.fromiter((m.start() for pattern in IMAGE_MARKS for m in pattern.finditer(whole)), np.int64)
    return hits[(hits == 0) | (text[np.maximum(hits - 1, 0)] != BACKSLASH)]


def stamp(path: Path) -> dict:
    status = path.stat()
    return {"size": status.st_size, "mtime_ns": status.st_mtime_ns}


def load_index(path: Path) -> dict:
    """{lines, images, videos} arrays of `path`, memory-mapped from its cached index (built when missing or stale)."""
    folder = index_folder(path)
    meta = folder / "source.json"
    if not (meta.is_file() and json.loads(meta.read_text()) == stamp(path)):
        logger.info("indexing %s (once; cached in %s)", path, folder)
        try:
            folder.mkdir(exist_ok=True)
            write_index(path, folder)
            write_text(meta, json.dumps(stamp(path)))
        except OSError as error:  # a read-only data folder: keep this process's copy
            logger.warning("cannot cache the index of %s (%s); it stays in memory", path, error)
            return index_arrays(path)
    return {name: np.load(folder / f"{name}.npy", mmap_mode="r") for name in INDEX_FILES}


class AnnotationIndex:
    """Random access to the lines of one or more jsonl files: `index[i]` parses line i into an `Annotation`
    (a malformed line raises ValueError, and the loader skips and counts it). Pickles by path, so DataLoader
    workers reopen the memory maps instead of copying them."""

    def __init__(self, paths):
        self.paths = [Path(p) for p in ([paths] if isinstance(paths, (str, Path)) else paths)]
        for path in self.paths:
            if not path.is_file():
                raise FileNotFoundError(f"annotation file {path} does not exist; point data.annotations at jsonl files")
        self.open()

    def open(self) -> None:
        self.indexes = [load_index(path) for path in self.paths]
        self.starts = np.cumsum([0] + [len(index["lines"]) for index in self.indexes])
        self.handles = {}

    def __getstate__(self):
        return {"paths": self.paths}

    def __setstate__(self, state):
        self.paths = state["paths"]
        self.open()

    def __len__(self) -> int:
        return int(self.starts[-1])

    def locate(self, row: int) -> tuple:
        if not 0 <= row < len(self):
            raise IndexError(f"annotation {row} is outside [0, {len(self)})")
        file = int(np.searchsorted(self.starts, row, side="right")) - 1
        return file, row - int(self.starts[file])

    def line(self, row: int) -> bytes:
        file, local = self.locate(row)
        start, end = (int(v) for v in self.indexes[file]["lines"][local])
        key = (os.getpid(), file)  # a descriptor per process: workers must not share file offsets
        if key not in self.handles:
            self.handles[key] = os.open(self.paths[file], os.O_RDONLY)
        return os.pread(self.handles[key], end - start, start)

    def __getitem__(self, row: int):
        from .data import parse_annotation

        file, _ = self.locate(row)
        try:
            record = json.loads(self.line(row))
        except json.JSONDecodeError as error:
            raise ValueError(f"{self.paths[file]}: line {row - int(self.starts[file]) + 1} is not JSON ({error})") from error
        return parse_annotation(record, self.paths[file].parent)

    def rows(self, kind: str) -> "KindRows":
        """The global rows of the images (`kind="image"`) or videos, as a lazily mapped sequence."""
        return KindRows(self, "images" if kind == "image" else "videos")


class KindRows:
    """rows[k] -> the k-th image (or video) row over all files, from the memory-mapped per-file lists."""

    def __init__(self, index: AnnotationIndex, name: str):
        self.parts = [(int(start), part[name]) for start, part in zip(index.starts, index.indexes)]
        self.starts = np.cumsum([0] + [len(part) for _, part in self.parts])

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, k: int) -> int:
        file = int(np.searchsorted(self.starts, k, side="right")) - 1
        offset, part = self.parts[file]
        return offset + int(part[k - int(self.starts[file])])
