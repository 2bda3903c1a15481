"""The stimulus protocol: ZAPBench's nine conditions, their 26 covariates, and a seeded schedule of them."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

ZAPBENCH_CONDITION_OFFSETS: tuple[int, ...] = (0, 649, 2422, 3078, 3735, 5047, 5638, 6623, 7279, 7879)
CONDITION_NAMES: tuple[str, ...] = ("gain", "dots", "flash", "taxis", "turning", "position", "open loop",
                                    "rotation", "dark")
FRAME_PERIOD_S = 0.9141
N_COVARIATES = 26
# Covariate columns each condition drives; 24 (ambient luminance) and 25 (trial onset) are shared by all.
CONDITION_COVARIATES: tuple[tuple[int, ...], ...] = (
    (0, 1, 2), (3, 4, 5), (6, 7), (8, 9, 10), (11, 12, 13), (14, 15, 16), (17, 18, 19), (20, 21, 22), (23,))


@dataclass(frozen=True)
class Schedule:
    """The stimulus protocol: covariates and condition per frame, ZAPBench-like condition blocks."""

    covariates: np.ndarray    # (T, 26) float32
    condition: np.ndarray     # (T,) int32 condition index 0..8
    offsets: tuple[int, ...]  # 10 condition offsets, ZAPBench's CONDITION_OFFSETS scaled to T


def condition_offsets(n_frames: int) -> tuple[int, ...]:
    """ZAPBench's condition offsets scaled to n_frames (each condition keeps >= 1 frame)."""
    offs = tuple(int(round(o * n_frames / ZAPBENCH_CONDITION_OFFSETS[-1])) for o in ZAPBENCH_CONDITION_OFFSETS)
    if any(b <= a for a, b in zip(offs, offs[1:])):
        raise ValueError(f"n_frames={n_frames} is too short: each of the 9 conditions needs >= 1 frame")
    return offs


def schedule_for_seed(seed: int, n_frames: int) -> Schedule:
    """Covariates per frame: each condition drives its own columns with trial-structured waveforms."""
    offs = condition_offsets(n_frames)
    rng = np.random.default_rng([seed, 0x5715])
    cov = np.zeros((n_frames, N_COVARIATES), np.float32)
    cond = np.zeros(n_frames, np.int32)
    for c, cols in enumerate(CONDITION_COVARIATES):
        a, b = offs[c], offs[c + 1]
        cond[a:b] = c
        tl = np.arange(b - a)
        trial = int(rng.integers(10, 31))                    # trial period, frames
        for k, j in enumerate(cols):
            period = trial * int(rng.integers(1, 3))
            if k % 3 == 0:                                   # pulse train (stimulus on / off)
                cov[a:b, j] = (tl % period) < rng.uniform(0.3, 0.6) * period
            elif k % 3 == 1:                                 # smooth modulation (speed, contrast)
                cov[a:b, j] = 0.5 + 0.5 * np.sin(2 * np.pi * tl / period + rng.uniform(0, 2 * np.pi))
            else:                                            # direction held per trial: -1, 0, 1
                levels = rng.integers(-1, 2, size=(b - a) // period + 1)
                cov[a:b, j] = levels[tl // period]
        cov[a:b, 24] = 0.0 if CONDITION_NAMES[c] == "dark" else rng.uniform(0.3, 1.0)   # ambient luminance
        cov[a:b, 25] = (tl % trial) == 0                     # trial onset
    return Schedule(cov, cond, offs)
