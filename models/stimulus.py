"""Stimulus baseline: the mean trial-locked response of each condition, from its train frames.

This is our version of ZAPBench's stimulus baseline (a forecast that ignores the context and predicts
what the stimulus protocol alone explains). It is fitted, not gradient-trained:

* Trial phase. Within condition k (frames [o_k, o_{k+1})), trial onsets are the frames whose covariate
  `onset_column` (25 = trial onset in replay.protocol) is > 0.5. The phase of frame t is t minus the
  last onset at or before t inside the condition; frames before the condition's first onset have no
  phase. The stimulus protocol is known in advance, so phases of future frames are known too.
* Profile. For each phase p seen in the condition's TRAIN frames, profile[p] (N,) is the mean of the
  traces over the train frames at phase p. Phases with no train frame (longer trials in test, frames
  before the first onset) fall back to the condition's train mean.
* Defined only where the recording has repeats: a condition needs >= `min_trials` onsets inside its
  train range. Elsewhere, and in a held-out condition (no train frames at all), the baseline is
  undefined: `predict` returns None and evaluation reports n/a.
* Forecast. For a window starting at frame s with context C, step h (1..H) targets frame s + C + h - 1
  and is predicted as the profile at that frame's phase; the context values are not used.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

Span = tuple[int, int]


@dataclass(frozen=True)
class StimulusBaselineConfig:
    """Covariate column of the trial onsets, and the fewest train onsets that make a condition usable."""

    onset_column: int = 25
    min_trials: int = 2

    def __post_init__(self) -> None:
        if self.onset_column < 0 or self.min_trials < 1:
            raise ValueError(f"onset_column must be >= 0 and min_trials >= 1, got "
                             f"{self.onset_column}, {self.min_trials}")


@dataclass(frozen=True)
class TrialProfile:
    """One condition's fitted baseline: phases of its frames, mean response per phase, train mean."""

    start: int               # first frame of the condition
    phases: np.ndarray       # (L,) int64 phase of every frame of the condition, -1 = none
    profile: np.ndarray      # (P, N) float32 mean train response at phase 0..P-1
    mean: np.ndarray         # (N,) float32 train mean (fallback)
    trials: int              # onsets in the train range

    def at(self, frames: np.ndarray) -> np.ndarray:
        """The baseline at absolute `frames` (any shape) -> (*frames.shape, N)."""
        rel = np.asarray(frames, dtype=np.int64) - self.start
        inside = (rel >= 0) & (rel < len(self.phases))
        phase = np.where(inside, self.phases[np.clip(rel, 0, len(self.phases) - 1)], -1)
        known = (phase >= 0) & (phase < len(self.profile))
        out = np.where(known[..., None], self.profile[np.where(known, phase, 0)], self.mean)
        return out.astype(np.float32, copy=False)


def trial_phases(onsets: np.ndarray) -> np.ndarray:
    """(L,) frames since the last onset at or before each frame (-1 before the first onset)."""
    idx = np.where(np.asarray(onsets, dtype=bool), np.arange(len(onsets)), -1)
    last = np.maximum.accumulate(idx) if len(idx) else idx
    return np.where(last >= 0, np.arange(len(onsets)) - last, -1).astype(np.int64)


class StimulusBaseline:
    """Per-condition trial-averaged response (see the module docstring); `fit` then `predict`."""

    def __init__(self, config: StimulusBaselineConfig | None = None) -> None:
        self.config = config or StimulusBaselineConfig()
        self.profiles: dict[int, TrialProfile] = {}

    def fit(self, traces: np.ndarray, covariates: np.ndarray, offsets: tuple[int, ...] | list[int],
            train_spans: Mapping[int, Span | None]) -> StimulusBaseline:
        """Fit every condition k with a train span (start, stop) in `train_spans`; returns self."""
        if covariates.ndim != 2 or covariates.shape[0] != traces.shape[0]:
            raise ValueError(f"covariates {covariates.shape} must be (T, K) with T = {traces.shape[0]}")
        if covariates.shape[1] <= self.config.onset_column:
            raise ValueError(f"covariates have {covariates.shape[1]} columns; no onset column "
                             f"{self.config.onset_column}")
        self.profiles = {}
        for k, span in train_spans.items():
            if span is not None:
                prof = self._fit_condition(traces, covariates, (offsets[k], offsets[k + 1]), span)
                if prof is not None:
                    self.profiles[k] = prof
        return self

    def _fit_condition(self, traces: np.ndarray, covariates: np.ndarray, cond: Span,
                       train: Span) -> TrialProfile | None:
        onsets = covariates[cond[0]:cond[1], self.config.onset_column] > 0.5
        a, b = train[0] - cond[0], train[1] - cond[0]
        trials = int(onsets[max(a, 0):b].sum())
        if trials < self.config.min_trials or b <= a:
            return None
        phases = trial_phases(onsets)
        x = np.asarray(traces[train[0]:train[1]], dtype=np.float64)   # (L_train, N)
        ph = phases[a:b]
        n_phase = int(ph.max()) + 1
        sums = np.zeros((n_phase, x.shape[1]))
        counts = np.bincount(ph[ph >= 0], minlength=n_phase)
        np.add.at(sums, ph[ph >= 0], x[ph >= 0])
        mean = x.mean(axis=0)
        profile = np.where(counts[:, None] > 0, sums / np.maximum(counts, 1)[:, None], mean)
        return TrialProfile(start=cond[0], phases=phases, profile=profile.astype(np.float32),
                            mean=mean.astype(np.float32), trials=trials)

    def defined(self, condition: int) -> bool:
        """Whether the baseline has a profile for `condition` (repeats in its train range)."""
        return condition in self.profiles

    def predict(self, condition: int, starts: np.ndarray, context: int,
                horizon: int) -> np.ndarray | None:
        """(B, H, N) forecasts for windows starting at `starts`, or None where undefined."""
        prof = self.profiles.get(condition)
        if prof is None:
            return None
        frames = np.asarray(starts, dtype=np.int64)[:, None] + context + np.arange(horizon)[None, :]
        return prof.at(frames)
