"""Pyramidal Flow Matching as a library: pyramid math, scheduler, transformers, VAE, pipeline.

Names are imported on first use, so `import model_core` stays cheap.
"""
import importlib
import logging

__version__ = "0.1.0"

# torchao 0.18's prebuilt C++ extensions target torch 2.11. Under the pinned torch they fail to load and say so at
# import, torch warns about torchao's pytree constants, and diffusers about torchao's tensor classes; the Python
# quantisation paths used here work. These lines would break the CLI's one-line errors, so only errors pass.
for _noisy in ("torchao", "torch.utils._pytree", "diffusers.quantizers.torchao.torchao_quantizer"):
    logging.getLogger(_noisy).setLevel(logging.ERROR)

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
