"""Small seeded synthetic traces: shared oscillating latents + AR(1) noise, in four conditions;
and `torchrun`, which runs a test file as a 2-rank CPU job."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

T, N = 800, 64
OFFSETS = (0, 200, 400, 600, 800)


def synthetic_traces(t: int = T, n: int = N, seed: int = 0) -> np.ndarray:
    """(T, N) float32 traces in a dF/F-like range: mixed sinusoids plus AR(1) noise per neuron."""
    rng = np.random.default_rng(seed)
    time = np.arange(t)[:, None]
    periods = rng.uniform(12.0, 40.0, size=6)
    latents = np.sin(2 * np.pi * time / periods + rng.uniform(0, 2 * np.pi, size=6))  # (T, 6)
    traces = latents @ rng.normal(0.0, 0.15, size=(6, n))                              # (T, N)
    noise = np.zeros((t, n))
    eps = rng.normal(0.0, 0.02, size=(t, n))
    for i in range(1, t):
        noise[i] = 0.8 * noise[i - 1] + eps[i]
    return (traces + noise + rng.uniform(0.0, 0.3, size=n)).astype(np.float32)


@pytest.fixture(autouse=True)
def _few_threads() -> None:
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def traces() -> np.ndarray:
    return synthetic_traces()


@pytest.fixture(scope="session")
def offsets() -> tuple[int, ...]:
    return OFFSETS


ROOT = Path(__file__).resolve().parents[2]
Torchrun = Callable[..., subprocess.CompletedProcess]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def torchrun() -> Torchrun:
    """`torchrun(script, *args)`: the script on 2 gloo ranks (127.0.0.1 only, 1 thread each) from the
    repository root; returns the finished process (stdout, stderr, returncode)."""
    def run(*args: str, timeout: float = 120.0) -> subprocess.CompletedProcess:
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
        env.update(GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
               "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{_free_port()}", *args]
        return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    return run
