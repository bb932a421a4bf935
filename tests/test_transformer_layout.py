"""Full-size parameter layouts equal the official manifests (keys, order, shapes, buffer, count)."""
import pytest
import torch
from reference import layout_manifest

from model_core.transformers import PyramidFluxTransformer, PyramidMMDiT

MANIFESTS = {
    "miniflux_transformer": PyramidFluxTransformer,
    "sd3_mmdit": PyramidMMDiT,
}


@pytest.fixture(scope="module", params=sorted(MANIFESTS))
def built(request):
    manifest = layout_manifest(request.param)
    with torch.device("meta"):
        model = MANIFESTS[request.param].from_config(manifest["config"])
    return manifest, model


def test_state_dict_keys_in_official_order(built):
    manifest, model = built
    assert list(model.state_dict()) == manifest["state_dict_keys_in_order"]


def test_parameter_and_buffer_shapes(built):
    manifest, model = built
    shapes = {name: list(param.shape) for name, param in model.named_parameters()}
    assert shapes == manifest["parameters"]
    persistent = {name: list(tensor.shape) for name, tensor in model.state_dict().items() if name not in shapes}
    assert persistent == {name: entry["shape"] for name, entry in manifest["buffers"].items()}


def test_num_parameters(built):
    manifest, model = built
    assert model.num_parameters() == manifest["num_parameters"]


def test_config_round_trips(built):
    manifest, model = built
    assert {key: model.config[key] for key in manifest["config"]} == manifest["config"]
