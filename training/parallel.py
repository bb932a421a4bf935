"""FSDP2 where accelerate does not apply it, and launches that would silently run fewer processes than asked.

accelerate 1.15 turns `ACCELERATE_USE_FSDP` into FSDP only on accelerator devices: CPU processes (gloo) become
plain DDP. There the trainer shards the model itself with torch's `fully_shard` (FSDP2) as one unit: the
pyramid transformers run their blocks once per packed column, and the number of columns differs between ranks
(bins are balanced by tokens, not by count), so per-block units would all-gather a different number of times on
each rank and deadlock; the whole model is gathered once per forward instead (weights, gradients and optimizer
state stay sharded between steps). `accelerate launch --cpu` starts a
single process whatever `--num_processes` says (it needs mpirun for more); that is refused with the command that
works instead.
"""
import os

from accelerate.utils import DistributedType


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
    """FSDP was asked for, several processes run, and accelerate did not apply it (CPU processes)."""
    return flag("ACCELERATE_USE_FSDP") and accelerator.num_processes > 1 and \
        accelerator.distributed_type != DistributedType.FSDP


def shard_model(model):
    """FSDP2 in place, the whole model one unit; returns the model."""
    from torch.distributed.fsdp import fully_shard

    fully_shard(model)
    return model


def is_sharded(model) -> bool:
    return any(hasattr(p, "device_mesh") for p in model.parameters())
