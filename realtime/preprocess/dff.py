"""dF/F: the online causal estimator and its offline references.

Definition (ZAPBench-style, but causal): F0_t = the `percentile`-th percentile of F over the trailing
window F[max(0, t-W+1) : t+1]; dF/F = (F - F0) / max(F0, min_baseline), clipped to `clip`.
Warm-up: the first frames use every frame seen so far (the same formula with a shorter window);
`ready` turns true after `warmup` frames. `causal_dff_reference` computes exactly this offline and the
online result equals it; `centered_dff` is ZAPBench's non-causal definition (window t-W .. t+W).

`method="running"` (default) keeps an exact running percentile (realtime.preprocess.percentile), O(1) expected
work per neuron and frame and bit-identical to `method="naive"`: the full np.percentile over the
window every frame, kept as the benchmark's reference. `causal_dff` runs the online path over a whole
(T, N) array; `centered_dff` (stride 1) uses the same running percentile with window 2W+1.
"""
from __future__ import annotations

from dataclasses import dataclass

import numba
import numpy as np
from numpy.typing import NDArray

from loopcast.realtime.jit import njit
from loopcast.realtime.preprocess.percentile import PARALLEL_MIN, RunningPercentile
from loopcast.realtime.preprocess.percentile_kernels import ratio_one

METHODS = ("running", "naive")
OFFLINE_BLOCK = 256              # frames per block push of `causal_dff`


@dataclass(frozen=True)
class DffConfig:
    """Causal dF/F parameters (window and warm-up in frames)."""

    window: int = 400
    percentile: float = 8.0
    warmup: int = 10
    min_baseline: float = 1.0
    clip_min: float = -0.25
    clip_max: float = 1.5
    method: str = "running"

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown dF/F method {self.method!r}; available: {list(METHODS)}")
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


@njit(nogil=True)
def _nonfinite_seq(x: NDArray[np.float32]) -> int:  # pragma: no cover (compiled)
    n = 0
    for i in range(x.shape[0]):
        n += not np.isfinite(x[i])
    return n


@njit(parallel=True, nogil=True)
def _nonfinite_par(x: NDArray[np.float32]) -> int:  # pragma: no cover (compiled)
    n = 0
    for i in numba.prange(x.shape[0]):
        n += not np.isfinite(x[i])
    return n


@njit(nogil=True, error_model="numpy")
def _ratio_seq(f: NDArray[np.float32], f0: NDArray[np.float32], min_baseline: np.float32, clip_min: np.float32,
               clip_max: np.float32, out: NDArray[np.float32]) -> tuple[int, int]:  # pragma: no cover (compiled)
    floored, nonfinite = 0, 0
    for i in range(f.shape[0]):
        floored += f0[i] < min_baseline
        nonfinite += not np.isfinite(f[i])
        out[i] = ratio_one(f[i], f0[i], min_baseline, clip_min, clip_max)
    return floored, nonfinite


@njit(parallel=True, nogil=True, error_model="numpy")
def _ratio_par(f: NDArray[np.float32], f0: NDArray[np.float32], min_baseline: np.float32, clip_min: np.float32,
               clip_max: np.float32, out: NDArray[np.float32]) -> tuple[int, int]:  # pragma: no cover (compiled)
    floored, nonfinite = 0, 0
    for i in numba.prange(f.shape[0]):
        floored += f0[i] < min_baseline
        nonfinite += not np.isfinite(f[i])
        out[i] = ratio_one(f[i], f0[i], min_baseline, clip_min, clip_max)
    return floored, nonfinite


def count_nonfinite(x: np.ndarray) -> int:
    """Number of NaN/inf entries of a 1-D float32 array (compiled; parallel when large)."""
    return int((_nonfinite_par if x.shape[0] >= PARALLEL_MIN else _nonfinite_seq)(x))


def ratio_into(f: np.ndarray, f0: np.ndarray, bounds: tuple[np.float32, np.float32, np.float32],
               out: np.ndarray) -> tuple[int, int]:
    """out = clip((f - f0) / max(f0, min_baseline)) for 1-D float32 arrays, in the same float32
    arithmetic as `_ratio`; bounds = (min_baseline, clip_min, clip_max) as float32. Returns how
    many baselines were floored and how many f were not finite (their out is not meaningful)."""
    kernel = _ratio_par if f.shape[0] >= PARALLEL_MIN else _ratio_seq
    floored, nonfinite = kernel(f, f0, *bounds, out)
    return int(floored), int(nonfinite)


