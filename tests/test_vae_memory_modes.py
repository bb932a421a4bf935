"""Memory modes of CausalVideoVAE on the tiny golden weights: temporal chunking, spatial tiling,
input validation and the posterior.

Chunking is exact, so chunked == full pass within 1e-4. Tiling is not: GroupNorm statistics, the
mid-block attention and zero padding only see the tile. What tiling guarantees, and what is tested:
* one tile covering the frame gives the full pass (1e-4);
* a pixel covered by one tile only equals that tile's full-pass coding of its own crop (1e-4);
* a pixel in an overlap lies between the codings of the tiles that cover it (1e-4), so the tiled
  result is never further from the full pass than the worst covering tile's coding;
* chunking inside tiles changes nothing (1e-4).
"""
import pytest
import torch
from golden import VAE, golden_cases

from model_core.vae import CausalVideoVAE
from model_core.vae.causal_conv import CausalConv3d
from model_core.vae.tiling import tile_starts

ATOL = 1e-4
TILE, OVERLAP = 4, 2  # latent cells: a 4 x 6 latent grid gives two tiles that overlap in columns 2-3


@pytest.fixture(scope="module")
def vae() -> CausalVideoVAE:
    cases = golden_cases(VAE)
    if not cases:
        pytest.fail("no causal VAE golden set found (set PYRAMID_GOLDEN_DIR)")
    model = CausalVideoVAE.from_config(cases[0].spec()["constructor_kwargs"])
    model.load_state_dict(cases[0].weights(), strict=True)
    return model.eval()


@pytest.fixture(scope="module")
def video(vae) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.rand(1, vae.config.encoder_in_channels, 17, 32, 48, generator=generator) * 2 - 1


@pytest.fixture(scope="module")
def latents(vae) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    return torch.randn(1, vae.config.decoder_in_channels, 3, 4, 6, generator=generator)


@pytest.fixture(scope="module")
def full_moments(vae, video) -> torch.Tensor:
    with torch.no_grad():
        return vae.encode(video).latent_dist.moments


@pytest.fixture(scope="module")
def full_video(vae, latents) -> torch.Tensor:
    with torch.no_grad():
        return vae.decode(latents).sample


@pytest.fixture()
def tiling(vae):
    vae.enable_tiling(TILE, OVERLAP)
    yield vae
    vae.disable_tiling()


def max_error(a, b) -> float:
    assert a.shape == b.shape
    return (a - b).abs().max().item()


@torch.no_grad()
@pytest.mark.parametrize("window_size", [8, 16])
def test_chunked_encode_equals_full_pass(vae, video, full_moments, window_size):
    chunked = vae.encode(video, temporal_chunk=True, window_size=window_size).latent_dist.moments
    assert full_moments.shape[2] == 3
    assert max_error(chunked, full_moments) <= ATOL


@torch.no_grad()
@pytest.mark.parametrize("window_size", [1, 2])
def test_chunked_decode_equals_full_pass(vae, latents, full_video, window_size):
    chunked = vae.decode(latents, temporal_chunk=True, window_size=window_size).sample
    assert full_video.shape[2] == 17
    assert max_error(chunked, full_video) <= ATOL


@torch.no_grad()
def test_chunk_cache_does_not_outlive_a_call(vae, latents):
    first = vae.decode(latents, temporal_chunk=True, window_size=1).sample
    assert all(m.stream_tail is None for m in vae.modules() if isinstance(m, CausalConv3d))
    again = vae.decode(latents, temporal_chunk=True, window_size=1).sample
    assert torch.equal(first, again)


@torch.no_grad()
def test_single_tile_equals_full_pass(vae, video, latents):
    video, latents = video[:, :, :9], latents[:, :, :2]
    full_moments, full_video = vae.encode(video).latent_dist.moments, vae.decode(latents).sample
    vae.enable_tiling(tile_latent_size=6, tile_latent_overlap=2)
    try:
        assert max_error(vae.encode(video).latent_dist.moments, full_moments) <= ATOL
        assert max_error(vae.decode(latents).sample, full_video) <= ATOL
    finally:
        vae.disable_tiling()


