"""The causal 3-D video VAE of Pyramid Flow."""
from .model import CausalVideoVAE, DiagonalGaussian

__all__ = ["CausalVideoVAE", "DiagonalGaussian"]
