"""Step caches for the pyramid transformers: skip the trunk's blocks on steps where they would change little.

`first-block` and `taylorseer` run the first block every step; when its image residual (output - input)
changed, relative to the last fully computed step, by less than `threshold`, the remaining blocks are
skipped and the final image tokens are the first block's output plus the residual the remaining blocks add:
- `first-block` (First Block Cache): the residual of the last computed step, reused as it was;
- `taylorseer` (TaylorSeer's forecast): extrapolated to this step by a first-order Taylor expansion in the
  step index, from the last two computed steps of the stage (the last one alone right after a reset).

`mag` (MagCache) skips every block, the first included: the trunk's residual is reused while the error
accumulated from the magnitude ratios |r_t| / |r_t-1| of consecutive residuals, sum |1 - prod ratio|, stays
below `threshold`, and for at most MAG_MAX_SKIPS steps in a row. MagCache calibrates the ratios on a run
ahead of time; here they are calibrated within the generation: each ratio is measured where both steps are
computed (the first unit runs every step of its schedule) and keyed by the pair of timesteps, so later units
with the same step schedule reuse them, and a step never calibrated is computed.

Written in diffusers' hook style (ModelHook on each block, one shared state) rather than with
diffusers' `FirstBlockCacheConfig` / `TaylorSeerCacheConfig` / `MagCacheConfig`, which do not fit the pyramid
sampler:
- miniFLUX's single-stream blocks carry one concatenated [text ; image] stream, while diffusers'
  tail residual is taken against the first block's separate (image, text) pair;
- the cached residuals must be dropped at every pyramid stage jump and every autoregressive unit
  (the token count and noise level jump); `reset_step_cache` is called by the sampler there;
- classifier-free guidance runs the unconditional and conditional branches as rows of one batch:
  the change is measured per row and the trunk is skipped only when every row qualifies, so one
  branch's small change never hides the other's large one, and each row keeps its own residual;
- diffusers' TaylorSeer forecasts every module on a fixed interval counted from the run's first step; a
  pyramid stage has only a few steps between the jumps that reset it, so here the forecast replaces the
  First Block Cache's reuse and the first block's gate decides when to forecast;
- diffusers' MagCache takes one list of ratios per step of one schedule; a pyramid video has one schedule
  per stage (and another for the first frame), so the ratios here are keyed by timestep pairs.
"""
from dataclasses import dataclass, field
from typing import Optional

import torch
from diffusers.hooks import HookRegistry, ModelHook

from .checkpoints import SamplingDefaults
from .option_names import CACHE_MODES, canonical_cache_name, check_cache_options

DEFAULT_CACHE_THRESHOLD = SamplingDefaults.cache_threshold
MAG_MAX_SKIPS = 2  # MagCache's K: consecutive steps skipped at most
NOTHING_SKIPPED = (1.0, 0.0, 0)  # mag's (ratio product, error, skips in a row) after a computed step
_HEAD_HOOK, _BLOCK_HOOK, _TIMESTEP_HOOK = "pyramid_step_cache_head", "pyramid_step_cache_block", "pyramid_step_cache_t"


def diffusers_cache_options(config) -> tuple:
    """(mode, threshold) of the step cache that stands in for diffusers' cache `config` (the module docstring says
    why diffusers' own hooks are not used): FirstBlockCacheConfig and MagCacheConfig keep their threshold, and
    TaylorSeerCacheConfig, which has none, gets DEFAULT_CACHE_THRESHOLD. Their other fields steer diffusers' hooks
    and are not read; mag ratios calibrated on one schedule are refused, since ours are calibrated per generation."""
    from diffusers.hooks import FirstBlockCacheConfig, MagCacheConfig, TaylorSeerCacheConfig

    if isinstance(config, FirstBlockCacheConfig):
        return check_cache_options("first-block", config.threshold)
    if isinstance(config, TaylorSeerCacheConfig):
        return check_cache_options("taylorseer", DEFAULT_CACHE_THRESHOLD)
    if isinstance(config, MagCacheConfig):
        if not config.calibrate:
            raise ValueError("MagCacheConfig's mag_ratios are one schedule's; the pyramid's mag cache calibrates its "
                             "ratios during each generation: pass MagCacheConfig(calibrate=True, threshold=...).")
        return check_cache_options("mag", config.threshold)
    raise ValueError(f"{type(config).__name__} is not a step cache of the pyramid transformers; use "
                     "FirstBlockCacheConfig, TaylorSeerCacheConfig or MagCacheConfig(calibrate=True).")


def row_mean(x: torch.Tensor) -> torch.Tensor:
    """Per batch row: the mean over every other dimension (the gate's statistic in one process)."""
    return x.mean(tuple(range(1, x.ndim)))


