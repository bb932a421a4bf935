"""Run a function on N gloo ranks in fresh processes, bounded by a timeout; any rank's error fails the run."""
import os
import sys
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _rank_main(rank, world_size, rendezvous, fn, args):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=60))
    try:
        fn(rank, *args)
        dist.barrier()  # no rank closes its gloo connections while another still uses them (seen: SIGABRT in CI)
    finally:
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # done: skip the interpreter's teardown, where a still-joinable C++ thread aborted a rank once in 3
    # full runs ("terminate called without an active exception", SIGABRT, after its work and the barrier)


def run_ranks(fn, world_size: int, tmp_path, *args, timeout: float = 120.0) -> float:
    """Start `fn(rank, *args)` on `world_size` processes in one gloo group; returns the seconds it took.

    Raises the failing rank's error (torch.multiprocessing.ProcessRaisedException) when a rank fails, after the
    others are ended, and TimeoutError when the ranks are not done within `timeout` seconds."""
    rendezvous = os.path.join(tmp_path, f"rendezvous-{time.monotonic_ns()}")
    started = time.monotonic()
    context = mp.start_processes(_rank_main, args=(world_size, rendezvous, fn, args), nprocs=world_size,
                                 join=False, start_method="spawn")
    while not context.join(timeout=1.0):
        if time.monotonic() - started > timeout:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
            raise TimeoutError(f"the {world_size} ranks did not finish within {timeout:.0f} s")
    return time.monotonic() - started
