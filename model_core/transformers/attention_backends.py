"""Attention backends for the blockwise causal attention, through diffusers' attention dispatch.

Each causal query group attends to a prefix of the keys (Sec. 3.4) in which padded text keys
must be ignored. How that key-padding is honoured depends on the kernel:

- `native` takes a mask [B, 1, L_q or 1, L_k] (attention_plan.py builds it once per layout, and may merge
  several causal groups into one call) and `flex` one BlockMask for the whole layer;
- `flash_varlen` and `sage_varlen` read a key mask only as per-row valid lengths of a key
  prefix, so the keys are reordered valid-first (attention does not depend on key order) and
  the mask becomes such a prefix;
- `flash` and `sage` take no mask at all, so each row attends to its valid keys only, one call
  per batch row when the rows' text lengths differ.

Every style computes the same attention; only rounding differs between kernels. `native` and `flex` run directly on
the layers' [B, heads, L, D] (what diffusers' native and flex backends do after transposing them): torch's SDPA, and
torch's flex_attention, compiled when the model is (`compile=True`; uncompiled, torch runs flex as a reference that
holds every score at once). The others go through diffusers' dispatch.
"""

import torch
from diffusers.models import attention_dispatch
from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry, dispatch_attention_fn
from torch.nn.attention import flex_attention

from ..option_names import DEFAULT_ATTENTION_BACKEND, canonical_backend_name

MASK_STYLES = {  # each of option_names.ATTENTION_BACKENDS -> how the key-padding mask reaches the kernel (see above)
    "native": "mask",
    "flex": "block_mask",
    "flash": "compact",
    "sage": "compact",
    "flash_varlen": "prefix",
    "sage_varlen": "prefix",
}
HEADS_FIRST = {"native", "flex"}  # run on [B, heads, L, D] as the attention layers hold it (attend_heads_first)
CUDA_ONLY = {"flash", "flash_varlen", "sage", "sage_varlen"}
HALF_PRECISION_ONLY = {"flash", "flash_varlen", "sage", "sage_varlen"}


def installed_attention_backends() -> list:
    """The offered backends whose packages are installed here (device aside)."""
    packages = {
        "native": True,
        "flex": attention_dispatch._CAN_USE_FLEX_ATTN,
        "flash": attention_dispatch._CAN_USE_FLASH_ATTN,
        "flash_varlen": attention_dispatch._CAN_USE_FLASH_ATTN,
        "sage": attention_dispatch._CAN_USE_SAGE_ATTN,
        "sage_varlen": attention_dispatch._CAN_USE_SAGE_ATTN,
    }
    return [name for name in MASK_STYLES if packages[name]]


def usable_attention_backends(device=None, dtype=None) -> list:
    """Installed backends that also run on `device` with `dtype` (CUDA half precision for flash / sage)."""
    names = installed_attention_backends()
    if device is not None and torch.device(device).type != "cuda":  # ok: a device-type check
        names = [name for name in names if name not in CUDA_ONLY]
    if dtype is not None and dtype not in (torch.float16, torch.bfloat16):
        names = [name for name in names if name not in HALF_PRECISION_ONLY]
    return names


def check_attention_backend(name, device=None, dtype=None) -> str:
    """The canonical backend name (see canonical_backend_name), or a ValueError that says what is usable here."""
    canonical = canonical_backend_name(name)
    usable = usable_attention_backends(device, dtype)
    if canonical not in usable:
        where = " on this device" if device is not None else ""
        why = ""
        if canonical in installed_attention_backends():
            why = " (it needs a CUDA GPU and float16 or bfloat16 weights)"
        elif canonical in MASK_STYLES:
            why = " (its package is not installed)"
        raise ValueError(
            f"attention_backend {name!r} is not available{why}; usable{where}: {', '.join(usable)}."
        )
    return canonical


def active_attention_backend() -> str:
    """diffusers' process-wide backend (inside its `attention_backend(...)` context, else DIFFUSERS_ATTN_BACKEND),
    which a model with no backend set follows as diffusers' own models do; one we cannot run is refused."""
    active, _ = _AttentionBackendRegistry.get_active_backend()
    name = getattr(active, "value", active)
    return name if name == DEFAULT_ATTENTION_BACKEND else check_attention_backend(name)


def mask_style(backend: str) -> str:
    """How `backend` takes the key-padding mask (MASK_STYLES)."""
    return MASK_STYLES.get(backend, "mask")


def additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """0 where allowed, -inf elsewhere: what SDPA makes of a bool mask on every call, made once."""
    return torch.zeros((), dtype=dtype, device=mask.device).masked_fill(~mask, float("-inf"))


def key_mask(key_valid: torch.Tensor, style: str, dtype: torch.dtype):
    """What one call of `style` needs to ignore the padded keys of `key_valid` [B, Lk], prepared once per
    forward so that no layer repeats the work (or, for `compact`, a device sync): see the module docstring."""
    if style == "mask":
        return additive(key_valid[:, None, None, :], dtype)
    if style == "prefix":
        order = torch.argsort(~key_valid, dim=1, stable=True)  # valid keys first, in their order
        return order, key_valid.gather(1, order)
    if style == "compact":
        return None if bool(key_valid.all()) else [valid.nonzero()[:, 0] for valid in key_valid]
    raise ValueError(f"no per-call key mask for style {style!r}")


def attend(q, k, v, mask, backend: str = DEFAULT_ATTENTION_BACKEND, style: str = None):
    """Attention of queries q [B, Lq, heads, D] to keys/values [B, Lk, heads, D] under `mask`, prepared for the
    backend's style (MASK_STYLES; tests pass another to check a style with the native kernel): a mask
    [B, 1, Lq or 1, Lk] or a BlockMask, or `key_mask(...)` of the per-group styles."""
    kernel = AttentionBackendName(backend)
    style = style or mask_style(backend)
    if style in ("mask", "block_mask"):
        return dispatch_attention_fn(q, k, v, attn_mask=mask, backend=kernel)
    if style == "prefix":
        order, valid_first = mask
        gather = order[:, :, None, None].expand_as(k)
        return dispatch_attention_fn(q, k.gather(1, gather), v.gather(1, gather), attn_mask=valid_first, backend=kernel)
    if mask is None:
        return dispatch_attention_fn(q, k, v, backend=kernel)
    rows = [
        dispatch_attention_fn(q[row : row + 1], k[row : row + 1, keep], v[row : row + 1, keep], backend=kernel)
        for row, keep in enumerate(mask)
    ]
    return torch.cat(rows)


def attend_heads_first(q, k, v, mask) -> torch.Tensor:
    """`native` or `flex` attention of queries q [B, heads, Lq, D] to keys/values [B, heads, Lk, D], without the
    transposes to and from the dispatch's [B, L, heads, D] around the call: torch's SDPA under an additive mask
    [B, 1, Lq or 1, Lk] (as diffusers' native backend calls it), or flex attention under a BlockMask (fused kernels
    when the forward is compiled on a GPU: model_core.speed.compile_forward)."""
    if isinstance(mask, flex_attention.BlockMask):
        return flex_attention.flex_attention(q, k, v, block_mask=mask)
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
