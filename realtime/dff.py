"""dF/F: the online causal estimator and its offline references (pure numpy).

Definition (ZAPBench-style, but causal): F0_t = the `percentile`-th percentile of F over the trailing
window F[max(0, t-W+1) : t+1]; dF/F = (F - F0) / max(F0, min_baseline), clipped to `clip`.
Warm-up: the first frames use every frame seen so far (the same formula with a shorter window);
`ready` turns true after `warmup` frames. `causal_dff_reference` computes exactly this offline and the
online result equals it; `centered_dff` is ZAPBench's non-causal definition (window t-W .. t+W).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class DffConfig:
    """Causal dF/F parameters (window and warm-up in frames)."""

    window: int = 400
    percentile: float = 8.0
    warmup: int = 10
    min_baseline: float = 1.0
    clip_min: float = -0.25
    clip_max: float = 1.5

    def __post_init__(self) -> None:
        if self.window < 1 or not 0.0 <= self.percentile <= 100.0:
            raise ValueError("window must be >= 1 and percentile in [0, 100]")
        if self.warmup < 1 or self.warmup > self.window:
            raise ValueError("warmup must be in [1, window]")
        if self.min_baseline <= 0 or self.clip_min >= self.clip_max:
            raise ValueError("min_baseline must be > 0 and clip_min < clip_max")


@dataclass(frozen=True)
class DffStats:
    """What one online step had to repair: non-finite inputs and floored baselines."""

    nonfinite: int
    floored: int


class CausalDff:
    """Online causal dF/F over N neurons, one frame at a time."""

    def __init__(self, n_neurons: int, config: DffConfig) -> None:
        self.n = n_neurons
        self.cfg = config
        self._buf = np.zeros((config.window, n_neurons), dtype=np.float32)
        self.frames = 0

    @property
    def ready(self) -> bool:
        return self.frames >= self.cfg.warmup

    def process(self, f: np.ndarray) -> tuple[np.ndarray, DffStats]:
        """f: (N,) fluorescence -> ((N,) float32 dF/F, repair stats)."""
        if f.shape != (self.n,):
            raise ValueError(f"expected fluorescence of shape ({self.n},), got {f.shape}")
        f = np.asarray(f, dtype=np.float32)
        bad = ~np.isfinite(f)
        nonfinite = int(bad.sum())
        if nonfinite:
            # A non-finite sample repeats the neuron's last (repaired) value: the newest buffer row,
            # which is still zeros before the first frame.
            f = np.where(bad, self._buf[(self.frames - 1) % self.cfg.window], f)
        self._buf[self.frames % self.cfg.window] = f
        self.frames += 1
        filled = self._buf[: min(self.frames, self.cfg.window)]
        f0 = np.percentile(filled, self.cfg.percentile, axis=0).astype(np.float32)
        return _ratio(f, f0, self.cfg), DffStats(nonfinite, int((f0 < self.cfg.min_baseline).sum()))


def _ratio(f: np.ndarray, f0: np.ndarray, cfg: DffConfig) -> np.ndarray:
    denom = np.maximum(f0, np.float32(cfg.min_baseline))
    return np.clip((f - f0) / denom, cfg.clip_min, cfg.clip_max).astype(np.float32)


def causal_dff_reference(f: np.ndarray, config: DffConfig) -> np.ndarray:
    """Offline reference of the causal definition: f (T, N) -> dF/F (T, N), a full recomputation per t."""
    f = np.asarray(f, dtype=np.float32)
    out = np.empty_like(f)
    for t in range(f.shape[0]):
        lo = max(0, t - config.window + 1)
        f0 = np.percentile(f[lo:t + 1], config.percentile, axis=0).astype(np.float32)
        out[t] = _ratio(f[t], f0, config)
    return out


def centered_dff(f: np.ndarray, config: DffConfig, stride: int = 1) -> np.ndarray:
    """ZAPBench's non-causal dF/F: F0_t over F[t-W : t+W+1] (clipped at the ends).

    stride=1 is exact. stride=k evaluates F0 every k frames and interpolates linearly in between,
    a documented approximation used to write large synthetic recordings quickly.
    """
    f = np.asarray(f, dtype=np.float32)
    n_t = f.shape[0]
    w = config.window
    knots = np.unique(np.r_[np.arange(0, n_t, max(1, stride)), n_t - 1])
    f0_knots = np.stack([np.percentile(f[max(0, t - w):t + w + 1], config.percentile, axis=0)
                         for t in knots]).astype(np.float32)
    if len(knots) == n_t:
        return _ratio(f, f0_knots, config)
    t = np.arange(n_t)
    i = np.clip(np.searchsorted(knots, t, side="right") - 1, 0, len(knots) - 2)  # knot at or before t
    w = ((t - knots[i]) / (knots[i + 1] - knots[i]))[:, None]                     # (T, 1) position between
    f0 = ((1.0 - w) * f0_knots[i] + w * f0_knots[i + 1]).astype(np.float32)      # (T, N)
    return _ratio(f, f0, config)
