"""Segmentation -> per-neuron mean fluorescence of each volume, with the index precomputed once."""
from __future__ import annotations

import numpy as np

from realtime.wire import volume_order


class TraceExtractor:
    """Mean intensity of each labelled neuron (labels 1..N; 0 is background), no loop over neurons."""

    def __init__(self, segmentation: np.ndarray) -> None:
        if segmentation.ndim != 3 or segmentation.dtype.kind not in "ui":
            raise ValueError(f"segmentation must be a 3-D integer array, got {segmentation.shape} "
                             f"{segmentation.dtype}")
        flat = segmentation.ravel()                          # C order; F-order indices made on demand
        self.shape = tuple(segmentation.shape)
        self._idx = np.flatnonzero(flat)                     # foreground voxels
        self._labels = (flat[self._idx] - 1).astype(np.intp)  # 0-based neuron id per voxel
        self.n_neurons = int(self._labels.max()) + 1 if self._labels.size else 0
        counts = np.bincount(self._labels, minlength=self.n_neurons)
        empty = np.flatnonzero(counts == 0)
        if self.n_neurons == 0 or empty.size:
            raise ValueError(f"segmentation labels must cover 1..N without gaps; "
                             f"{empty.size} label(s) have no voxels, e.g. {(empty[:5] + 1).tolist()}")
        self._inv_counts = (1.0 / counts).astype(np.float64)
        self._f_idx: np.ndarray | None = None

    def _indices(self, order: str) -> np.ndarray:
        """Flat voxel indices of the labelled voxels for a volume stored in `order` ("C" or "F")."""
        if order == "C":
            return self._idx
        if self._f_idx is None:
            self._f_idx = np.ravel_multi_index(np.unravel_index(self._idx, self.shape), self.shape, order="F")
        return self._f_idx

    def process(self, volume: np.ndarray) -> np.ndarray:
        """volume (x, y, z), C- or F-contiguous -> (N,) float32 mean over each neuron's voxels."""
        if tuple(volume.shape) != self.shape:
            raise ValueError(f"volume shape {volume.shape} != segmentation shape {self.shape}")
        order = volume_order(volume)
        values = volume.reshape(-1, order=order)[self._indices(order)]   # labels stay in C-index order
        sums = np.bincount(self._labels, weights=values, minlength=self.n_neurons)
        return (sums * self._inv_counts).astype(np.float32)
