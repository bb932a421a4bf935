"""The whole transformer forward compiles as one graph (issue 32): torch._dynamo.explain finds no graph break,
attention included, with one call per causal group and with the merged calls a CUDA device plans; and the blocks
compiled one by one (speed.compile_blocks) keep the attention processor eager."""
import pytest
import torch

from model_core.transformers import attention_plan
from model_core.transformers.attention import BlockwiseCausalAttnProcessor
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


def test_blocks_compiled_one_by_one_keep_the_attention_eager():
    model = tiny_model("flux")
    processors = [m.processor for m in model.modules() if isinstance(getattr(m, "processor", None),
                                                                      BlockwiseCausalAttnProcessor)]
    for processor in processors:
        processor.compiled = True  # what speed.compile_blocks sets
    explained = explain(model)
    reasons = {str(getattr(b, "reason", b)).splitlines()[0] for b in explained.break_reasons}
    assert explained.graph_break_count > 0 and all("torch.compiler.disable" in reason for reason in reasons), reasons
