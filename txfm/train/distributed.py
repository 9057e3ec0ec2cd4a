"""Data parallelism: one process per device, launched by ``torchrun``.

``torchrun --nproc_per_node=8 -m txfm.cli train ...`` (or ``txfm train`` under torchrun on
several machines) sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and
``MASTER_PORT``; :func:`init` joins the process group with NCCL on GPUs and gloo on CPUs
and pins each rank to ``cuda:LOCAL_RANK``. Without those variables it is a single process.
"""
from __future__ import annotations

import gc
import os
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from txfm.devices import DEVICE_NAMES, device_problem, parse_device


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init(device: str = "auto") -> DistInfo:
    """Join the process group described by torchrun's variables (if any) and pick the device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = parse_device(device)
    if dev is None:
        raise ValueError(f"device={device!r}: use {DEVICE_NAMES}")
    if dev.type == "cuda":
        dev = torch.device("cuda", local if dev.index is None else dev.index)
        problem = device_problem(dev)
        if problem:  # checked before set_device, whose own error names no argument
            raise ValueError(f"device={device!r} (this rank: {dev}): {problem}; train with "
                             f"device='cpu' or 'auto'")
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo",
                                rank=rank, world_size=world)
    return DistInfo(rank, world, local, dev)


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        # gloo's worker thread takes the GIL to free the tensors of a finished collective, and
        # the group's destructor (here, or in DDP's reducer at exit) joins that thread while
        # holding the GIL: a deadlock at exit if a free is still pending (seen once in the
        # two-process test on a loaded machine). Let it finish first, with the GIL released
        # (no barrier: after an error on one rank the others may never reach it).
        gc.collect()
        time.sleep(0.05)
        dist.destroy_process_group()


def all_reduce_mean(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Mean over ranks (in place on ``t``, returned)."""
    if info.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t /= info.world_size
    return t


def all_gather_object(obj, info: DistInfo) -> list:
    if not info.enabled:
        return [obj]
    out = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


