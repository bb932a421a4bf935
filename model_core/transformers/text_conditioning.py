"""The text side of a transformer's conditioning, the same at every step of a generation (issue 32).

The context embedder's text tokens and the pooled text's embedding depend on the prompt embeddings and the weights
only, and a sampler hands the transformer the same prompt tensors at every step: `text_conditioning` computes them
once and gives them back while the same tensors come back unchanged to unchanged layers. Only without gradients,
eager, and on plain layers (a LoRA, quantised or hooked layer computes them every time); one prompt's at a time,
dropped with its tensors.
"""
import torch
from torch.utils.weak import WeakIdKeyDictionary

from .attention import plain_linear


def text_conditioning(model, hidden_states: torch.Tensor, pooled: torch.Tensor) -> tuple:
    """(text tokens [B, L, D]: context_embedder(hidden_states), pooled text embedding [B, D]: the time_text_embed's
    text_embedder(pooled)) of `model`, reused while the inputs and the layers stay the same."""
    layers = text_layers(model)
    if torch.is_grad_enabled() or torch.compiler.is_compiling() or not all(map(plain_linear, layers)):
        return embed_text(model, hidden_states, pooled)
    cache = model.__dict__.setdefault("_text_conditioning", WeakIdKeyDictionary())
    key = (version(hidden_states), version(pooled), weights_state(layers))
    cached = cache.get(hidden_states)
    if cached is None or cached[0] is not pooled or cached[1] != key:
        cache.clear()  # one prompt's at a time
        cached = cache[hidden_states] = (pooled, key, embed_text(model, hidden_states, pooled))
    return cached[2]


def embed_text(model, hidden_states: torch.Tensor, pooled: torch.Tensor) -> tuple:
    return model.context_embedder(hidden_states), model.time_text_embed.text_embedder(pooled)


def text_layers(model) -> list:
    """The layers the text conditioning runs through."""
    mlp = model.time_text_embed.text_embedder
    return [model.context_embedder, mlp.linear_1, mlp.linear_2]


def version(x: torch.Tensor):
    """x's in-place change counter (inference tensors keep none)."""
    return None if x.is_inference() else x._version


def weights_state(layers: list) -> tuple:
    """What changes when a layer's weights do: in place (the version), replaced or moved (storage, dtype)."""
    return tuple((p._version, p.data_ptr(), p.dtype) for layer in layers for p in (layer.weight, layer.bias))
