"""Runs started by torchrun: joining the process group, which rank speaks, and values every rank must share.

Under `torchrun --nproc_per_node N` every rank runs the same command; rank 0 alone prints and writes.
A rank that fails exits with its error and torchrun ends the others, so none is left waiting in a
collective; collectives also give up after `COLLECTIVE_TIMEOUT`.
"""
import os
from datetime import timedelta

import torch
import torch.distributed as dist

COLLECTIVE_TIMEOUT = timedelta(minutes=10)


def launched_with_several_ranks() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def start(device: torch.device) -> bool:
    """Join torchrun's process group when there is one (each rank on GPU LOCAL_RANK); True when joined."""
    if not launched_with_several_ranks():
        return False
    if not dist.is_initialized():
        backend = "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            backend = "cpu:gloo,cuda:nccl"
        dist.init_process_group(backend=backend, timeout=COLLECTIVE_TIMEOUT)
    return True


def stop() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def rank() -> int:
    """This process's rank; torchrun's RANK before the group is joined (errors found early are printed once)."""
    return dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def parse_layout(text: str):
    """'auto' or 'GxC' (guidance x context ranks, e.g. 2x2) -> what `PyramidFlowPipeline.enable_parallelism` takes."""
    if text == "auto":
        return "auto"
    parts = text.lower().split("x")
    if len(parts) != 2 or not all(part.isdigit() and int(part) > 0 for part in parts):
        raise ValueError(f"--parallel takes 'auto' or GxC, guidance x context ranks such as 2x1 or 2x2; got {text!r}")
    return {"guidance": int(parts[0]), "context": int(parts[1])}
