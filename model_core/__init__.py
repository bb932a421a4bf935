"""Pyramidal Flow Matching as a library: pyramid math, scheduler, transformers, VAE, pipeline.

Names are imported on first use, so `import model_core` stays cheap.
"""
import importlib
import logging

__version__ = "0.1.0"



def _not_a_torchao_import_notice(record: logging.LogRecord) -> bool:
    """False for the three notices that importing torchao 0.18 logs under torch 2.13 (directly, or through diffusers'
    model classes), true for everything else these loggers say. PyPI's torchao carries CUDA kernels that a CPU build
    of torch cannot load (none of this package's paths calls them); torch flags torchao's own pytree registrations;
    diffusers 0.42 looks for tensor classes that torchao 0.18 moved (needed only for checkpoints torchao saved).
    Printed, they would break the CLI's one-line errors."""
    message = record.getMessage()
    if record.name == "torchao":
        return not message.startswith("Failed to load ")
    if record.name == "torch.utils._pytree":
        return not any(str(getattr(arg, "__module__", "")).startswith("torchao.") for arg in record.args or ())
    return not message.startswith("Unable to import `torchao` Tensor objects")


for _name in ("torchao", "torch.utils._pytree", "diffusers.quantizers.torchao.torchao_quantizer"):
    logging.getLogger(_name).addFilter(_not_a_torchao_import_notice)

_EXPORTS = {
    "PyramidFlowScheduler": "model_core.scheduler",
    "block_noise": "model_core.pyramid",
    "token_budget": "model_core.temporal",
    "PyramidFluxTransformer": "model_core.transformers",
    "PyramidMMDiT": "model_core.transformers",
    "CausalVideoVAE": "model_core.vae",
    "PyramidFlowPipeline": "model_core.pipeline",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'model_core' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value
