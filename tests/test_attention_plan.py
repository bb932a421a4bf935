"""The attention call plan: merging causal groups into calls is optimal for its cost, bounded in mask size,
planned once per forward, and changes the attention only by rounding."""
import itertools
import random

import pytest
import torch

from model_core.transformers import attention_plan
from model_core.transformers.attention import (
    blockwise_causal_attention,
    causal_group_ends,
    dense_block_causal_mask,
    run_calls,
)
from model_core.transformers.attention_plan import merge_groups, plan_calls
from tests.test_transformer_behaviour import TINY, pyramid_column, randn, text_inputs, tiny_model, velocity


def cost(runs, group_ends, overhead):
    starts = [0, *group_ends[:-1]]
    return sum((group_ends[last - 1] - starts[first]) * group_ends[last - 1] + overhead for first, last in runs)


def partitions(count):
    """Every split of `count` groups into runs of consecutive groups."""
    for cuts in itertools.product([False, True], repeat=count - 1):
        runs, first = [], 0
        for index, cut in enumerate(cuts, start=1):
            if cut:
                runs.append((first, index))
                first = index
        yield [*runs, (first, count)]


@pytest.mark.parametrize("seed", range(6))
def test_merge_is_the_cheapest_split(seed):
    rng = random.Random(seed)
    sizes = [rng.randint(1, 400) for _ in range(rng.randint(1, 8))]
    ends = list(itertools.accumulate(sizes))
    overhead = rng.choice([0.0, 1e3, 1e5, 1e7])
    runs = merge_groups(ends, batch=1, overhead_pairs=overhead)
    assert [first for first, _ in runs] == [0, *[last for _, last in runs[:-1]]] and runs[-1][1] == len(ends)
    assert cost(runs, ends, overhead) == min(cost(split, ends, overhead) for split in partitions(len(ends)))


def test_no_overhead_keeps_one_call_per_group_and_a_large_one_merges_all():
    ends = causal_group_ends(16, [8, 8, 8, 32])
    assert merge_groups(ends, 2, 0.0) == [(0, 1), (1, 2), (2, 3), (3, 4)]
    assert merge_groups(ends, 2, 1e9) == [(0, 4)]


def test_a_merged_mask_never_exceeds_its_bound(monkeypatch):
    monkeypatch.setattr(attention_plan, "MERGED_MASK_ELEMENTS", 2 * 40 * 100)
    ends = causal_group_ends(20, [20, 20, 20, 20])  # 40, 60, 80, 100
    runs = merge_groups(ends, 2, 1e9)
    starts = [0, *ends[:-1]]
    for first, last in runs:
        if last - first > 1:
            assert 2 * (ends[last - 1] - starts[first]) * ends[last - 1] <= 2 * 40 * 100
    assert len(runs) > 1


def padded_sequence(frame_tokens, num_text=5, seed=0):
    length = num_text + sum(frame_tokens)
    valid = torch.ones(2, length, dtype=torch.bool)
    valid[1, 2:num_text] = False
    q, k, v = (randn(2, 3, length, 8, seed=seed + s) for s in range(3))
    return q, k, v, valid, causal_group_ends(num_text, frame_tokens)


@pytest.mark.parametrize("frame_tokens", [[4, 4, 4, 9], [1, 6, 2, 2, 2, 12], [7]])
def test_merged_calls_equal_one_call_per_group_and_the_dense_mask(frame_tokens, monkeypatch):
    q, k, v, valid, ends = padded_sequence(frame_tokens)
    per_group = blockwise_causal_attention(q, k, v, ends, valid)
    monkeypatch.setitem(attention_plan.CALL_OVERHEAD_MACS, "cpu", 1e12)
    calls = plan_calls(ends, valid, "mask", q)
    rows = ends[-1] if len(ends) > 1 else 1  # a single group needs the key padding only
    assert len(calls) == 1 and tuple(calls[0].mask.shape) == (2, 1, rows, ends[-1])
    merged = run_calls(q, k, v, calls)
    torch.testing.assert_close(merged, per_group, atol=1e-6, rtol=0)
    frame_ids = torch.repeat_interleave(torch.arange(len(ends)), torch.tensor([e - s for s, e in zip([0, *ends[:-1]], ends)]))
    dense = torch.nn.functional.scaled_dot_product_attention(q, k, v, dense_block_causal_mask(frame_ids, valid))
    torch.testing.assert_close(merged[1, :, 5:], dense[1, :, 5:], atol=1e-6, rtol=0)  # valid rows: the official mask
    torch.testing.assert_close(merged[0], dense[0], atol=1e-6, rtol=0)


@pytest.mark.parametrize("kind", sorted(TINY))
def test_transformer_with_merged_calls_equals_per_group_and_plans_once_per_forward(kind, monkeypatch):
    model = tiny_model(kind)
    clips, inputs = pyramid_column(), text_inputs(model, 2)
    with torch.no_grad():
        per_group = velocity(model, clips, inputs)
        monkeypatch.setitem(attention_plan.CALL_OVERHEAD_MACS, "cpu", 1e12)
        plans = []
        planner = attention_plan.plan_calls

        def counted(*args):
            plans.append(planner(*args))
            return plans[-1]

        monkeypatch.setattr("model_core.transformers.attention.plan_calls", counted)
        merged = velocity(model, clips, inputs)
    assert [len(plan) for plan in plans] == [1]  # planned once for all the layers: one call each
    torch.testing.assert_close(merged, per_group, atol=1e-5, rtol=0)


def test_a_cuda_device_plans_a_published_clip_in_far_fewer_calls():
    """benchmarks/attention_calls.py from the plans alone: a 5-s clip (16 units) of the published miniFLUX, 24 blocks."""
    from benchmarks.attention_calls import clip_attention_calls

    calls = {size: clip_attention_calls(size) for size in ("384p", "768p")}
    assert calls["384p"]["per_group"] == calls["768p"]["per_group"] == 98_640  # the groups do not depend on the size
    assert (calls["384p"]["cuda_plan"], calls["768p"]["cuda_plan"]) == (12_240, 20_880)
