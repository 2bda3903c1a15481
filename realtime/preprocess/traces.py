"""Segmentation -> per-neuron mean fluorescence of each volume, with the index precomputed once.

The segmentation is turned into a CSR index once: the flat voxel indices of every neuron, grouped by
neuron (`offsets[i]:offsets[i+1]`), kept for both memory orders a volume can arrive in (C and F). Each
frame is then one compiled pass over the labelled voxels, parallel over neurons, that also counts
saturated voxels (at the integer dtype's maximum). `method="bincount"` keeps the plain numpy
gather + weighted bincount as the benchmark's naive reference.

Saturation: a neuron with saturated voxels keeps its mean (a lower bound of the true value) and is
counted in `TraceStats.saturated_neurons`; a float volume's NaN/inf voxels make that neuron's mean
non-finite, which the dF/F stage repairs and counts.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numba
import numpy as np
from numpy.typing import NDArray

from loopcast.realtime.jit import njit, read_only
from loopcast.realtime.wire.codec import Order, volume_order

METHODS = ("csr", "bincount")


@dataclass(frozen=True)
class TraceStats:
    """What one volume held that the traces cannot represent exactly."""

    saturated_voxels: int
    saturated_neurons: int


@njit(parallel=True, nogil=True)
def _csr_means(flat: NDArray[Any], idx: NDArray[np.integer], offsets: NDArray[np.int64],
               inv_counts: NDArray[np.float64], sat_value: float, out: NDArray[np.float32],
               sat: NDArray[np.int32]) -> None:  # pragma: no cover (compiled)
    for i in numba.prange(out.shape[0]):
        s = 0.0
        n_sat = 0
        for j in range(offsets[i], offsets[i + 1]):
            v = flat[idx[j]]
            s += v
            n_sat += v >= sat_value
        out[i] = s * inv_counts[i]
        sat[i] = n_sat


def neuron_count(segmentation: np.ndarray) -> int:
    """N of a segmentation labelled 1..N (0 is background): its largest label."""
    return int(segmentation.max()) if segmentation.size else 0


class TraceExtractor:
    """Mean intensity of each labelled neuron (labels 1..N; 0 is background), no loop over neurons."""

    def __init__(self, segmentation: np.ndarray, method: str = "csr") -> None:
        if segmentation.ndim != 3 or segmentation.dtype.kind not in "ui":
            raise ValueError(f"segmentation must be a 3-D integer array, got {segmentation.shape} "
                             f"{segmentation.dtype}")
        if method not in METHODS:
            raise ValueError(f"unknown trace extraction method {method!r}; available: {list(METHODS)}")
        self.method = method
        self.shape = tuple(int(s) for s in segmentation.shape)
        flat = segmentation.ravel()                              # C order; F-order indices made on demand
        fg = np.flatnonzero(flat)                                # foreground voxels, C-index order
        labels = (flat[fg] - 1).astype(np.intp)                  # 0-based neuron id per voxel
        self.n_neurons = neuron_count(segmentation)
        counts = np.bincount(labels, minlength=self.n_neurons)
        empty = np.flatnonzero(counts == 0)
        if self.n_neurons == 0 or empty.size:
            raise ValueError(f"segmentation labels must cover 1..N without gaps; "
                             f"{empty.size} label(s) have no voxels, e.g. {(empty[:5] + 1).tolist()}")
        self.n_voxels = int(fg.size)
        self._inv_counts = 1.0 / counts.astype(np.float64)
        by_neuron = np.argsort(labels, kind="stable")
        self._offsets: NDArray[np.int64] = np.r_[0, np.cumsum(counts)].astype(np.int64)
        index_dtype = np.int32 if segmentation.size < 2**31 else np.int64
        self._idx = {"C": fg[by_neuron].astype(index_dtype)}    # grouped by neuron
        self._fg, self._labels = fg, labels                      # the naive path's arrays
        self._f_fg: np.ndarray | None = None
        self._sat = np.empty(self.n_neurons, np.int32)

    def indices(self, order: Order) -> np.ndarray:
        """Flat indices (grouped by neuron, see `offsets`) of the labelled voxels for `order` "C" or "F"."""
        if order not in self._idx:
            c = self._idx["C"].astype(np.int64)
            self._idx[order] = np.ravel_multi_index(np.unravel_index(c, self.shape), self.shape,
                                                    order=order).astype(self._idx["C"].dtype)
        return self._idx[order]

    @property
    def offsets(self) -> np.ndarray:
        """(N + 1,) int64: neuron i owns indices(order)[offsets[i]:offsets[i + 1]]."""
        return self._offsets

    def warm_up(self, dtype: str) -> None:
        """Extract traces once from a synthetic volume of `dtype` in each memory order: compiles (or loads)
        the kernel for that dtype and builds the F-order index, neither of which a first frame should wait
        for. Nothing is kept but that index."""
        for order in ("F", "C"):
            self.process_with_stats(np.zeros(self.shape, dtype, order=order))

    def process(self, volume: np.ndarray) -> np.ndarray:
        """volume (x, y, z), C- or F-contiguous -> (N,) float32 mean over each neuron's voxels."""
        return self.process_with_stats(volume)[0]

    def process_with_stats(self, volume: np.ndarray) -> tuple[np.ndarray, TraceStats]:
        """volume (x, y, z) -> ((N,) float32 means, saturation counts)."""
        if tuple(volume.shape) != self.shape:
            raise ValueError(f"volume shape {volume.shape} != segmentation shape {self.shape}")
        order = volume_order(volume)
        flat = volume.reshape(-1, order=order)
        if self.method == "bincount":
            return self._bincount(flat, order), TraceStats(0, 0)
        sat_value = np.iinfo(flat.dtype).max if flat.dtype.kind in "ui" else np.inf
        out = np.empty(self.n_neurons, np.float32)
        _csr_means(read_only(flat), self.indices(order), self._offsets, self._inv_counts, sat_value, out, self._sat)
        if sat_value == np.inf:
            return out, TraceStats(0, 0)
        n_sat = int(self._sat.sum())
        return out, TraceStats(n_sat, int(np.count_nonzero(self._sat)) if n_sat else 0)

    def _bincount(self, flat: np.ndarray, order: Order) -> np.ndarray:
        """The naive reference: gather in C-index order, weighted bincount by label."""
        if order == "F" and self._f_fg is None:
            self._f_fg = np.ravel_multi_index(np.unravel_index(self._fg, self.shape), self.shape, order="F")
        values = flat[self._fg if order == "C" else self._f_fg]
        sums = np.bincount(self._labels, weights=values, minlength=self.n_neurons)
        return (sums * self._inv_counts).astype(np.float32)
