"""The speed options, one name each in pipeline, CLI and studio.

`attention_backend` and `compile` shape the loaded transformer (given to `from_pretrained`); `cache` and
`cache_threshold` are per generation (the checkpoint's sampling defaults fill them when not given).

`compile` has three levels: False (eager), True (the whole transformer forward compiled, attention included, one
graph per input shape) and "max" (the same, with CUDA graphs per shape on a CUDA device: torch.compile's
"reduce-overhead" mode). Compiled, a generation pads its history to shape buckets (model_core.sampling), so that a
video has a few input shapes, hence a few compiles, instead of one per unit and stage.
"""
import logging
import shutil
import warnings

import torch
from torch.utils._pytree import tree_map_only

from .option_names import COMPILE_LEVELS, compile_level, compile_name
from .step_cache import CACHE_MODES, step_cache_state
from .transformers.fusion import fuse_projections as fuse_layers
from .transformers.attention_backends import DEFAULT_ATTENTION_BACKEND, check_attention_backend, usable_attention_backends

CPU_COMPILERS = ("cc", "gcc", "clang")
FLEX_WITHOUT_COMPILE = (
    "attention_backend 'flex' without compile runs torch's unfused flex reference, which holds every attention "
    "score at once (slower and larger than native); turn compile on with it, or use native."
)
TORCH_FLEX_WARNING = r"flex_attention called without torch\.compile"  # torch's own multi-line form of the above
# Compiled graphs dynamo keeps per code object: a video's shapes (per stage its shape buckets and the unpadded
# shapes of its first units, guided and unguided) stay well below it, where dynamo's default of 8 would fall back
# to eager after the first units.
RECOMPILE_LIMIT = 64

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


def compile_forward(transformer, level=True, backend: str = "inductor") -> None:
    """torch.compile the whole transformer forward, attention included, with static shapes (one graph per input
    shape: `uses_shape_buckets` keeps them few); "max" on CUDA also captures each graph as a CUDA graph. In one
    graph (fullgraph=True) unless hooks run inside the forward: offload hooks (set before compiling) that move
    weights, or a step cache, whose gate reads the device between blocks (graph breaks); then, "max" included,
    without CUDA graphs, whose replays would overwrite what the hooks keep."""
    eager, offloaded = transformer.forward, managed_by_hooks(transformer)
    whole = torch.compile(eager, fullgraph=True, dynamic=False, backend=backend,
                          mode="reduce-overhead" if level == "max" else None)
    with_breaks = torch.compile(eager, dynamic=False, backend=backend)
    dynamo_config = torch._dynamo.config
    dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, RECOMPILE_LIMIT)

    def forward(*args, **kwargs):
        if offloaded or step_cache_state(transformer) is not None:
            return with_breaks(*args, **kwargs)
        if level != "max":
            return whole(*args, **kwargs)
        torch.compiler.cudagraph_mark_step_begin()  # each call a new step: the last one's outputs are taken
        return tree_map_only(torch.Tensor, torch.clone, whole(*args, **kwargs))  # the next replay overwrites them

    transformer.forward = forward


def uses_shape_buckets(compile) -> bool:
    """Whether generations pad their history to shape buckets: when the forward is compiled, where each new input
    shape costs a compile of the whole forward (and "max" a CUDA graph); eager, the padding tokens would buy nothing."""
    return compile in (True, "max")


def fuse_projections(transformer) -> None:
    """One q/k/v GEMM per attention stream and one GEMM for every adaLN modulation (transformers.fusion; the saved
    layout stays the official one), unless offload or layerwise-casting hooks manage the transformer's layers: they
    keep the layers they were set up with. LoRA, quantised and hooked layers stay unfused."""
    if not managed_by_hooks(transformer):
        fuse_layers(transformer)


def managed_by_hooks(transformer) -> bool:
    """Whether diffusers or accelerate hooks (offload, layerwise casting, step caches) sit on any of its modules."""
    return any(hasattr(module, "_diffusers_hook") or hasattr(module, "_hf_hook") for module in transformer.modules())


def check_compile(compile, device):
    """The compile level (option_names.compile_level); a ValueError saying what is allowed when it cannot work on
    `device`."""
    level, kind = compile_level(compile), torch.device(device).type
    if level == "max" and kind != "cuda":  # ok: a device-type check
        raise ValueError(f"compile 'max' captures CUDA graphs and needs a CUDA GPU; on this {kind} machine compile "
                         "can be off or on.")
    if level and not compile_available(device):
        need = "a C compiler (cc, gcc or clang)" if kind == "cpu" else "Triton"
        raise ValueError(f"compile {compile_name(level)!r} needs {need} on this {kind} machine; leave compile off.")
    return level


def check_speed_options(device, dtype, attention_backend, compile) -> str:
    """The canonical backend name; a ValueError when the backend or compiling cannot work on `device`."""
    backend = check_attention_backend(attention_backend, device, dtype)
    if check_compile(compile, device) and backend == "flex" and torch.device(device).type == "cpu":  # ok: device type
        raise ValueError("attention_backend 'flex' does not compile on the CPU (inductor cannot lower flex attention "
                         "inside the compiled forward there); use native with compile, or flex without it.")
    return backend


def apply_speed_options(transformer, device, dtype, attention_backend=DEFAULT_ATTENTION_BACKEND, compile=False) -> dict:
    """Fuse the q/k/v projections and adaLN modulations, set the attention backend and compile the forward at the
    `compile` level (False, True or "max"); returns the settings to record."""
    backend = check_speed_options(device, dtype, attention_backend, compile)
    compile = compile_level(compile)
    fuse_projections(transformer)
    if backend != DEFAULT_ATTENTION_BACKEND:
        transformer.set_attention_backend(backend)
    if backend == "flex" and not compile:
        logger.warning(FLEX_WITHOUT_COMPILE)
        warnings.filterwarnings("ignore", message=TORCH_FLEX_WARNING, category=UserWarning)
    if compile:
        compile_forward(transformer, compile)
    return {"attention_backend": backend, "compile": compile}


def speed_choices(device, dtype=None) -> dict:
    """What a UI may offer on `device`: cache modes, usable attention backends, whether compiling works."""
    return {
        "cache": CACHE_MODES,
        "attention_backend": tuple(usable_attention_backends(device, dtype)),
        "compile": compile_levels(device),
    }


def compile_levels(device) -> tuple:
    """The compile levels that work on `device`: "max" on CUDA only, nothing but False without a compiler."""
    if not compile_available(device):
        return (False,)
    return COMPILE_LEVELS if torch.device(device).type == "cuda" else (False, True)  # ok: a device-type check
