"""The single-process training device of every trainer's `device` field.

DEVICE_CHOICES: "auto" (cuda when torch sees a GPU, else the CPU), "cpu", "cuda" (the current GPU) or
"cuda:N" (GPU N). Under torchrun the ranks use `ddp_device` (offline_training/fit/ddp.py) instead, where a
trainer has one. Trained models still end on the CPU, where the exporters expect them.
"""
from __future__ import annotations

import re

import torch

from loopcast.offline_training.fit.ddp import DistEnv

DEVICE_CHOICES = ("auto", "cpu", "cuda", "cuda:N")
_PATTERN = re.compile(r"auto|cpu|cuda(:\d+)?")


def check_device(name: str) -> None:
    """Raise ValueError unless `name` is one of DEVICE_CHOICES (N a non-negative integer)."""
    if not isinstance(name, str) or not _PATTERN.fullmatch(name):
        raise ValueError(f"device must be one of {list(DEVICE_CHOICES)} (N >= 0), got {name!r}")


def resolve_device(name: str) -> torch.device:
    """The torch device that `name` stands for on this machine; ValueError if it names a missing GPU."""
    check_device(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError(f"device {name!r}: CUDA is not available on this machine; "
                         f"use device = \"auto\" or \"cpu\"")
    device = torch.device(name)
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"device {name!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def train_env(env: DistEnv, name: str) -> DistEnv:
    """`env` itself under torchrun (its ranks use ddp_device); otherwise a single-process DistEnv whose
    `.device` is resolve_device(name) ("cuda" is the current GPU)."""
    if env.distributed:
        return env
    device = resolve_device(name)
    if device.type != "cuda":
        return DistEnv()
    index = torch.cuda.current_device() if device.index is None else device.index
    return DistEnv(local_rank=index, cuda=True)
