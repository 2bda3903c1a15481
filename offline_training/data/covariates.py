"""Stimulus covariate windows for training and scoring, and how their future part is filled.

A covariate model sees (B, C + H, K): the stimulus of its C context frames, then of the H frames it
forecasts. Offline, that future is on record ("recorded", ZAPBench's setting). The live loop does not
know it: realtime.forecast holds the newest frame's stimulus for the H future steps ("held"). Training
and scoring with "held" make the offline numbers the ones the loop will see; an engine records which
it was trained with in its manifest (`future_covariates`).
"""
from __future__ import annotations

import numpy as np

from loopcast.offline_training.data.splits import gather_windows
from loopcast.realtime.engines.manifest import FUTURE_COVARIATES


def check_future_covariates(value: str) -> None:
    """ValueError unless `value` is one of FUTURE_COVARIATES."""
    if value not in FUTURE_COVARIATES:
        raise ValueError(f"future_covariates must be one of {list(FUTURE_COVARIATES)} ('held': the last "
                         f"context frame's stimulus repeated, as the live loop serves it), got {value!r}")


def covariate_windows(covariates: np.ndarray, starts: np.ndarray, context: int, horizon: int,
                      future: str = "recorded") -> np.ndarray:
    """Covariates (B, C + H, K) of window `starts`: the context steps, then the target steps, either as
    recorded or ("held") each a copy of the last context step."""
    check_future_covariates(future)
    past, ahead = gather_windows(covariates, starts, context, horizon)          # (B, C, K), (B, H, K)
    if future == "held":
        ahead = np.repeat(past[:, -1:], horizon, axis=1)                          # (B, H, K)
    return np.ascontiguousarray(np.concatenate([past, ahead], axis=1), dtype=np.float32)
