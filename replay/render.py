"""Fast rendering of the fish's fluorescence into noisy uint16 camera volumes, and the SNR calibration.

Camera model per voxel v (counts): value = round(offset + mu_v + sqrt(shot_gain * mu_v + read_noise^2) * z_v),
clipped to [0, 65535], where mu_v = g_t * neuropil_v outside nuclei (g_t: bleaching x activity modulation)
and mu_v = F_i(t) * w_v in the nucleus of neuron i (w_v: brightness profile). The volume is written in
Fortran (x, y, z) order: z planes of y rows of x, a light-sheet camera's plane-major order.

Speed (a full ZAPBench-sized volume is 196 M voxels) comes from two documented approximations:
- noise reuse: z_v = bank[o_t + v], one standard-normal bank of (volume + 2^22) float32 drawn once; each
  frame reads it at a fresh random offset o_t. Voxels of one frame get independent noise; across frames
  the noise of voxel v equals that of voxel v + (o_t - o_s) at frame s (never the same voxel unless the
  offsets collide, probability 2^-22 per pair of frames).
- Gaussian noise: shot noise is Gaussian with variance shot_gain * mu (not Poisson).
The noise sigma itself is exact every frame, for nuclei and for the (bleaching, activity-modulated) neuropil.
The work runs in fixed chunks of 2^18 voxels on a few threads (numpy releases the GIL); chunking does not
change the result, so frames are bit-identical for any thread count.
Rigid motion (replay/motion.py): with a non-zero shift s the whole expected image mu is built, moved to
mu(v - s) by linear interpolation along each axis (zero beyond the edges: camera offset only), then the
noise is added in one pass (single-threaded, two extra float32 volumes). A zero shift takes the path above.
"""
from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from loopcast.replay.anatomy import Nuclei

CHUNK = 1 << 18           # voxels per work item (1 MiB of float32: stays in cache)
NOISE_MARGIN = 1 << 22    # the noise bank's length beyond the volume: the range of per-frame offsets
MAX_THREADS = 4
QUANT_VAR = 1.0 / 12.0    # variance of rounding to integer counts


def trace_snr(nuclei: Nuclei, baseline: np.ndarray, dff_per_spike: float, shot_gain: float,
              read_noise: float) -> np.ndarray:
    """(N,) per-neuron SNR of the segment-mean trace at rest (no spikes, no bleaching, no drift):

    snr_i = dff_per_spike * S_i / sigma_i,  S_i = mean_v F_i w_v (signal above offset),
    sigma_i^2 = sum_v (shot_gain * F_i w_v + read_noise^2 + 1/12) / n_i^2   (v over neuron i's n_i voxels).
    One isolated spike's peak changes the trace by dff_per_spike * S_i counts (in dF/F the camera offset
    divides both numerator and noise, so the ratio is the same).
    """
    n = len(baseline)
    mu = baseline[nuclei.lab].astype(np.float64) * nuclei.w              # (M,)
    count = np.bincount(nuclei.lab, minlength=n).astype(np.float64)
    s = np.bincount(nuclei.lab, mu, n) / count
    var = np.bincount(nuclei.lab, shot_gain * mu + read_noise ** 2 + QUANT_VAR, n) / count ** 2
    return dff_per_spike * s / np.sqrt(var)


def solve_shot_gain(nuclei: Nuclei, baseline: np.ndarray, dff_per_spike: float, read_noise: float,
                    snr: float) -> float:
    """The shot_noise_gain whose median trace_snr equals `snr` (bisection; the SNR falls as gain grows)."""
    def med(g: float) -> float:
        return float(np.median(trace_snr(nuclei, baseline, dff_per_spike, g, read_noise)))

    if med(0.0) < snr:
        raise ValueError(f"snr={snr} is out of reach: read noise alone gives a median SNR of {med(0.0):.3g}; "
                         f"lower read_noise or snr, or raise dff_per_spike")
    lo, hi = 0.0, 1.0
    while med(hi) > snr:
        lo, hi = hi, hi * 4.0
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if med(mid) > snr else (lo, mid)
    return 0.5 * (lo + hi)


