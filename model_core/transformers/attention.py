"""Joint text-image attention with the temporal pyramid's blockwise causal mask (Sec. 3.4).

The packed sequence is [text ; image]. A query may attend a key when the key's frame is not
later than the query's (text counts as frame 0) and the key is valid text or an image token.
Image tokens are in non-decreasing frame order, so the queries split into contiguous groups
(group 0 = all text + the oldest frame) and each group attends to a prefix of the keys. How the
groups become kernel calls (one per group, several merged under a bounded mask, or one flex call)
is planned once per layout in attention_plan.py; no L x L mask of a long sequence is ever built.
Each call runs on the backend the attention modules carry (`transformer.set_attention_backend(name)`):
native as torch's SDPA on [B, heads, L, D], the others through diffusers' attention dispatch
(see attention_backends.py).
"""
from collections import OrderedDict
from dataclasses import dataclass, field
from functools import partial

import torch
from diffusers.models.attention import AttentionModuleMixin
from torch import nn

from .attention_backends import (
    DEFAULT_ATTENTION_BACKEND,
    HEADS_FIRST,
    active_attention_backend,
    attend,
    attend_heads_first,
    mask_style,
)
from .attention_plan import plan_calls, plan_key
from .embeddings import apply_rope_joined, apply_rope_pair


@dataclass
class AttentionLayout:
    """Attention inputs shared by every layer (and every step of a unit and stage): causal groups, key validity,
    RoPE angles and the kernel calls planned from them."""

    group_ends: list  # exclusive end (in the packed sequence) of each query group
    key_valid: torch.Tensor  # [B, L] bool: valid text and all image tokens
    rope: tuple = None  # (complex rotation table [L, head_dim / 2],) (embeddings.rotation_tables) or None
    context: object = None  # a model_core.parallel.UlyssesContext when ranks share the sequence
    image_valid: torch.Tensor = None  # [L_img] bool: the real image tokens when shape buckets pad (None: all)
    plans: dict = field(default_factory=dict)  # attention_plan.plan_key -> the layers' kernel calls, planned once

    def calls(self, style: str, q: torch.Tensor) -> list:
        """The kernel calls of every layer for backends of mask `style` (attention_plan.py), planned once."""
        key = plan_key(style, q)
        if key not in self.plans:
            self.plans[key] = plan_calls(self.group_ends, self.key_valid, style, q)
        return self.plans[key]


class PackedLayout:
    """Several samples packed in one sequence [every sample's text ; every sample's image tokens] (training): each
    keeps its own layout, and attention never crosses samples (a block-diagonal mask of per-sample blockwise causal
    masks). A plain class, not a dataclass: FSDP's input casting would copy it (and its plans) at every block."""

    context = None

    def __init__(self, layouts: list, text_counts: list, image_counts: list):
        self.layouts = layouts  # each sample's AttentionLayout (causal groups, key validity, planned calls)
        self.text_spans = list(zip(running_starts(text_counts), text_counts))  # (start, length) of each sample's text
        self.image_spans = list(zip(running_starts(image_counts, sum(text_counts)), image_counts))
        ropes = [layout.rope for layout in layouts]
        self.rope = None if ropes[0] is None else tuple(  # the samples' RoPE tables in packed order
            torch.cat([r[k][:t] for r, t in zip(ropes, text_counts)] + [r[k][t:] for r, t in zip(ropes, text_counts)])
            for k in range(len(ropes[0])))


def running_starts(counts: list, offset: int = 0) -> list:
    """Where each of consecutive runs of `counts` items starts, the first at `offset`."""
    starts = []
    for count in counts:
        starts.append(offset)
        offset += count
    return starts


def packed_attention(q, k, v, layout: PackedLayout, backend) -> torch.Tensor:
    """Attention of packed samples, q, k, v and the result [1, heads, L, D] in packed order: each sample's queries
    attend to its own keys with its own blockwise causal calls (varlen attention)."""
    if layout.rope is not None:
        q, k = apply_rope_pair(q, k, *layout.rope)
    style, texts, images = mask_style(backend), [], []
    for sample, text, image in zip(layout.layouts, layout.text_spans, layout.image_spans):
        q_i, k_i, v_i = (torch.cat([x.narrow(2, *text), x.narrow(2, *image)], dim=2) for x in (q, k, v))
        out = run_calls(q_i, k_i, v_i, sample.calls(style, q_i), backend)
        texts.append(out[:, :, : text[1]])
        images.append(out[:, :, text[1] :])
    return torch.cat(texts + images, dim=2)


