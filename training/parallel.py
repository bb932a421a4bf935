"""FSDP2 applied by the trainer, and launches that would silently run fewer processes than asked.

The trainer shards the model itself with torch's `fully_shard` (FSDP2) whenever FSDP is asked for and several
processes run, on CPUs (gloo, where accelerate 1.15 would fall back to DDP) and accelerators alike (accelerate then
finds the model already sharded and leaves it as it is). With packed samples every rank runs each transformer block
exactly once per micro-step, so each block is its own unit (then the root): one block's weights are gathered at a
time, the next block's all-gather is prefetched during this one's compute, and gradients are reduce-scattered per
block in backward. Without packing the blocks run once per column, and columns differ in number between ranks, so
per-block units would all-gather a different number of times on each rank and deadlock: the whole model is then one
unit. Under bf16 the parameters are gathered in bf16 and gradients are reduced in float32 (an explicit
`MixedPrecisionPolicy`). `accelerate launch --cpu` starts a single process whatever `--num_processes` says (it needs
mpirun for more); that is refused with the command that works instead.
"""
import logging
import os

import torch

logger = logging.getLogger(__name__)


def flag(name: str) -> bool:
    return os.environ.get(name, "false").lower() in ("1", "true", "yes")


def process_state():
    """accelerate's view of the launched processes, CPU ones included: `PartialState()` alone ignores
    ACCELERATE_USE_CPU (which `Accelerator()` reads), and every CPU rank of a torchrun launch would run alone."""
    from accelerate import PartialState

    return PartialState(cpu=flag("ACCELERATE_USE_CPU"))


def check_launch(accelerator) -> None:
    """Refuse a CPU launch that asked for several processes but got one."""
    asked_for_more = "MASTER_ADDR" in os.environ and "WORLD_SIZE" not in os.environ and "RANK" not in os.environ
    if accelerator.num_processes == 1 and flag("ACCELERATE_USE_CPU") and asked_for_more:
        raise ValueError("`accelerate launch --cpu` started one process, not the --num_processes asked for (it needs "
                         "mpirun for more); run `ACCELERATE_USE_CPU=true ACCELERATE_USE_FSDP=true torchrun "
                         "--nproc_per_node N -m training.launch ...` for N CPU processes with FSDP2")


def wants_own_fsdp(accelerator) -> bool:
    """FSDP was asked for (accelerate's FSDP config or ACCELERATE_USE_FSDP) and several processes run."""
    return flag("ACCELERATE_USE_FSDP") and accelerator.num_processes > 1


def transformer_blocks(model) -> list:
    """The repeated blocks of a pyramid transformer, in the order they run."""
    return [*getattr(model, "transformer_blocks", ()), *getattr(model, "single_transformer_blocks", ())]


def mixed_precision(param_dtype):
    """Parameters gathered (and computed) in `param_dtype` (None: as stored), gradients reduced in float32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    return MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)


def shard_model(model, per_block: bool = False, param_dtype=None):
    """FSDP2 in place, each transformer block one unit then the root (`per_block`), or the whole model one unit;
    blocks prefetch the next block's weights in forward and the previous one's in backward. Returns the model."""
    from torch.distributed.fsdp import fully_shard

    policy = mixed_precision(param_dtype)
    blocks = transformer_blocks(model) if per_block else []
    for block in blocks:
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    for block, following in zip(blocks, blocks[1:]):
        block.set_modules_to_forward_prefetch([following])
        following.set_modules_to_backward_prefetch([block])
    logger.info("FSDP2: %d block units and the root, parameters in %s, gradients reduced in float32", len(blocks),
                param_dtype or "their stored dtype")
    return model


def compile_blocks(model) -> None:
    """torch.compile each transformer block in place (dynamic shapes: packed lengths change every step)."""
    for block in transformer_blocks(model):
        block.compile(dynamic=True)


def is_sharded(model) -> bool:
    return any(hasattr(p, "device_mesh") for p in model.parameters())