def valid_row_mean(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Per batch row: the mean over the tokens x [B, L, ...] that `valid` [L] marks (shape buckets' padding left out)."""
    weights = valid.to(x.dtype).reshape(1, -1, *[1] * (x.ndim - 2))
    return (x * weights).sum(tuple(range(1, x.ndim))) / (valid.sum() * x[0, 0].numel())


def relative_change(residual: torch.Tensor, previous: torch.Tensor, mean=row_mean) -> torch.Tensor:
    """Per batch row: mean |residual - previous| / mean |previous|."""
    return mean((residual - previous).abs()) / mean(previous.abs())


@dataclass
class StepCacheState:
    """What the blocks of one transformer share between steps of one pyramid stage of one unit."""

    threshold: float
    mode: str = "first-block"
    ranks: object = None  # a model_core.parallel.Parallelism: statistics of the whole sequence, one decision on all ranks
    image_valid: Optional[torch.Tensor] = None  # [L_img] bool of this step's forward (shape buckets' padding: False)
    head_residual: Optional[torch.Tensor] = None  # first block's image residual at the last computed step
    head_output: Optional[torch.Tensor] = None  # image tokens the trunk's residual is added to (see the hooks)
    trunk_residuals: list = field(default_factory=list)  # (step, final image tokens - head_output), last computed
    step: int = -1  # this stage's step index (counted by the first block)
    skip: bool = False
    timesteps: tuple = (None, None)  # mag: (previous step's t, this step's t) in this stage
    magnitude_ratios: dict = field(default_factory=dict)  # mag: (t before, t) -> per-row ratio, kept across stages
    accumulated: tuple = NOTHING_SKIPPED  # mag: (ratio product, error, skips in a row) since the last computed step
    computed_steps: int = 0
    skipped_steps: int = 0
    decisions: list = field(default_factory=list)  # skip (True) or compute, step by step over the generation

    def reset(self):
        self.head_residual = self.head_output = None
        self.trunk_residuals, self.step, self.skip = [], -1, False
        self.timesteps, self.accumulated = (None, None), NOTHING_SKIPPED

    def decide(self, skip: bool) -> bool:
        """Every rank's common decision for this step, counted."""
        self.skip = self.ranks.all_agree(skip) if self.ranks is not None else skip
        self.computed_steps += not self.skip
        self.skipped_steps += self.skip
        self.decisions.append(self.skip)
        return self.skip

    def mean(self, x: torch.Tensor) -> torch.Tensor:
        """Per batch row mean of image tokens x [B, L, D]: of the whole sequence also when ranks share it (context
        parallel), so every rank gates on the statistic one process would compute; of the real tokens only when
        shape buckets pad the sequence."""
        if self.image_valid is not None:
            return valid_row_mean(x, self.image_valid)
        return row_mean(x) if self.ranks is None else self.ranks.sequence_mean(x)

    def record_trunk_residual(self, residual: torch.Tensor):
        last = self.trunk_residuals[-1] if self.trunk_residuals else None
        if self.mode == "mag" and last is not None and last[0] == self.step - 1:
            self.magnitude_ratios[self.timesteps] = self.mean(residual.abs()) / self.mean(last[1].abs())
        kept = self.trunk_residuals[-1:] if self.mode == "taylorseer" else []  # TaylorSeer differences the last two
        self.trunk_residuals = [*kept, (self.step, residual)]

    def trunk_residual(self) -> torch.Tensor:
        """The trunk's residual at this skipped step: the last computed one, or TaylorSeer's first-order forecast."""
        last_step, last = self.trunk_residuals[-1]
        if len(self.trunk_residuals) < 2:
            return last
        before_step, before = self.trunk_residuals[0]
        return last + (last - before) * ((self.step - last_step) / (last_step - before_step))

    def magnitude_allows_skip(self):
        """MagCache: the accumulation after skipping this step, or None when this step must be computed."""
        ratio = self.magnitude_ratios.get(self.timesteps)
        product, error, in_a_row = self.accumulated
        if ratio is None or not self.trunk_residuals or in_a_row >= MAG_MAX_SKIPS:
            return None
        product = product * ratio
        error = error + (1 - product).abs()
        return (product, error, in_a_row + 1) if bool((error < self.threshold).all()) else None


def passed_through(dual: bool, args):
    """A block's output when it is skipped: (text, image) for a dual-stream block, else the stream itself."""
    return (args[1], args[0]) if dual else args[0]


class StateHook(ModelHook):
    """A hook that shares the transformer's StepCacheState; `dual`: its block is a dual-stream (image, text) block."""

    def __init__(self, state: StepCacheState, dual: bool = False):
        super().__init__()
        self.state, self.dual = state, dual

    def read_image_validity(self, args):
        """Which image tokens of this forward are real: the block's attention layout, its last argument, says."""
        self.state.image_valid = getattr(args[-1], "image_valid", None)


class FirstBlockHook(StateHook):
    """first-block / taylorseer, on the first block: runs it and decides whether the remaining blocks run."""

    def new_forward(self, module, image, *args, **kwargs):
        self.read_image_validity(args)
        text, output = self.fn_ref.original_forward(image, *args, **kwargs)
        state, residual = self.state, output - image
        state.step += 1
        comparable = state.head_residual is not None and state.head_residual.shape == residual.shape
        if not state.decide(comparable and bool((relative_change(residual, state.head_residual, state.mean) < state.threshold).all())):
            state.head_residual = residual
        state.head_output = output
        return text, output


class MagnitudeHeadHook(StateHook):
    """mag, on the first block: decides before it runs whether the trunk runs; a skipped step passes its input on."""

    def new_forward(self, module, image, *args, **kwargs):
        self.read_image_validity(args)
        state = self.state
        state.step += 1
        accumulated = state.magnitude_allows_skip()
        state.accumulated = accumulated if state.decide(accumulated is not None) else NOTHING_SKIPPED
        state.head_output = image
        return passed_through(self.dual, (image, *args)) if state.skip else self.fn_ref.original_forward(image, *args, **kwargs)


class TimestepHook(StateHook):
    """mag, on the transformer: records each step's timestep, the key of the magnitude ratios."""

    def pre_forward(self, module, *args, **kwargs):
        timestep = kwargs["timestep"] if "timestep" in kwargs else args[4]
        self.state.timesteps = (self.state.timesteps[1], round(float(torch.as_tensor(timestep).reshape(-1)[0]), 3))
        return args, kwargs


class RemainingBlockHook(StateHook):
    """On every later block: passes its input through while the trunk is skipped. The last block
    records the trunk's image residual on computed steps and adds it back on skipped ones."""

    def __init__(self, state: StepCacheState, dual: bool, is_last: bool):
        super().__init__(state, dual)
        self.is_last = is_last

    def new_forward(self, module, *args, **kwargs):
        state, dual = self.state, self.dual
        if state.skip:
            output = passed_through(dual, args)
            return self.with_image(output, dual, self.image(output, dual) + state.trunk_residual()) if self.is_last else output
        output = self.fn_ref.original_forward(*args, **kwargs)
        if self.is_last:
            state.record_trunk_residual(self.image(output, dual) - state.head_output)
        return output

    def image(self, output, dual: bool) -> torch.Tensor:
        return output[1] if dual else output[:, -self.state.head_output.shape[1] :]

    def with_image(self, output, dual: bool, image: torch.Tensor):
        if dual:
            return output[0], image
        return torch.cat([output[:, : -image.shape[1]], image], dim=1)


def trunk_blocks(transformer) -> list:
    """(block, dual-stream) pairs in the order the blocks run (miniFLUX: dual- then single-stream)."""
    return [(block, True) for block in transformer.transformer_blocks] + [
        (block, False) for block in getattr(transformer, "single_transformer_blocks", [])]


def apply_step_cache(transformer, cache: str = "none", threshold: float = DEFAULT_CACHE_THRESHOLD, ranks=None) -> None:
    """Install (or, for `cache="none"`, remove) the step cache on the transformer's blocks: diffusers hooks sharing
    one StepCacheState, and nothing else on the model. `ranks`: the model_core.parallel.Parallelism the transformer
    runs under, if any (the gate then reads the whole sequence and all ranks skip together)."""
    cache, threshold = check_cache_options(cache, threshold)
    remove_step_cache(transformer)
    blocks = trunk_blocks(transformer)
    if cache == "none" or len(blocks) < 2:
        return
    state = StepCacheState(threshold, cache, ranks=ranks)
    (first, first_dual), *rest = blocks
    head = MagnitudeHeadHook(state, first_dual) if cache == "mag" else FirstBlockHook(state, first_dual)
    HookRegistry.check_if_exists_or_initialize(first).register_hook(head, _HEAD_HOOK)
    for index, (block, dual) in enumerate(rest, start=2):
        hook = RemainingBlockHook(state, dual, is_last=index == len(blocks))
        HookRegistry.check_if_exists_or_initialize(block).register_hook(hook, _BLOCK_HOOK)
    if cache == "mag":
        HookRegistry.check_if_exists_or_initialize(transformer).register_hook(TimestepHook(state), _TIMESTEP_HOOK)


def remove_step_cache(transformer) -> None:
    """Remove every hook `apply_step_cache` installed."""
    for module, names in [(block, (_HEAD_HOOK, _BLOCK_HOOK)) for block, _ in trunk_blocks(transformer)] + [
            (transformer, (_TIMESTEP_HOOK,))]:
        registry = getattr(module, "_diffusers_hook", None)
        if registry is not None:
            for name in names:
                registry.remove_hook(name, recurse=False)


def step_cache_state(transformer) -> Optional[StepCacheState]:
    """The state the installed step cache's hooks share, read from the first block's hook; None without one."""
    blocks = trunk_blocks(transformer)
    registry = getattr(blocks[0][0], "_diffusers_hook", None) if blocks else None
    hook = registry.get_hook(_HEAD_HOOK) if registry is not None else None
    return None if hook is None else hook.state


def standing_cache(transformer) -> Optional[tuple]:
    """(mode, threshold) set with the transformer's `enable_cache(config)`, or None."""
    config = getattr(transformer, "_cache_config", None)
    return None if config is None else diffusers_cache_options(config)


def reset_step_cache(transformer) -> None:
    """Forget the cached residuals (not mag's calibrated ratios): called at every pyramid stage of every unit."""
    state = step_cache_state(transformer)
    if state is not None:
        state.reset()
