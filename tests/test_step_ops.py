"""Fewer ops per sampling step, the same bits (issue 32): the single-stream block's [q ; k ; v ; mlp] GEMM, the joint
attention's q and k rotated together, the timestep frequencies and the text conditioning made once."""
import pytest
import torch

from benchmarks.counters import StepCounter
from model_core.transformers.attention import fuse_qkv_projections
from model_core.transformers.embeddings import (
    apply_rope_joined, apply_rope_pair, rotary_angles, rotation_tables, sinusoid_frequencies, timestep_frequencies,
)
from model_core.transformers.flux import FUSED_QKV_MLP
from model_core.transformers.fusion import fuse_projections
from model_core.transformers.modulation import fuse_modulations

from test_transformer_behaviour import pyramid_column, text_inputs, tiny_model, velocity


def counted(model, clips, inputs, new_prompt: bool = True) -> StepCounter:
    """The ops of a forward, the text conditioning made again unless `new_prompt` is False (then the model reuses
    it when `inputs` hold the tensors of its last call)."""
    if new_prompt:
        inputs = {**inputs, "encoder_hidden_states": inputs["encoder_hidden_states"].clone()}
    with torch.no_grad(), StepCounter() as counter:
        velocity(model, clips, inputs)
    return counter


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_the_fused_single_stream_block_computes_the_same_with_one_gemm_for_qkv_and_mlp(dtype):
    official = tiny_model("flux", num_single_layers=2).to(dtype)
    clips, inputs = [clip.to(dtype) for clip in pyramid_column()], text_inputs(official, 2)
    with torch.no_grad():
        expected = velocity(official, clips, inputs)
    fused = fuse_projections(tiny_model("flux", num_single_layers=2).to(dtype))
    for block in fused.single_transformer_blocks:
        assert FUSED_QKV_MLP in block._modules and "proj_mlp" not in block._modules
        assert not {"to_q", "to_k", "to_v", "to_qkv"} & set(block.attn._modules)
    with torch.no_grad():
        assert torch.equal(velocity(fused, clips, inputs), expected)
    # against the previous fusion (q/k/v and modulations only): per single-stream block one GEMM fewer, and proj_out
    # on the token rows (3 ops fewer in all)
    previous = tiny_model("flux", num_single_layers=2).to(dtype)
    fuse_modulations(fuse_qkv_projections(previous))
    with torch.no_grad():
        velocity(previous, clips, inputs)  # layouts and RoPE tables made, as for fused above
    before, after = counted(previous, clips, inputs), counted(fused, clips, inputs)
    assert before.ops["aten.addmm"] - after.ops["aten.addmm"] == 2 and before.op_count - after.op_count == 2 * 3


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_queries_and_keys_one_after_the_other_rotate_as_a_stacked_pair_does(dtype):
    generator = torch.Generator().manual_seed(0)
    q, k = (torch.randn(2, 3, 10, 8, generator=generator).to(dtype) for _ in range(2))
    (rotation,) = rotation_tables(*rotary_angles(torch.arange(10.0)[:, None], [8]))
    expected = apply_rope_pair(q, k, rotation)
    qk = torch.cat([q, k], dim=2)
    with StepCounter() as counter:
        joined = apply_rope_joined(qk, rotation)
    assert all(torch.equal(a, b) for a, b in zip(joined, expected))
    assert counter.op_count == 6 + (dtype != torch.float32) * 2  # view, complex, mul, real, view, unbind (+ casts)


def test_timestep_frequencies_are_made_once_per_device_with_the_same_values():
    first = timestep_frequencies(256, torch.device("cpu"))
    assert timestep_frequencies(256, torch.device("cpu")) is first
    assert torch.equal(first, sinusoid_frequencies(256, torch.device("cpu"))) and first.shape == (1, 128)


def text_stream_ops(counter: StepCounter) -> int:
    return counter.ops["aten.bmm"] + counter.ops["aten.addmm"]


@pytest.mark.parametrize("kind", ["flux", "mmdit"])
def test_the_text_conditioning_is_made_once_while_the_prompt_and_weights_stay_the_same(kind):
    model = fuse_projections(tiny_model(kind))
    clips, inputs = pyramid_column(), text_inputs(model, 2)
    first = counted(model, clips, inputs, new_prompt=False)
    again = counted(model, clips, {**inputs, "timestep": inputs["timestep"] * 0.5}, new_prompt=False)
    assert text_stream_ops(first) - text_stream_ops(again) == 3  # context embedder, the pooled text's two linears
    with torch.no_grad():
        reused = velocity(model, clips, inputs)
        fresh = velocity(fuse_projections(tiny_model(kind)), clips, inputs)
    assert torch.equal(reused, fresh)

    with torch.no_grad():
        model.context_embedder.weight.mul_(2)  # weights changed in place: computed again
        changed = velocity(model, clips, inputs)
        inputs["pooled_projections"].mul_(2)  # the prompt changed in place: computed again
        both = velocity(model, clips, inputs)
    expected = fuse_projections(tiny_model(kind))
    with torch.no_grad():
        expected.context_embedder.weight.mul_(2)
        assert torch.equal(both, velocity(expected, clips, inputs))
    assert not torch.equal(changed, reused) and not torch.equal(both, changed)


def test_with_gradients_the_text_conditioning_is_computed_every_time():
    model = tiny_model("flux")
    clips, inputs = pyramid_column(), text_inputs(model, 2)
    velocity(model, clips, inputs).sum().backward()
    model.zero_grad()
    velocity(model, clips, inputs).sum().backward()  # a reused graph would fail here
    assert model.context_embedder.weight.grad is not None
