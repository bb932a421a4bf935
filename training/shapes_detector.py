"""Reads a shapes-world clip back: the subject's colour, shape and direction of motion.

colour: nearest palette colour to the median of the subject's bright pixels; shape: nearest of three
prototypes in (fill ratio of the bounding box, share of the area in the box's top half) — square
(1, 1/2), circle (pi/4, 1/2), upright triangle (1/2, 1/4); direction: the larger axis of the centroid
displacement from the first to the last frame, when it is at least `MIN_TRAVEL` of the frame.
"""
import math
from dataclasses import dataclass
from typing import Optional

import numpy as np

from .shapes_world import DIRECTIONS, PALETTE

BRIGHT = 60  # a pixel whose brightest channel exceeds this belongs to the subject
MIN_TRAVEL = 1 / 8
SHAPE_PROTOTYPES = {"square": (1.0, 0.5), "circle": (math.pi / 4, 0.5), "triangle": (0.5, 0.25)}


@dataclass(frozen=True)
class FrameReading:
    color: Optional[str]
    shape: Optional[str]
    centroid: Optional[tuple]  # (x, y) pixels


@dataclass(frozen=True)
class ClipReading:
    color: Optional[str]  # the most common reading over the frames
    shape: Optional[str]
    direction: Optional[str]  # None when the subject is lost or barely moves
    frames: tuple


def subject_mask(frame: np.ndarray) -> np.ndarray:
    return frame.max(axis=-1) > BRIGHT


def nearest_color(rgb) -> str:
    return min(PALETTE, key=lambda name: float(np.sum((np.asarray(PALETTE[name], float) - rgb) ** 2)))


def shape_of(mask: np.ndarray) -> Optional[str]:
    rows, cols = np.nonzero(mask)
    height, width = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
    if min(height, width) < 3:
        return None
    box = mask[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
    fill = box.sum() / box.size
    above_midline = np.clip(height / 2 - np.arange(height), 0, 1)  # share of each row above the box's midline
    top_share = float(box.sum(axis=1) @ above_midline) / box.sum()
    return min(SHAPE_PROTOTYPES, key=lambda s: (fill - SHAPE_PROTOTYPES[s][0]) ** 2 + (top_share - SHAPE_PROTOTYPES[s][1]) ** 2)


def read_frame(frame: np.ndarray) -> FrameReading:
    mask = subject_mask(frame)
    if mask.sum() < 4:
        return FrameReading(None, None, None)
    rows, cols = np.nonzero(mask)
    rgb = np.median(frame[mask].astype(float), axis=0)
    return FrameReading(nearest_color(rgb), shape_of(mask), (float(cols.mean()), float(rows.mean())))


def majority(values) -> Optional[str]:
    values = [v for v in values if v is not None]
    return max(set(values), key=values.count) if values else None


def direction_between(first, last, frame_size: int) -> Optional[str]:
    if first is None or last is None:
        return None
    dx, dy = last[0] - first[0], last[1] - first[1]
    if max(abs(dx), abs(dy)) < MIN_TRAVEL * frame_size:
        return None
    step = (int(np.sign(dx)), 0) if abs(dx) >= abs(dy) else (0, int(np.sign(dy)))
    return next(name for name, vector in DIRECTIONS.items() if vector == step)


def read_clip(frames: np.ndarray) -> ClipReading:
    """Reading of a uint8 [T, H, W, 3] clip."""
    readings = tuple(read_frame(frame) for frame in frames)
    direction = direction_between(readings[0].centroid, readings[-1].centroid, frames.shape[2])
    return ClipReading(majority(r.color for r in readings), majority(r.shape for r in readings), direction, readings)