def per_tile_bounds(code, x, grid, in_scale, out_scale):
    """Elementwise min / max over the tiles covering each output pixel, and how many tiles cover it."""
    low = high = count = None
    for row in tile_starts(grid[0], TILE, OVERLAP):
        for col in tile_starts(grid[1], TILE, OVERLAP):
            coded = code(x[:, :, :, row * in_scale:(row + TILE) * in_scale, col * in_scale:(col + TILE) * in_scale])
            if low is None:
                shape = (*coded.shape[:3], grid[0] * out_scale, grid[1] * out_scale)
                low, high = torch.full(shape, torch.inf), torch.full(shape, -torch.inf)
                count = torch.zeros(shape[3:])
            rows = slice(row * out_scale, row * out_scale + coded.shape[3])
            cols = slice(col * out_scale, col * out_scale + coded.shape[4])
            low[..., rows, cols] = torch.minimum(low[..., rows, cols], coded)
            high[..., rows, cols] = torch.maximum(high[..., rows, cols], coded)
            count[rows, cols] += 1
    return low, high, count


def assert_blend_of_tiles(tiled, low, high, count):
    single = count == 1
    assert single.any() and (count > 1).any()
    assert max_error(tiled[..., single], low[..., single]) <= ATOL
    assert (tiled >= low - ATOL).all() and (tiled <= high + ATOL).all()


@torch.no_grad()
def test_tiled_decode_is_a_crossfade_of_tile_decodes(vae, latents, tiling):
    latents = latents[:, :, :2]
    tiled = vae.decode(latents).sample
    vae.disable_tiling()
    bounds = per_tile_bounds(lambda tile: vae.decode(tile).sample, latents, latents.shape[3:], 1, 8)
    assert_blend_of_tiles(tiled, *bounds)


@torch.no_grad()
def test_tiled_encode_is_a_crossfade_of_tile_encodes(vae, video, tiling):
    video = video[:, :, :9]
    tiled = vae.encode(video).latent_dist.moments
    vae.disable_tiling()
    grid = (video.shape[3] // 8, video.shape[4] // 8)
    bounds = per_tile_bounds(lambda tile: vae.encode(tile).latent_dist.moments, video, grid, 8, 1)
    assert_blend_of_tiles(tiled, *bounds)


@torch.no_grad()
def test_chunking_inside_tiles_changes_nothing(vae, video, latents, tiling):
    video, latents = video[:, :, :9], latents[:, :, :2]
    assert max_error(vae.decode(latents, temporal_chunk=True, window_size=1).sample, vae.decode(latents).sample) <= ATOL
    chunked = vae.encode(video, temporal_chunk=True, window_size=8).latent_dist.moments
    assert max_error(chunked, vae.encode(video).latent_dist.moments) <= ATOL


@pytest.mark.parametrize(
    "shape, kwargs, message",
    [
        ((1, 3, 8, 32, 32), {}, "1 \\+ 8k frames"),
        ((1, 3, 9, 30, 32), {}, "multiples of 8"),
        ((1, 4, 9, 32, 32), {}, "expected a video"),
        ((3, 9, 32, 32), {}, "expected a video"),
        ((1, 3, 9, 32, 32), {"temporal_chunk": True, "window_size": 4}, "positive multiple of 8"),
        ((1, 3, 9, 32, 32), {"is_init_image": False}, "is_init_image=False"),
    ],
)
def test_encode_rejects_bad_input(vae, shape, kwargs, message):
    with pytest.raises(ValueError, match=message):
        vae.encode(torch.zeros(shape), **kwargs)


@pytest.mark.parametrize(
    "shape, kwargs, message",
    [
        ((1, 3, 2, 4, 4), {}, "expected latents"),
        ((1, 4, 2, 4, 4), {"temporal_chunk": True, "window_size": 0}, "positive multiple of 1"),
    ],
)
def test_decode_rejects_bad_input(vae, shape, kwargs, message):
    with pytest.raises(ValueError, match=message):
        vae.decode(torch.zeros(shape), **kwargs)


def test_tiling_rejects_overlap_not_smaller_than_tile(vae):
    with pytest.raises(ValueError, match="tile_latent_size > tile_latent_overlap"):
        vae.enable_tiling(tile_latent_size=4, tile_latent_overlap=4)
    assert not vae.use_tiling


@torch.no_grad()
def test_posterior_sample_reproducible_with_generator(vae, video):
    posterior = vae.encode(video[:, :, :9]).latent_dist
    first = posterior.sample(torch.Generator().manual_seed(7))
    again = posterior.sample(torch.Generator().manual_seed(7))
    other = posterior.sample(torch.Generator().manual_seed(8))
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert first.shape == posterior.mean.shape
    assert torch.equal(posterior.mode(), posterior.mean)
    kl = posterior.kl()
    assert kl.shape == (1,) and kl.item() > 0
    assert posterior.kl(posterior).abs().max().item() <= ATOL


@torch.no_grad()
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_runs(vae, latents, dtype):
    half = CausalVideoVAE.from_config(vae.config)
    half.load_state_dict(vae.state_dict())
    half = half.eval().to(dtype=dtype)
    video = half.decode(latents[:, :, :2, :4, :4].to(dtype), temporal_chunk=True, window_size=1).sample
    assert video.dtype == dtype and video.shape == (1, 3, 9, 32, 32) and torch.isfinite(video).all()
    assert half.encode(video).latent_dist.mean.dtype == dtype


def test_single_clip_convolution_matches_torch_in_value_and_gradient():
    """A float32 CPU batch of one takes the oneDNN route (model_core.vae.causal_conv.conv3d); it must agree
    with nn.Conv3d in the output and in every gradient, so training and inference are unchanged."""
    layer = CausalConv3d(8, 8, 3)
    x = torch.randn(1, 8, 5, 16, 16, generator=torch.Generator().manual_seed(0), requires_grad=True)
    fast = layer(x)
    fast.square().sum().backward()
    fast_grads = [x.grad.clone(), layer.conv.weight.grad.clone(), layer.conv.bias.grad.clone()]
    x.grad = layer.conv.weight.grad = layer.conv.bias.grad = None
    padded = torch.cat([x.new_zeros(1, 8, 2, 16, 16), x], dim=2)
    reference = layer.conv(padded)
    reference.square().sum().backward()
    assert torch.allclose(fast, reference, atol=1e-5)
    for got, want in zip(fast_grads, [x.grad, layer.conv.weight.grad, layer.conv.bias.grad]):
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-4)


