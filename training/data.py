"""Training data: jsonl annotations, video/image decoding with fps resampling and aspect buckets,
precomputed latents and text features. A sample that cannot be read comes back as `None` with the
reason, so the loop skips and counts it instead of stopping a long run."""
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from model_core.media import to_video_tensor
from model_core.temporal import latent_frames, pixel_frames
from model_core.text import PromptEmbeddings

from .shards import load_tensors

logger = logging.getLogger(__name__)

LATENT_KEY = "latent"  # raw VAE posterior mean [C, T, h, w], not normalised
TEXT_KEYS = ("hidden_states", "attention_mask", "pooled")
PADDED_LENGTH_KEY = "padded_length"  # T5 states are stored up to their last valid token (`stored_text_features`)


@dataclass(frozen=True)
class Annotation:
    """One jsonl line: a `video` or `image` path, its caption, optional precomputed features."""

    kind: str  # "video" | "image"
    path: Optional[str]
    text: str
    latent: Optional[str] = None
    text_fea: Optional[str] = None
    height: Optional[int] = None
    width: Optional[int] = None
    clip_start: Optional[float] = None  # where an extracted clip starts in its video (see extract_latents)
    frames: Optional[int] = None  # pixel frames of an extracted clip (see extract_latents)


@dataclass(frozen=True)
class SampleRequest:
    """What the loader should produce for one slot of a global batch."""

    entry: int  # index into the annotation list
    step: int
    slot: int  # position inside the global batch; seeds the sample's randomness
    num_frames: int  # pixel frames wanted (1 + nk, n the VAE's frames per latent frame); 1 for images
    clip_start: float  # where the clip starts, as a fraction of the room left in the video


@dataclass
class TrainingSample:
    """A decoded sample: pixels [1, 3, T, H, W] in [-1, 1] or a raw latent [1, C, t, h, w], and its text."""

    request: SampleRequest
    pixels: Optional[torch.Tensor]
    latent: Optional[torch.Tensor]
    text: str
    text_features: Optional[PromptEmbeddings]


def read_annotations(paths) -> tuple:
    """(annotations, number of malformed lines skipped) from one or more jsonl files; relative
    media paths resolve against the jsonl's folder."""
    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    entries, malformed = [], 0
    for path in map(Path, paths):
        if not path.is_file():
            raise FileNotFoundError(f"annotation file {path} does not exist; point data.annotations at jsonl files")
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                entries.append(parse_annotation(json.loads(line), path.parent))
            except (ValueError, TypeError) as error:
                malformed += 1
                logger.warning("skipping %s line %d: %s", path, number, error)
    return entries, malformed


def first_annotation(annotations, tries: int = 100) -> Annotation:
    """The first well-formed annotation: what its fields hold (latents? text features?) the run expects of all."""
    for row in range(min(len(annotations), tries)):
        try:
            return annotations[row]
        except ValueError:
            continue
    raise ValueError(f"none of the first {tries} annotation lines is well formed; each must be a JSON object with a "
                     "`video`, `image` or `latent` path")


def parse_annotation(record: dict, base: Path) -> Annotation:
    if not isinstance(record, dict):
        raise ValueError("each line must be a JSON object")
    kind = "video" if "video" in record else "image" if "image" in record else None
    if kind is None and "latent" not in record:
        raise ValueError("a line needs a `video`, `image` or `latent` path")
    kind = kind or record.get("kind", "video")

    def resolve(key):
        value = record.get(key)
        return None if value is None else str(base / value)

    return Annotation(kind=kind, path=resolve(kind), text=str(record.get("text", "")), latent=resolve("latent"),
                      text_fea=resolve("text_fea"), height=record.get("height"), width=record.get("width"),
                      clip_start=record.get("clip_start"), frames=record.get("frames"))


def check_buckets(buckets, multiple: int, why: str) -> None:
    """Refuse, before the first step, a bucket whose sides are not multiples of `multiple` pixels."""
    bad = [list(b) for b in buckets if b[0] % multiple or b[1] % multiple]
    if bad:
        raise ValueError(f"data.buckets {bad} cannot be trained: {why} needs heights and widths that are multiples "
                         f"of {multiple} pixels")


def vae_spatial_scale(base) -> int:
    """Pixels per latent cell of a checkpoint's VAE, read from its config (`downsample_scale`)."""
    return int(json.loads((base.vae_path / "config.json").read_text()).get("downsample_scale", 8))


