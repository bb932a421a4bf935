"""First Block Cache for the pyramid transformers: skip the trunk when the first block barely changed.

Every step runs the first block; when its image residual (output - input) changed, relative to the
last fully computed step, by less than `threshold`, the remaining blocks are skipped and the final
image tokens are the first block's output plus the residual the remaining blocks added last time.

Written in diffusers' hook style (ModelHook on each block, one shared state) rather than with
diffusers' `FirstBlockCacheConfig`, which does not fit the pyramid sampler:
- miniFLUX's single-stream blocks carry one concatenated [text ; image] stream, while diffusers'
  tail residual is taken against the first block's separate (image, text) pair;
- the cached residuals must be dropped at every pyramid stage jump and every autoregressive unit
  (the token count and noise level jump); `reset_step_cache` is called by the sampler there;
- classifier-free guidance runs the unconditional and conditional branches as rows of one batch:
  the change is measured per row and the trunk is skipped only when every row qualifies, so one
  branch's small change never hides the other's large one, and each row keeps its own residual.
"""
from dataclasses import dataclass
from typing import Optional

import torch
from diffusers.hooks import HookRegistry, ModelHook

from .checkpoints import SamplingDefaults
from .transformers.blocks import DualStreamBlock

CACHE_MODES = ("none", "first-block")
DEFAULT_CACHE_THRESHOLD = SamplingDefaults.cache_threshold
_HEAD_HOOK, _BLOCK_HOOK = "pyramid_first_block_cache_head", "pyramid_first_block_cache_block"


def check_cache_options(cache, threshold) -> tuple:
    """(mode, threshold) validated; a ValueError names what is allowed."""
    if cache not in CACHE_MODES:
        raise ValueError(f"cache must be one of {', '.join(CACHE_MODES)}; got {cache!r}.")
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or threshold < 0:
        raise ValueError(f"cache_threshold must be a number >= 0 (0 never skips a step); got {threshold!r}.")
    return cache, float(threshold)


@dataclass
class FirstBlockCacheState:
    """What the blocks of one transformer share between steps of one pyramid stage of one unit."""

    threshold: float
    head_residual: Optional[torch.Tensor] = None  # first block's image residual at the last computed step
    head_output: Optional[torch.Tensor] = None  # first block's image output at the current step
    trunk_residual: Optional[torch.Tensor] = None  # final image tokens - head_output, last computed step
    skip: bool = False
    ranks: object = None  # a model_core.parallel.Parallelism: the trunk is skipped on every rank or on none
    computed_steps: int = 0
    skipped_steps: int = 0

    def reset(self):
        self.head_residual = self.head_output = self.trunk_residual = None
        self.skip = False


def relative_change(residual: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
    """Per batch row: mean |residual - previous| / mean |previous|."""
    dims = tuple(range(1, residual.ndim))
    return (residual - previous).abs().mean(dims) / previous.abs().mean(dims)


class FirstBlockHook(ModelHook):
    """On the first block: runs it and decides whether the remaining blocks run this step."""

    def __init__(self, state: FirstBlockCacheState):
        super().__init__()
        self.state = state

    def new_forward(self, module, image, *args, **kwargs):
        text, output = self.fn_ref.original_forward(image, *args, **kwargs)
        state, residual = self.state, output - image
        comparable = state.head_residual is not None and state.head_residual.shape == residual.shape
        state.skip = comparable and bool((relative_change(residual, state.head_residual) < state.threshold).all())
        if state.ranks is not None:
            state.skip = state.ranks.all_agree(state.skip)
        if not state.skip:
            state.head_residual = residual
        state.head_output = output
        state.computed_steps += not state.skip
        state.skipped_steps += state.skip
        return text, output


class RemainingBlockHook(ModelHook):
    """On every later block: passes its input through while the trunk is skipped. The last block
    records the trunk's image residual on computed steps and adds it back on skipped ones."""

    def __init__(self, state: FirstBlockCacheState, is_last: bool):
        super().__init__()
        self.state, self.is_last = state, is_last

    def new_forward(self, module, *args, **kwargs):
        state = self.state
        dual = isinstance(module, DualStreamBlock)
        if state.skip:
            output = (args[1], args[0]) if dual else args[0]  # (text, image) or the [text ; image] stream
            return self.with_image(output, dual, self.image(output, dual) + state.trunk_residual) if self.is_last else output
        output = self.fn_ref.original_forward(*args, **kwargs)
        if self.is_last:
            state.trunk_residual = self.image(output, dual) - state.head_output
        return output

    def image(self, output, dual: bool) -> torch.Tensor:
        return output[1] if dual else output[:, -self.state.head_output.shape[1] :]

    def with_image(self, output, dual: bool, image: torch.Tensor):
        if dual:
            return output[0], image
        return torch.cat([output[:, : -image.shape[1]], image], dim=1)


def trunk_blocks(transformer) -> list:
    """The transformer's blocks in the order they run (miniFLUX: dual- then single-stream)."""
    return [*transformer.transformer_blocks, *getattr(transformer, "single_transformer_blocks", [])]


def enable_step_cache(transformer, cache: str = "none", threshold: float = DEFAULT_CACHE_THRESHOLD) -> None:
    """Install (or, for `cache="none"`, remove) the step cache on the transformer's blocks."""
    cache, threshold = check_cache_options(cache, threshold)
    disable_step_cache(transformer)
    blocks = trunk_blocks(transformer)
    if cache == "none" or len(blocks) < 2:
        return
    state = FirstBlockCacheState(threshold, ranks=getattr(transformer, "parallel_ranks", None))
    HookRegistry.check_if_exists_or_initialize(blocks[0]).register_hook(FirstBlockHook(state), _HEAD_HOOK)
    for index, block in enumerate(blocks[1:], start=2):
        hook = RemainingBlockHook(state, is_last=index == len(blocks))
        HookRegistry.check_if_exists_or_initialize(block).register_hook(hook, _BLOCK_HOOK)
    transformer._step_cache_state = state


def disable_step_cache(transformer) -> None:
    for block in trunk_blocks(transformer):
        registry = getattr(block, "_diffusers_hook", None)
        if registry is not None:
            for name in (_HEAD_HOOK, _BLOCK_HOOK):
                registry.remove_hook(name, recurse=False)
    transformer._step_cache_state = None


def step_cache_state(transformer) -> Optional[FirstBlockCacheState]:
    return getattr(transformer, "_step_cache_state", None)


def reset_step_cache(transformer) -> None:
    """Forget the cached residuals: called at every pyramid stage of every unit."""
    state = step_cache_state(transformer)
    if state is not None:
        state.reset()
