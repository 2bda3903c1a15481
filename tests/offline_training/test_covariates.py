"""Covariate windows with the future stimulus as recorded (ZAPBench) or held (as the live loop serves it),
and the training configs that choose between them."""
from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from loopcast.offline_training.data.covariates import covariate_windows
from loopcast.offline_training.quantformer.train import QuantFormerTrainConfig
from loopcast.offline_training.sbm.config import SBMData, SBMTrainConfig
from loopcast.offline_training.trace.train import TrainConfig

COV = np.arange(40, dtype=np.float32).reshape(20, 2)          # frame t's stimulus = (2t, 2t + 1)


def test_recorded_future_is_the_recording() -> None:
    got = covariate_windows(COV, np.array([0, 5]), 3, 4)
    assert got.shape == (2, 7, 2) and got.dtype == np.float32
    np.testing.assert_array_equal(got[1], COV[5:12])


def test_held_future_repeats_the_last_context_frame() -> None:
    got = covariate_windows(COV, np.array([0, 5]), 3, 4, "held")
    np.testing.assert_array_equal(got[1, :3], COV[5:8])
    np.testing.assert_array_equal(got[1, 3:], np.repeat(COV[7:8], 4, axis=0))


def test_unknown_future_is_refused() -> None:
    with pytest.raises(ValueError, match="future_covariates must be one of \\['recorded', 'held'\\]"):
        covariate_windows(COV, np.array([0]), 3, 4, "true")


# [train] keeps ZAPBench's recorded future; the SBM and QuantFormer train with the held stimulus the loop serves
@pytest.mark.parametrize(("cls", "default"), [(TrainConfig, "recorded"), (SBMTrainConfig, "held"),
                                              (QuantFormerTrainConfig, "held")])
def test_training_configs_check_it(cls: Any, default: str) -> None:
    assert cls().future_covariates == default
    with pytest.raises(ValueError, match="future_covariates must be one of"):
        cls(future_covariates="hold")


def test_sbm_batches_hold_the_target_frames_stimulus() -> None:
    """The SBM's teacher-forced window of C + 1 frames: with "held" the target frame's stimulus is the
    last context frame's, as the loop feeds the next-step engine."""
    probs = np.random.default_rng(0).uniform(size=(20, 3)).astype(np.float32)
    positions = np.zeros((3, 3), np.float32)
    recorded = SBMData(probs, COV, positions, (0, 20))
    held = SBMData(probs, COV, positions, (0, 20), future="held")
    _, c_rec = recorded.batch(np.array([4]), 3)
    _, c_held = held.batch(np.array([4]), 3)
    assert c_rec is not None and c_held is not None
    assert torch.equal(c_rec[0], torch.from_numpy(COV[4:8]))
    assert torch.equal(c_held[0, :3], c_rec[0, :3]) and torch.equal(c_held[0, 3], torch.from_numpy(COV[6]))
