"""Every adaLN modulation of a transformer at once (issue 32): one SiLU of the conditioning and, fused, one GEMM.

Each adaLN layer (blocks.AdaLayerNorm) maps SiLU(temb) to its shift / scale / gate vectors, and all of them read
the same temb: `block_modulations` computes the SiLU once and hands every layer its vectors, and `fuse_modulations`
concatenates the layers' linear weights into one GEMM (the model's `adaln_modulation`, in `qualified_layers`
order). The saved layout stays the official one: state_dict() gives each layer's `linear.weight` /
`linear.bias` where the official model has them (blocks.official_modulation_keys), load_state_dict() takes them, and
unfusing restores the layers' own linears.
"""
import torch
import torch.nn.functional as F
from torch import nn

from .attention import plain_linear
from .blocks import AdaLayerNorm, joined_linear

FUSED = "adaln_modulation"


def modulated_modules(model) -> list:
    """The modules whose adaLN layers are children: the trunk's blocks in the order they run, then the model."""
    return [*model.transformer_blocks, *getattr(model, "single_transformer_blocks", ()), model]


def adaln_layers(module) -> list:
    """(name, layer) of a module's adaLN children."""
    return [(name, child) for name, child in module.named_children() if isinstance(child, AdaLayerNorm)]


def fused_rows(model, act: torch.Tensor, fused: nn.Linear, spread) -> list:
    """Every layer's vectors from the one modulation GEMM: [rows, 1, all layers' k·D] unpacked, else one per layer."""
    if spread is None:
        return [fused(act)[:, None]]
    layers = [(name, layer) for module in modulated_modules(model) for name, layer in adaln_layers(module)]
    per_layer = fused(act).split([layer.num_chunks * act.shape[-1] for _, layer in layers], dim=-1)
    return [spread_rows(vectors, spread[name]) for (name, _), vectors in zip(layers, per_layer)]


def spread_rows(vectors: torch.Tensor, spread: torch.Tensor) -> torch.Tensor:
    """Each token's sample vectors [1, L, k·D] from the samples' [samples, k·D] (a one-hot matrix product: an index's
    backward accumulates in a varying order on the CPU)."""
    return (spread.to(vectors.dtype) @ vectors)[None]


def as_chunks(rows: torch.Tensor, layers: list, dim: int) -> list:
    """The layers' chunk tuples from their vectors side by side in `rows` [.., sum of k·D], scales as 1 + scale."""
    pairs = iter(zip(rows.split(dim, dim=-1), (rows + 1).split(dim, dim=-1)))
    return [layer.chunks([next(pairs) for _ in range(layer.num_chunks)]) for layer in layers]


class OwnModulations:
    """One module's adaLN vectors by name, computed from the module's own linears when the module reads them, inside
    its forward (unfused models: per-block FSDP gathers a block's weights only there). Not a Mapping, so hooks that
    move a forward's arguments between devices (group offloading) pass it on as it is instead of rebuilding it."""

    def __init__(self, module, act: torch.Tensor, spread: dict = None):
        self.layers, self.act, self.spread = dict(adaln_layers(module)), act, spread

    def __getitem__(self, name: str):
        layer = self.layers[name]
        vectors = layer.linear(self.act)
        rows = vectors[:, None] if self.spread is None else spread_rows(vectors, self.spread[name])
        return as_chunks(rows, [layer], self.act.shape[-1])[0]


def block_modulations(model, temb: torch.Tensor, spread: dict = None) -> list:
    """Each modulated module's {adaLN name: its vectors} (`modulated_modules` order: the trunk's blocks, then the
    model's own), from one SiLU of temb [rows, D]: vectors [rows, 1, D], scales as factors 1 + scale. Fused, one GEMM
    makes them all here; unfused, each module computes its own as it runs (`OwnModulations`).

    spread (packed samples, training): temb holds each sample's row, and `spread[name]` the one-hot [L, samples]
    of the tokens an adaLN `name` modulates; each token takes its sample's vectors [1, L, D]."""
    act = F.silu(temb)
    fused = model._modules.get(FUSED)
    if fused is None:
        return [OwnModulations(module, act, spread) for module in modulated_modules(model)]
    layers = [layer for module in modulated_modules(model) for _, layer in adaln_layers(module)]
    chunks = iter([chunk for rows, layer_group in zip(fused_rows(model, act, fused, spread),
                                                      [layers] if spread is None else [[layer] for layer in layers])
                   for chunk in as_chunks(rows, layer_group, act.shape[-1])])
    return [{name: next(chunks) for name, _ in adaln_layers(module)} for module in modulated_modules(model)]


def qualified_layers(model) -> list:
    """(name in the model, layer) of every adaLN layer in the fused order."""
    names = {module: name for name, module in model.named_modules()}
    return [(names[layer], layer) for module in modulated_modules(model) for _, layer in adaln_layers(module)]


@torch.no_grad()
def fuse_modulations(model, fuse: bool = True) -> None:
    """Make every adaLN layer's linear part of one modulation GEMM (or, with fuse=False, give them back); nothing
    when a layer is not a plain nn.Linear with plain weights (a LoRA, a quantised or hooked layer)."""
    layers = [layer for _, layer in qualified_layers(model)]
    fused = model._modules.get(FUSED)
    if not fuse and fused is not None:
        unfuse(layers, fused)
        delattr(model, FUSED)
    linears = [layer._modules.get("linear") for layer in layers]
    if fuse and fused is None and layers and all(map(plain_linear, linears)):
        joined = joined_linear(linears)
        start = 0
        for layer, linear in zip(layers, linears):
            del layer.linear
            layer.fused_rows = (joined, start, start + linear.out_features)
            start += linear.out_features
        model.add_module(FUSED, joined)


def unfuse(layers: list, fused: nn.Linear) -> None:
    """Each adaLN layer gets its own linear back from its rows of `fused`, where the official layout has it."""
    for layer in layers:
        _, start, end = layer.fused_rows
        linear = nn.Linear(fused.in_features, end - start, device=fused.weight.device, dtype=fused.weight.dtype)
        linear.weight.copy_(fused.weight[start:end])
        linear.bias.copy_(fused.bias[start:end])
        children = dict(layer._modules)
        layer._modules.clear()
        for name, child in [("act", children.pop("act")), ("linear", linear), *children.items()]:  # official order
            layer.add_module(name, child.requires_grad_(fused.weight.requires_grad))
        del layer.fused_rows


def without_fused_keys(model, state_dict, prefix: str, local_metadata) -> None:
    """state_dict() of a fused model: the adaLN layers gave their official keys; the fused GEMM's are left out."""
    for kind in ("weight", "bias"):
        state_dict.pop(f"{prefix}{FUSED}.{kind}", None)


def fused_modulation_keys(model, state_dict, prefix: str, *_) -> None:
    """load_state_dict() of the official layout into a fused model: the adaLN layers' linear tensors concatenated
    under the fused GEMM's key."""
    if FUSED not in model._modules:
        return
    names = [name for name, _ in qualified_layers(model)]
    for kind in ("weight", "bias"):
        keys = [f"{prefix}{name}.linear.{kind}" for name in names]
        if all(key in state_dict for key in keys):
            state_dict[f"{prefix}{FUSED}.{kind}"] = torch.cat([state_dict.pop(key) for key in keys])
