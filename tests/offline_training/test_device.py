"""The trainers' shared `device` field: validation, resolution, the single-process DistEnv, and resuming
a checkpoint written on another device."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from loopcast.offline_training.fit.ddp import DistEnv
from loopcast.offline_training.fit.device import check_device, resolve_device, train_env
from loopcast.offline_training.quantformer.train import QuantFormerTrainConfig
from loopcast.offline_training.sbm.config import SBMTrainConfig
from loopcast.offline_training.sbm.pnm_train import PNMTrainConfig
from loopcast.offline_training.spikes.train import SpikeTrainConfig
from loopcast.offline_training.trace.train import TrainConfig, train
from loopcast.offline_training.video.train import VideoTrainConfig

CONFIGS = (TrainConfig, VideoTrainConfig, SBMTrainConfig, QuantFormerTrainConfig, PNMTrainConfig, SpikeTrainConfig)
HAS_CUDA = torch.cuda.is_available()


@pytest.mark.parametrize("name", ["auto", "cpu", "cuda", "cuda:0", "cuda:3", "cuda:12"])
def test_check_device_accepts(name: str) -> None:
    check_device(name)  # no GPU needed: a config for a GPU machine loads anywhere


@pytest.mark.parametrize("name", ["gpu", "", "CPU", "cuda:", "cuda:-1", "cuda:x", "cuda0", " cpu", "mps", "auto:0"])
def test_check_device_rejects_and_names_the_value(name: str) -> None:
    with pytest.raises(ValueError, match="device must be one of") as err:
        check_device(name)
    assert repr(name) in str(err.value) and "cuda:N" in str(err.value)


def test_auto_picks_cuda_only_when_available() -> None:
    assert resolve_device("auto") == torch.device("cuda" if HAS_CUDA else "cpu")
    assert resolve_device("cpu") == torch.device("cpu")


@pytest.mark.skipif(HAS_CUDA, reason="this machine has CUDA")
@pytest.mark.parametrize("name", ["cuda", "cuda:0"])
def test_cuda_without_cuda_says_so(name: str) -> None:
    with pytest.raises(ValueError, match="CUDA is not available") as err:
        resolve_device(name)
    assert '"auto" or "cpu"' in str(err.value)


@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_cuda_index_past_the_device_count_raises() -> None:
    assert resolve_device("cuda:0") == torch.device("cuda:0")
    with pytest.raises(ValueError, match="CUDA device"):
        resolve_device(f"cuda:{torch.cuda.device_count()}")


def test_train_env_keeps_torchrun_ranks_and_places_a_single_process() -> None:
    ranks = DistEnv(rank=1, world_size=2, local_rank=1)
    assert train_env(ranks, "auto") is ranks  # torchrun: ddp_device decides, not `device`
    assert train_env(DistEnv(), "cpu") == DistEnv() and train_env(DistEnv(), "cpu").device == torch.device("cpu")
    single = train_env(DistEnv(), "auto")
    assert not single.distributed and single.device.type == resolve_device("auto").type


@pytest.mark.parametrize("cls", CONFIGS, ids=lambda c: c.__name__)
def test_every_training_config_checks_its_device(cls: Any) -> None:
    assert cls().device == "auto"
    assert cls(device="cpu").device == "cpu"
    with pytest.raises(ValueError, match="'gpu'"):
        cls(device="gpu")


def test_resume_on_another_device_and_the_model_ends_on_the_cpu(tmp_path: Path, traces: np.ndarray,
                                                               offsets: tuple[int, ...]) -> None:
    """A checkpoint written on the CPU resumes under device="auto" (a GPU where there is one); the
    trained model is on the CPU and the metrics name the device used."""
    cfg = TrainConfig(context=4, horizon=4, batch_size=16, max_epochs=1, steps_per_epoch=3, threads=1, device="cpu")
    ckpt = tmp_path / "run.pt"
    first = train(traces, offsets, cfg, progress=False, checkpoint=ckpt)
    assert first.metrics["device"] == "cpu"
    again = train(traces, offsets, dataclasses.replace(cfg, max_epochs=2, device="auto"), progress=False,
                  checkpoint=ckpt)
    assert [h["epoch"] for h in again.history] == [1, 2] and again.history[0] == first.history[0]
    assert torch.device(again.metrics["device"]).type == resolve_device("auto").type
    assert all(p.device.type == "cpu" for p in again.model.parameters())
