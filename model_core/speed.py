"""The speed options, one name each in pipeline, CLI and studio.

`attention_backend` and `compile` shape the loaded transformer (given to `from_pretrained`); `cache` and
`cache_threshold` are per generation (the checkpoint's sampling defaults fill them when not given).
"""
import logging
import shutil
import warnings

import torch

from .step_cache import CACHE_MODES
from .transformers.attention import BlockwiseCausalAttnProcessor
from .transformers.fusion import fuse_projections as fuse_layers
from .transformers.attention_backends import DEFAULT_ATTENTION_BACKEND, check_attention_backend, usable_attention_backends

CPU_COMPILERS = ("cc", "gcc", "clang")
FLEX_WITHOUT_COMPILE = (
    "attention_backend 'flex' without compile runs torch's unfused flex reference, which holds every attention "
    "score at once (slower and larger than native); turn compile on with it, or use native."
)
TORCH_FLEX_WARNING = r"flex_attention called without torch\.compile"  # torch's own multi-line form of the above

logger = logging.getLogger(__name__)


def compile_available(device) -> bool:
    """torch.compile's inductor needs a C compiler for CPU code and Triton for CUDA code."""
    if torch.device(device).type == "cuda":
        try:
            import triton  # noqa: F401
        except ImportError:
            return False
        return True
    return torch.device(device).type == "cpu" and any(shutil.which(name) for name in CPU_COMPILERS)


def compile_blocks(transformer, backend: str = "inductor") -> None:
    """torch.compile each repeated block with dynamic shapes, so the three pyramid stages and the growing history
    reuse the same graphs instead of recompiling every unit (the causal-group loop stays eager, see attention.py),
    and the flex backend's attention calls (attention_backends.compiled_flex_attention)."""
    transformer.compile_repeated_blocks(dynamic=True, backend=backend)
    for module in transformer.modules():
        if isinstance(getattr(module, "processor", None), BlockwiseCausalAttnProcessor):
            module.processor.compiled = True


def fuse_projections(transformer) -> None:
    """One q/k/v GEMM per attention stream and one GEMM for every adaLN modulation (transformers.fusion; the saved
    layout stays the official one), unless offload or layerwise-casting hooks manage the transformer's layers: they
    keep the layers they were set up with. LoRA, quantised and hooked layers stay unfused."""
    if not any(hasattr(module, "_diffusers_hook") or hasattr(module, "_hf_hook") for module in transformer.modules()):
        fuse_layers(transformer)


def check_speed_options(device, dtype, attention_backend, compile) -> str:
    """The canonical backend name; a ValueError when the backend or compiling cannot work on `device`."""
    backend = check_attention_backend(attention_backend, device, dtype)
    if not isinstance(compile, bool):
        raise ValueError(f"compile must be True or False; got {compile!r}.")
    if compile and not compile_available(device):
        need = "Triton" if torch.device(device).type == "cuda" else "a C compiler (cc, gcc or clang)"
        raise ValueError(f"compile=True needs {need} on this {torch.device(device).type} machine; leave compile off.")
    return backend


def apply_speed_options(transformer, device, dtype, attention_backend=DEFAULT_ATTENTION_BACKEND, compile=False) -> dict:
    """Fuse the q/k/v projections and adaLN modulations, set the attention backend and compile the blocks; returns the settings to record."""
    backend = check_speed_options(device, dtype, attention_backend, compile)
    fuse_projections(transformer)
    if backend != DEFAULT_ATTENTION_BACKEND:
        transformer.set_attention_backend(backend)
    if backend == "flex" and not compile:
        logger.warning(FLEX_WITHOUT_COMPILE)
        warnings.filterwarnings("ignore", message=TORCH_FLEX_WARNING, category=UserWarning)
    if compile:
        compile_blocks(transformer)
    return {"attention_backend": backend, "compile": compile}


def speed_choices(device, dtype=None) -> dict:
    """What a UI may offer on `device`: cache modes, usable attention backends, whether compiling works."""
    return {
        "cache": CACHE_MODES,
        "attention_backend": tuple(usable_attention_backends(device, dtype)),
        "compile": (False, True) if compile_available(device) else (False,),
    }