def causal_group_ends(num_text: int, frame_token_counts, causal: bool = True) -> list:
    """Query-group boundaries of the blockwise causal mask (Sec. 3.4): text joins the oldest frame."""
    total = num_text + sum(frame_token_counts)
    if not causal:
        return [total]
    ends, end = [], num_text
    for count in frame_token_counts:
        end += count
        ends.append(end)
    return ends


def blockwise_causal_attention(q, k, v, group_ends, key_valid, backend=DEFAULT_ATTENTION_BACKEND) -> torch.Tensor:
    """Blockwise causal attention (Sec. 3.4): query group g attends to keys [0, group_ends[g]).

    q, k, v: [B, heads, L, D]; key_valid: [B, L] bool. Padded-text queries see valid keys only,
    so their (unused) outputs stay finite.
    """
    return run_calls(q, k, v, plan_calls(group_ends, key_valid, mask_style(backend), q), backend)


def run_calls(q, k, v, calls: list, backend=DEFAULT_ATTENTION_BACKEND) -> torch.Tensor:
    """The attention of a planned layer (attention_plan.py); q, k, v and the result are [B, heads, L, D]."""
    heads_first = backend in HEADS_FIRST
    if not heads_first:
        q, k, v = (x.transpose(1, 2) for x in (q, k, v))  # the dispatch's [B, L, heads, D]
    kernel = attend_heads_first if heads_first else partial(attend, backend=backend)
    tokens = 2 if heads_first else 1
    outputs = [kernel(span(q, tokens, call.start, call.end), span(k, tokens, 0, call.end), span(v, tokens, 0, call.end),
                      call.mask) for call in calls]
    out = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=tokens)
    return out if heads_first else out.transpose(1, 2)


def span(x: torch.Tensor, dim: int, start: int, end: int) -> torch.Tensor:
    """x's positions [start, end) along `dim`; x itself when that is all of them (one op fewer)."""
    return x if start == 0 and end == x.shape[dim] else x.narrow(dim, start, end - start)


