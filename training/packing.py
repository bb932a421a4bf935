"""Which samples make up each global batch, and how they are split over ranks and micro-steps.

The global batch of a step is fixed by (seed, step) alone: images and videos are drawn from their own
shuffled streams (the image share of each batch is the recipe's `image_ratio`), every sample's random
choices come from its (seed, step, slot) generator, and the batch is cut into world x accumulation
bins of similar token counts (length-balanced packing, Patch n' Pack; Sec. 3.4). Changing the number
of ranks therefore changes who computes a sample, never what is computed.
"""
import functools
import heapq
import math
from dataclasses import dataclass

import numpy as np
import torch

from model_core.temporal import frames_for_duration, latent_frames

from .annotation_index import entry_meta
from .data import SampleRequest
from .objective import SampleChoices, draw_choices, sample_generator, sample_tokens, unit_index
from .permutation import Permutation

VAE_SCALE = 8


class ShuffledStream:
    """An endless sequence of entry indices: `rows` (a sequence of entry indices) in a new seeded order each epoch,
    O(1) work and memory per lookup (`Permutation`), the same on every rank."""

    def __init__(self, rows, seed: int, stream_id: int):
        self.rows, self.seed, self.stream_id = rows, seed, stream_id
        self.epoch, self.order = None, None

    def permutation(self, epoch: int) -> Permutation:
        if epoch != self.epoch:
            self.epoch, self.order = epoch, Permutation(len(self.rows), [self.seed, self.stream_id, epoch])
        return self.order

    def __getitem__(self, position: int) -> int:
        epoch, offset = divmod(position, len(self.rows))
        return int(self.rows[int(self.permutation(epoch)([offset])[0])])

    def take(self, start: int, count: int) -> list:
        """Entries at positions start .. start + count - 1."""
        out = []
        while count:
            epoch, offset = divmod(start, len(self.rows))
            n = min(count, len(self.rows) - offset)
            out += pick(self.rows, self.permutation(epoch)(np.arange(offset, offset + n)))
            start, count = start + n, count - n
        return out


def pick(rows, positions: np.ndarray) -> list:
    """rows[p] for each position, at once where `rows` can (an index's KindRows, an array)."""
    if hasattr(rows, "take"):
        return [int(r) for r in rows.take(positions)]
    return [int(rows[int(p)]) for p in positions]


def rows_of_kind(annotations, kind: str):
    """The entry indices of one kind: the index's memory-mapped lists, or a scan of a small in-memory list."""
    if hasattr(annotations, "rows"):
        return annotations.rows(kind)
    return [i for i, a in enumerate(annotations) if a.kind == kind]


def clip_seconds(schedule: list, step: int, fraction: float) -> float:
    """Clip length at `step` from the recipe's schedule [{until_step, seconds}] (the last phase runs
    on); `seconds` is a number or a [min, max] range that `fraction` picks from."""
    phase = next((p for p in schedule if p.get("until_step") is None or step < p["until_step"]), schedule[-1])
    seconds = phase["seconds"]
    return seconds[0] + fraction * (seconds[1] - seconds[0]) if isinstance(seconds, list) else seconds


def balanced_bins(costs: list, num_bins: int) -> list:
    """Greedy longest-first assignment of items to `num_bins` bins of similar total cost; each bin
    gets at least one item when there are enough. Returns lists of item indices, each ascending."""
    heap = [(0, b) for b in range(num_bins)]
    bins = [[] for _ in range(num_bins)]
    for index in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        load, b = heapq.heappop(heap)
        bins[b].append(index)
        heapq.heappush(heap, (load + costs[index], b))
    return [sorted(b) for b in bins]


@dataclass(frozen=True)
class MicroBatching:
    """How one process covers its share of the global batch: `accumulation` micro-batches of about `samples`
    samples and `tokens` image tokens each, every one forwarded and backpropagated before the next."""

    accumulation: int
    samples: float
    tokens: float

    def describe(self, world: int, global_batch: int) -> str:
        return (f"global batch {global_batch} on {world} process(es): {self.accumulation} accumulation step(s) of "
                f"~{self.samples:.1f} samples (~{self.tokens:.0f} image tokens) per process")


