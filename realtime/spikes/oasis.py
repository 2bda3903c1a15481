"""Streaming OASIS: thresholded AR(1) deconvolution of causal dF/F, per frame, for every neuron.

Model (Friedrich, Zhou & Paninski 2017): y_t = b + c_t + noise, c_t = g c_{t-1} + s_t, and each s_t is
0 or >= s_min. OASIS solves min 1/2 |c - (y - b)|^2 with a stack of pools (runs of frames on which c
decays freely from one value): every frame is pushed as a new pool, and while the newest pool's start
would need a jump below s_min (m_prev g^l_prev + s_min > m_new) it is merged into the one before it.
A pool is kept as (v, w, h, start): value sum v = sum_k g^k y_k, weight w = sum_k g^2k, h = g^length and
its first frame; its value (c at its start) is m = v / w. s at a pool's start is m - m_prev h_prev.

Conventions, the same as the oasis-deconv reference `oasisAR1(y - b, g, lam=0, s_min)`: the first
frame is initial calcium (s = 0 there, its pool free of the s_min rule); when building c, the first
pool's value is clipped at 0 and any later pool's value below s_min is set to 0.

Streaming: at most `max_pools` pools are held per neuron (the newest in a hot row, the others in a
ring). When a new pool starts with all of them held, the oldest becomes final: its decayed end is kept
as a frozen predecessor (merging never reaches past it, and a spike at the oldest held pool's start
counts only if it clears s_min above it). The output at frame t is s at frame t - lag from the pools
after frame t; with max_pools >= T it equals `oasis_offline(y[:t+1])[1][t - lag]` exactly.
"""
from __future__ import annotations

import concurrent.futures
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import numba
import numpy as np
from numpy.typing import NDArray

from loopcast.realtime.jit import njit
from loopcast.realtime.spikes.oasis_params import OasisConfig, OasisParams, estimate_params

# The parameters' config, type and estimator are re-exported: callers of the method need only this module.
__all__ = ["OasisConfig", "OasisParams", "StreamingOasis", "estimate_params", "oasis_offline"]

# ---------------------------------------------------------------- compiled pool kernels (numba)
# State of neuron i: hot[i] = the newest pool (v, w, h, start) and its predecessor's decayed end, raw
# (m h, for merging) and as built into c (for s) -- one cache line, enough for most frames; ring[i] =
# the older held pools, newest in slot meta[i, RT]; meta[i, CNT] = pools held (newest included);
# meta[i, FROZEN] = 1 once a pool was final, prev[i] = that predecessor's decayed end as built.
V, W, H, START, END, CEND = 0, 1, 2, 3, 4, 5
RT, CNT, FROZEN = 0, 1, 2
F64 = NDArray[np.float64]
I64 = NDArray[np.int64]


@njit(nogil=True, inline="always")
def _value(m: float, free: bool, smin: float) -> float:  # pragma: no cover (compiled)
    """A pool's value as built into c: the first pool (free) clipped at 0, others below smin set to 0."""
    if free:
        return m if m >= 0.0 else 0.0
    return m if m >= smin else 0.0


@njit(nogil=True, inline="always")
def _record(hot: F64, ring: F64, meta: I64, i: int,
            j: int) -> tuple[float, float, float, float]:  # pragma: no cover (compiled)
    """(v, w, h, start) of held pool j of neuron i, counted from the newest (0)."""
    if j == 0:
        return hot[i, V], hot[i, W], hot[i, H], hot[i, START]
    k = meta[i, RT] - (j - 1)
    k = k + ring.shape[1] if k < 0 else k
    return ring[i, k, V], ring[i, k, W], ring[i, k, H], ring[i, k, START]


@njit(nogil=True, inline="always")
def _set_end(hot: F64, ring: F64, meta: I64, i: int, smin: float) -> None:  # pragma: no cover (compiled)
    """Cache the decayed end of the pool below the newest one (raw and as built)."""
    if meta[i, CNT] > 1:
        k = meta[i, RT]
        m, h = ring[i, k, V] / ring[i, k, W], ring[i, k, H]
        hot[i, END] = m * h
        hot[i, CEND] = _value(m, meta[i, CNT] == 2 and meta[i, FROZEN] == 0, smin) * h


