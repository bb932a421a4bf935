"""Deterministic weight initialisation from a torch.Generator, never from the global RNG."""
import math

import torch


@torch.no_grad()
def reinitialize(module: torch.nn.Module, generator: torch.Generator) -> torch.nn.Module:
    """Redraw `module`'s parameters from `generator`, keeping each one's role: zero tensors stay zero
    (adaLN-zero and zero-initialised outputs), all-ones vectors stay ones (norm scales), other vectors
    (biases) become zero, and matrices / kernels / embeddings are drawn from N(0, 1/fan_in)."""
    for parameter in module.parameters():
        if not parameter.is_floating_point() or not parameter.any():
            continue
        if parameter.dim() == 1:
            if not torch.all(parameter == 1):
                parameter.zero_()
            continue
        fan_in = parameter[0].numel()
        noise = torch.randn(parameter.shape, generator=generator, dtype=torch.float32, device=generator.device)
        parameter.copy_(noise / math.sqrt(fan_in))
    return module
