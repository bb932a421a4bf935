"""Packing a column of temporal-pyramid clips (Fig. 3b) into one token sequence and back.

`PyramidTransformer` holds what miniFLUX and the MMDiT share: input checks, conditioning,
packing [text ; history clips oldest first ; current unit], the causal attention layout,
the output head and unpatchifying the current unit. Subclasses supply the patch embedding,
the rotary positions and the stack of blocks.
"""
import logging
import math
from collections import OrderedDict
from contextlib import contextmanager
from typing import NamedTuple

import torch
from diffusers.configuration_utils import ConfigMixin
from diffusers.loaders import PeftAdapterMixin
from diffusers.models.attention_dispatch import _AttentionBackendRegistry
from diffusers.models.cache_utils import CacheMixin
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.modeling_utils import ModelMixin
from torch.utils.weak import WeakIdKeyDictionary

from ..step_cache import apply_step_cache, diffusers_cache_options, remove_step_cache
from .attention import AttentionLayout, PackedLayout, causal_group_ends
from .attention_backends import check_attention_backend
from .embeddings import PATCH, clip_positions, rotation_tables, unpatchify
from .fusion import refuse_after_lora, unfuse_for_lora
from .modulation import block_modulations, fused_modulation_keys, without_fused_keys
from .text_conditioning import text_conditioning

ROPE_CACHE_SIZE = 8  # shapes of RoPE angles kept: a unit's three stages, with room for guided/unguided text lengths


@contextmanager
def backend_of_this_model_only():
    """Around diffusers' set/reset_attention_backend: keep its process-wide active backend (set_attention_backend
    also makes the backend process-wide, and every model with no backend of its own would follow it), and hold
    back its notice that the API is experimental (our option is stable)."""
    notices = logging.getLogger(ModelMixin.__module__)
    level, active = notices.level, _AttentionBackendRegistry.get_active_backend()[0]
    notices.setLevel(logging.ERROR)
    try:
        yield
    finally:
        notices.setLevel(level)
        _AttentionBackendRegistry.set_active_backend(active)


class ClipGrid(NamedTuple):
    """Token grid of one clip: frames x rows x columns."""

    frames: int
    height: int
    width: int

    @property
    def tokens_per_frame(self) -> int:
        return self.height * self.width

    @property
    def tokens(self) -> int:
        return self.frames * self.tokens_per_frame


