"""One generation across several processes: guidance parallel x Ulysses context parallel on a DeviceMesh.

N = G x C ranks form a 2-D `DeviceMesh` ("guidance", "context"). Guidance parallel (G = 2) gives the
unconditional and the conditional branch of classifier-free guidance to the two rows of the mesh and swaps
the two velocities with one all-gather. Context parallel (C ranks of a row) splits the packed sequence
[text ; image] of every transformer forward: each rank keeps 1/C of the text and 1/C of the image tokens
through the token-wise layers, and each attention exchanges q, k, v with one all-to-all so that a rank holds
every token for H/C of the heads (Ulysses), runs the unchanged blockwise causal attention over them, and
exchanges the output back. Sequences are padded to a multiple of C with masked keys, so the result is exact.
Every rank runs the same sampler on identical latents (noise from an identically seeded CPU generator).

Why not diffusers' context parallelism (`ContextParallelConfig`, `ModelMixin.enable_parallelism`): its
Ulysses template (`TemplatedUlyssesAttention`, reached through `dispatch_attention_fn`) wraps a single
attention-op call, whose q and k are each rank's contiguous shard of that call's own sequence. Our
attention (model_core/transformers/attention.py) is one SDPA call per causal query group over a key prefix
of the whole sequence: the groups' query ranges and key prefixes do not line up with per-rank shards, so
every group would need its own all-to-all of a key prefix (O(groups x L) traffic instead of O(L)), and the
template rejects a causal flag. Its `_cp_plan` also splits a module's tensor inputs along a fixed dim, while
our transformer takes columns of 5-D clips of several resolutions and forms [text ; image] only inside the
attention of each dual-stream block. So the exchange is done here, once per attention, with torch's
functional all-to-all over the mesh's "context" dim, and the attention itself stays as it is.
"""
import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from .transformers.attention import AttentionLayout

MESH_DIMS = ("guidance", "context")


@dataclass(frozen=True)
class ParallelConfig:
    """How the ranks split a generation: `guidance` (1 or 2) x `context` ranks = the world size.

    `context=None` gives every rank left over to context parallel."""

    guidance: int = 1
    context: Optional[int] = None

    def resolved(self, world_size: int) -> "ParallelConfig":
        if self.guidance not in (1, 2):
            raise ValueError(f"guidance parallel takes 1 or 2 ranks (one per guidance branch); got {self.guidance}")
        if world_size % self.guidance:
            raise ValueError(f"guidance={self.guidance} does not divide the world size {world_size}")
        context = world_size // self.guidance if self.context is None else self.context
        if not isinstance(context, int) or context < 1 or self.guidance * context != world_size:
            raise ValueError(
                f"guidance x context must equal the world size {world_size}; got {self.guidance} x {context}"
            )
        return ParallelConfig(self.guidance, context)


def as_config(parallel, world_size: int) -> ParallelConfig:
    """A ParallelConfig from `parallel`: a ParallelConfig, a dict of its fields, or "auto" (guidance 2 on an even
    number of ranks, the rest context parallel)."""
    if parallel == "auto":
        parallel = ParallelConfig(guidance=2 if world_size % 2 == 0 else 1)
    elif isinstance(parallel, dict):
        unknown = set(parallel) - {"guidance", "context"}
        if unknown:
            raise ValueError(f"parallel takes the keys 'guidance' and 'context'; got {sorted(unknown)}")
        parallel = ParallelConfig(**parallel)
    if not isinstance(parallel, ParallelConfig):
        raise ValueError(f"parallel must be 'auto', a dict or a ParallelConfig; got {parallel!r}")
    return parallel.resolved(world_size)


