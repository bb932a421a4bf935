"""CausalVideoVAE against golden vectors from the official implementation (atol 1e-4)."""
import ast

import pytest
import torch
from golden import VAE, golden_params, require

from model_core.vae import CausalVideoVAE

ATOL = 1e-4


def call_keywords(call: str) -> dict:
    """Keyword arguments of a recorded call such as 'decode(z, is_init_image=True).sample -> ...'."""
    expression = ast.parse(call.split("->")[0].strip(), mode="eval")
    method_call = next(node for node in ast.walk(expression) if isinstance(node, ast.Call))
    return {keyword.arg: ast.literal_eval(keyword.value) for keyword in method_call.keywords}


def golden_vae(case) -> CausalVideoVAE:
    vae = CausalVideoVAE.from_config(case.spec()["constructor_kwargs"])
    vae.load_state_dict(case.weights(), strict=True)
    return vae.eval()


def assert_close(actual, expected, what):
    assert actual.shape == expected.shape, f"{what}: shape {list(actual.shape)} != {list(expected.shape)}"
    error = (actual - expected).abs().max().item()
    assert error <= ATOL, f"{what}: max |diff| {error:.3g} > {ATOL}"


@pytest.mark.parametrize("case", golden_params(VAE))
def test_golden_vae_encode(case):
    require(case)
    spec, tensors = case.case_spec(), case.tensors()
    video = tensors[spec["input_video"]["key"]]
    with torch.no_grad():
        posterior = golden_vae(case).encode(video, **call_keywords(spec["encode_call"])).latent_dist
    assert_close(posterior.moments, tensors[spec["moments"]["key"]], "moments")
    assert_close(posterior.mean, tensors[spec["latent_mean"]["key"]], "latent mean")


@pytest.mark.parametrize("case", golden_params(VAE))
def test_golden_vae_decode(case):
    require(case)
    spec, tensors = case.case_spec(), case.tensors()
    latent = tensors[spec["latent_mean"]["key"]]
    with torch.no_grad():
        video = golden_vae(case).decode(latent, **call_keywords(spec["decode_call"])).sample
    assert_close(video, tensors[spec["decoded"]["key"]], "decoded video")