@njit(nogil=True, inline="always")
def _push(hot: F64, ring: F64, meta: I64, prev: F64, i: int, x: float, g: float, smin: float,
          t: int) -> None:  # pragma: no cover (compiled)
    """Frame t starts a new pool: the newest moves to the ring (the oldest becomes final if full)."""
    r, cnt = ring.shape[1], meta[i, CNT]
    k = meta[i, RT] + 1 if meta[i, RT] + 1 < r else 0
    if cnt - 1 == r:
        prev[i] = _value(ring[i, k, V] / ring[i, k, W], meta[i, FROZEN] == 0, smin) * ring[i, k, H]
        meta[i, FROZEN] = 1
        cnt -= 1
    ring[i, k, V], ring[i, k, W], ring[i, k, H], ring[i, k, START] = hot[i, V], hot[i, W], hot[i, H], hot[i, START]
    hot[i, V], hot[i, W], hot[i, H], hot[i, START] = x, 1.0, g, t
    meta[i, RT], meta[i, CNT] = k, cnt + 1
    _set_end(hot, ring, meta, i, smin)


@njit(nogil=True, inline="always")
def _merge_down(hot: F64, ring: F64, meta: I64, i: int, smin: float) -> None:  # pragma: no cover (compiled)
    """Merge the newest pool into the one below it (taken back from the ring)."""
    k = meta[i, RT]
    hb = ring[i, k, H]
    hot[i, V] = ring[i, k, V] + hot[i, V] * hb
    hot[i, W] = ring[i, k, W] + hot[i, W] * hb * hb
    hot[i, H] = hb * hot[i, H]
    hot[i, START] = ring[i, k, START]
    meta[i, RT] = k - 1 if k > 0 else ring.shape[1] - 1
    meta[i, CNT] -= 1
    _set_end(hot, ring, meta, i, smin)


@njit(nogil=True, inline="always")
def _add(hot: F64, ring: F64, meta: I64, prev: F64, i: int, x: float, g: float, smin: float,
         t: int) -> None:  # pragma: no cover (compiled)
    """Frame t (baseline-free value x) for neuron i: a new pool, merged back while s_min is violated."""
    if meta[i, CNT] == 0:
        hot[i, V], hot[i, W], hot[i, H], hot[i, START] = x, 1.0, g, t
        meta[i, CNT] = 1
        return
    h = hot[i, H]
    if hot[i, V] / hot[i, W] * h + smin <= x:
        _push(hot, ring, meta, prev, i, x, g, smin, t)
        return
    hot[i, V] += x * h                            # merge frame t into the newest pool
    hot[i, W] += h * h
    hot[i, H] = h * g
    while meta[i, CNT] > 1 and hot[i, END] + smin > hot[i, V] / hot[i, W]:
        _merge_down(hot, ring, meta, i, smin)


@njit(nogil=True, inline="always")
def _jump(hot: F64, ring: F64, meta: I64, prev: F64, i: int, j: int,
          smin: float) -> float:  # pragma: no cover (compiled)
    """s at the start of held pool j (0 = newest) of neuron i."""
    cnt, frozen = meta[i, CNT], meta[i, FROZEN] == 1
    if j == cnt - 1 and not frozen:
        return 0.0                                # the very first frame: initial calcium, not a spike
    v, w, _, _ = _record(hot, ring, meta, i, j)
    m = _value(v / w, False, smin)
    if j == cnt - 1:                              # predecessor final: s_min was not enforced against it
        s = m - prev[i]
        return s if s >= smin else 0.0
    if j == 0:
        cend: float = hot[i, CEND]
        return m - cend
    vb, wb, hb, _ = _record(hot, ring, meta, i, j + 1)
    return m - _value(vb / wb, j + 1 == cnt - 1 and not frozen, smin) * hb


@njit(nogil=True, inline="always")
def _spike_at(hot: F64, ring: F64, meta: I64, prev: F64, i: int, f: int,
              smin: float) -> float:  # pragma: no cover (compiled)
    """s at frame f (held, e.g. t - lag) for neuron i."""
    for j in range(meta[i, CNT]):
        start = _record(hot, ring, meta, i, j)[3]
        if start <= f:
            return _jump(hot, ring, meta, prev, i, j, smin) if start == f else 0.0
    return 0.0


@njit(parallel=True, nogil=True)
def _stream_step(y: NDArray[np.float32], b: F64, g: F64, smin: F64, hot: F64, ring: F64, meta: I64, prev: F64,
                 t: int, lag: int, out: NDArray[np.float32]) -> None:  # pragma: no cover (compiled)
    for i in numba.prange(y.shape[0]):
        _add(hot, ring, meta, prev, i, np.float64(y[i]) - b[i], g[i], smin[i], t)
        out[i] = _spike_at(hot, ring, meta, prev, i, t - lag, smin[i]) if t >= lag else 0.0


