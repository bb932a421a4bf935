"""Parity of the pyramid transformers with the official implementation's golden vectors."""
import pytest
import torch
from golden import FLUX, MMDIT, golden_params, require

from model_core.transformers import PyramidFluxTransformer, PyramidMMDiT
from model_core.transformers.attention import dense_block_causal_mask
from model_core.transformers.packing import clip_grid

ATOL = 1e-4
MODELS = {FLUX: PyramidFluxTransformer, MMDIT: PyramidMMDiT}
POSITION_KEYS = {FLUX: "debug.rope_position_ids", MMDIT: "debug.temporal_rope_ids"}


def load_case(case, kind):
    """(model, clips, shared inputs, case spec, tensors) of one golden case, all read from its JSON."""
    spec, case_spec, tensors = case.spec(), case.case_spec(), case.tensors()
    model = MODELS[kind].from_config(spec["constructor_kwargs"])
    model.load_state_dict(case.weights(), strict=True)
    model.eval()
    clips = [tensors[clip["key"]] for clip in case_spec["clips_oldest_to_current"]]
    inputs = {name: tensors[name] for name in spec["shared_inputs"]}
    return model, clips, inputs, case_spec, tensors


def check_forward(case, kind):
    model, clips, inputs, case_spec, tensors = load_case(require(case), kind)
    with torch.no_grad():
        (velocities,) = model(
            [clips],
            inputs["encoder_hidden_states"],
            inputs["encoder_attention_mask"],
            inputs["pooled_projections"],
            inputs["timestep"],
            return_dict=False,
        )
    expected = tensors[case_spec["output"]["key"]]
    assert len(velocities) == 1 and velocities[0].shape == expected.shape
    torch.testing.assert_close(velocities[0], expected, atol=ATOL, rtol=0)


def check_debug(case, kind):
    model, clips, inputs, case_spec, tensors = load_case(require(case), kind)
    debug = {name: tensors[entry["key"]] for name, entry in case_spec["debug"].items()}
    grids = [clip_grid(clip) for clip in clips]
    num_text = inputs["encoder_hidden_states"].shape[1]
    with torch.no_grad():
        temb = model.time_text_embed(inputs["timestep"], inputs["pooled_projections"])
        tokens = model.embed_clips(clips, grids)
    torch.testing.assert_close(temb, debug["debug.temb"], atol=ATOL, rtol=0)
    torch.testing.assert_close(tokens, debug["debug.embedded_image_tokens"], atol=ATOL, rtol=0)
    positions = model.position_ids(num_text, grids)
    expected_positions = debug[POSITION_KEYS[kind]]
    torch.testing.assert_close(positions.expand_as(expected_positions), expected_positions)
    text_valid = inputs["encoder_attention_mask"].bool()
    valid = torch.cat([text_valid, text_valid.new_ones(text_valid.shape[0], positions.shape[0] - num_text)], dim=1)
    mask = dense_block_causal_mask(positions[:, 0], valid)
    assert torch.equal(mask, debug["debug.attention_mask"].bool())


@pytest.mark.parametrize("case", golden_params(FLUX))
def test_golden_flux_forward(case):
    check_forward(case, FLUX)


@pytest.mark.parametrize("case", golden_params(MMDIT))
def test_golden_mmdit_forward(case):
    check_forward(case, MMDIT)


@pytest.mark.parametrize("case", golden_params(FLUX))
def test_golden_flux_debug_tensors(case):
    check_debug(case, FLUX)


@pytest.mark.parametrize("case", golden_params(MMDIT))
def test_golden_mmdit_debug_tensors(case):
    check_debug(case, MMDIT)


@pytest.mark.parametrize("case", golden_params(MMDIT))
def test_golden_mmdit_sincos_buffer_from_config(case):
    """The constructor's 2-D sincos table equals the official persistent buffer."""
    case = require(case)
    model = PyramidMMDiT.from_config(case.spec()["constructor_kwargs"])
    expected = case.weights()["pos_embed.pos_embed"]
    torch.testing.assert_close(model.pos_embed.pos_embed, expected, atol=1e-5, rtol=0)
