"""Memory and speed options for consumer hardware: offload, quantisation, dtype, VAE tiling.

Every option has one name across pipeline, CLI and UI: `offload`, `quantize`, `vae_tiling`.
"""
import importlib.util

import torch

from .option_names import DTYPE_NAMES, OFFLOAD_CHOICES, QUANTIZE_CHOICES

DTYPES = {name: getattr(torch, name) for name in DTYPE_NAMES}


def resolve_device(device=None) -> torch.device:
    """'auto'/None picks CUDA, then Apple MPS, then CPU."""
    if device not in (None, "auto"):
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda")  # ok: chosen only when available
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def resolve_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if dtype in DTYPES:
        return DTYPES[dtype]
    raise ValueError(f"unknown dtype {dtype!r}; allowed: {', '.join(DTYPES)}")


def uses_bitsandbytes(quantize: str, device: torch.device) -> bool:
    return quantize == "nf4" or (quantize == "int8" and device.type == "cuda")


def check_memory_options(device: torch.device, dtype: torch.dtype, offload: str, quantize: str) -> None:
    """Reject unknown values and combinations that cannot work, saying what would."""
    if offload not in OFFLOAD_CHOICES:
        raise ValueError(f"unknown offload {offload!r}; allowed: {', '.join(OFFLOAD_CHOICES)}")
    if quantize not in QUANTIZE_CHOICES:
        raise ValueError(f"unknown quantize {quantize!r}; allowed: {', '.join(QUANTIZE_CHOICES)}")
    if offload != "none" and device.type == "cpu":
        raise ValueError(f"offload={offload!r} moves weights between CPU and a GPU; on CPU use offload='none' (quantize='int8' saves memory there)")
    if dtype == torch.float16 and device.type == "cpu":
        raise ValueError("float16 is not supported for generation on CPU; use float32 or bfloat16")
    if dtype == torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError("this GPU has no bfloat16 support; use dtype float16 or float32")
    if quantize == "nf4" and device.type != "cuda":
        raise ValueError("quantize='nf4' uses bitsandbytes and needs a CUDA GPU; on CPU use quantize='int8'")
    if quantize == "int8" and device.type == "mps":
        raise ValueError("quantize='int8' runs on CUDA (bitsandbytes) or CPU (dynamic int8); on Apple MPS use quantize='fp8' or 'none'")
    if quantize == "int8" and device.type == "cpu" and dtype != torch.float32:
        raise ValueError("quantize='int8' on CPU computes in float32; use dtype float32")
    if uses_bitsandbytes(quantize, device):
        if importlib.util.find_spec("bitsandbytes") is None:
            raise ValueError(f"quantize={quantize!r} needs the bitsandbytes package: pip install bitsandbytes")
        if offload in ("sequential", "group"):
            raise ValueError(f"quantize={quantize!r} (bitsandbytes) cannot be combined with offload={offload!r}; use offload='model' or 'none'")
    if quantize == "fp8" and offload == "sequential":
        raise ValueError("quantize='fp8' cannot be combined with offload='sequential'; use offload='model', 'group' or 'none'")


def bitsandbytes_configs(quantize: str, dtype: torch.dtype) -> tuple:
    """Load-time quantisation configs (diffusers for the transformer, transformers for T5)."""
    from diffusers import BitsAndBytesConfig as DiffusersConfig
    from transformers import BitsAndBytesConfig as TransformersConfig

    if quantize == "nf4":
        kwargs = dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)
    else:
        kwargs = dict(load_in_8bit=True)
    return DiffusersConfig(**kwargs), TransformersConfig(**kwargs)


def quantize_linear_int8_cpu(module: torch.nn.Module) -> torch.nn.Module:
    """Dynamic int8 for every nn.Linear (weights int8, activations quantised per token on the fly, torchao):
    the CPU speed option."""
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

    quantize_(module, Int8DynamicActivationInt8WeightConfig())
    return module


def fp8_compute_supported(device: torch.device) -> bool:
    """float8 matrix products (torch._scaled_mm) exist on CUDA GPUs of compute capability 8.9 (Ada) and newer."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9) and importlib.util.find_spec("torchao") is not None


def compute_in_fp8(module: torch.nn.Module, device: torch.device) -> None:
    """Every nn.Linear computes in float8 on `device`: weights stored in float8 per output row, activations
    quantised per row on the fly (torchao's float8 dynamic activation + weight)."""
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_

    quantize_(module, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()), device=device)


def apply_fp8(module: torch.nn.Module, compute_dtype: torch.dtype, device: torch.device, offload: str = "none") -> str:
    """quantize='fp8': float8 compute on `device` where the GPU supports it and the weights stay there (offload
    'none'), else float8 storage with `compute_dtype` compute (layerwise casting). Returns which one was used
    ("compute" or "storage"), for the output's settings."""
    if fp8_compute_supported(device) and compute_dtype == torch.bfloat16 and offload == "none":
        compute_in_fp8(module, device)
        return "compute"
    store_in_fp8(module, compute_dtype)
    return "storage"


def store_in_fp8(module: torch.nn.Module, compute_dtype: torch.dtype) -> None:
    """Keep weights in float8 and upcast each layer to `compute_dtype` as it runs (diffusers layerwise casting)."""
    from diffusers.hooks import apply_layerwise_casting

    apply_layerwise_casting(module, storage_dtype=torch.float8_e4m3fn, compute_dtype=compute_dtype)