@njit(parallel=True, nogil=True)
def _run_block(ys: F64, b: F64, g: F64, smin: F64, hot: F64, ring: F64, meta: I64, prev: F64,
               t0: int) -> None:  # pragma: no cover (compiled)
    for i in numba.prange(ys.shape[1]):
        for k in range(ys.shape[0]):
            _add(hot, ring, meta, prev, i, ys[k, i] - b[i], g[i], smin[i], t0 + k)


@njit(nogil=True)
def _run_block_serial(ys: F64, b: F64, g: F64, smin: F64, hot: F64, ring: F64, meta: I64, prev: F64,
                      t0: int) -> None:  # pragma: no cover (compiled)
    """`_run_block` on the calling thread only: for a thread beside the loop's, which runs the parallel
    kernels (numba's `workqueue` threading layer must not run parallel kernels on two threads at once)."""
    for i in range(ys.shape[1]):
        for k in range(ys.shape[0]):
            _add(hot, ring, meta, prev, i, ys[k, i] - b[i], g[i], smin[i], t0 + k)


@njit(parallel=True, nogil=True)
def _build(hot: F64, ring: F64, meta: I64, prev: F64, g: F64, smin: F64, t_end: int, c: F64,
           s: F64) -> None:  # pragma: no cover (compiled)
    """c and s of frames t_end - len(c) + 1 .. t_end from the held pools (NaN where not held)."""
    f0 = t_end - c.shape[0] + 1
    for i in numba.prange(c.shape[1]):
        c[:, i] = np.nan
        s[:, i] = np.nan
        end: int | np.int64
        cnt, end = meta[i, CNT], t_end + 1
        for j in range(cnt):                      # newest to oldest
            v, w, _, st = _record(hot, ring, meta, i, j)
            start = np.int64(st)
            val = _value(v / w, j == cnt - 1 and meta[i, FROZEN] == 0, smin[i])
            for f in range(start, end):
                if f >= f0:
                    c[f - f0, i] = val
                    s[f - f0, i] = _jump(hot, ring, meta, prev, i, j, smin[i]) if f == start else 0.0
                val *= g[i]
            end = start


class _PoolState:
    """The per-neuron pools of the numba kernels."""

    def __init__(self, n: int, max_pools: int) -> None:
        self.hot = np.zeros((n, 8), dtype=np.float64)
        self.ring = np.zeros((n, max_pools - 1, 4), dtype=np.float64)
        self.meta = np.zeros((n, 3), dtype=np.int64)
        self.meta[:, RT] = max_pools - 2             # empty: the first pool pushed down lands in slot 0
        self.prev = np.zeros(n, dtype=np.float64)

    @property
    def arrays(self) -> tuple[F64, F64, I64, F64]:
        return self.hot, self.ring, self.meta, self.prev

    def oldest_start(self) -> int:
        """First frame any neuron still holds."""
        n, r = self.meta.shape[0], self.ring.shape[1]
        cnt, rt = self.meta[:, CNT], self.meta[:, RT]
        slot = (rt - (cnt - 2)) % r
        starts = np.where(cnt > 1, self.ring[np.arange(n), slot, START], self.hot[:, START])
        return int(starts.min())

    def build(self, g: np.ndarray, smin: np.ndarray, t_end: int, n_frames: int) -> tuple[np.ndarray, np.ndarray]:
        n = self.meta.shape[0]
        c, s = np.empty((n_frames, n)), np.empty((n_frames, n))
        _build(*self.arrays, g, smin, t_end, c, s)
        return c, s


def _per_neuron(a: Any, n: int) -> np.ndarray:
    return np.ascontiguousarray(np.broadcast_to(np.asarray(a, dtype=np.float64), (n,)))


