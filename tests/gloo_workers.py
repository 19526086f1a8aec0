"""Running a function on several gloo processes: the CPU tests of torch.distributed code."""

import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _worker(rank, fn, world, tmp):
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=world)
    torch.save(fn(rank, world), os.path.join(tmp, f"rank{rank}.pt"))
    dist.barrier()  # every rank's work is done and saved
    # gloo's teardown (destroy_process_group, or its destructors at exit) now and then aborts a process after
    # all the work ("terminate called without an active exception", SIGABRT): leave without it
    os._exit(0)


def spawn_gloo(fn, world, tmp):
    """fn(rank, world) (a module-level function) on `world` gloo processes; the list of what each rank returned."""
    mp.spawn(_worker, args=(fn, world, str(tmp)), nprocs=world)
    return [torch.load(os.path.join(tmp, f"rank{rank}.pt"), weights_only=False) for rank in range(world)]
