"""Pyramid flow transformers: miniFLUX and SD3 MM-DiT over a packed temporal pyramid."""
from .flux import PyramidFluxTransformer
from .mmdit import PyramidMMDiT

__all__ = ["PyramidFluxTransformer", "PyramidMMDiT"]