def oasis_offline(y: np.ndarray, g: Any, smin: Any, baseline: Any = 0.0,
                  chunk_bytes: int = 1 << 28) -> tuple[np.ndarray, np.ndarray]:
    """Non-causal thresholded OASIS of whole traces: y (T,) or (T, N); g, smin, baseline scalars or (N,)
    -> (c, s) float64 like y, c the denoised y - baseline. Same problem and conventions as oasis-deconv's
    `oasisAR1(y - baseline, g, lam=0, s_min=smin)`. Neurons run in chunks of ~chunk_bytes of pools."""
    ys = np.asarray(y, dtype=np.float64)
    one = ys.ndim == 1
    ys = ys[:, None] if one else ys
    if ys.ndim != 2 or ys.shape[0] < 1:
        raise ValueError(f"y must be (T,) or (T, N) with T >= 1, got shape {np.shape(y)}")
    t, n = ys.shape
    g, smin, b = (_per_neuron(a, n) for a in (g, smin, baseline))
    if not (np.all(g > 0) and np.all(g < 1) and np.all(smin >= 0)):
        raise ValueError("need 0 < g < 1 and smin >= 0")
    c, s = np.empty((t, n)), np.empty((t, n))
    step = max(1, chunk_bytes // (32 * t))
    for lo in range(0, n, step):
        sl = slice(lo, min(n, lo + step))
        state = _PoolState(sl.stop - sl.start, t)
        _run_block(np.ascontiguousarray(ys[:, sl]), b[sl], g[sl], smin[sl], *state.arrays, 0)
        c[:, sl], s[:, sl] = state.build(g[sl], smin[sl], t - 1, t)
    return (c[:, 0], s[:, 0]) if one else (c, s)


@dataclass(frozen=True)
class _Replay:
    """What the end of the warm-up hands back: `frames` (T', N) to run into the pools from frame `start`
    on (into `prepared` when the background job already ran the earlier ones into pools of its own),
    and `live`: the current frame is not among them and is to be processed as a live frame next."""

    frames: NDArray[np.float32]
    start: int
    live: bool
    prepared: Any = None


class _Warmup:
    """Warm-up bookkeeping shared by both implementations: without given parameters, buffer `cfg.warmup`
    frames, estimate the parameters on them and hand the frames back to replay into the pools.

    Inline (`background` False), the fit and the replay run on the frame that completes the warm-up:
    0.3-0.6 s at 71,721 neurons on 2 CPU cores, inside that frame's latency. In the background, that
    frame starts a job on its own thread: the fit (numpy: it releases the GIL in the sorts and
    products) and, where the implementation can (`_prepare`), the replay of the warm-up frames into
    pools of its own. Later frames are buffered until the job is done; the first frame that finds it
    done adopts its pools, replays the buffered frames and is then processed live. The pools then hold
    what inline fitting gives: from that frame on the outputs are the same, and only the frames that
    came during the job report zeros (one or two at the rig's rate).
    """

    def _init_warmup(self, n: int, params: OasisParams | None, cfg: OasisConfig, frame_period_s: float,
                     background: bool = False) -> None:
        if params is not None and params.g.shape != (n,):
            raise ValueError(f"params are for {params.g.shape[0]} neurons, expected {n}")
        self.n, self.cfg, self.frame_period_s, self.background = n, cfg, frame_period_s, background
        self.params, self.n_fallback, self.frames = params, 0, 0
        self._warm: NDArray[np.float32] | None = \
            None if params is not None else np.zeros((cfg.warmup, n), dtype=np.float32)
        self._job: Future[tuple[tuple[OasisParams, int], Any]] | None = None
        self._backlog: list[NDArray[np.float32]] = []

    @property
    def ready(self) -> bool:
        """True once parameters are set (given, or estimated at the end of warm-up)."""
        return self.params is not None

    @property
    def fitting(self) -> bool:
        """True while the background job runs (frames are being buffered)."""
        return self._job is not None

    def wait_for_fit(self, timeout_s: float | None = None) -> None:
        """Block until a background job is done (its frames are replayed by the next `process`)."""
        if self._job is not None:
            concurrent.futures.wait([self._job], timeout_s)

    def _check(self, shape: tuple[int, ...]) -> None:
        if tuple(shape) != (self.n,):
            raise ValueError(f"expected dF/F of shape ({self.n},), got {tuple(shape)}")

    def _prepare(self, params: OasisParams, warm: NDArray[np.float32]) -> Any:
        """Background job, after the fit: pools with the warm-up frames run into them, or None (the loop
        then replays them)."""
        return None

    def _fit_job(self, warm: NDArray[np.float32]) -> tuple[tuple[OasisParams, int], Any]:
        fit = estimate_params(warm, self.frame_period_s, self.cfg)
        return fit, self._prepare(fit[0], warm)

    def _warm_frame(self, dff: np.ndarray) -> _Replay | None:
        """One frame while `params` is None. None: buffered (output zeros). Else the parameters are set
        (the buffers released here), and the frames to replay come back."""
        warm = self._warm
        assert warm is not None, "warm-up frame after the warm-up"
        if self._job is not None:
            if self._job.done():
                return self._adopt(*self._job.result())   # a failed job raises here, on the loop's thread
            if len(self._backlog) >= self.cfg.warmup:
                raise RuntimeError(f"the OASIS parameter fit is still running after {len(self._backlog)} "
                                   "more frames; frames are piling up")
            self._backlog.append(np.array(dff, dtype=np.float32))
            self.frames += 1
            return None
        warm[self.frames] = dff
        self.frames += 1
        if self.frames < self.cfg.warmup:
            return None
        if not self.background:
            self.params, self.n_fallback = estimate_params(warm, self.frame_period_s, self.cfg)
            self._warm = None
            return _Replay(warm, 0, live=False)
        pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="oasis-fit")
        self._job = pool.submit(self._fit_job, warm)
        pool.shutdown(wait=False)                 # its thread ends with the job
        return None

    def _adopt(self, fit: tuple[OasisParams, int], prepared: Any) -> _Replay:
        self.params, self.n_fallback = fit
        warm, backlog = self._warm, self._backlog
        assert warm is not None
        self._warm, self._job, self._backlog = None, None, []
        later = np.stack(backlog) if backlog else np.zeros((0, self.n), np.float32)
        if prepared is not None:
            return _Replay(later, len(warm), live=True, prepared=prepared)
        return _Replay(np.concatenate([warm, later]), 0, live=True)


