import pytest
import torch

from model_core.checkpoints import FAMILIES
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
