"""The whole transformer forward compiles as one graph (issue 32): torch._dynamo.explain finds no graph break,
attention included, with one call per causal group and with the merged calls a CUDA device plans."""
import pytest
import torch

from model_core.transformers import attention_plan
from tests.test_transformer_behaviour import TINY, pyramid_column, text_inputs, tiny_model


def explain(model):
    torch._dynamo.reset()
    with torch.no_grad():
        return torch._dynamo.explain(model)([pyramid_column()], **text_inputs(model, 2))


@pytest.mark.parametrize("plan", ["per group", "CUDA plan"])
@pytest.mark.parametrize("kind", sorted(TINY))
def test_the_whole_forward_has_no_graph_break(kind, plan, monkeypatch):
    overhead = attention_plan.ACCELERATOR_CALL_OVERHEAD_MACS if plan == "CUDA plan" else 0.0
    monkeypatch.setitem(attention_plan.CALL_OVERHEAD_MACS, "cpu", overhead)
    explained = explain(tiny_model(kind))
    assert explained.graph_break_count == 0 and explained.graph_count == 1, explained.break_reasons