class CausalDff:
    """Online causal dF/F over N neurons, one frame at a time."""

    def __init__(self, n_neurons: int, config: DffConfig) -> None:
        self.n = n_neurons
        self.cfg = config
        self.frames = 0
        if config.method == "naive":
            self._buf = np.zeros((config.window, n_neurons), dtype=np.float32)   # (W, N) ring
            return
        self._running = RunningPercentile(n_neurons, config.window, config.percentile,
                                          check_finite=False)                 # repaired here
        self._bounds = (np.float32(config.min_baseline), np.float32(config.clip_min),
                        np.float32(config.clip_max))

    @property
    def ready(self) -> bool:
        return self.frames >= self.cfg.warmup

    def warm_up(self) -> None:
        """Run `process` on a throwaway estimator of the same N and config (so the same kernels: their
        parallel variants from PARALLEL_MIN neurons on), a finite frame and one with a NaN to repair;
        this estimator's window sees nothing."""
        scratch = CausalDff(self.n, self.cfg)
        f = np.full(self.n, 100.0, np.float32)
        scratch.process(f)
        if self.n:
            f[0] = np.nan
        scratch.process(f)

    def process(self, f: np.ndarray) -> tuple[np.ndarray, DffStats]:
        """f: (N,) fluorescence -> ((N,) float32 dF/F, repair stats)."""
        if f.shape != (self.n,):
            raise ValueError(f"expected fluorescence of shape ({self.n},), got {f.shape}")
        if self.cfg.method == "naive":
            return self._process_naive(np.asarray(f, dtype=np.float32))
        f = np.ascontiguousarray(f, dtype=np.float32)
        nonfinite = count_nonfinite(f)
        if nonfinite:
            # A non-finite sample repeats the neuron's last (repaired) value, zero before the first.
            f = np.where(np.isfinite(f), f, self._running.newest())
        out = np.empty(self.n, np.float32)
        floored = self._running.push_dff(f, self._bounds, out)    # push, F0 and dF/F in one pass
        self.frames += 1
        return out, DffStats(nonfinite, floored)

    def _process_naive(self, f: np.ndarray) -> tuple[np.ndarray, DffStats]:
        """The full recomputation: np.percentile over the (W, N) window every frame."""
        bad = ~np.isfinite(f)
        nonfinite = int(bad.sum())
        if nonfinite:
            # As above: the newest buffer row, which is still zeros before the first frame.
            f = np.where(bad, self._buf[(self.frames - 1) % self.cfg.window], f)
        self._buf[self.frames % self.cfg.window] = f
        self.frames += 1
        filled = self._buf[: min(self.frames, self.cfg.window)]
        f0 = np.percentile(filled, self.cfg.percentile, axis=0).astype(np.float32)
        return _ratio(f, f0, self.cfg), DffStats(nonfinite, int((f0 < self.cfg.min_baseline).sum()))


def _ratio(f: NDArray[np.float32], f0: NDArray[np.float32], cfg: DffConfig) -> NDArray[np.float32]:
    denom = np.maximum(f0, np.float32(cfg.min_baseline))
    return np.clip((f - f0) / denom, cfg.clip_min, cfg.clip_max).astype(np.float32)


def causal_dff(f: np.ndarray, config: DffConfig) -> np.ndarray:
    """Offline convenience: f (T, N) -> dF/F (T, N) float32, what CausalDff gives row by row (equal
    to `causal_dff_reference` on finite input; non-finite samples repeat the last repaired value).
    The running method pushes blocks of frames, one pass per series over each block."""
    f = np.array(f, dtype=np.float32)                      # a copy: repaired in place
    if f.ndim != 2:
        raise ValueError(f"expected fluorescence of shape (T, N), got {f.shape}")
    if config.method == "naive":
        online = CausalDff(f.shape[1], config)
        return np.stack([online.process(row)[0] for row in f]) if len(f) else f
    bad = ~np.isfinite(f)
    for t in np.flatnonzero(bad.any(axis=1)):
        f[t, bad[t]] = f[t - 1, bad[t]] if t else 0.0      # forward fill, zero before the first
    running = RunningPercentile(f.shape[1], config.window, config.percentile, check_finite=False)
    f0 = np.empty_like(f)                                    # (T, N)
    for t0 in range(0, len(f), OFFLINE_BLOCK):
        running.push_values(f[t0:t0 + OFFLINE_BLOCK], out=f0[t0:t0 + OFFLINE_BLOCK])
    return _ratio(f, f0, config)


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

    stride=1 is exact: a running percentile of window 2W+1, pushed W frames ahead and popped at the
    end (input with NaN/inf falls back to np.percentile per frame, which propagates them). stride=k
    evaluates F0 every k frames and interpolates linearly in between, a documented approximation used
    to write large synthetic recordings quickly.
    """
    f = np.asarray(f, dtype=np.float32)
    if stride <= 1 and f.ndim == 2 and np.isfinite(f).all():
        return _ratio(f, _centered_baseline(f, config), config)
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


def _centered_baseline(f: np.ndarray, config: DffConfig) -> np.ndarray:
    """f (T, N) finite -> F0 (T, N): the percentile of f[max(0, t-W) : t+W+1] for every t. One
    block push gives t < T-W (pushing frame t+W completes t's window; the ring of 2W+1 drops
    frame t-W-1 by itself), then the last W frames pop their window's start."""
    n_t, w = f.shape[0], config.window
    running = RunningPercentile(f.shape[1], 2 * w + 1, config.percentile, check_finite=False)
    f0 = np.empty(f.shape, np.float32)
    running.push_values(f[:min(w, n_t)])
    if n_t > w:
        running.push_values(f[w:], out=f0[:n_t - w])
    for t in range(max(0, n_t - w), n_t):
        if t - w - 1 >= 0:
            running.pop()                           # frame t-W-1 leaves; nothing new arrives
        running.value(out=f0[t])
    return f0
