"""Attention backends: every key-padding style and CPU backend equals native SDPA; set_attention_backend
really changes the kernel the transformer calls."""
import warnings

import pytest
import torch
from diffusers.models import attention_dispatch
from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry

from torch.nn.attention.flex_attention import BlockMask

from model_core.speed import TORCH_FLEX_WARNING, check_speed_options, compile_available, compile_forward
from model_core.transformers import attention
from model_core.transformers.attention import blockwise_causal_attention, causal_group_ends
from model_core.transformers.attention_backends import (
    HEADS_FIRST,
    attend,
    check_attention_backend,
    key_mask,
    installed_attention_backends,
    usable_attention_backends,
)
from tests.test_transformer_behaviour import TINY, pyramid_column, randn, text_inputs, tiny_model, velocity

CPU_BACKENDS = usable_attention_backends("cpu", torch.float32)


def padded_keys(rows=2, length=19, heads=2, dim=8):
    """q/k/v in the dispatch layout [B, L, heads, D]; row 0 has three padded text keys in the middle."""
    q = randn(rows, 7, heads, dim, seed=1)
    k, v = (randn(rows, length, heads, dim, seed=s) for s in (2, 3))
    valid = torch.ones(rows, length, dtype=torch.bool)
    valid[0, 2:5] = False
    return q, k, v, valid


@pytest.mark.parametrize("style", ["prefix", "compact"])
def test_each_key_padding_style_equals_the_masked_call(style):
    q, k, v, valid = padded_keys()
    masked = attend(q, k, v, key_mask(valid, "mask", q.dtype), "native", style="mask")
    chosen = attend(q, k, v, key_mask(valid, style, q.dtype), "native", style=style)
    torch.testing.assert_close(chosen, masked, atol=1e-6, rtol=1e-5)


def test_padded_keys_change_nothing_in_the_masked_call():
    q, k, v, valid = padded_keys()
    scrambled_k, scrambled_v = k.clone(), v.clone()
    scrambled_k[0, 2:5], scrambled_v[0, 2:5] = 100.0, -100.0
    mask = key_mask(valid, "mask", q.dtype)
    torch.testing.assert_close(attend(q, scrambled_k, scrambled_v, mask), attend(q, k, v, mask))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_cpu_backend_equals_native_blockwise_attention(backend):
    frame_tokens, num_text = [3, 3, 5, 7], 4
    length = num_text + sum(frame_tokens)
    valid = torch.ones(2, length, dtype=torch.bool)
    valid[0, 2:num_text] = False
    q, k, v = (randn(2, 2, length, 8, seed=s) for s in range(3))
    ends = causal_group_ends(num_text, frame_tokens)
    native = blockwise_causal_attention(q, k, v, ends, valid)
    torch.testing.assert_close(blockwise_causal_attention(q, k, v, ends, valid, backend), native, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", sorted(TINY))
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_transformer_with_each_cpu_backend_equals_native(kind, backend):
    model = tiny_model(kind)
    clips, inputs = pyramid_column(), text_inputs(model, 2)
    with torch.no_grad():
        native = velocity(model, clips, inputs)
        model.set_attention_backend(backend)
        chosen = velocity(model, clips, inputs)
    torch.testing.assert_close(chosen, native, atol=1e-5, rtol=0)


def counting(monkeypatch, name):
    """Replace backend `name`'s kernel by a counting wrapper (native and flex: the call attention.py makes on
    [B, heads, L, D], told apart by their masks; the others: the dispatch's kernel); returns the call list."""
    calls = []
    if name in HEADS_FIRST:
        kernel = attention.attend_heads_first  # counted already when the other heads-first backend is

        def counted_heads_first(q, k, v, mask):
            if isinstance(mask, BlockMask) == (name == "flex"):
                calls.append(q.shape)
            return kernel(q, k, v, mask)

        monkeypatch.setattr(attention, "attend_heads_first", counted_heads_first)
        return calls
    key = AttentionBackendName(name)
    kernel = _AttentionBackendRegistry._backends[key]

    def counted(**kwargs):
        calls.append(kwargs["query"].shape)
        return kernel(**kwargs)

    monkeypatch.setitem(_AttentionBackendRegistry._backends, key, counted)
    return calls


@pytest.mark.skipif("flex" not in CPU_BACKENDS, reason="flex attention is not available in this torch")
def test_set_attention_backend_changes_the_called_kernel(monkeypatch):
    model = tiny_model("flux")  # one dual- and one single-stream block: two attention layers
    clips, inputs = pyramid_column(), text_inputs(model, 2)
    native_calls, flex_calls = counting(monkeypatch, "native"), counting(monkeypatch, "flex")
    groups = 2 + 1 + 1  # the quarter-res history has 2 frames, then the half-res frame, then the current unit
    with torch.no_grad():  # on the CPU native makes one call per group; flex one call per layer (a BlockMask)
        velocity(model, clips, inputs)
        assert (len(native_calls), len(flex_calls)) == (2 * groups, 0)
        model.set_attention_backend("flex")
        velocity(model, clips, inputs)
        assert (len(native_calls), len(flex_calls)) == (2 * groups, 2)
        model.reset_attention_backend()
        velocity(model, clips, inputs)
    assert (len(native_calls), len(flex_calls)) == (4 * groups, 2)


@pytest.mark.skipif("flex" not in CPU_BACKENDS, reason="flex attention is not available in this torch")
def test_diffusers_attention_backend_context_reaches_a_model_with_no_backend_set(monkeypatch):
    """diffusers' `attention_backend(...)` context steers a model with no backend of its own, as it steers
    diffusers' models; a backend set on one model never leaks into another."""
    model = tiny_model("flux")
    clips, inputs = pyramid_column(), text_inputs(model, 2)
    native_calls, flex_calls = counting(monkeypatch, "native"), counting(monkeypatch, "flex")
    with torch.no_grad():
        expected = velocity(model, clips, inputs)
        with attention_dispatch.attention_backend("flex"):
            inside = velocity(model, clips, inputs)
        assert len(flex_calls) == 2
        velocity(model, clips, inputs)
        assert len(flex_calls) == 2
        model.set_attention_backend("native")  # a model's own backend wins over the context
        with attention_dispatch.attention_backend("flex"):
            velocity(model, clips, inputs)
        tiny_model("flux").set_attention_backend("flex")  # another model's backend stays that model's
        velocity(model, clips, inputs)
        model.reset_attention_backend()
        velocity(model, clips, inputs)
    assert len(flex_calls) == 2 and len(native_calls) == 5 * 4 * 2
    torch.testing.assert_close(inside, expected, atol=1e-5, rtol=0)
    with attention_dispatch.attention_backend("_native_math"), pytest.raises(ValueError, match="usable: native"):
        model.reset_attention_backend()
        velocity(model, clips, inputs)


def test_unavailable_backend_is_refused_with_the_usable_ones(monkeypatch):
    model = tiny_model("mmdit")
    missing = "sage" if "sage" not in installed_attention_backends() else "flash"
    with pytest.raises(ValueError, match="not installed.*usable: native"):
        model.set_attention_backend(missing)
    with pytest.raises(ValueError, match="usable: native"):
        check_attention_backend("nonsense")
    monkeypatch.setattr(attention_dispatch, "_CAN_USE_FLASH_ATTN", True)
    with pytest.raises(ValueError, match="needs a CUDA GPU"):
        check_attention_backend("flash-varlen", "cpu", torch.bfloat16)
    assert check_attention_backend("flash-varlen") == "flash_varlen"
    assert check_attention_backend("Native", "cpu", torch.float32) == "native"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or not compile_available("cuda"), reason="needs CUDA and Triton")
