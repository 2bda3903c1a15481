"""Traces read through a rigid shift, without warping the volume (the registration's application).

Application (`ShiftedTraces`): no warp of the volume. Each neuron's mean is taken over the volume sampled at
(voxel + shift) of its voxels, trilinear in the sub-voxel part, from the segmentation's precomputed voxel
coordinates (the CSR order of `TraceExtractor`); coordinates outside the volume are clamped to its edge.
A whole-voxel shift reads one voxel per labelled voxel (the plain trace pass at an offset): with
`interpolation = "nearest"` the stage rounds the shift so (at ZAPBench's 0.4 um x/y voxels, a rounding of
<= 0.2 um; in z, <= half a 4 um plane: the price of the speed, docs/preprocessing.md).
With a zero (or integer) shift the traces are those of `TraceExtractor` on the (shifted) volume exactly,
for finite volumes (at a fractional shift a non-finite voxel next to a neuron reaches it through a zero
weight: 0 * inf = nan; a whole-voxel shift reads only the neuron's own, shifted voxels).
"""
from __future__ import annotations

import numba
import numpy as np
from numpy.typing import NDArray

from loopcast.realtime.jit import njit, read_only
from loopcast.realtime.preprocess.registration import Shift
from loopcast.realtime.preprocess.traces import TraceExtractor, TraceStats
from loopcast.realtime.wire.codec import Order, volume_order


@njit(parallel=True, nogil=True)
def _shifted_means(vol: NDArray[np.generic], flat: NDArray[np.generic], idx: NDArray[np.integer],
                   coords: NDArray[np.int32], offsets: NDArray[np.int64], inv_counts: NDArray[np.float64],
                   box: NDArray[np.int32], base: NDArray[np.int64], corner: NDArray[np.int64],
                   weight: NDArray[np.float64], near: int, sat_value: float, out: NDArray[np.float32],
                   sat: NDArray[np.int32]) -> None:  # pragma: no cover (compiled)
    """Fast path (the neuron's shifted box + 1 inside the volume): 8 reads at flat offsets, no clamping (one
    read for a whole-voxel shift: `weight` (1,), the plain trace pass moved by an offset). `sat[i]`: neuron
    i's samples whose nearest voxel (corner `near`, the largest weight) is >= sat_value."""
    n = vol.shape
    for i in numba.prange(out.shape[0]):
        inside = True
        for a in range(3):
            inside &= box[i, a] + base[a] >= 0 and box[i, 3 + a] + base[a] + 1 < n[a]
        s = 0.0
        n_sat = 0
        if inside and weight.shape[0] == 1:     # whole voxels: the plain pass at an offset
            off = corner[0] + corner[1]
            for j in range(offsets[i], offsets[i + 1]):
                x = flat[idx[j] + off]
                s += x
                n_sat += x >= sat_value
        elif inside:
            for j in range(offsets[i], offsets[i + 1]):
                p = idx[j] + corner[0]
                v = 0.0
                for c in range(weight.shape[0]):
                    v += weight[c] * flat[p + corner[c + 1]]
                s += v
                n_sat += flat[p + corner[near + 1]] >= sat_value
        else:
            for j in range(offsets[i], offsets[i + 1]):
                v, hit = _clamped_sample(vol, coords[j], base, weight, near, sat_value)
                s += v
                n_sat += hit
        out[i] = s * inv_counts[i]
        sat[i] = n_sat


@njit(nogil=True, inline="always")
def _clamped_sample(vol: NDArray[np.generic], at: NDArray[np.int32], base: NDArray[np.int64],
                    weight: NDArray[np.float64], near: int,
                    sat_value: float) -> tuple[float, bool]:  # pragma: no cover (compiled)
    """Trilinear sample at `at` + base (+ the fractions in `weight`), coordinates clamped to the volume; and
    whether its nearest voxel (corner `near`) is saturated."""
    v = 0.0
    hit = False
    for c in range(weight.shape[0]):
        x = min(max(at[0] + base[0] + (c >> 2), 0), vol.shape[0] - 1)
        y = min(max(at[1] + base[1] + ((c >> 1) & 1), 0), vol.shape[1] - 1)
        z = min(max(at[2] + base[2] + (c & 1), 0), vol.shape[2] - 1)
        value = vol[x, y, z]
        v += weight[c] * value
        hit |= c == near and value >= sat_value
    return v, hit