class UlyssesContext:
    """Splits the packed [text ; image] sequence over a 1-D mesh; attention swaps sequence and heads (Ulysses).

    Each stream is padded to a multiple of the mesh size and rank r keeps the r-th slice of each, so its local
    sequence is [text_r ; image_r]; after the all-to-all the slices are put back in the padded global order
    [text ; pad ; image ; pad]. Padded positions are masked keys and their queries are dropped.
    """

    def __init__(self, mesh: DeviceMesh):
        self.mesh = mesh
        self.size = mesh.size()
        self.rank = mesh.get_local_rank()
        self.text_slice = self.image_slice = self.image_tokens = 0
        self._padded_layout = (None, None)  # (a column's layout, its padded global layout): planned once per stage

    def _padded(self, tokens: int) -> int:
        return math.ceil(tokens / self.size) * self.size

    def shard(self, text: torch.Tensor, image: torch.Tensor, layout):
        """This rank's slices of text [B, T, D] and image [B, I, D], and the layout of the padded sequence."""
        num_text, num_image = text.shape[1], image.shape[1]
        pad_text, pad_image = self._padded(num_text) - num_text, self._padded(num_image) - num_image
        self.text_slice, self.image_slice = (num_text + pad_text) // self.size, (num_image + pad_image) // self.size
        self.image_tokens = num_image

        def padded(x, dim, fill):  # [.. text .. pad .. image .. pad] along `dim`
            text_part, image_part = x.split([num_text, num_image], dim=dim)
            pads = [x.new_full((*x.shape[:dim], n, *x.shape[dim + 1 :]), fill) for n in (pad_text, pad_image)]
            return torch.cat([text_part, pads[0], image_part, pads[1]], dim=dim)

        text = torch.cat([text, text.new_zeros(text.shape[0], pad_text, text.shape[2])], dim=1)
        image = torch.cat([image, image.new_zeros(image.shape[0], pad_image, image.shape[2])], dim=1)
        if self._padded_layout[0] is not layout:  # the transformer keeps a column's layout for a stage's steps
            ends = [end + pad_text for end in layout.group_ends]
            ends[-1] += pad_image  # padded image queries join the last group; nobody attends to them
            self._padded_layout = layout, AttentionLayout(
                group_ends=ends,
                key_valid=padded(layout.key_valid, 1, False),
                rope=None if layout.rope is None else tuple(padded(angles, 0, 0.0) for angles in layout.rope),
                context=self,
            )
        global_layout = self._padded_layout[1]
        text_local = text[:, self.rank * self.text_slice : (self.rank + 1) * self.text_slice]
        image_local = image[:, self.rank * self.image_slice : (self.rank + 1) * self.image_slice]
        return text_local, image_local, global_layout

    def _exchange(self, x: torch.Tensor) -> torch.Tensor:
        """all-to-all over dim 0 of [mesh size, ...]: block i goes to rank i, block i received from rank i."""
        return funcol.wait_tensor(funcol.all_to_all_single(x.contiguous(), None, None, self.mesh))

    def to_heads(self, x: torch.Tensor) -> torch.Tensor:
        """[B, H, local tokens, D] -> [B, H/C, all padded tokens, D] in global order."""
        b, heads, _, d = x.shape
        received = self._exchange(x.reshape(b, self.size, heads // self.size, -1, d).transpose(0, 1))
        text, image = received.split([self.text_slice, self.image_slice], dim=3)  # [C, B, h, slice, D] each
        return torch.cat([part.permute(1, 2, 0, 3, 4).flatten(2, 3) for part in (text, image)], dim=2)

    def to_sequence(self, x: torch.Tensor) -> torch.Tensor:
        """Inverse of `to_heads`: [B, H/C, all padded tokens, D] -> [B, H, local tokens, D]."""
        b, local_heads, _, d = x.shape
        text, image = x.split([self.text_slice * self.size, self.image_slice * self.size], dim=2)
        blocks = torch.cat([text.unflatten(2, (self.size, -1)), image.unflatten(2, (self.size, -1))], dim=3)
        received = self._exchange(blocks.permute(2, 0, 1, 3, 4))  # [C (head block), B, h, local tokens, D]
        return received.transpose(0, 1).reshape(b, self.size * local_heads, -1, d)

    def gather(self, image: torch.Tensor) -> torch.Tensor:
        """Every rank's image slice [B, I/C, D] -> the whole image sequence [B, I, D] on every rank."""
        whole = funcol.wait_tensor(funcol.all_gather_single(image.contiguous(), 1, self.mesh))
        return whole[:, : self.image_tokens]


class Parallelism:
    """The mesh of one multi-process generation and what each rank does in it."""

    def __init__(self, parallel, device: torch.device):
        if not dist.is_available() or not dist.is_initialized():
            raise ValueError(
                "parallel generation needs an initialised process group: start with torchrun "
                "(torchrun --nproc_per_node N -m pyramid_app generate ...) or call torch.distributed.init_process_group"
            )
        self.world_size = dist.get_world_size()
        self.config = as_config(parallel, self.world_size)
        self.mesh = init_device_mesh(device.type, (self.config.guidance, self.config.context), mesh_dim_names=MESH_DIMS)
        self.guidance_rank = self.mesh.get_local_rank("guidance")
        self.context = UlyssesContext(self.mesh["context"]) if self.config.context > 1 else None

    def settings(self) -> dict:
        return {"world_size": self.world_size, "guidance": self.config.guidance, "context": self.config.context}

    def all_agree(self, flag: bool) -> bool:
        """True when `flag` is true on every rank (e.g. the step cache skips the trunk only if all ranks would)."""
        vote = torch.tensor([int(flag)], device=self.mesh.device_type)
        dist.all_reduce(vote, op=dist.ReduceOp.MIN)
        return bool(vote.item())

    def sequence_mean(self, x: torch.Tensor) -> torch.Tensor:
        """Per batch row mean of this rank's image tokens x [B, L, D] over the whole image sequence: under context
        parallel the valid tokens' sums of every rank are added up, so each rank gets the figure of one process."""
        if self.context is None:
            return x.mean(tuple(range(1, x.ndim)))
        context = self.context
        valid = min(max(context.image_tokens - context.rank * context.image_slice, 0), x.shape[1])  # padding excluded
        total = funcol.all_reduce(x[:, :valid].sum(tuple(range(1, x.ndim))), "sum", context.mesh)
        return funcol.wait_tensor(total) / (context.image_tokens * x[0, 0].numel())

    def guidance_branch(self, batch: torch.Tensor) -> torch.Tensor:
        """This rank's half of a [unconditional ; conditional] batch."""
        return batch.chunk(2)[self.guidance_rank]

    def gather_guidance(self, velocity: torch.Tensor) -> torch.Tensor:
        """Both branches' velocities [unconditional ; conditional] on every rank."""
        return funcol.wait_tensor(funcol.all_gather_single(velocity.contiguous(), 0, self.mesh["guidance"]))


SINGLE_PROCESS = {"world_size": 1, "guidance": 1, "context": 1}


def agree(value):
    """Rank 0's `value` on every rank (a seed, a Stop request), or `value` itself in one process: the one place ranks
    agree on a host value, so every rank then takes the same path."""
    if not dist.is_available() or not dist.is_initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def apply_parallel(transformer, parallel="auto", device=None) -> Parallelism:
    """Split `transformer`'s forward over the ranks of the initialised process group; returns the engine. Undone by
    `remove_parallel`. The step cache takes the engine where it is applied (`apply_step_cache(..., ranks=)`)."""
    engine = Parallelism(parallel, torch.device(device) if device is not None else transformer.device)
    heads = transformer.config.num_attention_heads
    if heads % engine.config.context:
        raise ValueError(
            f"context parallel over {engine.config.context} ranks splits the {heads} attention heads evenly; "
            f"use a context size that divides {heads}"
        )
    transformer.context_parallel = engine.context
    return engine


def remove_parallel(transformer) -> None:
    """The transformer computes the whole sequence in this process again."""
    transformer.context_parallel = None
