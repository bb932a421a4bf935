
import pytest
import torch
import torch.nn.functional as F

from model_core import PyramidFlowScheduler, block_noise
from model_core.pyramid import (
    coupled_endpoints,
    downsample,
    initial_noise,
    latent_pyramid,
    renoise_at_jump,
    upsample,
)
from reference import scheduler_tables


def blocks_of(x):
    """[B, C, T, H, W] -> [N, 4] rows of 2x2 blocks in row-major element order."""
    b, c, t, h, w = x.shape
    x = x.reshape(b, c, t, h // 2, 2, w // 2, 2).permute(0, 1, 2, 3, 5, 4, 6)
    return x.reshape(-1, 4)


def covariance(rows):
    rows = rows.double()
    centred = rows - rows.mean(0)
    return centred.T @ centred / (len(rows) - 1)


def test_block_noise_has_the_reference_covariance():
    noise = block_noise((4, 16, 2, 64, 64), generator=torch.Generator().manual_seed(0))
    rows = blocks_of(noise)
    assert len(rows) >= 100_000
    expected = torch.tensor(scheduler_tables()["block_noise"]["covariance_4x4"], dtype=torch.float64)
    torch.testing.assert_close(covariance(rows), expected, atol=0.02, rtol=0)
    assert rows.mean().abs() < 0.01


def test_block_noise_is_independent_across_blocks():
    noise = block_noise((2, 8, 1, 64, 128), generator=torch.Generator().manual_seed(1))
    left, right = noise[..., 0::4], noise[..., 2::4]  # first element of horizontally adjacent blocks
    corr = torch.corrcoef(torch.stack([left.flatten(), right.flatten()]))[0, 1]
    assert corr.abs() < 0.02


@pytest.mark.parametrize("correlation", [0.0, -0.2])
def test_block_noise_general_correlation(correlation):
    noise = block_noise((4, 8, 1, 64, 64), generator=torch.Generator().manual_seed(2), correlation=correlation)
    expected = torch.full((4, 4), correlation, dtype=torch.float64).fill_diagonal_(1.0)
    torch.testing.assert_close(covariance(blocks_of(noise)), expected, atol=0.03, rtol=0)


def test_block_noise_generator_device_dtype():
    a = block_noise((1, 2, 1, 4, 6), generator=torch.Generator().manual_seed(5), dtype=torch.bfloat16)
    b = block_noise((1, 2, 1, 4, 6), generator=torch.Generator().manual_seed(5), dtype=torch.bfloat16)
    assert a.dtype == torch.bfloat16 and a.device.type == "cpu"
    assert torch.equal(a, b)


@pytest.mark.parametrize("shape", [(1, 2, 1, 5, 6), (1, 2, 1, 4, 7)])
def test_block_noise_rejects_odd_spatial_sizes(shape):
    with pytest.raises(ValueError, match="even spatial sizes"):
        block_noise(shape)


def test_block_noise_rejects_wrong_rank_and_correlation():
    with pytest.raises(ValueError, match=r"\[B, C, T, H, W\]"):
        block_noise((2, 4, 4))
    with pytest.raises(ValueError, match=r"\[-1/3, 0\]"):
        block_noise((1, 1, 1, 2, 2), correlation=-0.5)


def test_downsample_is_the_official_bilinear():
    x = torch.randn(2, 3, 2, 8, 12)
    frames = x.permute(0, 2, 1, 3, 4).reshape(-1, 3, 8, 12)
    official = F.interpolate(frames, scale_factor=0.5, mode="bilinear", align_corners=False)
    official = official.reshape(2, 2, 3, 4, 6).permute(0, 2, 1, 3, 4)
    torch.testing.assert_close(downsample(x), official)


def test_upsample_is_nearest_and_inverts_downsample_on_constant_blocks():
    x = torch.randn(1, 2, 1, 3, 5)
    up = upsample(x)
    assert up.shape == (1, 2, 1, 6, 10)
    torch.testing.assert_close(downsample(up), x)
    assert torch.equal(up[..., 1::2, 0::2], x)


def test_latent_pyramid_levels():
    x = torch.randn(1, 4, 3, 16, 24)
    levels = latent_pyramid(x, 3)
    assert [tuple(l.shape[-2:]) for l in levels] == [(4, 6), (8, 12), (16, 24)]
    assert levels[-1] is x


def test_initial_noise_is_unit_variance_at_the_coarsest_level():
    noise = initial_noise((8, 16, 2, 64, 64), 3, generator=torch.Generator().manual_seed(3))
    assert noise.shape == (8, 16, 2, 16, 16)
    assert abs(noise.std().item() - 1) < 0.02


def test_downsample_rejects_odd_sizes():
    with pytest.raises(ValueError, match="even spatial sizes"):
        downsample(torch.zeros(1, 1, 1, 6, 5))


@pytest.mark.parametrize("stage", [1, 2])
def test_renoise_matches_the_next_stage_start_distribution(stage):
    """Eq. 21: after the jump, x_{s_k} ~ N(s_k Up(Down(x1, 2^(k+1))), (1 - s_k)^2 I)."""
    scheduler = PyramidFlowScheduler()
    before, window = scheduler.windows[stage - 1], scheduler.windows[stage]
    scale, noise_std = scheduler.renoise_coefficients(stage)
    g = torch.Generator().manual_seed(stage)
    samples, size = 40_000, 4
    x1 = torch.randn(1, 2, 1, size * 2, size * 2, generator=g)  # a fixed synthetic latent at the new level
    low = downsample(x1)
    # end of the previous stage (Eq. 7): e Down(x1) + (1 - e) n, one draw per sample
    end = before.end_signal * low + (1 - before.end_signal) * torch.randn(samples, 2, 1, size, size, generator=g)
    jumped = renoise_at_jump(end, scale, noise_std, generator=g)
    target_mean = window.start_signal * upsample(low)
    torch.testing.assert_close(jumped.mean(0, keepdim=True), target_mean, atol=0.03, rtol=0)
    rows = blocks_of(jumped - target_mean)
    expected = torch.eye(4, dtype=torch.float64) * window.start_sigma**2
    torch.testing.assert_close(covariance(rows), expected, atol=0.01, rtol=0)


def test_without_corrective_noise_the_covariance_would_not_match():
    """Sanity check that the covariance test can fail: plain rescaling leaves blocks fully correlated."""
    scheduler = PyramidFlowScheduler()
    scale, _ = scheduler.renoise_coefficients(1)
    end = torch.randn(20_000, 1, 1, 2, 2, generator=torch.Generator().manual_seed(9))
    rows = blocks_of(upsample(end) * scale)
    assert covariance(rows)[0, 1] > 0.3


def test_coupled_endpoints_share_noise_and_resolutions():
    g = torch.Generator().manual_seed(4)
    x1 = torch.randn(1, 4, 1, 16, 16, generator=g)
    noise = torch.randn(1, 4, 1, 8, 8, generator=g)
    start, end = coupled_endpoints(x1, level=1, start_signal=0.2, end_signal=0.666, noise=noise)
    torch.testing.assert_close(end, 0.666 * downsample(x1) + 0.334 * noise)
    torch.testing.assert_close(start, 0.2 * upsample(downsample(x1, 2)) + 0.8 * noise)
    with pytest.raises(ValueError, match="stage's shape"):
        coupled_endpoints(x1, level=2, start_signal=0.5, end_signal=1.0, noise=noise)
