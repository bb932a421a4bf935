"""quantize=int8 on the CPU (torchao dynamic int8) and quantize=fp8 (float8 compute on capable GPUs, else storage)."""
import pytest
import torch

from model_core import PyramidFlowPipeline
from model_core.memory import apply_fp8, fp8_compute_supported, quantize_linear_int8_cpu
from tiny_checkpoint import build_tiny_checkpoint

FAST = dict(first_frame_steps=(1, 1, 1), video_steps=(1, 1, 1))


def _mlp(dtype=torch.float32, device="cpu"):
    generator = torch.Generator().manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.GELU(), torch.nn.Linear(512, 256))
    for parameter in model.parameters():
        parameter.data = torch.randn(parameter.shape, generator=generator) / parameter.shape[-1] ** 0.5
    return model.to(device, dtype).eval()


def _is_torchao_tensor(tensor) -> bool:
    from torchao.utils import TorchAOBaseTensor

    return isinstance(tensor, TorchAOBaseTensor)


def test_cpu_int8_quantises_every_linear_with_torchao_and_stays_close():
    model, x = _mlp(), torch.randn(16, 256, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = model(x)
        quantize_linear_int8_cpu(model)
        quantized = model(x)
    assert all(_is_torchao_tensor(m.weight) for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert not torch.equal(quantized, reference)
    assert (quantized - reference).abs().max() < 0.03 * reference.abs().max()


def test_cpu_int8_pipeline_stays_close(tmp_path):
    checkpoint = build_tiny_checkpoint(tmp_path / "miniflux", "miniflux")
    plain = PyramidFlowPipeline.from_pretrained(checkpoint)
    quantized = PyramidFlowPipeline.from_pretrained(checkpoint, quantize="int8")
    assert all(_is_torchao_tensor(m.weight) for m in quantized.transformer.modules() if isinstance(m, torch.nn.Linear))
    a = plain.text_to_image("x", seed=0, output_type="latent", **FAST).latents
    b = quantized.text_to_image("x", seed=0, output_type="latent", **FAST).latents
    assert (a - b).abs().mean() < 0.25 * a.abs().mean()


def test_pipeline_records_which_fp8_it_used(tmp_path):
    pipe = PyramidFlowPipeline.from_pretrained(build_tiny_checkpoint(tmp_path / "m", "miniflux"), quantize="fp8")
    out = pipe.text_to_image("x", seed=0, **FAST)
    assert out.settings["quantize"] == "fp8" and out.settings["fp8"] == "storage"
    assert any(p.dtype == torch.float8_e4m3fn for p in pipe.transformer.parameters())


def test_fp8_falls_back_to_float8_storage_without_a_capable_gpu():
    model, x = _mlp(torch.bfloat16), torch.randn(4, 256, dtype=torch.bfloat16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        reference = model(x)
        assert apply_fp8(model, torch.bfloat16, torch.device("cpu")) == "storage"
        stored = model(x)
    assert all(m.weight.dtype == torch.float8_e4m3fn for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert stored.dtype == torch.bfloat16
    assert (stored.float() - reference.float()).abs().max() < 0.1 * reference.float().abs().max()
    assert not fp8_compute_supported(torch.device("cpu"))


@pytest.mark.gpu
def test_fp8_computes_in_float8_on_a_capable_gpu():
    device = torch.device("cuda")
    if not fp8_compute_supported(device):
        pytest.skip("float8 compute needs compute capability 8.9+ and torchao")
    model = _mlp(torch.bfloat16, device)
    x = torch.randn(64, 256, dtype=torch.bfloat16, generator=torch.Generator().manual_seed(3)).to(device)
    with torch.no_grad():
        reference = model(x)
        assert apply_fp8(model, torch.bfloat16, device) == "compute"
        computed = model(x)
    assert apply_fp8(_mlp(torch.bfloat16, device), torch.bfloat16, device, offload="model") == "storage"
    assert all(_is_torchao_tensor(m.weight) for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert not torch.equal(computed, reference)
    assert (computed.float() - reference.float()).abs().max() < 0.1 * reference.float().abs().max()


@pytest.mark.gpu
def test_pipeline_fp8_on_cuda_computes_in_float8_where_it_can(tmp_path):
    device = torch.device("cuda")
    checkpoint = build_tiny_checkpoint(tmp_path / "miniflux", "miniflux")
    pipe = PyramidFlowPipeline.from_pretrained(checkpoint, device="cuda", torch_dtype="bfloat16", quantize="fp8")
    out = pipe.text_to_video("a red circle", num_frames=9, seed=0, **FAST)
    assert out.frames[0].shape == (9, 64, 64, 3)
    assert out.settings["fp8"] == ("compute" if fp8_compute_supported(device) else "storage")
