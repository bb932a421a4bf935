"""Every adaLN modulation from one SiLU and, fused, one GEMM (issue 32; transformers.modulation).

A fused transformer computes the velocities of the official layers bit for bit, batched and packed, with one
modulation GEMM instead of one per adaLN layer; what it saves and loads is the official layout (test_fused_qkv's
layout tests run both fusions).
"""
import pytest
import torch

from benchmarks.counters import StepCounter
from model_core.transformers.fusion import fuse_projections
from model_core.transformers.modulation import FUSED, adaln_layers, fuse_modulations, modulated_modules

from test_transformer_behaviour import TINY, pyramid_column, text_inputs, tiny_model, velocity


def adaln_count(model) -> int:
    return sum(len(adaln_layers(module)) for module in modulated_modules(model))


def counted_ops(model, clips, inputs):
    """The velocity and its ops, the text conditioning included: a new prompt tensor every call (the model reuses
    its text conditioning for the same tensors: transformers.text_conditioning)."""
    inputs = {**inputs, "encoder_hidden_states": inputs["encoder_hidden_states"].clone()}
    with torch.no_grad(), StepCounter() as counted:
        out = velocity(model, clips, inputs)
    return out, counted.ops


@pytest.mark.parametrize("kind", sorted(TINY))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_fused_modulations_compute_the_same_with_one_gemm_and_one_silu(kind, dtype):
    model = tiny_model(kind).to(dtype)
    clips, inputs = [clip.to(dtype) for clip in pyramid_column()], text_inputs(model, 2)
    expected, ops = counted_ops(model, clips, inputs)
    layers = adaln_count(model)
    fuse_modulations(model)
    assert all(layer.fused_rows is not None and not hasattr(layer, "linear")
               for module in modulated_modules(model) for _, layer in adaln_layers(module))
    fused, fused_ops = counted_ops(model, clips, inputs)
    assert torch.equal(fused, expected)
    assert layers >= 3 and fused_ops["aten.addmm"] == ops["aten.addmm"] - (layers - 1)
    assert fused_ops["aten.silu"] == ops["aten.silu"] == 3  # the timestep and text embeddings' two, all adaLNs' one


@pytest.mark.parametrize("kind", sorted(TINY))
def test_packed_velocities_of_a_fused_model_equal_the_official_layers(kind):
    model = tiny_model(kind)
    columns = [pyramid_column(batch=1, seed=seed) for seed in (0, 10)]
    inputs = text_inputs(model, 2)
    with torch.no_grad():
        expected = model(columns, **inputs, packed=True).sample
        fuse_projections(model)
        fused = model(columns, **inputs, packed=True).sample
    assert FUSED in model._modules
    assert all(torch.equal(a, b) for a, b in zip(fused, expected))


def test_a_model_with_a_layer_that_is_not_a_plain_linear_stays_unfused():
    model = tiny_model("flux")
    model.norm_out.linear.register_forward_hook(lambda *_: None)
    fuse_modulations(model)
    assert FUSED not in model._modules and hasattr(model.transformer_blocks[0].norm1, "linear")


def test_unfusing_gives_back_each_layers_weights():
    official = tiny_model("mmdit")
    model = tiny_model("mmdit")
    fuse_modulations(model)
    with torch.no_grad():
        getattr(model, FUSED).weight.mul_(2)  # trained while fused
    fuse_modulations(model, fuse=False)
    assert FUSED not in model._modules
    for name, module in official.named_modules():
        if name.endswith("linear") and ("norm" in name):
            unfused = model.get_submodule(name)
            assert torch.equal(unfused.weight, 2 * module.weight) and torch.equal(unfused.bias, module.bias)