class Renderer:
    """Per-neuron F (N,) -> noisy (x, y, z) uint16 Fortran-order volume, into a caller's buffer."""

    def __init__(self, shape: tuple[int, int, int], nuclei: Nuclei, neuropil: np.ndarray, offset: float,
                 shot_gain: float, read_noise: float, rng: np.random.Generator) -> None:
        self.shape = tuple(shape)
        self.size = int(np.prod(shape))
        self._nuc = nuclei
        self._neuropil = neuropil                                  # (V,) float32, F-flat
        self._c = np.float32(offset + 0.5)                         # + 0.5: truncation rounds
        self._shot, self._r2 = np.float32(shot_gain), np.float32(read_noise ** 2)
        self._rng = rng
        self._bank = rng.standard_normal(self.size + NOISE_MARGIN, dtype=np.float32)
        starts = np.arange(0, self.size, CHUNK)
        self._split = np.searchsorted(nuclei.idx, np.append(starts, self.size))  # (K+1,) nuclear range per chunk
        chunk_of = np.repeat(np.arange(len(starts)), np.diff(self._split))
        self._loc = (nuclei.idx - starts[chunk_of]).astype(np.intp)           # (M,) index inside its chunk
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        self._threads = max(1, min(MAX_THREADS, cpus, len(starts)))   # the CPUs this process may run on
        m = int(np.diff(self._split).max()) if len(starts) else 0
        self._scratch = [tuple(np.zeros(k, np.float32) for k in (CHUNK, CHUNK, m, m))
                         for _ in range(self._threads)]
        self._pool: ThreadPoolExecutor | None = None
        self._pool_pid = 0

    def check_out(self, out: np.ndarray | None) -> np.ndarray:
        """A valid output buffer: `out` itself, or a fresh one when None."""
        if out is None:
            return np.empty(self.shape, np.uint16, order="F")
        if not isinstance(out, np.ndarray) or out.shape != self.shape or out.dtype != np.uint16:
            raise ValueError(f"out must be a {self.shape} uint16 array, got "
                             f"{getattr(out, 'shape', type(out))} {getattr(out, 'dtype', '')}")
        if not out.flags.f_contiguous or not out.flags.writeable:
            raise ValueError("out must be Fortran-contiguous (x fastest) and writeable")
        return out

    def render(self, fluor: np.ndarray, neuropil_gain: float | np.float32, out: np.ndarray,
               shift: np.ndarray | None = None) -> None:
        """Write the frame for per-neuron F `fluor` (N,) float32 into `out` (checked by check_out), the
        fish moved by `shift` (x, y, z) voxels when given and non-zero."""
        o = int(self._rng.integers(0, NOISE_MARGIN + 1))
        if shift is None or not np.any(shift):
            self._render_at(o, fluor, neuropil_gain, out)
        else:
            self._render_moved(o, fluor, np.float32(neuropil_gain), out, shift)

    def expected(self, fluor: np.ndarray, neuropil_gain: float | np.float32) -> np.ndarray:
        """The noiseless expected counts above offset, mu: (x, y, z) float32, F order."""
        mu = np.multiply(self._neuropil, np.float32(neuropil_gain))
        mu[self._nuc.idx] = np.asarray(fluor, np.float32)[self._nuc.lab] * self._nuc.w
        return mu.reshape(self.shape, order="F")

    def _render_moved(self, o: int, fluor: np.ndarray, g: np.float32, out: np.ndarray, shift: np.ndarray) -> None:
        """`render` of the fish moved by `shift`: mu moved, then the camera noise (see the module doc)."""
        mu = shift_volume(self.expected(fluor, g), shift).reshape(-1, order="F")
        np.maximum(mu, 0.0, out=mu)                                 # rounding of the interpolation
        t = np.multiply(mu, self._shot)
        t += self._r2
        np.sqrt(t, out=t)
        t *= self._bank[o:o + self.size]
        t += mu
        t += self._c
        np.clip(t, 0.0, 65535.0, out=t)
        out.reshape(-1, order="F")[:] = t

    def warm_up(self, n_neurons: int, out: np.ndarray) -> None:
        """Render a blank frame into `out` (checked by check_out) at noise offset 0, drawing nothing from
        the random stream: the worker threads start and `out`'s pages are written before the first real
        frame, whose pixels stay bit-identical to an unwarmed renderer's."""
        self._render_at(0, np.zeros(n_neurons, np.float32), 1.0, out)

    def _render_at(self, o: int, fluor: np.ndarray, neuropil_gain: float | np.float32, out: np.ndarray) -> None:
        """`render` with the frame's noise offset `o` given."""
        flat = out.reshape(-1, order="F")                          # a view: out is F-contiguous
        fluor = np.ascontiguousarray(fluor, np.float32)
        g = np.float32(neuropil_gain)
        if self._threads == 1:
            self._work(0, o, fluor, g, flat)
            return
        if self._pool is None or self._pool_pid != os.getpid():   # a forked child needs its own threads
            self._pool, self._pool_pid = ThreadPoolExecutor(self._threads, "fish-render"), os.getpid()
        jobs = [self._pool.submit(self._work, w, o, fluor, g, flat) for w in range(self._threads)]
        for j in jobs:
            j.result()

    def _work(self, w: int, o: int, fluor: np.ndarray, g: np.float32, flat: np.ndarray) -> None:
        """Worker w renders chunks w, w + threads, ... with its own scratch."""
        for k in range(w, len(self._split) - 1, self._threads):
            self._chunk(k, o, fluor, g, flat, self._scratch[w])

    def _chunk(self, k: int, o: int, fluor: np.ndarray, g: np.float32, flat: np.ndarray,
               scratch: tuple[np.ndarray, ...]) -> None:
        a = k * CHUNK
        b = min(self.size, a + CHUNK)
        t, t2 = scratch[0][:b - a], scratch[1][:b - a]
        p, z = self._neuropil[a:b], self._bank[o + a:o + b]
        np.multiply(p, self._shot * g, out=t2)                      # background + neuropil: shot + read
        t2 += self._r2
        np.sqrt(t2, out=t2)
        t2 *= z
        np.multiply(p, g, out=t)
        t += t2
        t += self._c
        na, nb = self._split[k], self._split[k + 1]
        if nb > na:                                                 # nuclei: signal-dependent noise
            loc, s, q = self._loc[na:nb], scratch[2][:nb - na], scratch[3][:nb - na]
            np.take(fluor, self._nuc.lab[na:nb], out=s)
            s *= self._nuc.w[na:nb]
            np.multiply(s, self._shot, out=q)
            q += self._r2
            np.sqrt(q, out=q)
            q *= z[loc]
            s += q
            s += self._c
            t[loc] = s
        np.clip(t, 0.0, 65535.0, out=t)
        flat[a:b] = t