def nearest_bucket(height: int, width: int, buckets) -> tuple:
    """The (height, width) bucket whose aspect ratio is closest to the source's (log scale)."""
    ratio = np.log(height / width)
    return tuple(min(buckets, key=lambda b: abs(np.log(b[0] / b[1]) - ratio)))


def resampled_indices(num_source: int, source_fps: float, target_fps: float, num_frames: int, start: float,
                      frames_per_latent: int) -> list:
    """Source frame indices of a `num_frames` clip at `target_fps`; fewer (1 + nk, n = `frames_per_latent`) when
    the video is short."""
    step = source_fps / target_fps
    available = int((num_source - 1) / step) + 1
    num_frames = min(num_frames, pixel_frames(latent_frames(available, frames_per_latent), frames_per_latent))
    first = int(start * (num_source - 1 - step * (num_frames - 1)))
    return [min(num_source - 1, round(first + step * j)) for j in range(num_frames)]


def stored_text_features(embeddings: PromptEmbeddings, dtype=torch.bfloat16) -> dict:
    """The tensors one caption's features are stored as: the T5 states and their mask trimmed after the last valid
    token (what lies past it is padding no token attends to), floats in `dtype`, and the padded length to restore."""
    trimmed = embeddings.without_padding_columns()
    tensors = (trimmed.hidden_states, trimmed.attention_mask, trimmed.pooled)
    stored = {key: (t.to(dtype) if t.is_floating_point() else t).cpu().contiguous() for key, t in zip(TEXT_KEYS, tensors)}
    return stored | {PADDED_LENGTH_KEY: torch.tensor(embeddings.attention_mask.shape[1])}


def load_text_features(reference) -> PromptEmbeddings:
    """Text features from a .safetensors file or an Arrow shard row (`<shard>.arrow#<row>`): float32, padded back
    to the encoder's length with masked zeros (features stored before trimming load as they were)."""
    tensors = load_tensors(reference)
    hidden_states, mask, pooled = (tensors[key] for key in TEXT_KEYS)
    padding = int(tensors.get(PADDED_LENGTH_KEY, mask.shape[1])) - mask.shape[1]
    return PromptEmbeddings(F.pad(hidden_states.float(), (0, 0, 0, padding)), F.pad(mask, (0, padding)), pooled.float())


class AnnotatedDataset(torch.utils.data.Dataset):
    """Map-style dataset indexed by `SampleRequest`; returns (TrainingSample or None, error or None)."""

    def __init__(self, annotations, buckets, fps: float, frames_per_latent: int, use_latents: bool, use_text_features: bool):
        self.annotations = annotations
        self.buckets = [tuple(b) for b in buckets]
        self.fps, self.frames_per_latent = fps, frames_per_latent
        self.use_latents = use_latents
        self.use_text_features = use_text_features

    def __len__(self):
        return len(self.annotations)

    def __getitem__(self, request: SampleRequest):
        try:
            entry = self.annotations[request.entry]
        except ValueError as error:  # a malformed line of a streamed annotation file
            return None, str(error)
        try:
            return self.load(entry, request), None
        except Exception as error:  # a damaged file can fail in any decoder; the run must go on
            return None, f"{entry.path or entry.latent}: {type(error).__name__}: {error}"

    def load(self, entry: Annotation, request: SampleRequest) -> TrainingSample:
        features = load_text_features(entry.text_fea) if self.use_text_features else None
        if self.use_latents:
            latent = load_tensors(entry.latent)[LATENT_KEY][None]
            keep = latent_frames(request.num_frames, self.frames_per_latent)
            return TrainingSample(request, None, latent[:, :, :keep].float(), entry.text, features)
        return TrainingSample(request, self.pixels(entry, request), None, entry.text, features)

    def pixels(self, entry: Annotation, request: SampleRequest) -> torch.Tensor:
        from model_core.media_files import read_image, read_video

        if entry.kind == "image":
            frames = read_image(entry.path)[None]
        else:
            frames, source_fps = read_video(entry.path)
            frames = frames[resampled_indices(len(frames), source_fps, self.fps, request.num_frames, request.clip_start,
                                             self.frames_per_latent)]
        height, width = nearest_bucket(frames.shape[1], frames.shape[2], self.buckets)
        return to_video_tensor(torch.from_numpy(frames), height, width)


def annotation_record(entry: Annotation) -> dict:
    """The jsonl record of an annotation, with absolute paths."""
    record = {entry.kind: entry.path, "text": entry.text, "latent": entry.latent, "text_fea": entry.text_fea,
              "height": entry.height, "width": entry.width, "clip_start": entry.clip_start, "frames": entry.frames}
    return {k: v for k, v in record.items() if v is not None}