def test_encode_and_decode_move_an_offloaded_vae_to_its_device(video):
    """Model offload (accelerate) moves a model when its forward runs; the pipeline calls encode and decode, so
    both must fire the hook too, or an offloaded VAE computes on the CPU with inputs on the GPU."""
    from accelerate.hooks import ModelHook, add_hook_to_module

    class CountCalls(ModelHook):
        calls = 0

        def pre_forward(self, module, *args, **kwargs):
            CountCalls.calls += 1
            return args, kwargs

    model = CausalVideoVAE.from_config(golden_cases(VAE)[0].spec()["constructor_kwargs"]).eval()
    add_hook_to_module(model, CountCalls())
    with torch.no_grad():
        model.decode(model.encode(video[:, :, :9]).latent_dist.mean)
    assert CountCalls.calls == 2


@torch.no_grad()
@pytest.mark.parametrize("split", [(1, 1, 1), (2, 1), (1, 2)])
def test_streamed_decode_unit_by_unit_equals_one_decode(vae, latents, full_video, split):
    """The pipeline decodes each unit as it finishes; the convs' caches carry over between calls."""
    stream = vae.start_decode_stream()
    parts, first = [], 0
    for size in split:
        parts.append(vae.decode_stream(latents[:, :, first : first + size], stream))
        first += size
    assert [p.shape[2] for p in parts] == [1 + 8 * (size - 1) if i == 0 else 8 * size for i, size in enumerate(split)]
    assert max_error(torch.cat(parts, dim=2), full_video) <= ATOL
    assert all(m.stream_tail is None for m in vae.modules() if isinstance(m, CausalConv3d))  # state lives in the stream


@torch.no_grad()
def test_streamed_decode_with_tiling_equals_tiled_decode(vae, latents, tiling):
    whole = vae.decode(latents).sample
    stream = vae.start_decode_stream()
    parts = [vae.decode_stream(latents[:, :, unit : unit + 1], stream) for unit in range(latents.shape[2])]
    assert max_error(torch.cat(parts, dim=2), whole) <= ATOL


@torch.no_grad()
def test_two_streams_do_not_share_caches(vae, latents, full_video):
    one, two = vae.start_decode_stream(), vae.start_decode_stream()
    a0 = vae.decode_stream(latents[:, :, :1], one)
    b0 = vae.decode_stream(latents[:, :, :1], two)
    a1 = vae.decode_stream(latents[:, :, 1:], one)
    b1 = vae.decode_stream(latents[:, :, 1:], two)
    assert torch.equal(a0, b0) and torch.equal(a1, b1)
    assert max_error(torch.cat([a0, a1], dim=2), full_video) <= ATOL