def shift_volume(vol: np.ndarray, shift: np.ndarray | tuple[float, ...]) -> np.ndarray:
    """`vol` (x, y, z) moved by `shift` voxels per axis: out(v) = vol(v - shift), linear interpolation along
    each axis (trilinear), zero where v - shift falls outside. A new float32 array in vol's memory order."""
    out = np.asarray(vol, np.float32)
    for axis, s in enumerate(float(x) for x in shift):
        if s != 0.0:
            out = _shift_axis(out, axis, s)
    return out if out is not vol else out.copy()


def _shift_axis(v: np.ndarray, axis: int, s: float) -> np.ndarray:
    """`v` moved by s voxels along `axis`: (1 - f) v[i - n] + f v[i - n - 1], n = floor(s), f = s - n."""
    n = math.floor(s)
    f = np.float32(s - n)
    out = np.zeros_like(v)
    _add_moved(out, v, axis, n, np.float32(1.0) - f)
    _add_moved(out, v, axis, n + 1, f)
    return out


def _add_moved(out: np.ndarray, v: np.ndarray, axis: int, k: int, w: np.float32) -> None:
    """out[i] += w * v[i - k] along `axis`, where i - k is inside."""
    size = v.shape[axis]
    if w == 0 or abs(k) >= size:
        return
    dst, src = [slice(None)] * v.ndim, [slice(None)] * v.ndim
    dst[axis], src[axis] = slice(max(k, 0), size + min(k, 0)), slice(max(-k, 0), size - max(k, 0))
    out[tuple(dst)] += w * v[tuple(src)]
