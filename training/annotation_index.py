"""jsonl annotations at any size: a byte-offset index built once per file and cached beside it
(`<file>.index/`: the [start, end) of every non-blank line, the rows that are images or videos, and per line its
kind, height, width and frames (`meta`: what batch planning needs, so planning parses no JSON), as .npy files
opened memory-mapped), so a line is read with one `pread` and a process keeps only the pages it touched.
The index is rebuilt when the file's size or modification time (or the index format) changes."""
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
INDEX_FILES = ("lines", "images", "videos", "meta")
FORMAT = 2  # 2: with `meta`
META_FIELDS = ("height", "width", "frames")  # integer fields of a line kept in `meta` after its image flag
UNKNOWN = -1  # a meta field the line does not give
META_MARKS = [re.compile(rb'"' + name.encode() + rb'"\s*:\s*(\d+)') for name in META_FIELDS]


def index_folder(path: Path) -> Path:
    return path.with_name(path.name + ".index")


def scan_blocks(path: Path):
    """Per block of about `CHUNK` bytes of whole lines: ([k, 2] int64 byte ranges of its non-blank lines, int64
    [k, 4] meta: image flag, height, width, frames)."""
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
                meta = np.full((len(ends), 1 + len(META_FIELDS)), UNKNOWN, np.int64)
                meta[:, 0] = 0
                meta[np.searchsorted(ends, image_marks(whole, text)), 0] = 1
                for column, pattern in enumerate(META_MARKS, 1):
                    hits, values = number_marks(whole, text, pattern)
                    meta[np.searchsorted(ends, hits), column] = values
                keep = ends - starts > 0
                yield (np.stack([starts[keep], ends[keep]], 1) + base).astype(np.int64), meta[keep]
                base += len(whole)
            if not chunk:
                break


def index_arrays(path: Path) -> dict:
    """{lines, images, videos} of `path` held in memory (when the index cannot be cached beside the file)."""
    blocks = list(scan_blocks(path))
    lines = np.concatenate([ranges for ranges, _ in blocks]) if blocks else np.zeros((0, 2), np.int64)
    meta = np.concatenate([meta for _, meta in blocks]) if blocks else np.zeros((0, 1 + len(META_FIELDS)), np.int64)
    is_image = meta[:, 0] == 1
    return {"lines": lines, "images": np.flatnonzero(is_image), "videos": np.flatnonzero(~is_image), "meta": meta}


def write_index(path: Path, folder: Path) -> None:
    """The index files of `path` in `folder` from one scan, holding one block in memory, not N lines: each block is
    appended to a raw file per array, then each .npy is its header (the row count known only now) and that raw data,
    written under a name of this process alone and renamed (every rank of a launch may build the same index)."""
    raw = {name: private_sibling(folder / f"{name}.raw") for name in INDEX_FILES}
    rows = 0
    with ExitStack() as files:
        out = {name: files.enter_context(raw[name].open("wb")) for name in INDEX_FILES}
        for ranges, meta in scan_blocks(path):
            numbers = np.arange(rows, rows + len(ranges), dtype=np.int64)
            flags = meta[:, 0] == 1
            ranges.tofile(out["lines"])
            numbers[flags].tofile(out["images"])
            numbers[~flags].tofile(out["videos"])
            meta.tofile(out["meta"])
            rows += len(ranges)
    for name in INDEX_FILES:
        length = raw[name].stat().st_size // 8
        width = {"lines": 2, "meta": 1 + len(META_FIELDS)}.get(name)
        shape = (length // width, width) if width else (length,)
        staged = private_sibling(folder / f"{name}.npy")
        with staged.open("wb") as target, raw[name].open("rb") as source:
            np.lib.format.write_array_header_1_0(target, {"descr": "<i8", "fortran_order": False, "shape": shape})
            shutil.copyfileobj(source, target, CHUNK)
        raw[name].unlink()
        staged.replace(folder / f"{name}.npy")


def image_marks(whole: bytes, text: np.ndarray) -> np.ndarray:
    """Offsets of the image marks in `whole` (its bytes also as `text`), a mark after a backslash (inside an escaped
    string) left out: two literal searches and a vectorised check rather than one slower look-behind pattern."""
    hits = np.fromiter((m.start() for pattern in IMAGE_MARKS for m in pattern.finditer(whole)), np.int64)
    return hits[(hits == 0) | (text[np.maximum(hits - 1, 0)] != BACKSLASH)]


def number_marks(whole: bytes, text: np.ndarray, pattern) -> tuple:
    """(offsets, values) of the `"key": <integer>` matches of `pattern` in `whole`, those inside an escaped string
    left out (as in `image_marks`)."""
    found = [(m.start(), int(m.group(1))) for m in pattern.finditer(whole)]
    hits = np.array([offset for offset, _ in found], np.int64)
    values = np.array([value for _, value in found], np.int64)
    real = (hits == 0) | (text[np.maximum(hits - 1, 0)] != BACKSLASH)
    return hits[real], values[real]


def stamp(path: Path) -> dict:
    status = path.stat()
    return {"size": status.st_size, "mtime_ns": status.st_mtime_ns, "format": FORMAT}


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

    def meta(self, rows) -> np.ndarray:
        """int64 [k, 4] of the given global rows: image flag (1 image, 0 video), height, width, frames (-1 where a
        line does not give it), from the memory-mapped index: no line is read."""
        rows = np.asarray(rows, np.int64)
        files = np.searchsorted(self.starts, rows, side="right") - 1
        out = np.empty((len(rows), 1 + len(META_FIELDS)), np.int64)
        for file in np.unique(files):
            chosen = files == file
            out[chosen] = self.indexes[file]["meta"][rows[chosen] - int(self.starts[file])]
        return out

    def rows(self, kind: str) -> "KindRows":
        """The global rows of the images (`kind="image"`) or videos, as a lazily mapped sequence."""
        return KindRows(self, "images" if kind == "image" else "videos")


def entry_meta(annotations, rows) -> np.ndarray:
    """`AnnotationIndex.meta` of an index, or the same array made from a small in-memory list of annotations."""
    if hasattr(annotations, "meta"):
        return annotations.meta(rows)
    known = lambda value: UNKNOWN if value is None else int(value)  # noqa: E731
    return np.array([[int(annotations[r].kind == "image"), *(known(getattr(annotations[r], name)) for name in META_FIELDS)]
                     for r in rows], np.int64).reshape(-1, 1 + len(META_FIELDS))


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

    def take(self, ks) -> np.ndarray:
        """rows[k] for many k at once."""
        ks = np.asarray(ks, np.int64)
        files = np.searchsorted(self.starts, ks, side="right") - 1
        out = np.empty(len(ks), np.int64)
        for file in np.unique(files):
            chosen = files == file
            offset, part = self.parts[file]
            out[chosen] = offset + part[ks[chosen] - int(self.starts[file])]
        return out