def micro_batching(global_batch: int, world: int, tokens_per_gpu: int, sample_tokens: float) -> MicroBatching:
    """Accumulation from the world size and the per-process token budget: the fewest micro-steps whose micro-batches
    hold at most `tokens_per_gpu` image tokens on average (samples of `sample_tokens` each), and at least one sample."""
    if global_batch < world:
        raise ValueError(f"global batch {global_batch} is smaller than the {world} processes; give each one a sample")
    accumulation = max(1, min(math.ceil(global_batch * sample_tokens / (world * tokens_per_gpu)), global_batch // world))
    samples = global_batch / (world * accumulation)
    return MicroBatching(accumulation, samples, samples * sample_tokens)


def phase_starts(schedule: list, max_steps: int) -> list:
    """The first step of every clip-length phase that a run of `max_steps` reaches."""
    return [0, *(p["until_step"] for p in schedule[:-1] if p.get("until_step") is not None and p["until_step"] < max_steps)]


class BatchPlanner:
    """The requests of every step's global batch and their split into balanced bins."""

    def __init__(self, annotations: list, data: dict, objective: dict, seed: int, global_batch: int, num_bins: int,
                 frames_per_latent: int):
        self.annotations, self.seed, self.global_batch = annotations, seed, global_batch
        self.split_into(num_bins)
        self.data, self.objective, self.frames_per_latent = data, objective, frames_per_latent
        if not len(annotations):
            raise ValueError("the recipe's annotation files list no samples")
        images, videos = rows_of_kind(annotations, "image"), rows_of_kind(annotations, "video")
        ratio = data.get("image_ratio")
        if ratio is None or not len(images) or not len(videos):
            self.streams = [(ShuffledStream(range(len(annotations)), seed, 0), global_batch)]
        else:
            num_images = round(ratio * global_batch)
            self.streams = [(ShuffledStream(images, seed, 1), num_images), (ShuffledStream(videos, seed, 2), global_batch - num_images)]
        if len(videos) and not data.get("clip_schedule"):
            raise ValueError("the annotations include videos but data.clip_schedule is empty; give clip lengths in seconds")

    def split_into(self, num_bins: int) -> None:
        """Cut every global batch into `num_bins` bins (processes x accumulation steps)."""
        if self.global_batch < num_bins:
            raise ValueError(f"global batch {self.global_batch} is smaller than processes x accumulation steps ({num_bins})")
        self.num_bins = num_bins

    def mean_sample_tokens(self, max_steps: int) -> float:
        """Image tokens per sample averaged over a global batch: at the first step of each clip phase the run reaches,
        the largest (the budget must hold the longest clips)."""
        steps = phase_starts(self.data.get("clip_schedule") or [{}], max_steps)
        return max(float(np.mean([self.cost(r) for r in self.requests(step)])) for step in steps)

    def choices(self, step: int, slot: int):
        o = self.objective
        return draw_choices(sample_generator(self.seed, step, slot), o.get("stages", 1), o.get("history_noise_max", 0.0),
                            o.get("text_dropout", 0.0))

    def entries(self, step: int) -> list:
        """The annotation rows of the global batch of `step`, slot by slot."""
        return [e for stream, count in self.streams if count for e in stream.take(step * count, count)]

    def frames(self, step: int, fraction: float, meta) -> int:
        """Pixel frames of a sample (index meta row: image flag, height, width, frames) at a duration fraction."""
        if meta[0] == 1:
            return 1
        seconds = clip_seconds(self.data["clip_schedule"], step, fraction)
        return frames_for_duration(seconds, self.data["fps"], self.frames_per_latent)

    def request(self, step: int, slot: int, entry: int, meta, choices) -> SampleRequest:
        return SampleRequest(entry, step, slot, self.frames(step, choices.duration_fraction, meta), choices.clip_start)

    def requests(self, step: int) -> list:
        entries = self.entries(step)
        meta = entry_meta(self.annotations, entries)
        return [self.request(step, slot, entry, meta[slot], self.choices(step, slot)) for slot, entry in enumerate(entries)]

    def latent_frames(self, num_frames: int, meta) -> int:
        """Latent frames a sample yields: those asked for, fewer when its extracted clip is shorter."""
        return latent_frames(num_frames if meta[3] < 1 else min(num_frames, int(meta[3])), self.frames_per_latent)

    def cost(self, request: SampleRequest) -> int:
        """Image tokens of the request's column."""
        meta = entry_meta(self.annotations, [request.entry])
        return self.tokens(bucket_sides(meta, self.data["buckets"])[0], request.num_frames, meta[0],
                           self.choices(request.step, request.slot))

    def tokens(self, side, num_frames: int, meta, choices) -> int:
        """Image tokens of a column: its sample's bucket side, pixel frames, index meta row and choices."""
        num_latent = self.latent_frames(num_frames, meta)
        return column_tokens(int(side[0]) // VAE_SCALE, int(side[1]) // VAE_SCALE, num_latent, choices.stage,
                             unit_index(choices, num_latent), self.objective.get("stages", 1))

    def expected_costs(self, step: int, meta: np.ndarray, sides: np.ndarray) -> list:
        """Full-resolution latent tokens of each sample's clip at the middle of its length range: what a sample costs
        before its random choices are drawn."""
        video_frames = self.frames(step, 0.5, (0,))
        return [int(h // VAE_SCALE * (w // VAE_SCALE) * self.latent_frames(1 if m[0] == 1 else video_frames, m))
                for (h, w), m in zip(sides, meta)]

    def rank_bins(self, step: int, rank: int, world: int) -> list:
        """This rank's num_bins / world bins of `step` (its micro-steps in order), planned from its own samples:
        the global batch is split over the ranks by expected cost (index meta only: no line read, no random draw),
        then only this rank's samples draw their choices and are split into its micro-steps by their tokens."""
        entries = self.entries(step)
        meta = entry_meta(self.annotations, entries)
        sides = bucket_sides(meta, self.data["buckets"]).tolist()
        meta = meta.tolist()  # Python ints: per-sample arithmetic on numpy scalars costs more than the planning
        mine = balanced_bins(self.expected_costs(step, meta, sides), world)[rank]
        requests, costs = [], []
        for slot in mine:
            choices = self.choices(step, slot)
            requests.append(self.request(step, slot, entries[slot], meta[slot], choices))
            costs.append(self.tokens(sides[slot], requests[-1].num_frames, meta[slot], choices))
        return [[requests[i] for i in b] for b in balanced_bins(costs, self.num_bins // world)]

    def bins(self, step: int) -> list:
        """The num_bins bins of `step` as one process plans them."""
        return self.rank_bins(step, 0, 1)


@functools.lru_cache(maxsize=4096)
def column_tokens(latent_height: int, latent_width: int, num_latent: int, stage: int, unit: int, stages: int) -> int:
    """`sample_tokens` of a column, which depends on its size, frames, stage and unit alone (so it is remembered)."""
    choices = SampleChoices(stage, (unit + 0.5) / num_latent, 0.0, 0.0, False, 0.0, 0.0)  # unit_index gives `unit`
    return sample_tokens(latent_height, latent_width, num_latent, choices, stages)


def bucket_sides(meta: np.ndarray, buckets) -> np.ndarray:
    """int64 [k, 2]: each sample's (height, width) bucket, the nearest in aspect ratio (log scale) to its own size,
    the first bucket where the size is unknown (`nearest_bucket` for many samples at once)."""
    buckets = np.asarray(buckets, np.int64)
    known = (meta[:, 1] > 0) & (meta[:, 2] > 0)
    ratios = np.log(np.where(known, meta[:, 1], 1) / np.where(known, meta[:, 2], 1))
    nearest = np.abs(ratios[:, None] - np.log(buckets[:, 0] / buckets[:, 1])[None]).argmin(axis=1)
    return buckets[np.where(known, nearest, 0)]


class RankBatches(torch.utils.data.Sampler):
    """Batch sampler for a DataLoader: this rank's bins, step after step, from `start_step` on."""

    def __init__(self, planner: BatchPlanner, rank: int, world: int, start_step: int, max_steps: int):
        self.planner, self.rank, self.world = planner, rank, world
        self.start_step, self.max_steps = start_step, max_steps

    def __iter__(self):
        for step in range(self.start_step, self.max_steps):
            yield from self.planner.rank_bins(step, self.rank, self.world)

    def __len__(self):
        return (self.max_steps - self.start_step) * (self.planner.num_bins // self.world)