def dense_block_causal_mask(frame_ids: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Reference dense mask [B, 1, L, L] of the official formulation, for verification only.

    frame_ids: [L] frame of each packed token (text = 0); valid: [B, L] (False = padded text).
    Allowed when both are valid or both are padding, and the key's frame <= the query's.
    """
    same_kind = valid[:, :, None] == valid[:, None, :]
    causal = frame_ids[None, :] <= frame_ids[:, None]
    return (same_kind & causal)[:, None]


class RMSNorm(nn.Module):
    """RMS normalisation over the last dim with a learned scale, computed in float32 (torch's rms_norm: one fused
    kernel on CUDA, the same arithmetic as x * rsqrt(mean(x²) + eps) * weight)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.rms_norm(x, x.shape[-1:], self.weight, self.eps).to(x.dtype)


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    return x.unflatten(-1, (heads, -1)).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    return x.transpose(1, 2).flatten(2)


class BlockwiseCausalAttnProcessor:
    """Rotary positions then blockwise causal attention; [B, heads, L, D] -> [B, L, heads·D].

    Holds the attention backend the way diffusers' processors do (`_attention_backend`, None = diffusers'
    active backend, native unless inside its `attention_backend(...)` context), so
    `ModelMixin.set_attention_backend` / `reset_attention_backend` and that context reach it.
    Under context parallel the ranks first swap sequence for heads (Ulysses) and swap back after. A compiled
    forward (model_core.speed.compile_forward) traces it, flex's calls included.
    """

    def __init__(self):
        self._attention_backend = None

    def __call__(self, q, k, v, layout: AttentionLayout) -> torch.Tensor:
        """k None: q holds the queries and then the keys along the sequence (JointAttention: rotated as one)."""
        if k is None and (isinstance(layout, PackedLayout) or layout.context is not None or layout.rope is None):
            q, k = q.chunk(2, dim=2)
        if isinstance(layout, PackedLayout):
            return merge_heads(packed_attention(q, k, v, layout, self.backend()))
        if layout.context is not None:
            q, k, v = (layout.context.to_heads(x) for x in (q, k, v))
        if layout.rope is not None:
            q, k = apply_rope_pair(q, k, *layout.rope) if k is not None else apply_rope_joined(q, *layout.rope)
        backend = self.backend()
        out = run_calls(q, k, v, layout.calls(mask_style(backend), q), backend)
        return merge_heads(out if layout.context is None else layout.context.to_sequence(out))

    def backend(self) -> str:
        return getattr(self._attention_backend, "value", self._attention_backend) or active_attention_backend()


class SelfAttention(nn.Module, AttentionModuleMixin):
    """q/k/v projections with per-head RMS qk-norm over one stream (the single-stream block's attention).

    The official layout has separate to_q/to_k/to_v; `fuse_projections` makes them one to_qkv GEMM (diffusers'
    name) while state_dict() still gives, and load_state_dict() still takes, the official keys.
    """

    _supports_qkv_fusion = True
    fusable = {"to_qkv": ("to_q", "to_k", "to_v")}  # fused projection -> the official ones, in q, k, v order

    def __init__(self, dim: int, heads: int, qk_eps: float):
        super().__init__()
        self.processor = BlockwiseCausalAttnProcessor()
        self.heads = heads
        self.norm_q = RMSNorm(dim // heads, eps=qk_eps)
        self.norm_k = RMSNorm(dim // heads, eps=qk_eps)
        self.to_q = nn.Linear(dim, dim)
        self.to_k = nn.Linear(dim, dim)
        self.to_v = nn.Linear(dim, dim)
        self.register_state_dict_post_hook(official_keys)
        self.register_load_state_dict_pre_hook(fused_keys)

    def qkv_heads(self, x: torch.Tensor, fused: str) -> tuple:
        """q, k, v heads [B, heads, L, D] of x: one GEMM when `fused` is, else one per official projection."""
        if fused in self._modules:  # the GEMM on token rows, viewed as heads at once: one view in, one out
            return qkv_rows_as_heads(self._modules[fused](x.flatten(0, -2)), x.shape, self.heads)
        return tuple(split_heads(self._modules[name](x), self.heads) for name in self.fusable[fused])

    def project(self, x: torch.Tensor):
        """Normalised q, k and v heads [B, heads, L, D] of the image-side projections."""
        q, k, v = self.qkv_heads(x, "to_qkv")
        return self.norm_q(q), self.norm_k(k), v

    def forward(self, x: torch.Tensor, layout: AttentionLayout) -> torch.Tensor:
        return self.processor(*self.project(x), layout)

    @torch.no_grad()
    def fuse_projections(self):
        """Concatenate each group of official projections into its fused one (`fusable`); a group with a layer that
        is not a plain nn.Linear with plain weights (a LoRA, a quantised or hooked layer) stays as it is."""
        for fused, names in self.fusable.items():
            layers = [self._modules.get(name) for name in names]
            if not all(map(plain_linear, layers)):
                continue
            self._official_order = self._official_order or list(self.state_dict(keep_vars=True))
            joined = nn.Linear(layers[0].in_features, sum(layer.out_features for layer in layers),
                               device=layers[0].weight.device, dtype=layers[0].weight.dtype)
            joined.weight.copy_(torch.cat([layer.weight for layer in layers]))
            joined.bias.copy_(torch.cat([layer.bias for layer in layers]))
            joined.requires_grad_(layers[0].weight.requires_grad)
            for name in names:
                delattr(self, name)
            self.add_module(fused, joined)
        self.fused_projections = any(fused in self._modules for fused in self.fusable)

    @torch.no_grad()
    def unfuse_projections(self):
        """Back to the official projections (what peft's LoRA targets, to_q/to_k/to_v/add_*_proj, need)."""
        for fused, names in self.fusable.items():
            joined = self._modules.get(fused)
            if joined is None:
                continue
            size = joined.out_features // len(names)
            for name, weight, bias in zip(names, joined.weight.split(size), joined.bias.split(size)):
                layer = nn.Linear(joined.in_features, size, device=weight.device, dtype=weight.dtype)
                layer.weight.copy_(weight)
                layer.bias.copy_(bias)
                self.add_module(name, layer.requires_grad_(joined.weight.requires_grad))
            delattr(self, fused)
        self._modules = OrderedDict(sorted(self._modules.items(), key=lambda item: self.official_position(item[0])))
        self.fused_projections = False

    def official_position(self, child: str) -> int:
        """Where the official layout registers `child`: the index of its first state-dict key."""
        keys = self._official_order or []
        return next((index for index, key in enumerate(keys) if key.startswith(child + ".")), len(keys))

    _official_order = None  # the official state-dict keys (local names, in order), recorded when first fused


def qkv_rows_as_heads(rows: torch.Tensor, shape, heads: int) -> tuple:
    """q, k, v heads [B, heads, L, D] of the [q ; k ; v] projections of tokens `shape` [B, L, ·] held as rows
    [B·L, 3·heads·D]."""
    return rows.view(*shape[:-1], 3, heads, -1).permute(2, 0, 3, 1, 4).unbind(0)


def plain_linear(layer) -> bool:
    """An nn.Linear (not a subclass) with a bias and plain tensors for weights (no tensor subclass: checked without
    dispatching an op) and no hooks of its own."""
    return (type(layer) is nn.Linear and layer.bias is not None and not layer._forward_hooks
            and not layer._forward_pre_hooks and not hasattr(layer, "_hf_hook") and not hasattr(layer, "_diffusers_hook")
            and all(type(p) in (nn.Parameter, torch.Tensor) for p in (layer.weight, layer.bias)))


def official_keys(module: SelfAttention, state_dict, prefix: str, local_metadata) -> None:
    """state_dict() of a fused attention in the official layout: each fused tensor split (copied, so that files
    hold no shared storage) into its official projections' keys, every key of the module in the official order."""
    fused = [name for name in module.fusable if name in module._modules]
    if not fused:
        return
    local = {key[len(prefix):]: state_dict.pop(key) for key in [key for key in state_dict if key.startswith(prefix)]}
    for name in fused:
        parts = module.fusable[name]
        for kind in ("weight", "bias"):
            joined = local.pop(f"{name}.{kind}")
            for part, piece in zip(parts, joined.split(joined.shape[0] // len(parts))):
                local[f"{part}.{kind}"] = piece.clone()
    order = {key: index for index, key in enumerate(module._official_order)}
    for key in sorted(local, key=lambda key: order.get(key, len(order))):
        state_dict[prefix + key] = local[key]


def fused_keys(module: SelfAttention, state_dict, prefix: str, *_) -> None:
    """load_state_dict() of the official layout into a fused attention: each group of official tensors
    concatenated under its fused projection's key."""
    for name, parts in module.fusable.items():
        if name in module._modules:
            join_official_tensors(state_dict, prefix, name, parts)


def join_official_tensors(state_dict, prefix: str, fused: str, parts) -> None:
    """The official projections `parts`' weights and biases in `state_dict`, concatenated in that order under the
    fused projection `fused`'s keys (where all of them are there)."""
    for kind in ("weight", "bias"):
        keys = [f"{prefix}{part}.{kind}" for part in parts]
        if all(key in state_dict for key in keys):
            state_dict[f"{prefix}{fused}.{kind}"] = torch.cat([state_dict.pop(key) for key in keys])


def fuse_qkv_projections(model: nn.Module, fuse: bool = True) -> nn.Module:
    """Fuse (or, with fuse=False, unfuse) the q/k/v projections of every attention of `model` (see SelfAttention)."""
    for module in model.modules():
        if isinstance(module, SelfAttention):
            module.fuse_projections() if fuse else module.unfuse_projections()
    return model


class JointAttention(SelfAttention):
    """MM-DiT joint attention: separate text/image projections, one attention over [text ; image].

    The two official variants name the text qk-norms differently (`text_norm_name`: 'added' for
    miniFLUX, 'add' for the MMDiT) and register them before or after the output projections.
    """

    fusable = {**SelfAttention.fusable, "to_added_qkv": ("add_q_proj", "add_k_proj", "add_v_proj")}

    def __init__(self, dim, heads, qk_eps, text_norm_name, text_norms_last, context_pre_only=False):
        super().__init__(dim, heads, qk_eps)
        self.add_k_proj = nn.Linear(dim, dim)
        self.add_v_proj = nn.Linear(dim, dim)
        self.add_q_proj = nn.Linear(dim, dim)
        self.text_norm_names = (f"norm_{text_norm_name}_q", f"norm_{text_norm_name}_k")
        if not text_norms_last:
            self._add_text_norms(dim // heads, qk_eps)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim), nn.Dropout(0.0)])
        self.to_add_out = None if context_pre_only else nn.Linear(dim, dim)
        if text_norms_last:
            self._add_text_norms(dim // heads, qk_eps)

    def _add_text_norms(self, head_dim: int, qk_eps: float):
        for name in self.text_norm_names:
            self.add_module(name, RMSNorm(head_dim, eps=qk_eps))

    def project_text(self, x: torch.Tensor):
        """Normalised q, k and v heads of the text-side projections."""
        q, k, v = self.qkv_heads(x, "to_added_qkv")
        norm_q, norm_k = (getattr(self, name) for name in self.text_norm_names)
        return norm_q(q), norm_k(k), v

    def forward(self, image: torch.Tensor, text: torch.Tensor, layout: AttentionLayout):
        """Returns (image output, text output); the text output is None for a context-pre-only block."""
        (q_text, k_text, v_text), (q_image, k_image, v_image) = self.project_text(text), self.project(image)
        qk = torch.cat([q_text, q_image, k_text, k_image], dim=2)  # [text ; image] queries, then keys: one rotation
        out = self.processor(qk, None, torch.cat([v_text, v_image], dim=2), layout)
        text_out, image_out = out.split([text.shape[1], out.shape[1] - text.shape[1]], dim=1)
        image_out = self.to_out[1](self.to_out[0](image_out))
        return image_out, None if self.to_add_out is None else self.to_add_out(text_out)