class ShiftedTraces:
    """Per-neuron means of a volume sampled at (voxel + shift), trilinear; `TraceExtractor`'s voxel order."""

    def __init__(self, extractor: TraceExtractor) -> None:
        self.shape = extractor.shape
        self.n_neurons = extractor.n_neurons
        self._extractor = extractor
        idx = extractor.indices("C").astype(np.int64)
        self._coords = np.stack(np.unravel_index(idx, self.shape), axis=1).astype(np.int32)
        self._offsets = extractor.offsets
        self._inv_counts = 1.0 / np.diff(self._offsets).astype(np.float64)
        starts = self._offsets[:-1]
        self._box = np.concatenate([np.minimum.reduceat(self._coords, starts, axis=0),
                                    np.maximum.reduceat(self._coords, starts, axis=0)], axis=1).astype(np.int32)
        self._sat = np.empty(self.n_neurons, np.int32)

    def process(self, volume: NDArray[np.generic], shift: Shift | NDArray[np.float64]) -> NDArray[np.float32]:
        """volume (x, y, z), C- or F-contiguous, and its shift -> (N,) float32 neuron means."""
        return self.process_with_stats(volume, shift)[0]

    def process_with_stats(self, volume: NDArray[np.generic],
                           shift: Shift | NDArray[np.float64]) -> tuple[NDArray[np.float32], TraceStats]:
        """(N,) float32 neuron means and the saturation counts of `TraceExtractor` (a sample whose nearest
        voxel is at the integer dtype's maximum counts as a saturated voxel)."""
        if tuple(volume.shape) != self.shape:
            raise ValueError(f"volume shape {volume.shape} != segmentation shape {self.shape}")
        d = shift.as_array() if isinstance(shift, Shift) else np.asarray(shift, np.float64)
        base = np.floor(d).astype(np.int64)
        order = volume_order(volume)
        out = np.empty(self.n_neurons, np.float32)
        vol = read_only(volume)
        frac = d - base
        weight = _weights(frac) if frac.any() else np.ones(1)      # a whole-voxel shift: one read per voxel
        sat_value = float(np.iinfo(vol.dtype.str).max) if vol.dtype.kind in "ui" else np.inf
        _shifted_means(vol, vol.reshape(-1, order=order), self._extractor.indices(order), self._coords,
                       self._offsets, self._inv_counts, self._box, base, self._corners(base, order),
                       weight, int(np.argmax(weight)), sat_value, out, self._sat)
        n_sat = int(self._sat.sum())
        return out, TraceStats(n_sat, int(np.count_nonzero(self._sat)) if n_sat else 0)

    def _corners(self, base: NDArray[np.int64], order: Order) -> NDArray[np.int64]:
        """(9,) flat offsets: the base shift's, then the 8 corners' (x, y, z bits of c = 0..7)."""
        strides = np.array(_elem_strides(self.shape, order))
        bits = np.array([[c >> 2, (c >> 1) & 1, c & 1] for c in range(8)])
        return np.concatenate([[int(base @ strides)], bits @ strides]).astype(np.int64)


def _elem_strides(shape: tuple[int, ...], order: Order) -> list[int]:
    """Element strides of an array of `shape` in memory `order`."""
    dims = shape if order == "F" else shape[::-1]
    acc, out = 1, []
    for n in dims:
        out.append(acc)
        acc *= n
    return out if order == "F" else out[::-1]


def _weights(frac: NDArray[np.float64]) -> NDArray[np.float64]:
    """(8,) trilinear weights of the corners c = 0..7 (x, y, z bits) for fractions `frac`."""
    return np.array([(frac[0] if c >> 2 else 1 - frac[0]) * (frac[1] if (c >> 1) & 1 else 1 - frac[1])
                     * (frac[2] if c & 1 else 1 - frac[2]) for c in range(8)])
