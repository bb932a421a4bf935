"""Fused q/k/v projections (issue 32): one GEMM per attention stream, weights still in the official layout.

A fused transformer (transformers.attention.fuse_qkv_projections) computes what the official to_q/to_k/to_v
(and add_q/k/v_proj) layers compute, bit for bit; with the adaLN modulations fused too (transformers.fusion,
what pipelines load), state_dict() and save_pretrained() give the official keys in the official order,
load_state_dict() takes them, and LoRAs (which target the official layers) still load.
"""
import pytest
import torch
from safetensors import safe_open

from benchmarks.counters import StepCounter
from model_core.speed import fuse_projections
from model_core.transformers.attention import fuse_qkv_projections
from model_core.transformers.fusion import fuse_projections as fuse_all
from model_core.transformers.modulation import FUSED

from test_lora import PipelineLike, base_weights, run, tiny_transformer, trained_adapter
from test_transformer_behaviour import TINY, pyramid_column, text_inputs, tiny_model, velocity

PROJECTIONS = ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj")


def projection_layers(model) -> set:
    return {name.rsplit(".", 1)[-1] for name, _ in model.named_modules() if name.rsplit(".", 1)[-1] in
            PROJECTIONS + ("to_qkv", "to_added_qkv")}


def addmm_count(model, clips, inputs) -> int:
    with torch.no_grad(), StepCounter() as counted:
        velocity(model, clips, inputs)
    return counted.ops["aten.addmm"]


@pytest.mark.parametrize("kind", sorted(TINY))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_fused_projections_compute_the_same_with_one_gemm_per_stream(kind, dtype):
    model = tiny_model(kind).to(dtype)
    clips, inputs = [clip.to(dtype) for clip in pyramid_column()], text_inputs(model, 2)
    with torch.no_grad():
        expected = velocity(model, clips, inputs)
    gemms = addmm_count(model, clips, inputs)
    fuse_qkv_projections(model)
    assert projection_layers(model) == {"to_qkv", "to_added_qkv"}
    with torch.no_grad():
        assert torch.equal(velocity(model, clips, inputs), expected)
    streams = sum(1 + hasattr(module, "to_added_qkv") for module in model.modules() if hasattr(module, "to_qkv"))
    assert addmm_count(model, clips, inputs) == gemms - 2 * streams


@pytest.mark.parametrize("kind", sorted(TINY))
def test_fused_model_saves_and_loads_the_official_layout_key_for_key(kind, tmp_path):
    official = tiny_model(kind)
    weights = official.state_dict()
    fused = fuse_all(tiny_model(kind))
    assert FUSED in fused._modules and any(name.endswith("to_qkv") for name, _ in fused.named_modules())
    assert list(fused.state_dict()) == list(weights)
    assert all(torch.equal(value, weights[key]) for key, value in fused.state_dict().items())

    other = fuse_all(tiny_model(kind))
    with torch.no_grad():
        for parameter in other.parameters():
            parameter.mul_(0.5)
    assert other.load_state_dict(weights, strict=True)  # official keys into fused layers: nothing missing or left
    assert all(torch.equal(value, weights[key]) for key, value in other.state_dict().items())

    fused.save_pretrained(tmp_path / "saved")
    with safe_open(str(tmp_path / "saved" / "diffusion_pytorch_model.safetensors"), framework="pt") as handle:
        assert sorted(handle.keys()) == sorted(weights)
        assert all(torch.equal(handle.get_tensor(key), weights[key]) for key in weights)
    reloaded = type(official).from_pretrained(tmp_path / "saved").eval()
    clips, inputs = pyramid_column(), text_inputs(official, 2)
    with torch.no_grad():
        assert torch.equal(velocity(reloaded, clips, inputs), velocity(official, clips, inputs))


@pytest.mark.parametrize("kind", sorted(TINY))
def test_unfusing_gives_back_the_official_modules_in_their_order(kind):
    official = tiny_model(kind)
    model = fuse_all(tiny_model(kind))
    fuse_all(model, fuse=False)
    assert [name for name, _ in model.named_modules()] == [name for name, _ in official.named_modules()]
    assert all(torch.equal(value, official.state_dict()[key]) for key, value in model.state_dict().items())


def test_a_lora_loads_on_a_fused_model_and_unloading_fuses_again(tmp_path):
    folder, trained = trained_adapter(tmp_path / "a", seed=1)
    model = tiny_transformer()
    model.load_state_dict(base_weights(trained))
    fuse_all(model)
    clips, text = pyramid_column(), text_inputs(model, 2)
    base = run(model, clips, text)
    holder = PipelineLike(model)
    holder.load_lora_weights(folder)
    assert projection_layers(model) == set(PROJECTIONS) and FUSED not in model._modules  # what the LoRA targets
    torch.testing.assert_close(run(model, clips, text), run(trained, clips, text), rtol=0, atol=1e-6)
    holder.unload_lora_weights()
    assert projection_layers(model) == {"to_qkv", "to_added_qkv"} and FUSED in model._modules
    assert torch.equal(run(model, clips, text), base)


def test_pipelines_fuse_unless_hooks_manage_the_layers():
    """speed.fuse_projections (what apply_speed_options runs): a plain transformer is fused; one whose layers
    layerwise casting (quantize=fp8) or offloading hooks manage keeps the layers those hooks were set up with."""
    plain = tiny_transformer()
    fuse_projections(plain)
    assert projection_layers(plain) == {"to_qkv", "to_added_qkv"} and FUSED in plain._modules
    hooked = tiny_transformer()
    hooked.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32)
    fuse_projections(hooked)
    assert projection_layers(hooked) == set(PROJECTIONS) and FUSED not in hooked._modules
