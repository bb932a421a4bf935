"""Behaviour of the pyramid transformers beyond golden parity: dtypes, checkpointing, I/O, causality."""
import pytest
import torch
import torch.nn.functional as F

from model_core.transformers import PyramidFluxTransformer, PyramidMMDiT
from model_core.transformers.attention import blockwise_causal_attention, causal_group_ends, dense_block_causal_mask

TINY = {
    "flux": (
        PyramidFluxTransformer,
        dict(in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
             joint_attention_dim=32, pooled_projection_dim=24, axes_dims_rope=[4, 6, 6]),
    ),
    "mmdit": (
        PyramidMMDiT,
        dict(sample_size=16, in_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=2,
             caption_projection_dim=32, pooled_projection_dim=24, pos_embed_max_size=24, joint_attention_dim=40),
    ),
}
LATENT_CHANNELS = 4
TEXT_LEN = 6


def tiny_model(kind, **overrides):
    """The same random weights in every process, whatever ran before (module init draws from torch's global RNG)."""
    cls, config = TINY[kind]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return cls.from_config({**config, **overrides}).eval()


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def pyramid_column(batch=2, seed=0, height=16, width=24):
    """Quarter-res 2 frames, half-res 1 frame, current unit: the stage-2 history layout."""
    sizes = [(2, height // 4, width // 4), (1, height // 2, width // 2), (1, height, width)]
    return [randn(batch, LATENT_CHANNELS, t, h, w, seed=seed + i) for i, (t, h, w) in enumerate(sizes)]


def text_inputs(model, rows, seed=100):
    joint, pooled = model.config.joint_attention_dim, model.config.pooled_projection_dim
    mask = torch.ones(rows, TEXT_LEN, dtype=torch.long)
    mask[::2, TEXT_LEN // 2 :] = 0
    return dict(
        encoder_hidden_states=randn(rows, TEXT_LEN, joint, seed=seed),
        encoder_attention_mask=mask,
        pooled_projections=randn(rows, pooled, seed=seed + 1),
        timestep=torch.linspace(900.0, 100.0, rows),
    )


def public_config(model):
    return {key: value for key, value in model.config.items() if not key.startswith("_")}


def velocity(model, clips, inputs):
    return model([clips], **inputs).sample[0]


def last_block_image_tokens(model, clips, inputs):
    """Image tokens of every clip after the trunk, captured with a hook on the last block."""
    captured = {}
    blocks = getattr(model, "single_transformer_blocks", model.transformer_blocks)
    last = blocks[-1]
    handle = last.register_forward_hook(lambda module, args, out: captured.setdefault("out", out))
    with torch.no_grad():
        velocity(model, clips, inputs)
    handle.remove()
    out = captured["out"]
    return out[1] if isinstance(out, tuple) else out[:, TEXT_LEN:]


@pytest.mark.parametrize("kind", sorted(TINY))
def test_bf16_forward_close_to_fp32(kind):
    model = tiny_model(kind)
    clips, inputs = pyramid_column(), text_inputs(model, 2)
    with torch.no_grad():
        reference = velocity(model, clips, inputs)
        low = velocity(model.to(torch.bfloat16), clips, inputs)
    assert low.dtype == torch.bfloat16 and torch.isfinite(low).all()
    assert (low.float() - reference).abs().max() < 0.1 * reference.abs().max()


@pytest.mark.parametrize("kind", sorted(TINY))
def test_gradient_checkpointing_gives_same_gradients(kind):
    plain = tiny_model(kind, gradient_checkpointing_ratio=1.0).train()
    checkpointed = tiny_model(kind, gradient_checkpointing_ratio=1.0, use_gradient_checkpointing=True).train()
    checkpointed.load_state_dict(plain.state_dict())
    assert checkpointed.is_gradient_checkpointing and not plain.is_gradient_checkpointing
    clips, inputs = pyramid_column(), text_inputs(plain, 2)
    for model in (plain, checkpointed):
        velocity(model, clips, inputs).square().mean().backward()
    for (name, a), (_, b) in zip(plain.named_parameters(), checkpointed.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("kind", sorted(TINY))
def test_save_and_load_round_trip(kind, tmp_path):
    model = tiny_model(kind)
    model.save_pretrained(tmp_path / "transformer")
    loaded = type(model).from_pretrained(tmp_path, subfolder="transformer").eval()
    assert public_config(loaded) == public_config(model)
    clips, inputs = pyramid_column(), text_inputs(model, 2)
    with torch.no_grad():
        torch.testing.assert_close(velocity(loaded, clips, inputs), velocity(model, clips, inputs))


@pytest.mark.parametrize("causal", [True, False])
def test_grouped_attention_equals_dense_mask(causal):
    frame_tokens, num_text, heads, dim = [3, 3, 5, 7, 7], 4, 2, 8
    length = num_text + sum(frame_tokens)
    image_frames = torch.repeat_interleave(torch.arange(5.0), torch.tensor(frame_tokens))
    frame_ids = torch.cat([torch.zeros(num_text), image_frames])
    if not causal:
        frame_ids = torch.zeros(length)
    valid = torch.ones(2, length, dtype=torch.bool)
    valid[0, 2:num_text] = False
    q, k, v = (randn(2, heads, length, dim, seed=s) for s in range(3))
    grouped = blockwise_causal_attention(q, k, v, causal_group_ends(num_text, frame_tokens, causal), valid)
    dense = F.scaled_dot_product_attention(q, k, v, attn_mask=dense_block_causal_mask(frame_ids, valid))
    query_valid = valid[:, None, :, None].expand_as(dense)
    torch.testing.assert_close(grouped[query_valid], dense[query_valid])
    assert torch.isfinite(grouped).all()


@pytest.mark.parametrize("kind", sorted(TINY))
def test_history_is_not_influenced_by_later_frames(kind):
    model = tiny_model(kind)
    clips, inputs = pyramid_column(), text_inputs(model, 2)
    quarter, half = (clip.shape[2] * clip.shape[3] * clip.shape[4] // 4 for clip in clips[:2])
    before = last_block_image_tokens(model, clips, inputs)
    new_current = last_block_image_tokens(model, [clips[0], clips[1], clips[2] + 1.0], inputs)
    torch.testing.assert_close(new_current[:, : quarter + half], before[:, : quarter + half])
    assert not torch.allclose(new_current[:, quarter + half :], before[:, quarter + half :])
    new_half_res_frame = last_block_image_tokens(model, [clips[0], clips[1] + 1.0, clips[2]], inputs)
    torch.testing.assert_close(new_half_res_frame[:, :quarter], before[:, :quarter])
    assert not torch.allclose(new_half_res_frame[:, quarter:], before[:, quarter:])


@pytest.mark.parametrize("kind", sorted(TINY))
def test_without_temporal_causality_history_sees_the_current_unit(kind):
    model = tiny_model(kind, use_temporal_causal=False)
    clips, inputs = pyramid_column(), text_inputs(model, 2)
    before = last_block_image_tokens(model, clips, inputs)
    after = last_block_image_tokens(model, clips[:-1] + [clips[-1] + 1.0], inputs)
    assert not torch.allclose(after[:, :4], before[:, :4])


@pytest.mark.parametrize("kind", sorted(TINY))
def test_flash_flag_keeps_causality_and_padding_is_ignored(kind):
    model = tiny_model(kind)
    flash = tiny_model(kind, use_flash_attn=True)
    flash.load_state_dict(model.state_dict())
    clips, inputs = pyramid_column(), text_inputs(model, 2)
    padded = dict(inputs, encoder_hidden_states=inputs["encoder_hidden_states"].clone())
    padded["encoder_hidden_states"][0, TEXT_LEN // 2 :] += 5.0
    with torch.no_grad():
        reference = velocity(model, clips, inputs)
        torch.testing.assert_close(velocity(flash, clips, inputs), reference)
        torch.testing.assert_close(velocity(model, clips, padded), reference)


@pytest.mark.parametrize("kind", sorted(TINY))
def test_columns_equal_separate_calls(kind):
    model = tiny_model(kind)
    columns = [pyramid_column(seed=0), [randn(2, LATENT_CHANNELS, 1, 4, 6, seed=9)]]
    inputs = text_inputs(model, 4)
    with torch.no_grad():
        together = model(columns, **inputs).sample
        for index, clips in enumerate(columns):
            alone = velocity(model, clips, {name: value[index::2] for name, value in inputs.items()})
            torch.testing.assert_close(together[index], alone, atol=1e-5, rtol=1e-5)
        flat = model(columns[0], **text_inputs(model, 2)).sample
    assert len(flat) == 1 and flat[0].shape == columns[0][-1].shape


@pytest.mark.parametrize("kind", sorted(TINY))
@pytest.mark.parametrize(
    "bad, message",
    [
        (lambda clips: clips[:-1] + [clips[-1][..., :-1]], "even"),
        (lambda clips: [clip[:, :3] for clip in clips], "channels"),
        (lambda clips: clips[:-1] + [clips[-1][:1]], "batch"),
        (lambda clips: [clips[-1][:, :, 0]], r"\[B, C, T, H, W\]"),
    ],
    ids=["odd-width", "channels", "clip-batch", "not-5d"],
)
def test_bad_clips_raise_value_error(kind, bad, message):
    model = tiny_model(kind)
    with pytest.raises(ValueError, match=message):
        velocity(model, bad(pyramid_column()), text_inputs(model, 2))


@pytest.mark.parametrize("kind", sorted(TINY))
def test_mismatched_text_rows_raise_value_error(kind):
    model = tiny_model(kind)
    with pytest.raises(ValueError, match="rows"):
        velocity(model, pyramid_column(), text_inputs(model, 3))
    inputs = text_inputs(model, 2)
    with pytest.raises(ValueError, match="timestep"):
        velocity(model, pyramid_column(), dict(inputs, timestep=torch.ones(3)))


@pytest.mark.parametrize("option", [{"pos_embed_type": "rope"}, {"qk_norm": "layer_norm"}, {"patch_size": 4}])
def test_unsupported_mmdit_options_raise_value_error(option):
    with pytest.raises(ValueError, match=next(iter(option))):
        tiny_model("mmdit", **option)


def test_unsupported_flux_options_raise_value_error():
    with pytest.raises(ValueError, match="axes_dims_rope"):
        tiny_model("flux", axes_dims_rope=[4, 4, 4])
    with pytest.raises(ValueError, match="patch_size"):
        tiny_model("flux", patch_size=2)


@pytest.mark.parametrize("kind", sorted(TINY))
def test_diffusers_fp8_storage_and_group_offloading_hooks(kind):
    model = tiny_model(kind)
    clips, inputs = pyramid_column(), text_inputs(model, 2)
    with torch.no_grad():
        reference = velocity(model, clips, inputs)
        offloaded = tiny_model(kind)
        offloaded.load_state_dict(model.state_dict())
        cpu = torch.device("cpu")
        offloaded.enable_group_offload(
            onload_device=cpu, offload_device=cpu, offload_type="block_level", num_blocks_per_group=1
        )
        torch.testing.assert_close(velocity(offloaded, clips, inputs), reference)
        model.to(torch.bfloat16)
        model.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.bfloat16)
        low = velocity(model, clips, inputs)
    assert low.dtype == torch.bfloat16 and (low.float() - reference).abs().max() < 0.2 * reference.abs().max()
