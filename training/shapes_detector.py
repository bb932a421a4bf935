"""Reads a shapes-world clip back: the subject's colour, shape and direction of motion.

colour: nearest palette colour to the median of the subject's bright pixels; shape: of the subject's
largest connected part, the world's shape (square, circle, upright triangle) that overlaps it most
(intersection over union) once its box is fitted to the part, or None when none reaches `MIN_OVERLAP`;
direction: the larger axis of the centroid displacement from the first to the last frame, when it is at
least `MIN_TRAVEL` of the frame.

The box is fitted rather than taken from the part's bounding box: a generated frame's subject has ragged
edges and a faint trail along its motion, which widen the bounding box and leave a square filling too
little of it — a rule on the fill of the bounding box read most generated squares as circles.
"""
from collections import Counter, deque
from dataclasses import dataclass
from typing import Optional

import numpy as np

from .shapes_world import DIRECTIONS, PALETTE, SHAPES, box_coverage

BRIGHT = 60  # a pixel whose brightest channel exceeds this belongs to the subject
MIN_TRAVEL = 1 / 8
MIN_OVERLAP = 0.7  # a part no shape overlaps this well has no shape
FIT_MARGIN = 3  # pixels a fitted box may reach beyond the part's bounding box
SIDE_MOVES = np.concatenate([np.eye(4, dtype=int), -np.eye(4, dtype=int)])  # one pixel, one side (top, bottom, left, right)


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


def largest_part(mask: np.ndarray) -> np.ndarray:
    """The largest 8-connected part of a boolean mask."""
    labels = np.zeros(mask.shape, int)
    sizes = [0]
    for seed in zip(*np.nonzero(mask)):
        if labels[seed]:
            continue
        sizes.append(0)
        labels[seed] = len(sizes) - 1
        queue = deque([seed])
        while queue:
            row, col = queue.popleft()
            sizes[-1] += 1
            for r in range(max(row - 1, 0), min(row + 2, mask.shape[0])):
                for c in range(max(col - 1, 0), min(col + 2, mask.shape[1])):
                    if mask[r, c] and not labels[r, c]:
                        labels[r, c] = len(sizes) - 1
                        queue.append((r, c))
    return labels == int(np.argmax(sizes))


def overlaps(part: np.ndarray, shape: str, boxes: np.ndarray) -> np.ndarray:
    """Intersection over union of the part [H, W] with the shape drawn in each box [N, (top, bottom, left, right)]."""
    top, bottom, left, right = boxes.T
    coverage = box_coverage(shape, top, left, bottom - top, right - left, *part.shape)
    return np.minimum(part, coverage).sum(axis=(-2, -1)) / np.maximum(part, coverage).sum(axis=(-2, -1))


def fitted_overlap(part: np.ndarray, shape: str) -> float:
    """The shape's best overlap with the part [H, W] (the part's bounding box plus `FIT_MARGIN` each side): its
    box starts at the part's bounding box and moves one side by one pixel at a time while the overlap rises."""
    height, width = part.shape
    box = np.array([FIT_MARGIN, height - FIT_MARGIN, FIT_MARGIN, width - FIT_MARGIN])
    best = float(overlaps(part, shape, box[None])[0])
    while True:
        candidates = np.array([(top, bottom, left, right) for top, bottom, left, right in box + SIDE_MOVES
                               if 0 <= top < bottom - 1 and bottom <= height and 0 <= left < right - 1 and right <= width])
        scores = overlaps(part, shape, candidates)
        if scores.max() <= best:
            return best
        best, box = float(scores.max()), candidates[int(scores.argmax())]


def shape_of(mask: np.ndarray) -> Optional[str]:
    part = largest_part(mask)
    rows, cols = np.nonzero(part)
    if min(np.ptp(rows), np.ptp(cols)) < 2:
        return None
    part = np.pad(part[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1], FIT_MARGIN).astype(float)
    fits = {shape: fitted_overlap(part, shape) for shape in SHAPES}
    best = max(fits, key=fits.get)
    return best if fits[best] >= MIN_OVERLAP else None


def read_frame(frame: np.ndarray) -> FrameReading:
    mask = subject_mask(frame)
    if mask.sum() < 4:
        return FrameReading(None, None, None)
    rows, cols = np.nonzero(mask)
    rgb = np.median(frame[mask].astype(float), axis=0)
    return FrameReading(nearest_color(rgb), shape_of(mask), (float(cols.mean()), float(rows.mean())))


def majority(values) -> Optional[str]:
    """The most common reading; a tie goes to the one read first (not to the hash order of a set)."""
    counts = Counter(v for v in values if v is not None)
    return counts.most_common(1)[0][0] if counts else None


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
