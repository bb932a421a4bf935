import json

import pytest
import torch

from model_core.checkpoints import FAMILIES, SETTINGS_FILE, SamplingDefaults, with_overrides
from reference import scheduler_tables

NORMALIZATION = scheduler_tables()["latent_normalization"]
KEYS = {"miniflux": "pyramid_flux (miniFLUX)", "sd3": "pyramid_mmdit (SD3)"}


@pytest.mark.parametrize("family", ["miniflux", "sd3"])
def test_latent_normalization_constants_match_reference(family):
    ref, ours = NORMALIZATION[KEYS[family]], FAMILIES[family].normalization
    assert (ours.first_shift, ours.first_scale) == pytest.approx((ref["first_frame"]["shift"], ref["first_frame"]["scale"]))
    assert (ours.later_shift, ours.later_scale) == pytest.approx((ref["later_frames"]["shift"], ref["later_frames"]["scale"]))


@pytest.mark.parametrize("family", ["miniflux", "sd3"])
def test_normalize_uses_first_frame_constants_on_frame_zero_only(family):
    n = FAMILIES[family].normalization
    z = torch.randn(2, 16, 3, 4, 4)
    out = n.normalize(z)
    torch.testing.assert_close(out[:, :, 0], (z[:, :, 0] - n.first_shift) * n.first_scale)
    torch.testing.assert_close(out[:, :, 1:], (z[:, :, 1:] - n.later_shift) * n.later_scale)
    torch.testing.assert_close(n.denormalize(out), z)


def write_settings(root, **settings):
    root.mkdir(parents=True, exist_ok=True)
    (root / SETTINGS_FILE).write_text(json.dumps(settings))
    return root


def test_published_families_sample_with_the_recommended_settings():
    for family in FAMILIES.values():
        assert family.sampling == SamplingDefaults((20, 20, 20), (10, 10, 10), 7.0, 5.0, image_to_video_guidance_scale=4.0)


def test_a_checkpoint_names_its_own_sampling_defaults(tmp_path):
    root = write_settings(tmp_path, sampling={"video_steps": [4, 5, 6], "guidance_scale": 3.5})
    sampling = with_overrides(root, FAMILIES["miniflux"]).sampling
    assert sampling == SamplingDefaults((20, 20, 20), (4, 5, 6), 3.5, 5.0)
    assert sampling.filled(guidance_scale=9.0, video_steps=None) == SamplingDefaults((20, 20, 20), (4, 5, 6), 9.0, 5.0)


def test_a_checkpoint_names_its_stage_grid_which_is_not_a_call_option(tmp_path):
    sampling = with_overrides(write_settings(tmp_path, sampling={"stage_grid": "trailing"}), FAMILIES["miniflux"]).sampling
    assert sampling.stage_grid == "trailing" and "stage_grid" not in sampling.call_options("text_to_video")
    with pytest.raises(ValueError, match='sampling.stage_grid is "even"; allowed: "official" or "trailing"'):
        with_overrides(write_settings(tmp_path, sampling={"stage_grid": "even"}), FAMILIES["miniflux"])


def test_unknown_sampling_settings_are_named(tmp_path):
    root = write_settings(tmp_path, sampling={"guidance": 3})
    with pytest.raises(ValueError, match="unknown sampling setting.*guidance; allowed: first_frame_steps"):
        with_overrides(root, FAMILIES["miniflux"])