def clip_grid(clip: torch.Tensor) -> ClipGrid:
    _, _, frames, height, width = clip.shape
    return ClipGrid(frames, height // PATCH, width // PATCH)


def as_columns(sample) -> list:
    """A list of columns (lists of clips); a flat list of tensors is one column."""
    if isinstance(sample, torch.Tensor):
        return [[sample]]
    if len(sample) == 0:
        raise ValueError("`sample` is empty: pass a list of columns, each a list of latent clips [B, C, T, H, W].")
    if all(isinstance(clip, torch.Tensor) for clip in sample):
        return [list(sample)]
    return [list(column) for column in sample]


def frame_token_counts(grids) -> list:
    """Image tokens of each frame of a column's clips, in packed order."""
    return [grid.tokens_per_frame for grid in grids for _ in range(grid.frames)]


class PaddedColumn(list):
    """The clip grids of one column whose coarsest history clip ends in padding frames (shape buckets, see
    model_core.sampling): `valid_frames` [T] bool marks the real frames of the column's clips, the current unit's
    included. Padding frames are no keys of attention, count in no temporal position and in no step-cache statistic."""

    def __init__(self, grids, valid_frames: torch.Tensor):
        super().__init__(grids)
        self.valid_frames = valid_frames

    def per_token(self, per_frame: torch.Tensor) -> torch.Tensor:
        """[L_img]: each frame's value of `per_frame` [T] repeated over its tokens (static sizes: no device read)."""
        return torch.cat([per_frame[index].expand(count) for index, count in enumerate(frame_token_counts(self))])

    def image_valid(self) -> torch.Tensor:
        """[L_img] bool: the real image tokens."""
        return self.per_token(self.valid_frames)

    def padding_before(self) -> torch.Tensor:
        """[L_img]: padding frames before each token's frame, what its temporal position drops."""
        padding = (~self.valid_frames).to(torch.float32)
        return self.per_token(padding.cumsum(0) - padding)


def pyramid_positions(grids, interpolate: bool, device=None) -> torch.Tensor:
    """(t, h, w) ids [L_img, 3] of packed clips on `device`: frames counted from the oldest, h/w in the current grid
    (Fig. 3b); the padding frames of a PaddedColumn are not counted."""
    current, first_frame, positions = grids[-1], 0, []
    for grid in grids:
        positions.append(clip_positions(grid.frames, grid[1:], current[1:], first_frame, interpolate, device))
        first_frame += grid.frames
    positions = torch.cat(positions)
    if isinstance(grids, PaddedColumn):
        shift = grids.padding_before()
        positions = torch.cat([positions[:, :1] - shift[:, None], positions[:, 1:]], dim=1)
    return positions


def membership(counts: list, device) -> torch.Tensor:
    """One-hot [sum(counts), n]: the sample of each token of a stream whose samples hold `counts` tokens in turn."""
    samples = torch.arange(len(counts), device=device)
    return torch.nn.functional.one_hot(samples.repeat_interleave(torch.tensor(counts, device=device)), len(counts))


def per_column(valid_frames, num_columns: int) -> list:
    """`valid_frames` as one entry per column (None for each when not given; a lone tensor is one column's)."""
    if valid_frames is None:
        return [None] * num_columns
    entries = [valid_frames] if isinstance(valid_frames, torch.Tensor) else list(valid_frames)
    if len(entries) != num_columns:
        raise ValueError(f"valid_frames needs one entry per column ({num_columns}); got {len(entries)}.")
    return entries


def padded_column(grids: list, valid_frames):
    """The column's grids, as a PaddedColumn when it has `valid_frames` ([T] bool over all its clips' frames)."""
    if valid_frames is None:
        return grids
    frames = sum(grid.frames for grid in grids)
    if valid_frames.shape != (frames,) or valid_frames.dtype != torch.bool:
        raise ValueError(f"valid_frames must be a bool tensor of the column's {frames} frames; got "
                         f"{valid_frames.dtype} {tuple(valid_frames.shape)}.")
    return PaddedColumn(grids, valid_frames)


class PyramidTransformer(ModelMixin, ConfigMixin, PeftAdapterMixin, CacheMixin):
    """Shared forward of the pyramid flow transformers: velocity of the current unit of each column.

    A subclass defines `latent_channels`, `embed_clips(clips, grids)` (image tokens [B, L_img, D]),
    `position_ids(num_text, grids, device)` (ids [L, n_axes] of [text ; image], frame id first),
    `rope_angles(num_text, grids, device)` ((cos, sin) for [text ; image] or None, made on `device`) and
    `run_blocks(image, text, modulations, layout)` (the trunk, given each block's adaLN vectors in the order the
    blocks run (modulation.block_modulations), returning the final image tokens), plus the modules
    `time_text_embed`, `context_embedder`, `norm_out` and `proj_out`.

    `use_flash_attn` is kept for config compatibility only: attention always keeps the blockwise
    causal mask (the official flash path drops it). `use_temporal_causal=False` lets every token
    attend to every valid token. LoRA adapters come through diffusers' `PeftAdapterMixin`
    (`load_lora_adapter`, `set_adapters`, `fuse_lora`, `unload_lora`; see model_core.lora), step caches
    through diffusers' `CacheMixin` (`enable_cache`, `disable_cache`, `is_cache_enabled`; see model_core.step_cache).
    """

    _supports_gradient_checkpointing = True
    context_parallel = None  # set by model_core.parallel.apply_parallel: this rank keeps a slice of the sequence
    _skip_layerwise_casting_patterns = ["pos_embed", "norm"]

    def __init__(self):
        super().__init__()
        self.register_state_dict_post_hook(without_fused_keys)  # the official layout when the adaLN GEMMs are fused
        self.register_load_state_dict_pre_hook(fused_modulation_keys)

    def check_columns(self, columns, rows: int):
        """Every clip is a [B, C, T, H, W] latent of one batch size B, and the text has B x columns rows."""
        batch = columns[0][0].shape[0] if columns[0] else 0
        for column in columns:
            if not column:
                raise ValueError("Every column of `sample` needs at least the current unit.")
            for clip in column:
                self.check_clip(clip, batch)
        if batch * len(columns) != rows:
            raise ValueError(
                f"The text inputs have {rows} rows but the sample has {len(columns)} column(s) of batch {batch}; "
                "rows must equal batch x columns (row = sample * num_columns + column)."
            )

    def check_clip(self, clip: torch.Tensor, batch: int):
        if clip.ndim != 5:
            raise ValueError(f"Latent clips must be [B, C, T, H, W]; got shape {tuple(clip.shape)}.")
        b, channels, _, height, width = clip.shape
        if channels != self.latent_channels:
            raise ValueError(f"Latent clips must have {self.latent_channels} channels; got {channels}.")
        if height % PATCH or width % PATCH:
            raise ValueError(f"Latent height and width must be even (2x2 patches); got {height}x{width}.")
        if b != batch:
            raise ValueError(f"All clips must share one batch size; got {b} and {batch}.")

    def check_text(self, encoder_hidden_states, encoder_attention_mask, pooled_projections, timestep, rows):
        shapes = {
            "encoder_attention_mask": (encoder_attention_mask.shape, (rows, encoder_hidden_states.shape[1])),
            "pooled_projections": (pooled_projections.shape[:1], (rows,)),
            "timestep": (timestep.shape, (rows,)),
        }
        for name, (got, expected) in shapes.items():
            if tuple(got) != expected:
                raise ValueError(
                    f"`{name}` must have shape {expected} to match encoder_hidden_states; got {tuple(got)}."
                )

    def set_attention_backend(self, backend: str) -> None:
        """Route every blockwise causal attention call through `backend` (see attention_backends.py);
        a backend whose package is missing is refused with a ValueError naming the installed ones."""
        with backend_of_this_model_only():
            super().set_attention_backend(check_attention_backend(backend))

    def reset_attention_backend(self) -> None:
        """Back to no backend of its own: diffusers' active one (native outside its `attention_backend(...)`)."""
        with backend_of_this_model_only():
            super().reset_attention_backend()

    def load_lora_adapter(self, *args, **kwargs):
        """diffusers' LoRA loading; q/k/v projections fused for speed are split back first (LoRAs target the official
        to_q/to_k/to_v/add_*_proj) and fused again by `unload_lora` (attention.unfuse_for_lora)."""
        unfuse_for_lora(self)
        return super().load_lora_adapter(*args, **kwargs)

    def add_adapter(self, adapter_config, adapter_name: str = "default") -> None:
        unfuse_for_lora(self)
        super().add_adapter(adapter_config, adapter_name)

    def unload_lora(self) -> None:
        super().unload_lora()
        refuse_after_lora(self)

    def enable_cache(self, config) -> None:
        """diffusers' `enable_cache` on the pyramid step caches (model_core.step_cache): FirstBlockCacheConfig,
        TaylorSeerCacheConfig or MagCacheConfig(calibrate=True) become the `cache` the pipeline uses when a call
        names none; other configs are refused with a ValueError."""
        if self._cache_config is not None:
            raise ValueError(f"a step cache ({type(self._cache_config).__name__}) is already enabled; "
                             "call disable_cache() first.")
        apply_step_cache(self, *diffusers_cache_options(config))
        self._cache_config = config

    def disable_cache(self) -> None:
        """Remove the step cache that `enable_cache` set."""
        remove_step_cache(self)
        self._cache_config = None

    def call_block(self, block, index: int, num_blocks: int, *args):
        """Run a block, through activation checkpointing for the first `gradient_checkpointing_ratio` of them."""
        checkpointed = index < math.ceil(self.config.gradient_checkpointing_ratio * num_blocks)
        if torch.is_grad_enabled() and self.gradient_checkpointing and checkpointed:
            return self._gradient_checkpointing_func(block, *args)
        return block(*args)

    def attention_layout(self, text_valid: torch.Tensor, grids) -> AttentionLayout:
        """Causal groups, key validity and RoPE of one column's packed sequence (Sec. 3.4); a PaddedColumn's padding
        frames are invalid keys, and its RoPE, which depends on which frames are real, is made for it alone."""
        frame_tokens = frame_token_counts(grids)
        num_text, rows = text_valid.shape[1], text_valid.shape[0]
        padded = isinstance(grids, PaddedColumn)
        image_valid = grids.image_valid().expand(rows, -1) if padded else text_valid.new_ones(rows, sum(frame_tokens))
        return AttentionLayout(
            group_ends=causal_group_ends(num_text, frame_tokens, self.config.use_temporal_causal),
            key_valid=torch.cat([text_valid, image_valid], dim=1),
            rope=self.rope_tables(num_text, grids, text_valid.device) if padded else self.shared_rope(
                num_text, grids, text_valid.device),
            image_valid=image_valid[0] if padded else None,
        )

    def shared_rope(self, num_text: int, grids, device):
        """RoPE angles depend on the shapes only: computed once per (text length, clip grids, device), so every
        step of a stage reuses them (the last ROPE_CACHE_SIZE shapes are kept)."""
        if torch.compiler.is_compiling():  # made in the graph (see column_layouts)
            return self.rope_tables(num_text, grids, device)
        cache = self.__dict__.setdefault("_rope_cache", OrderedDict())
        key = (num_text, tuple(grids), str(device))
        if key not in cache:
            cache[key] = self.rope_tables(num_text, grids, device)
            if len(cache) > ROPE_CACHE_SIZE:
                cache.popitem(last=False)
        return cache[key]

    def rope_tables(self, num_text: int, grids, device):
        """The RoPE tables made on `device` (compiled, a CUDA graph then holds no CPU tensor and no copy)."""
        rope = self.rope_angles(num_text, grids, device)
        return None if rope is None else rotation_tables(*rope)

    def text_validity(self, encoder_attention_mask: torch.Tensor) -> torch.Tensor:
        return encoder_attention_mask.bool()

    def column_layouts(self, encoder_attention_mask: torch.Tensor, column_grids: list, device) -> list:
        """The attention layout of each column, made once for the steps of a (unit, stage): kept while the same
        text mask tensor comes back unchanged with the same clip shapes (and dropped with that tensor), so the
        kernel calls planned from it and their masks are made on the stage's first step only, and later steps
        make no mask and read nothing back from the device. Compiled, the layouts are made in the graph (a
        host-side cache would break it and guard on every change). Padded columns are kept by the identity of their
        `valid_frames` (the sampler makes one per unit and stage), held by the cache so that it stays unique."""
        if torch.compiler.is_compiling():
            return self.make_layouts(encoder_attention_mask, column_grids, device)
        cache = self.__dict__.setdefault("_layout_cache", WeakIdKeyDictionary())
        version = None if encoder_attention_mask.is_inference() else encoder_attention_mask._version
        key = (version, tuple(tuple(grids) for grids in column_grids), str(device))
        valid = [getattr(grids, "valid_frames", None) for grids in column_grids]
        cached = cache.get(encoder_attention_mask)
        if cached is None or cached[0] != key or any(a is not b for a, b in zip(cached[1], valid)):
            cached = key, valid, self.make_layouts(encoder_attention_mask, column_grids, device)
            cache.clear()  # one text mask's layouts at a time
            cache[encoder_attention_mask] = cached
        return cached[2]

    def make_layouts(self, encoder_attention_mask: torch.Tensor, column_grids: list, device) -> list:
        text_valid = self.text_validity(encoder_attention_mask.to(device))
        num_columns = len(column_grids)
        return [self.attention_layout(text_valid[index::num_columns], grids)
                for index, grids in enumerate(column_grids)]

    def column_velocity(self, clips, grids, layout, text, temb) -> torch.Tensor:
        """Velocity [B, C, T, H, W] of the current unit (the last clip) of one column."""
        image = self.embed_clips(clips, grids)
        context = self.context_parallel
        if context is not None:
            text, image, layout = context.shard(text, image, layout)
        *modulations, head = block_modulations(self, temb)
        image = self.run_blocks(image, text, modulations, layout)
        if context is not None:
            image = context.gather(image)
        current = grids[-1]
        tokens = self.proj_out(self.norm_out(image[:, -current.tokens :], head["norm_out"]))
        return unpatchify(tokens, *current)

    def packed_velocities(self, columns, column_grids, text_valid, text, temb) -> list:
        """Velocities of every column's current unit (batch 1 each) from one packed sequence: [every column's valid
        text ; every column's image tokens] runs through each block once, attention stays within a column and padded
        text is left out (varlen attention: attention.PackedLayout; training)."""
        if any(clips[0].shape[0] != 1 for clips in columns):
            raise ValueError("packed=True needs columns of batch 1 (one sample each); pass a batch as columns.")
        image = torch.cat([self.embed_clips([clip.to(text.dtype) for clip in clips], grids)
                           for clips, grids in zip(columns, column_grids)], dim=1)
        text_counts = text_valid.sum(1).tolist()
        image_counts = [sum(grid.tokens for grid in grids) for grids in column_grids]
        layouts = [self.attention_layout(text_valid.new_ones(1, count), grids)
                   for count, grids in zip(text_counts, column_grids)]
        layout = PackedLayout(layouts, text_counts, image_counts)
        currents = [grids[-1] for grids in column_grids]
        text_tokens, image_tokens = membership(text_counts, text.device), membership(image_counts, text.device)
        spread = {"norm1": image_tokens, "norm1_context": text_tokens, "norm": torch.cat([text_tokens, image_tokens]),
                  "norm_out": membership([grid.tokens for grid in currents], text.device)}  # adaLN name -> its tokens
        *modulations, head = block_modulations(self, temb, spread)
        image = self.run_blocks(image, text[text_valid][None], modulations, layout)
        ends = [sum(image_counts[: i + 1]) for i in range(len(image_counts))]
        current = torch.cat([image[:, end - grid.tokens : end] for end, grid in zip(ends, currents)], dim=1)
        tokens = self.proj_out(self.norm_out(current, head["norm_out"]))
        tokens = tokens.split([grid.tokens for grid in currents], dim=1)
        return [unpatchify(t, *grid) for t, grid in zip(tokens, currents)]

    def forward(
        self,
        sample,
        encoder_hidden_states: torch.Tensor,
        encoder_attention_mask: torch.Tensor,
        pooled_projections: torch.Tensor,
        timestep: torch.Tensor,
        return_dict: bool = True,
        packed: bool = False,
        valid_frames=None,
    ):
        """Predict the flow velocity of the current unit of every column (Eq. 11/17).

        sample: columns of latent clips [B, C, T_i, H_i, W_i], oldest history first, current unit last.
        Text/pooled/timestep rows are interleaved sample-major: row = sample * num_columns + column.
        packed: run columns of batch 1 as one packed sequence (`packed_velocities`; training) instead of one by one.
        valid_frames: shape buckets' padding (model_core.sampling): a [T] bool tensor per column (or one for a single
        column; None: all real) marking the real frames of its clips, all frames of all clips in order.
        """
        columns = as_columns(sample)
        rows = encoder_hidden_states.shape[0]
        timestep = torch.as_tensor(timestep, device=encoder_hidden_states.device).reshape(-1)
        self.check_columns(columns, rows)
        self.check_text(encoder_hidden_states, encoder_attention_mask, pooled_projections, timestep, rows)
        dtype = self.dtype
        text, pooled = text_conditioning(self, encoder_hidden_states.to(dtype), pooled_projections.to(dtype))
        temb = self.time_text_embed(timestep, pooled_embedding=pooled).to(dtype)
        column_grids = [padded_column([clip_grid(clip) for clip in clips], valid)
                        for clips, valid in zip(columns, per_column(valid_frames, len(columns)))]
        if packed and valid_frames is not None:
            raise ValueError("packed=True takes no valid_frames: packed columns are not padded.")
        if valid_frames is not None and self.context_parallel is not None:
            raise ValueError("valid_frames (shape buckets) cannot be combined with context parallel.")
        if packed:
            text_valid = self.text_validity(encoder_attention_mask.to(text.device))
            velocities = self.packed_velocities(columns, column_grids, text_valid, text, temb)
            return (velocities,) if not return_dict else Transformer2DModelOutput(sample=velocities)
        layouts = self.column_layouts(encoder_attention_mask, column_grids, text.device)
        num_columns = len(columns)
        velocities = [
            self.column_velocity(
                [clip.to(dtype) for clip in clips],
                column_grids[index],
                layouts[index],
                text[index::num_columns],
                temb[index::num_columns],
            )
            for index, clips in enumerate(columns)
        ]
        if not return_dict:
            return (velocities,)
        return Transformer2DModelOutput(sample=velocities)
