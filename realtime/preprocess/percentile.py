"""Exact running percentile of N independent series over their trailing `window` samples.

`RunningPercentile` returns, after every push/pop, exactly what `np.percentile(held, p, axis=0)`
(method "linear") returns for the samples currently held: float32, in numpy's own arithmetic (its
interpolation index, weight and two-sided lerp are reproduced), so the two agree bit for bit.

Algorithm (compiled in realtime.preprocess.percentile_kernels; parallel over series, series-major state).
Every held sample gets a unique 64-bit key (order-preserving bits of its float32 value, then its ring
slot), so ties need no special case. Only the order statistics lo = floor(q (n-1)) and lo + 1 are
read, so only the K = lo + 2 smallest keys matter: each series keeps its `size` smallest keys (the
"low set", K <= size <= C = K + slack) sorted in a row of width B = C + 2 + 2 margin, placed at
`start` so that an insert or delete shifts the shorter side (O(1) at the ends, where a trending
baseline inserts and deletes). Invariant: every held key outside the low set is larger than the low
set's maximum ("top"), so membership is one comparison. A push overwrites the oldest ring slot: the
old key leaves the low set if it is <= top, the new key enters if it is <= top (the maximum is
evicted past C). A frame is three passes: a streaming one over all series (ring write, two key
comparisons: most series stop here), one over the few series whose low set changes (their sorted
runs prefetched ahead), one writing the values. Only when a low set falls below K is its ring row
read, to append every sample up to a threshold found by vectorised counting (about K + slack/2
keys; a selection scan if ties defeat the count); the slack makes that rare for stationary data and
once per ~slack/2 frames for a steadily rising baseline.

Inputs must be finite (NaN has no order): `push` raises ValueError on non-finite input unless made
with `check_finite=False` by a caller that repairs first (realtime.preprocess.dff.CausalDff does).
Memory: N x (4 W + 8 B + 40) bytes, e.g. 71,721 x (1,600 + 536 + 40) = 156 MB at W=400, p=8 and
the default slack 16, margin 8.
"""
from __future__ import annotations

import math
from typing import TypeVar

import numpy as np
from numpy.typing import NDArray

from loopcast.realtime.preprocess.percentile_kernels import all_finite, pop_chunk, pop_par, push_chunk, push_par

_ScalarT = TypeVar("_ScalarT", bound=np.generic)
MARGIN = 8        # free entries kept on each side of a low set before it is re-centred


def order_statistics(n: int, percentile: float) -> tuple[int, int, float]:
    """(lo, hi, gamma) of np.percentile(method="linear") over n sorted samples, value =
    lerp(sorted[lo], sorted[hi], gamma), with numpy's own index arithmetic."""
    vi = (n - 1) * float(np.true_divide(percentile, 100))
    lo = math.floor(vi)
    if vi >= n - 1:
        return n - 1, n - 1, vi - lo
    return lo, lo + 1, vi - lo