class StreamingOasis(_Warmup):
    """Per-frame thresholded OASIS over N neurons (numba, parallel over neurons).

    With `params` None the first `cfg.warmup` frames are buffered (output zeros), the parameters are
    estimated on them (`background`: on a thread of its own, see _Warmup) and they are replayed into the
    pools. `process` returns s for frame t - lag.
    """

    def __init__(self, n_neurons: int, params: OasisParams | None = None, cfg: OasisConfig = OasisConfig(),
                 frame_period_s: float = 0.9141, background: bool = False) -> None:
        self._init_warmup(n_neurons, params, cfg, frame_period_s, background)
        self._state = _PoolState(n_neurons, cfg.max_pools)
        self._out = np.zeros(n_neurons, dtype=np.float32)
        if params is not None:
            self._set_params(params)

    def _set_params(self, p: OasisParams) -> None:
        self._b, self._g, self._smin = (np.asarray(a, dtype=np.float64) for a in (p.baseline, p.g, p.smin))

    def _prepare(self, params: OasisParams, warm: NDArray[np.float32]) -> _PoolState:
        """On the background job's thread: fresh pools with the warm-up frames run into them."""
        state = _PoolState(self.n, self.cfg.max_pools)
        b, g, smin = (np.asarray(a, dtype=np.float64) for a in (params.baseline, params.g, params.smin))
        _run_block_serial(warm.astype(np.float64), b, g, smin, *state.arrays, 0)
        return state

    def process(self, dff: np.ndarray) -> np.ndarray:
        """dff (N,) -> (N,) float32 spike amount (dF/F) at frame t - lag; zeros in warm-up and while t < lag."""
        self._check(np.shape(dff))
        if self.params is None:
            replay = self._warm_frame(dff)
            if replay is None:
                return np.zeros(self.n, dtype=np.float32)
            assert self.params is not None
            self._set_params(self.params)
            if replay.prepared is not None:
                self._state = replay.prepared
            if len(replay.frames):
                _run_block(replay.frames.astype(np.float64), self._b, self._g, self._smin, *self._state.arrays,
                           replay.start)
            if not replay.live:
                return np.zeros(self.n, dtype=np.float32)
        st = self._state
        _stream_step(np.ascontiguousarray(dff, dtype=np.float32), self._b, self._g, self._smin, *st.arrays,
                     self.frames, self.cfg.lag, self._out)
        self.frames += 1
        return self._out.copy()

    def held(self) -> tuple[int, np.ndarray, np.ndarray]:
        """The current deconvolution of the frames still held -> (first frame, c, s), c and s (F, N) float64
        for frames first .. frames - 1; NaN for frames a neuron no longer holds. c excludes the baseline."""
        if self.params is None or self.frames == 0:
            return self.frames, np.zeros((0, self.n)), np.zeros((0, self.n))
        first = self._state.oldest_start()
        c, s = self._state.build(self._g, self._smin, self.frames - 1, self.frames - first)
        return first, c, s
