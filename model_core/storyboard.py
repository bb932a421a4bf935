"""Storyboards: a prompt per segment of a video, switched at unit boundaries of the autoregressive history.

Every unit of Eq. 17 is generated with the text of the segment it starts in, while the temporal-pyramid
history runs on across segment boundaries. A storyboard is written one segment per line as
`SECONDS | PROMPT`. The first segment of a new video is a clip (1 + nk frames: the first frame, then
n = frames per latent frame per unit); every later segment, and every segment of an extension, adds
nk frames, so a storyboard's frame count is the sum of its segments' counts.
"""
import math
from dataclasses import dataclass

import torch

from .temporal import frames_for_duration
from .text import PromptEmbeddings

SEPARATOR = "|"
LINE_FORMAT = "SECONDS | PROMPT"


@dataclass(frozen=True)
class Segment:
    """`seconds` of video generated with `prompt`."""

    seconds: float
    prompt: str


@dataclass(frozen=True)
class Storyboard:
    """Segments in playing order; `blend` mixes the old and new text over each switch's first unit."""

    segments: tuple
    blend: bool = False

    def __post_init__(self):
        segments = tuple(self.segments)
        if not segments:
            raise ValueError(f"a storyboard needs at least one segment (one line {LINE_FORMAT})")
        checked = tuple(_checked_segment(segment, index) for index, segment in enumerate(segments))
        object.__setattr__(self, "segments", checked)
        if not isinstance(self.blend, bool):
            raise ValueError(f"blend must be true or false; got {self.blend!r}")

    @classmethod
    def parse(cls, text: str, blend: bool = False) -> "Storyboard":
        """Segments from text with one `SECONDS | PROMPT` per non-empty line; `#` starts a comment line."""
        segments = []
        for number, line in enumerate(text.splitlines(), start=1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            seconds, separator, prompt = line.partition(SEPARATOR)
            if not separator:
                raise ValueError(f"storyboard line {number} has no '{SEPARATOR}'; write each segment as {LINE_FORMAT}, "
                                 f"e.g. '2.5 | a fox walks through snow'")
            try:
                seconds = float(seconds)
            except ValueError:
                raise ValueError(f"storyboard line {number} starts with {seconds.strip()!r}, not a number of seconds; "
                                 f"write each segment as {LINE_FORMAT}") from None
            segments.append(Segment(seconds, prompt.strip()))
        if not segments:
            raise ValueError(f"the storyboard holds no segments; write one segment per line as {LINE_FORMAT}")
        return cls(tuple(segments), blend)

    @classmethod
    def coerce(cls, value) -> "Storyboard":
        """A Storyboard from itself, its text, or a list of (seconds, prompt) pairs or {"seconds", "prompt"} dicts."""
        if isinstance(value, Storyboard):
            return value
        if isinstance(value, str):
            return cls.parse(value)
        if isinstance(value, dict):
            return cls(tuple(_pair(segment) for segment in value.get("segments", ())), value.get("blend", False))
        if isinstance(value, (list, tuple)):
            return cls(tuple(_pair(segment) for segment in value))
        raise ValueError(f"a storyboard is text ({LINE_FORMAT} lines) or a list of (seconds, prompt) pairs; "
                         f"got {type(value).__name__}")

    @property
    def seconds(self) -> float:
        return sum(segment.seconds for segment in self.segments)

    @property
    def prompts(self) -> list:
        return [segment.prompt for segment in self.segments]

    def to_text(self) -> str:
        return "\n".join(f"{segment.seconds:g} | {segment.prompt}" for segment in self.segments)

    def to_settings(self) -> dict:
        """The JSON form recorded in an output's settings (read back by `coerce`)."""
        return {"segments": [{"seconds": s.seconds, "prompt": s.prompt} for s in self.segments], "blend": self.blend}

    def segment_units(self, fps: int, frames_per_latent: int, continues: bool = False) -> list:
        """Latent units per segment: the first segment of a new video is a clip (its first frame is a unit of its
        own), every other segment, and all of them when `continues` an existing video, adds whole units."""
        n = frames_per_latent
        units = []
        for index, segment in enumerate(self.segments):
            if index == 0 and not continues:
                units.append(1 + (frames_for_duration(segment.seconds, fps, n) - 1) // n)
            else:
                units.append(frames_for_duration(segment.seconds, fps, n, new_frames_only=True) // n)
        return units

    def num_frames(self, fps: int, frames_per_latent: int, continues: bool = False) -> int:
        """Pixel frames the storyboard makes (new frames only when it `continues` a video)."""
        units = sum(self.segment_units(fps, frames_per_latent, continues))
        return frames_per_latent * units - (0 if continues else frames_per_latent - 1)

    def unit_segments(self, fps: int, frames_per_latent: int, continues: bool = False) -> list:
        """The segment index of every unit the storyboard makes, in order."""
        units = self.segment_units(fps, frames_per_latent, continues)
        return [index for index, count in enumerate(units) for _ in range(count)]


def unit_texts(segment_of_unit: list, embeddings: list, blend: bool) -> list:
    """Text conditioning per unit: its segment's embeddings, or with `blend` the mean of the previous and
    the new segment's on the first unit after each switch."""
    texts = []
    for unit, segment in enumerate(segment_of_unit):
        switched = unit > 0 and segment != segment_of_unit[unit - 1]
        if blend and switched:
            texts.append(blend_embeddings(embeddings[segment_of_unit[unit - 1]], embeddings[segment], 0.5))
        else:
            texts.append(embeddings[segment])
    return texts


def blend_embeddings(a: PromptEmbeddings, b: PromptEmbeddings, weight: float) -> PromptEmbeddings:
    """(1 - weight)·a + weight·b for the token states and the pooled vector; a token counts where either is valid."""
    return PromptEmbeddings(
        torch.lerp(a.hidden_states, b.hidden_states, weight),
        torch.maximum(a.attention_mask, b.attention_mask),
        torch.lerp(a.pooled, b.pooled, weight),
    )


def _pair(segment) -> Segment:
    if isinstance(segment, Segment):
        return segment
    if isinstance(segment, dict):
        return Segment(segment.get("seconds"), segment.get("prompt"))
    if isinstance(segment, (list, tuple)) and len(segment) == 2:
        return Segment(*segment)
    raise ValueError(f"each storyboard segment is a (seconds, prompt) pair; got {segment!r}")


def _checked_segment(segment, index: int) -> Segment:
    segment = _pair(segment)
    seconds, prompt = segment.seconds, segment.prompt
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not math.isfinite(seconds) or seconds <= 0:
        raise ValueError(f"storyboard segment {index + 1} lasts {seconds!r} seconds; give a positive number")
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError(f"storyboard segment {index + 1} has no prompt; describe what happens in it")
    return Segment(float(seconds), prompt.strip())