class RunningPercentile:
    """Exact running `percentile` of `n_series` series over their trailing `window` samples."""

    def __init__(self, n_series: int, window: int, percentile: float, slack: int = 16,
                 margin: int = MARGIN, check_finite: bool = True) -> None:
        if n_series < 0 or not 1 <= window < 2**31 or not 0.0 <= percentile <= 100.0 \
                or min(slack, margin) < 0:
            raise ValueError("need n_series >= 0, 1 <= window < 2**31, percentile in [0, 100], "
                             "slack and margin >= 0")
        self.n, self.window, self.percentile = n_series, window, float(percentile)
        self.check_finite = check_finite
        self.k_need = order_statistics(window, percentile)[1] + 1           # K = lo + 2 (<= W)
        self.capacity = min(self.k_need + slack, window)                     # C
        self.target = min(self.k_need + slack // 2, self.capacity)
        self._sb = max(1, (window - 1).bit_length())                         # slot bits of a key
        self._allocate(self.capacity + 2 + 2 * margin)
        self._ranks = (-1, -1)                                              # what _stats hold
        self._head = 0                                                      # slot of the oldest
        self._count = 0
        self._parallel = n_series >= PARALLEL_MIN

    def _allocate(self, width: int) -> None:
        """The per-series state (see realtime.preprocess.percentile_kernels), pages written up front."""
        n = self.n
        self._ring = _touched((n, self.window), np.float32)                # (N, W) samples
        self._keys = _touched((n, width), np.uint64)                       # (N, B) sorted runs
        self._start = np.full(n, width // 2, np.int32)                     # (N,) run starts
        self._size = np.zeros(n, np.int32)                                 # (N,) low-set sizes
        self._top = np.full(n, np.iinfo(np.uint64).max, np.uint64)         # (N,) largest low key
        self._stats = np.zeros((n, 2), np.float32)                         # (N, 2) ranks lo, hi
        self._todo = np.empty(n, np.int64)                                 # (N,) kernel scratch
        self._olds = np.empty(n, np.uint64)                                # (N,) kernel scratch

    @property
    def count(self) -> int:
        """Samples currently held per series (<= window)."""
        return self._count

    def push(self, x: np.ndarray) -> None:
        """Add one sample per series, x (N,) finite; the oldest is dropped when `window` are held."""
        self._push(self._frames(x, 1), _NO_OUT, _NO_RATIO)

    def push_value(self, x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """`push(x)` then `value(out)` in one pass over the state (the online fast path); (N,)."""
        out = _checked_out(out, (self.n,))
        self._push(self._frames(x, 1), out[None], _NO_RATIO)
        return out

    def push_values(self, xs: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """Push the frames xs (T, N) in order; (T, N) float32 value after each push. One pass per
        series (its state stays in cache): the fast path for whole recordings."""
        xs = self._frames(xs, None)
        out = _checked_out(out, xs.shape)
        self._push(xs, out, _NO_RATIO)
        return out

    def push_dff(self, x: np.ndarray, bounds: tuple[float | np.float32, float | np.float32, float | np.float32],
                 out: np.ndarray) -> int:
        """`push(x)`, then out = clip((x - F0) / max(F0, b0), b1, b2) with F0 the new value and
        bounds = (min_baseline, clip_min, clip_max), in float32 and the same pass (realtime.preprocess.dff's
        fast path). Returns how many F0 < min_baseline."""
        out = _checked_out(out, (self.n,))
        return self._push(self._frames(x, 1), out[None], np.asarray(bounds, np.float32))

    def pop(self) -> None:
        """Drop the oldest sample of every series (the end of a centred window)."""
        if self._count == 0:
            raise ValueError("pop from an empty RunningPercentile")
        self._count -= 1
        lo, hi = self._ranks = order_statistics(max(self._count, 1), self.percentile)[:2]
        pop = pop_par if self._parallel else pop_chunk
        pop(self._ring, self._keys, self._start, self._size, self._top, self._stats, self._head,
            self._count, self.k_need, self.target, self.capacity, lo, hi, self._sb, 0, self.n)
        self._head = (self._head + 1) % self.window

    def value(self, out: np.ndarray | None = None) -> np.ndarray:
        """(N,) float32: np.percentile of each series' held samples (method "linear")."""
        if self._count == 0:
            raise ValueError("no samples held")
        out = _checked_out(out, (self.n,))
        _, _, gamma = order_statistics(self._count, self.percentile)
        a, b = self._stats[:, 0], self._stats[:, 1]
        if gamma >= 0.5:                                    # numpy's _lerp, in float32
            np.subtract(b, (b - a) * np.float32(1.0 - gamma), out=out)
        else:
            np.add(a, (b - a) * np.float32(gamma), out=out)
        return out

    def newest(self) -> np.ndarray:
        """(N,) float32 copy of each series' most recent sample (zeros before the first)."""
        if self._count == 0:
            return np.zeros(self.n, np.float32)
        return self._ring[:, (self._head + self._count - 1) % self.window].copy()

    def _frames(self, xs: np.ndarray, n_frames: int | None) -> np.ndarray:
        xs = np.ascontiguousarray(xs, dtype=np.float32)
        xs = xs[None] if n_frames == 1 and xs.ndim == 1 else xs
        if xs.ndim != 2 or xs.shape[1] != self.n or (n_frames and xs.shape[0] != n_frames):
            raise ValueError(f"expected samples of shape ({self.n},) or (T, {self.n}), got {xs.shape}")
        if self.check_finite and not all_finite(xs.reshape(-1)):
            raise ValueError("RunningPercentile needs finite samples (repair NaN/inf before pushing)")
        return xs

    def _push(self, xs: np.ndarray, out: np.ndarray, ratio: np.ndarray) -> int:
        prm, w = self._params(xs.shape[0])
        kernel = push_par if self._parallel else push_chunk
        return int(kernel(self._ring, self._keys, self._start, self._size, self._top, self._stats,
                          xs, prm, w, self.capacity, self.target, self._sb, out, ratio, self._todo,
                          self._olds, 0, self.n))

    def _params(self, n_frames: int) -> tuple[np.ndarray, np.ndarray]:
        """Per-frame parameters (T, 9) int64 and weights (T, 2) float32 of the next n_frames
        pushes; advances head and count as those pushes will."""
        prm = np.zeros((n_frames, 9), np.int64)
        w = np.zeros((n_frames, 2), np.float32)
        for t in range(n_frames):
            full = self._count == self.window
            n_live = self._count if full else self._count + 1
            lo, hi, gamma = order_statistics(n_live, self.percentile)
            prm[t] = (self._head if full else (self._head + self._count) % self.window, full, n_live,
                      min(self.k_need, n_live), self._head, lo, hi, (lo, hi) != self._ranks,
                      gamma >= 0.5)
            w[t] = gamma, 1.0 - gamma
            self._ranks = (lo, hi)
            self._head, self._count = ((self._head + 1) % self.window, self._count) if full \
                else (self._head, self._count + 1)
        return prm, w


PARALLEL_MIN = 4096              # series below which one thread beats waking the pool
_NO_OUT = np.empty((0, 0), np.float32)
_NO_RATIO = np.empty(0, np.float32)


def _touched(shape: tuple[int, int], dtype: type[_ScalarT]) -> NDArray[_ScalarT]:
    """Zeros whose pages are written now, not on their first use inside a frame's deadline."""
    arr = np.empty(shape, dtype)
    arr.fill(0)
    return arr


def _checked_out(out: np.ndarray | None, shape: tuple[int, ...]) -> np.ndarray:
    if out is None:
        return np.empty(shape, np.float32)
    if out.shape != shape or out.dtype != np.float32 or not out.flags.c_contiguous:
        raise ValueError(f"out must be a C-contiguous float32 array of shape {shape}")
    return out