def test_a_compiled_model_runs_flex_compiled():
    """compile=True compiles the whole forward, flex attention included (its calls traced into the graph under the
    plan's BlockMask, not torch's eager reference), and it computes what native computes."""
    model = tiny_model("flux").cuda()
    clips = [clip.cuda() for clip in pyramid_column()]
    inputs = {name: value.cuda() for name, value in text_inputs(model, 2).items()}
    torch._dynamo.reset()
    with torch.no_grad():
        native = velocity(model, clips, inputs)
        model.set_attention_backend("flex")
        compile_forward(model, True)
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message=TORCH_FLEX_WARNING)  # the eager reference would warn
            flex = velocity(model, clips, inputs)
    torch._dynamo.reset()
    torch.testing.assert_close(flex, native, atol=1e-5, rtol=0)


def test_flex_with_compile_is_refused_on_the_cpu_with_what_works():
    with pytest.raises(ValueError, match="attention_backend 'flex' does not compile on the CPU .*; use native with "
                                         "compile, or flex without it"):
        check_speed_options("cpu", torch.float32, "flex", True)
    assert check_speed_options("cpu", torch.float32, "flex", False) == "flex"


@pytest.mark.skipif("flex" not in CPU_BACKENDS, reason="flex attention is not available in this torch")
def test_flex_block_mask_is_made_once_per_layout(monkeypatch):
    """The flex BlockMask is part of the plan kept for a (unit, stage): steps with the same text mask and shapes reuse
    it, every layer included; new shapes make one more."""
    from torch.nn.attention import flex_attention

    made, create = [], flex_attention.create_block_mask

    def counted(*args, **kwargs):
        made.append(1)
        return create(*args, **kwargs)

    monkeypatch.setattr(flex_attention, "create_block_mask", counted)
    model = tiny_model("flux")
    model.set_attention_backend("flex")
    inputs = text_inputs(model, 2)
    with torch.no_grad():
        for timestep in (900.0, 500.0, 100.0):  # three steps of one stage
            velocity(model, pyramid_column(), {**inputs, "timestep": torch.full((2,), timestep)})
        assert len(made) == 1
        velocity(model, pyramid_column(height=8, width=16), inputs)
    assert len(made) == 2
