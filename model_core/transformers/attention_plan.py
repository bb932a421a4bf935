"""How one layer's blockwise causal attention (Sec. 3.4) is split into kernel calls.

Query group g (text + the oldest frame, then one frame each) may see keys [0, group_ends[g]). One
call per group needs no mask beyond the text padding, but a late unit has one group per history
frame (up to 31), and on a GPU each call's fixed host cost (slicing, dispatch, launch) outweighs the
small groups' arithmetic (the H200 figures: benchmarks/RESULTS.md, "Attention calls per step"). So consecutive groups are merged into one call whose [B, 1, Lq, Lk] mask
keeps the causality inside it, where the masked-out work costs less than the calls saved.

The split minimises  sum over calls of (Lq x Lk + call overhead)  by dynamic programming over the
groups; the overhead is `call_overhead_macs(device)` (the multiply-adds a device does in the time one
extra call costs) in query-key pairs of this layer's batch x heads x head_dim. A merged call's mask is
bounded by `MERGED_MASK_ELEMENTS`, so long sequences never build a full L x L mask. The plan and its
masks are made once per layout and shared by every layer (the transformer keeps a layout for the steps of one
unit and stage: packing.PyramidTransformer.column_layouts).

How a call receives its mask depends on the backend (attention_backends.MASK_STYLES): `native`
takes an additive float mask built once; `flex` runs the whole layer as one call with a BlockMask
(it skips the masked blocks, so nothing is wasted); the flash / sage kernels take no 2-D mask, so
they keep one call per group.
"""
from dataclasses import dataclass

import torch

from .attention_backends import additive, key_mask

# Multiply-adds one extra attention call is worth on an accelerator, whose kernels the host queues: a call's
# dispatched ops at the per-op host cost of the H200 baseline (benchmarks/RESULTS.md, "Attention calls per step"),
# at ~1e14 attention multiply-adds per second.
ACCELERATOR_CALL_OVERHEAD_MACS = 4e10
# Device types that differ. The CPU: 0, one call per group, because merging saved no time on the CPU
# (benchmarks/attention_calls.py) and the per-group calls give today's outputs bit for bit there.
CALL_OVERHEAD_MACS = {"cpu": 0.0}
MERGED_MASK_ELEMENTS = 2**25  # B x Lq x Lk of a merged call's mask (64 MiB as bfloat16)


@dataclass(frozen=True)
class AttentionCall:
    """Queries [start, end) attend to keys [0, end); `mask` is what the kernel gets (see the module docstring)."""

    start: int
    end: int
    mask: object  # an additive [B, 1, 1 or Lq, end] mask, a flex BlockMask, or attention_backends.key_mask(...)


def call_overhead_macs(device) -> float:
    return CALL_OVERHEAD_MACS.get(torch.device(device).type, ACCELERATOR_CALL_OVERHEAD_MACS)


def call_overhead_pairs(macs: float, batch_heads_dim: int) -> float:
    """A call's fixed cost of `macs` in query-key pairs of a layer with batch x heads x head_dim = `batch_heads_dim`."""
    return macs / (2 * batch_heads_dim)  # QK^T and PV: 2 x head_dim multiply-adds per pair and head


def planned_overhead_pairs(q: torch.Tensor) -> float:
    """The call overhead a layer with queries q [B, heads, L, D] on q's device is planned with, in query-key pairs."""
    batch, heads, _, dim = q.shape
    return call_overhead_pairs(call_overhead_macs(q.device), batch * heads * dim)


def plan_key(style: str, q: torch.Tensor) -> tuple:
    """What a layer's plan depends on beside the causal groups and key validity: the mask style, the masks' dtype
    and, for merged calls, the planned overhead (a layout keeps one plan per key)."""
    return style, q.dtype, planned_overhead_pairs(q) if style == "mask" else None


def merge_groups(group_ends: list, batch: int, overhead_pairs: float) -> list:
    """[(first, last)]: runs of consecutive groups [first, last) merged into one call each, minimising
    the attention work plus the calls' overhead (dynamic programming over the group boundaries)."""
    starts = [0, *group_ends[:-1]]
    best, cut = [0.0] + [float("inf")] * len(group_ends), [0] * (len(group_ends) + 1)
    for last in range(1, len(group_ends) + 1):
        end = group_ends[last - 1]
        for first in range(last - 1, -1, -1):
            queries = end - starts[first]
            if first < last - 1 and batch * queries * end > MERGED_MASK_ELEMENTS:
                break  # merging further back only grows the mask
            cost = best[first] + queries * end + overhead_pairs
            if cost < best[last]:
                best[last], cut[last] = cost, first
    runs, last = [], len(group_ends)
    while last:
        runs.append((cut[last], last))
        last = cut[last]
    return runs[::-1]


def query_group_ends(group_ends: list, start: int, end: int, device) -> torch.Tensor:
    """[end - start]: the end of each query's group, for the queries [start, end)."""
    ends = torch.tensor(group_ends, device=device)
    return ends[torch.searchsorted(ends, torch.arange(start, end, device=device), right=True)]


def causal_mask(group_ends: list, start: int, end: int, key_valid: torch.Tensor) -> torch.Tensor:
    """[B, 1, Lq, end] bool: query i in [start, end) sees the valid keys before its group's end (Sec. 3.4)."""
    sees = torch.arange(end, device=key_valid.device)[None, :] < query_group_ends(group_ends, start, end, key_valid.device)[:, None]
    return key_valid[:, None, None, :end] & sees[None, None]


def flex_block_mask(group_ends: list, key_valid: torch.Tensor):
    """One flex BlockMask of the whole layer: valid keys before the query's group end."""
    from torch.nn.attention.flex_attention import create_block_mask

    length = group_ends[-1]
    query_end = query_group_ends(group_ends, 0, length, key_valid.device)

    def sees(batch, head, query, key):
        return key_valid[batch, key] & (key < query_end[query])

    return create_block_mask(sees, key_valid.shape[0], None, length, length, device=key_valid.device)


def plan_calls(group_ends: list, key_valid: torch.Tensor, style: str, q: torch.Tensor) -> list:
    """The kernel calls of one layer with queries q [B, heads, L, D] for a backend of mask `style`
    (attention_backends.MASK_STYLES)."""
    if style == "block_mask":
        return [AttentionCall(0, group_ends[-1], flex_block_mask(group_ends, key_valid))]
    starts = [0, *group_ends[:-1]]
    if style != "mask":
        return [AttentionCall(start, end, key_mask(key_valid[:, :end], style, q.dtype)) for start, end in zip(starts, group_ends)]
    calls = []
    for first, last in merge_groups(group_ends, q.shape[0], planned_overhead_pairs(q)):
        start, end = starts[first], group_ends[last - 1]
        merged = last - first > 1
        mask = additive(causal_mask(group_ends, start, end, key_valid), q.dtype) if merged else key_mask(
            key_valid[:, :end], style, q.dtype)
        calls.append(AttentionCall(start, end, mask))
    return calls
