"""The fused layouts a loaded transformer runs with (issue 32), and taking them apart for LoRA.

Fused: each single-stream block's q/k/v and MLP input projections (flux.SingleStreamBlock), each other attention's
q/k/v projections (attention.fuse_qkv_projections) and every adaLN layer's modulation (modulation.fuse_modulations)
are one GEMM each; the saved layout stays the official one either way.
"""
from torch import nn

from .attention import fuse_qkv_projections
from .modulation import FUSED, fuse_modulations


def fuse_projections(model: nn.Module, fuse: bool = True) -> nn.Module:
    """Fuse (or, with fuse=False, unfuse) the projections and the adaLN modulations of `model`: single-stream blocks'
    [q ; k ; v ; mlp] first (from, or back to, the official layers), then the other attentions' q/k/v."""
    for block in getattr(model, "single_transformer_blocks", ()):
        block.fuse_projections(fuse)
    fuse_qkv_projections(model, fuse)
    fuse_modulations(model, fuse)
    return model


def is_fused(model: nn.Module) -> bool:
    return FUSED in model._modules or any(getattr(module, "fused_projections", False) for module in model.modules())


def unfuse_for_lora(model: nn.Module) -> None:
    """LoRAs target the official layers (to_q, to_k, to_v, add_*_proj, and any adaLN linear): a fused model gets
    them back (and remembers it, for `refuse_after_lora`)."""
    if is_fused(model):
        model._fused_before_lora = True
        fuse_projections(model, fuse=False)


def refuse_after_lora(model: nn.Module) -> None:
    """Undo `unfuse_for_lora` once the model's LoRAs are unloaded."""
    if model.__dict__.pop("_fused_before_lora", False):
        fuse_projections(model)
