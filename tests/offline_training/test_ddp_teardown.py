"""A 2-rank gloo job whose DDP wrappers outlive the process group exits cleanly, every time.

Before `process_group` waited for every rank at its end, 5 of 40 runs of this script aborted a rank
at interpreter exit ("terminate called without an active exception"), and torchrun failed a job whose
work had finished; with the barrier, 1 of 8 still did on a loaded machine, so a rank now also leaves
through `exit_rank` (no interpreter teardown), as the CLI's ranks do. The race is timing-dependent, so
the test repeats the job. pytest runs it through torchrun, which runs this file's `__main__` block on
each rank.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from loopcast.offline_training.fit.ddp import broadcast_object, dist_env, exit_rank, process_group, wrap

RUNS = 8
KEPT: list[nn.Module] = []  # DDP wrappers that live until interpreter exit


def worker() -> None:
    """Backward through DDP with uneven shards (rank 1's empty), broadcast, then leave the group."""
    env = dist_env(device="cpu")
    assert env.distributed, env
    with process_group(env):
        for step in range(10):
            torch.manual_seed(step)
            model = wrap(nn.Linear(8, 8), env)
            KEPT.append(model)
            model(torch.randn(3 if env.rank == 0 else 0, 8)).sum().backward()
            assert broadcast_object(step * 10 + env.rank, env) == step * 10
    print(f"rank {env.rank} left the group", flush=True)


def test_ranks_exit_cleanly_with_ddp_wrappers_alive(torchrun: Callable[..., Any]) -> None:
    for run in range(RUNS):
        res = torchrun(__file__, timeout=60.0)
        assert res.returncode == 0, f"run {run + 1} of {RUNS}:\n" + res.stdout[-2000:] + res.stderr[-2000:]
        assert res.stdout.count("left the group") == 2, res.stdout


if __name__ == "__main__":
    worker()
    exit_rank(0)   # as `loopcast` does on a torchrun rank
