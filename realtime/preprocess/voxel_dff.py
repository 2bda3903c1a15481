"""Per-voxel causal dF/F of xy-downsampled volumes (e.g. 2048 x 1328 x 72 -> 512 x 332 x 72).

`downsample_xy` averages f x f blocks in x and y (z untouched), compiled and parallel, for volumes in
C or F order. `VoxelDff` then keeps a causal baseline per voxel with a documented approximation, a
decimated window: the V voxels (C flat order) are split into `decimate` contiguous slabs, slab j takes
a sample only on frames t with t % decimate == j, and a voxel's F0 is the exact percentile
(numpy "linear") of its last window // decimate samples (its samples inside the trailing `window`
frames when decimate divides window). So each frame updates the running percentiles of only 1/decimate
of the voxels, while dF/F = clip((F_t - F0) / max(F0, min_baseline)) uses the current frame for every
voxel. decimate=1 is exactly `realtime.preprocess.dff.causal_dff_reference` applied voxel-wise.

Warm-up: a voxel with no sample yet (slab j before frame j) takes the current frame as F0 (dF/F 0).
A non-finite voxel repeats its slab's latest sample of that voxel (0 before the first), is counted in
`DffStats.nonfinite` and used as such.

Memory: the running state (realtime.preprocess.percentile) is 4 S + 8 (K + slack + 2 + 2 margin) + 40 bytes
per voxel, S = window // decimate samples (K = 5 for S = 50, p = 8): 392 bytes, 4.8 GB for
512 x 332 x 72 voxels at the defaults (decimate 8), written at construction (seconds), plus a (V,)
float32 baseline. Without decimation (S = 400) it would be ~25 GB.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numba
import numpy as np
from numpy.typing import NDArray

from loopcast.realtime.jit import njit, read_only
from loopcast.realtime.preprocess.dff import DffStats, count_nonfinite, ratio_into
from loopcast.realtime.preprocess.percentile import RunningPercentile

VOXEL_SLACK = 8                  # low-set slack per voxel (short windows: keep the state small)
VOXEL_MARGIN = 2
Z_GROUP = 8                      # planes per pass of the F-order downsample (their row sums in L1/L2)


@dataclass(frozen=True)
class VoxelDffConfig:
    """Per-voxel causal dF/F parameters (window, warm-up in frames; decimate in frames per sample)."""

    window: int = 400
    percentile: float = 8.0
    warmup: int = 10
    decimate: int = 8
    min_baseline: float = 1.0
    clip_min: float = -0.25
    clip_max: float = 1.5

    def __post_init__(self) -> None:
        if self.decimate < 1 or self.window < self.decimate:
            raise ValueError("decimate must be in [1, window]")
        if not 0.0 <= self.percentile <= 100.0 or not 1 <= self.warmup <= self.window:
            raise ValueError("percentile must be in [0, 100] and warmup in [1, window]")
        if self.min_baseline <= 0 or self.clip_min >= self.clip_max:
            raise ValueError("min_baseline must be > 0 and clip_min < clip_max")

    @property
    def samples(self) -> int:
        """Samples per voxel in its running window."""
        return self.window // self.decimate


@njit(parallel=True, nogil=True)
def _down_c(vol: NDArray[Any], f: int, out: NDArray[np.float32]) -> None:  # pragma: no cover (compiled)
    """vol (X, Y, Z) C order -> out (X//f, Y//f, Z): block means, rows read in memory order."""
    nx, ny, nz = out.shape
    inv = np.float32(f * f)
    for i in numba.prange(nx):
        out[i] = 0.0
        for a in range(f):
            for j in range(ny):
                for b in range(f):
                    for z in range(nz):
                        out[i, j, z] += np.float32(vol[f * i + a, f * j + b, z])
        for j in range(ny):
            for z in range(nz):
                out[i, j, z] /= inv


@njit(parallel=True, nogil=True)
def _down_f(vol_t: NDArray[Any], f: int, out: NDArray[np.float32]) -> None:  # pragma: no cover (compiled)
    """vol_t (Z, Y, X) C order (an F-order volume's transpose) -> out (X//f, Y//f, Z) C order. Per
    output row j and group of Z_GROUP planes: the f input rows of each plane are summed in memory
    order (vectorised), then reduced in x straight into z-contiguous output columns."""
    nx, ny, nz = out.shape
    inv = np.float32(f * f)
    for j in numba.prange(ny):
        rows = np.empty((Z_GROUP, f * nx), np.float32)       # row sums over y of a plane group
        for z0 in range(0, nz, Z_GROUP):
            nzg = min(Z_GROUP, nz - z0)
            for g in range(nzg):
                for x in range(f * nx):
                    rows[g, x] = np.float32(vol_t[z0 + g, f * j, x])
                for b in range(1, f):
                    for x in range(f * nx):
                        rows[g, x] += np.float32(vol_t[z0 + g, f * j + b, x])
            for i in range(nx):
                for g in range(nzg):
                    s = rows[g, f * i]
                    for a in range(1, f):
                        s += rows[g, f * i + a]
                    out[i, j, z0 + g] = s / inv


def downsample_xy(volume: np.ndarray, factor: int = 4, out: np.ndarray | None = None) -> np.ndarray:
    """volume (X, Y, Z) uint16 or float32, C- or F-contiguous -> (X//f, Y//f, Z) float32 C order, the
    mean of each f x f block in x, y. A remainder of X or Y not divisible by f is cropped (the last
    X % f rows / Y % f columns are dropped). Sums are float32 (exact for uint16 while f <= 16)."""
    if volume.ndim != 3 or volume.dtype not in (np.uint16, np.float32) or factor < 1:
        raise ValueError(f"need a 3-D uint16/float32 volume and factor >= 1, got {volume.shape} "
                         f"{volume.dtype}, factor {factor}")
    shape = (volume.shape[0] // factor, volume.shape[1] // factor, volume.shape[2])
    if out is None:
        out = np.empty(shape, np.float32)
    elif out.shape != shape or out.dtype != np.float32 or not out.flags.c_contiguous:
        raise ValueError(f"out must be a C-contiguous float32 array of shape {shape}")
    if volume.flags.f_contiguous and not volume.flags.c_contiguous:
        _down_f(read_only(volume.T), factor, out)
    else:
        _down_c(read_only(np.ascontiguousarray(volume)), factor, out)
    return out


class VoxelDff:
    """Online per-voxel causal dF/F of (X, Y, Z) volumes with a decimated baseline window."""

    def __init__(self, shape: tuple[int, int, int], cfg: VoxelDffConfig) -> None:
        self.shape = tuple(int(s) for s in shape)
        self.cfg = cfg
        self.n_voxels = int(np.prod(self.shape))
        self.frames = 0
        edges = np.linspace(0, self.n_voxels, cfg.decimate + 1).round().astype(np.int64)
        self._slabs = [slice(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:])]
        self._running: list[RunningPercentile] = []
        self._start_over()
        self._f0 = np.empty(self.n_voxels, np.float32)          # (V,) current baselines
        self._bounds = (np.float32(cfg.min_baseline), np.float32(cfg.clip_min),
                        np.float32(cfg.clip_max))

    @property
    def ready(self) -> bool:
        return self.frames >= self.cfg.warmup

    def _start_over(self) -> None:
        """The state as constructed, no frame seen: the running percentiles built anew (the old ones
        released first, so the state is never held twice)."""
        self._running = []
        self._running = [RunningPercentile(s.stop - s.start, self.cfg.samples, self.cfg.percentile,
                                           slack=VOXEL_SLACK, margin=VOXEL_MARGIN,
                                           check_finite=False) for s in self._slabs]
        self.frames = 0

    def warm_up(self) -> None:
        """Run `process` on synthetic volumes for `decimate` frames (every slab's kernels; the last frame
        with a NaN voxel to repair), then start over from the state as constructed. Unlike the per-neuron
        stages this one warms itself rather than a throwaway: its state takes GBs (4.8 GB at 512 x 332 x 72),
        which a second copy would double."""
        volume = np.full(self.shape, 100.0, np.float32)
        for k in range(self.cfg.decimate):
            if k == self.cfg.decimate - 1:
                volume.flat[0] = np.nan
            self.process(volume)
        self._start_over()

    def process(self, volume: np.ndarray, out: np.ndarray | None = None) -> tuple[np.ndarray, DffStats]:
        """volume (X, Y, Z) -> ((X, Y, Z) float32 dF/F, into `out` when given; repair stats)."""
        if tuple(volume.shape) != self.shape:
            raise ValueError(f"expected a volume of shape {self.shape}, got {tuple(volume.shape)}")
        if out is None:
            out = np.empty(self.shape, np.float32)
        elif out.shape != self.shape or out.dtype != np.float32 or not out.flags.c_contiguous:
            raise ValueError(f"out must be a C-contiguous float32 array of shape {self.shape}")
        flat = np.ascontiguousarray(volume, dtype=np.float32).reshape(-1)   # (V,) C order
        j = self.frames % self.cfg.decimate
        slab, running = self._slabs[j], self._running[j]
        x = flat[slab]
        if count_nonfinite(x):                                   # repaired before it is a sample
            x = np.where(np.isfinite(x), x, running.newest())
        running.push_value(x, out=self._f0[slab])
        self.frames += 1
        floored, nonfinite = self._ratio(flat, out.reshape(-1))
        if nonfinite:                                            # rare: repair and recompute
            floored, _ = self._ratio(self._repaired(flat), out.reshape(-1))
        return out, DffStats(nonfinite, floored)

    def _ratio(self, flat: np.ndarray, out: np.ndarray) -> tuple[int, int]:
        """dF/F of every voxel into out (V,); slabs without a sample yet use F0 = F."""
        for k in range(self.frames, self.cfg.decimate):
            self._f0[self._slabs[k]] = flat[self._slabs[k]]
        return ratio_into(flat, self._f0, self._bounds, out)

    def _repaired(self, flat: np.ndarray) -> np.ndarray:
        """A copy of flat with each non-finite voxel replaced by its latest sample (0 before any)."""
        flat = flat.copy()
        for slab, running in zip(self._slabs, self._running):
            part = flat[slab]
            bad = ~np.isfinite(part)
            if bad.any():
                part[bad] = running.newest()[bad]
        return flat
