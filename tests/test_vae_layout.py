"""Full-size CausalVideoVAE layout against the official manifest, and config/weight round trips."""
import json

import pytest
import torch
from reference import layout_manifest

from model_core.vae import CausalVideoVAE


@pytest.fixture(scope="module")
def manifest() -> dict:
    return layout_manifest("causal_vae")


@pytest.fixture(scope="module")
def full_size_vae(manifest) -> CausalVideoVAE:
    with torch.device("meta"):
        return CausalVideoVAE.from_config(manifest["config"])


def test_vae_state_dict_keys_in_official_order(full_size_vae, manifest):
    assert list(full_size_vae.state_dict()) == manifest["state_dict_keys_in_order"]


def test_vae_parameter_shapes_match_manifest(full_size_vae, manifest):
    shapes = {name: list(p.shape) for name, p in full_size_vae.named_parameters()}
    assert shapes == manifest["parameters"]
    assert {name: list(b.shape) for name, b in full_size_vae.named_buffers()} == {
        name: entry["shape"] for name, entry in manifest["buffers"].items()
    }


def test_vae_num_parameters_match_manifest(full_size_vae, manifest):
    assert sum(p.numel() for p in full_size_vae.parameters()) == manifest["num_parameters"]


def test_vae_registered_config_is_the_official_one(full_size_vae, manifest):
    config = {key: full_size_vae.config[key] for key in manifest["config"]}
    assert json.loads(json.dumps(config)) == manifest["config"]


@pytest.mark.parametrize(
    "override",
    [
        {"encoder_down_block_types": ["DownEncoderBlock2D"] * 4},
        {"decoder_up_block_types": ["UpDecoderBlock2D"] * 4},
        {"encoder_act_fn": "gelu"},
        {"decoder_act_fn": "relu"},
        {"encoder_type": "causal_vae_transformer"},
        {"interpolate": True},
        {"downsample_scale": 16},
        {"encoder_block_dropout": [0.0, 0.0]},
    ],
)
def test_vae_rejects_unsupported_config(manifest, override):
    with torch.device("meta"), pytest.raises(ValueError, match="not supported|differ|does not match"):
        CausalVideoVAE.from_config({**manifest["config"], **override})


def test_vae_save_and_load_round_trip(tmp_path):
    tiny = dict(encoder_block_out_channels=(8, 16), encoder_layers_per_block=(1, 1),
                encoder_down_block_types=("DownEncoderBlockCausal3D",) * 2, encoder_spatial_down_sample=(True, False),
                encoder_temporal_down_sample=(True, False), encoder_block_dropout=(0.0, 0.0),
                decoder_block_out_channels=(8, 16), decoder_layers_per_block=(1, 1),
                decoder_up_block_types=("UpDecoderBlockCausal3D",) * 2, decoder_spatial_up_sample=(True, False),
                decoder_temporal_up_sample=(True, False), decoder_block_dropout=(0.0, 0.0),
                encoder_norm_num_groups=4, decoder_norm_num_groups=4, encoder_out_channels=4,
                decoder_in_channels=4, downsample_scale=2)
    vae = CausalVideoVAE(**tiny)
    vae.save_pretrained(tmp_path / "causal_video_vae")
    loaded = CausalVideoVAE.from_pretrained(tmp_path, subfolder="causal_video_vae")
    def public(config):
        return json.loads(json.dumps({key: value for key, value in config.items() if not key.startswith("_")}))

    assert public(loaded.config) == public(vae.config)
    for (name, saved), restored in zip(vae.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(saved, restored), name
