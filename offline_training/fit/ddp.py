"""Data-parallel training under torchrun (torch.distributed + DistributedDataParallel).

torchrun's environment (WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) is the protocol: without
it, or with WORLD_SIZE=1, everything here is a no-op single process. Launch e.g.

    torchrun --standalone --nproc_per_node 2 -m loopcast.cli train --run-dir runs/ddp

[train] batch_size is the GLOBAL batch: every rank draws the same seeded permutation, cuts the same
global batches and takes its own contiguous, disjoint slice of each (sizes differ by at most one); each
rank's loss is scaled so that DDP's gradient average equals the gradient of the whole batch's mean
loss. So N ranks reproduce one process with the same config (up to float summation order).

Backend: gloo on CPU; nccl with one GPU per rank (cuda:LOCAL_RANK) where CUDA has a GPU for every local
rank ([train] ddp_device = "auto"); "cpu" or "cuda" forces the choice. A single process trains on its
config's `device` instead (offline_training/fit/device.py).
"""
from __future__ import annotations

import gc
import logging
import os
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, NoReturn

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class DistEnv:
    """This process's place in the job (rank 0 of 1 outside torchrun)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    cuda: bool = False

    def __post_init__(self) -> None:
        if self.world_size < 1 or not 0 <= self.rank < self.world_size or self.local_rank < 0:
            raise ValueError(f"bad torchrun environment: rank {self.rank} of world size {self.world_size}, "
                             f"local rank {self.local_rank}")

    @property
    def distributed(self) -> bool:
        """True under torchrun with more than one process."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the only rank that writes checkpoints, metrics and engines."""
        return self.rank == 0

    @property
    def device(self) -> torch.device:
        """Where this rank trains: cuda:LOCAL_RANK with nccl, else the CPU."""
        return torch.device(f"cuda:{self.local_rank}") if self.cuda else torch.device("cpu")

    @property
    def backend(self) -> str:
        """nccl for GPU ranks, gloo for CPU ranks."""
        return "nccl" if self.cuda else "gloo"

    def shard(self, items: np.ndarray) -> np.ndarray:
        """This rank's contiguous slice of `items` (all of it in a single process)."""
        if not self.distributed:
            return items
        return np.array_split(items, self.world_size)[self.rank]


def dist_env(environ: Mapping[str, str] | None = None, device: str = "auto") -> DistEnv:
    """The DistEnv that torchrun's variables describe (a single process if they are absent); `device`
    ('auto', 'cpu' or 'cuda') picks the ranks' device."""
    env = os.environ if environ is None else environ
    world = int(env.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistEnv()
    rank = int(env["RANK"])
    local = int(env.get("LOCAL_RANK", rank))
    local_world = int(env.get("LOCAL_WORLD_SIZE", world))
    return DistEnv(rank=rank, world_size=world, local_rank=local, cuda=_use_cuda(device, local_world))


def is_main_process() -> bool:
    """False on torchrun ranks other than 0 (they train, but write nothing)."""
    return dist_env().is_main


@contextmanager
def process_group(env: DistEnv) -> Iterator[None]:
    """Initialise the default process group for `env` (env:// rendezvous) and destroy it on exit;
    nothing for a single process or if a group already exists (its owner destroys it).

    A normal exit first waits for every rank (barrier) and frees unreachable DDP wrappers while the
    group is alive: without that, a gloo rank whose DDP reducer outlived the group aborted at
    interpreter exit ("terminate called without an active exception") in 23 of 130 two-rank runs
    on a 2-core machine, failing the whole torchrun job after training had finished; 0 of 85 with it."""
    if not env.distributed or dist.is_initialized():
        yield
        return
    if env.cuda:
        torch.cuda.set_device(env.local_rank)
    dist.init_process_group(env.backend, rank=env.rank, world_size=env.world_size)
    try:
        yield
        dist.barrier(device_ids=[env.local_rank] if env.cuda else None)
        gc.collect()
    finally:
        dist.destroy_process_group()


def exit_rank(code: int) -> NoReturn:
    """End a torchrun rank once its command is done: flush logs and stdio, then leave without the
    interpreter's teardown (os._exit). A DDP wrapper still referenced at exit keeps the gloo group's
    C++ objects alive into the process's static destructors, where gloo aborted the rank ("terminate
    called without an active exception") and torchrun failed a finished job: `process_group`'s barrier
    made it rare (0 of 85 runs on a quiet machine) but not gone (1 of 8 with the test suite and another
    busy process on the 2 cores). Every file a command writes is closed before it returns."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(code)


def wrap(model: nn.Module, env: DistEnv) -> nn.Module:
    """DistributedDataParallel around `model` (already on env.device); the model itself if single."""
    if not env.distributed:
        return model
    return DistributedDataParallel(model, device_ids=[env.local_rank] if env.cuda else None)


def all_reduce_sum(x: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """Elementwise sum of `x` over all ranks (x itself in a single process); returned on x's device."""
    if not env.distributed:
        return x
    y = x.detach().clone().to(env.device)
    dist.all_reduce(y, op=dist.ReduceOp.SUM)
    return y.to(x.device)


def broadcast_object(obj: Any, env: DistEnv) -> Any:
    """Rank 0's `obj` (picklable) on every rank."""
    if not env.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, device=env.device if env.cuda else None)
    return box[0]


def _use_cuda(device: str, local_world: int) -> bool:
    if device not in DEVICES:
        raise ValueError(f"ddp_device must be one of {list(DEVICES)}, got {device!r}")
    if device != "auto":
        return device == "cuda"
    return torch.cuda.is_available() and torch.cuda.device_count() >= local_world
