"""Predicted dF/F frames -> per-neuron traces: the video model's output grid and its reduction.

The video model sees the dF/F volume mean-downsampled by `factor` in x and y (ZAPBench's level 2:
factor 4), optionally centre-cropped in y to rows [y0, y1) of the downsampled volume, and predicts a
frame upsampled by 2**super_resolution in x and y. Output voxel (i, j, k) stands for the full-resolution
voxel (i*s, y0*factor + j*s, k), s = factor // 2**super_resolution (the grid's `stride`).

Per-neuron traces are means over the strided full-resolution segmentation
seg[::s, y0*f : (y0+crop)*f : s, :] (ZAPBench: "segmentation downsampled using striding"). A neuron
with no voxel left after striding takes the one output voxel nearest its centroid (computed from the
full segmentation): `fallback_outside_crop` when that centroid lies outside the region the output
grid covers (the y crop, or an x remainder dropped by downsampling), `fallback_lost` otherwise.
Neurons are counted, never dropped. The index arrays (voxel_index, neuron_index, counts) are what
the training loss uses in torch; `reduce` applies them as a sparse (N, V') mean matrix.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.sparse as sp

SUPER_RESOLUTIONS = (0, 1, 2)


def centre_crop(y_size: int, crop: int) -> tuple[int, int]:
    """Rows (y0, y1) of a centre crop keeping `crop` of `y_size` rows (crop 0 = everything)."""
    if y_size < 1 or crop < 0 or crop > y_size:
        raise ValueError(f"crop_y must be in [0, {y_size}] (0 = no crop), got {crop} for {y_size} rows")
    if crop == 0:
        return 0, int(y_size)
    y0 = (y_size - crop) // 2
    return int(y0), int(y0 + crop)


def crop_y(volume: np.ndarray, crop: tuple[int, int]) -> np.ndarray:
    """volume (..., X, Y, Z) -> (..., X, y1 - y0, Z), a view of rows [y0, y1) of axis -2."""
    y0, y1 = (int(c) for c in crop)
    if volume.ndim < 3 or not 0 <= y0 < y1 <= volume.shape[-2]:
        raise ValueError(f"crop {crop} does not fit a volume of shape {volume.shape} (need (..., X, Y, Z) "
                         f"and 0 <= y0 < y1 <= Y)")
    return volume[..., y0:y1, :]


@dataclass(frozen=True)
class VideoGrid:
    """Geometry of the video model's output frame relative to the full-resolution volume."""

    factor: int
    crop_y: tuple[int, int]
    super_resolution: int
    output_shape: tuple[int, int, int]

    def __post_init__(self) -> None:
        object.__setattr__(self, "crop_y", tuple(int(c) for c in self.crop_y))
        object.__setattr__(self, "output_shape", tuple(int(s) for s in self.output_shape))
        f, sr, (y0, y1) = self.factor, self.super_resolution, self.crop_y
        if sr not in SUPER_RESOLUTIONS:
            raise ValueError(f"super_resolution must be one of {SUPER_RESOLUTIONS}, got {sr}")
        if f < 1 or f % 2 ** sr:
            raise ValueError(f"factor must be >= 1 and divisible by 2**super_resolution = {2 ** sr}, got {f}")
        if len(self.output_shape) != 3 or min(self.output_shape) < 1:
            raise ValueError(f"output_shape must be 3 positive sizes (X', Y', Z'), got {self.output_shape}")
        if not 0 <= y0 < y1 or self.output_shape[1] != (y1 - y0) * 2 ** sr:
            raise ValueError(f"crop_y {self.crop_y} (downsampled rows) and super_resolution {sr} imply "
                             f"Y' = {(y1 - y0) * 2 ** sr}, but output_shape is {self.output_shape}")
        if self.output_shape[0] % 2 ** sr:
            raise ValueError(f"output X' = {self.output_shape[0]} is not a multiple of 2**super_resolution")

    @property
    def stride(self) -> int:
        """Full-resolution voxels between neighbouring output voxels in x and y."""
        return self.factor >> self.super_resolution        # factor // 2 ** super_resolution

    @property
    def y_offset(self) -> int:
        """Full-resolution y of output row 0."""
        return self.crop_y[0] * self.factor

    @classmethod
    def from_manifest(cls, video: dict[str, Any]) -> VideoGrid:
        """The grid of an engine manifest's "video" block (level, factor, crop_y, super_resolution, ...)."""
        missing = [k for k in ("factor", "crop_y", "super_resolution", "output_shape") if k not in video]
        if missing:
            raise ValueError(f"video manifest block lacks {missing}; found keys {sorted(video)}")
        if "level" in video and 2 ** int(video["level"]) != int(video["factor"]):
            raise ValueError(f"video manifest: factor {video['factor']} != 2**level ({video['level']})")
        crop = tuple(video["crop_y"])
        if len(crop) != 2:
            raise ValueError(f"video manifest: crop_y must be [y0, y1], got {video['crop_y']}")
        return cls(int(video["factor"]), crop, int(video["super_resolution"]), tuple(video["output_shape"]))


class VolumeReducer:
    """Per-neuron means of output frames through the strided full-resolution segmentation."""

    def __init__(self, segmentation: np.ndarray, grid: VideoGrid, n_neurons: int | None = None) -> None:
        if segmentation.ndim != 3 or segmentation.dtype.kind not in "ui":
            raise ValueError(f"segmentation must be a 3-D integer array, got {segmentation.shape} "
                             f"{segmentation.dtype}")
        self.grid = grid
        self.output_shape = grid.output_shape
        counts, centroids = _label_stats(segmentation)
        self.n_neurons = _check_labels(counts, n_neurons)
        strided = _strided(segmentation, grid)
        flat = strided.ravel()                                           # C order over (X', Y', Z')
        fg = np.flatnonzero(flat).astype(np.int64)
        labels = flat[fg].astype(np.int64) - 1
        have = np.bincount(labels, minlength=self.n_neurons) > 0
        lost = np.flatnonzero(~have)
        vox, outside = _nearest_voxels(centroids[lost], grid)
        order = np.argsort(np.r_[labels, lost], kind="stable")           # grouped by neuron
        self.voxel_index: np.ndarray = np.r_[fg, vox].astype(np.int64)[order]
        self.neuron_index: np.ndarray = np.r_[labels, lost].astype(np.int64)[order]
        self.counts: np.ndarray = np.bincount(self.neuron_index, minlength=self.n_neurons).astype(np.float32)
        self.stats: dict[str, int] = {"neurons": self.n_neurons, "strided": int(have.sum()),
                                      "fallback_lost": int((~outside).sum()),
                                      "fallback_outside_crop": int(outside.sum())}
        self.fallback_neurons: np.ndarray = lost.astype(np.int64)
        weights = (1.0 / self.counts[self.neuron_index]).astype(np.float32)
        self._matrix = sp.csr_matrix((weights, (self.neuron_index, self.voxel_index)),
                                     shape=(self.n_neurons, int(np.prod(self.output_shape))))

    def __repr__(self) -> str:
        return f"VolumeReducer(output_shape={self.output_shape}, stride={self.grid.stride}, stats={self.stats})"

    def reduce(self, frames: np.ndarray) -> np.ndarray:
        """frames (B, X', Y', Z') float32 -> (B, N) float32 mean over each neuron's voxels."""
        if not isinstance(frames, np.ndarray) or frames.dtype != np.float32 or frames.ndim != 4 \
                or tuple(frames.shape[1:]) != self.output_shape:
            raise ValueError(f"expected frames (B, {', '.join(map(str, self.output_shape))}) float32, got "
                             f"{getattr(frames, 'shape', None)} {getattr(frames, 'dtype', type(frames).__name__)}")
        flat = frames.reshape(frames.shape[0], -1)                       # (B, V') C order (copies if needed)
        return np.ascontiguousarray((self._matrix @ flat.T).T, dtype=np.float32)   # (B, N)


def _label_stats(seg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Voxel counts (L+1,) per label and centroids (L+1, 3) x, y, z, one z plane at a time (bounded memory)."""
    n_lab = int(seg.max()) + 1 if seg.size else 1
    counts = np.zeros(n_lab, np.int64)
    sums = np.zeros((n_lab, 3), np.float64)
    for z in range(seg.shape[2]):
        plane = seg[:, :, z]
        xs, ys = np.nonzero(plane)
        lab = plane[xs, ys].astype(np.int64)
        c = np.bincount(lab, minlength=n_lab)
        counts += c
        sums[:, 0] += np.bincount(lab, weights=xs, minlength=n_lab)
        sums[:, 1] += np.bincount(lab, weights=ys, minlength=n_lab)
        sums[:, 2] += c * z
    centroids = sums / np.maximum(counts, 1)[:, None]
    return counts, centroids[1:]                                          # centroids of neuron i = label i+1


def _check_labels(counts: np.ndarray, n_neurons: int | None) -> int:
    """N (from n_neurons or the largest label); every label 1..N must have voxels, none may exceed N."""
    n_max = len(counts) - 1
    n = n_max if n_neurons is None else int(n_neurons)
    if n < 1 or n_max > n:
        raise ValueError(f"segmentation has labels up to {n_max} but n_neurons is {n} (labels must be 1..N)")
    present = np.zeros(n, bool)
    present[: n_max] = counts[1:] > 0
    absent = np.flatnonzero(~present)
    if absent.size:
        raise ValueError(f"{absent.size} neuron(s) have no voxel in the full segmentation, e.g. labels "
                         f"{(absent[:5] + 1).tolist()}")
    return n


def _strided(seg: np.ndarray, grid: VideoGrid) -> np.ndarray:
    """seg[::s, y0*f : ... : s, :] cut to the output shape (X', Y', Z'); ValueError if it does not fit."""
    s, (nx, ny, nz), y = grid.stride, grid.output_shape, grid.y_offset
    out = seg[: nx * s: s, y: y + ny * s: s, :nz]
    if out.shape != grid.output_shape or seg.shape[2] != nz:
        raise ValueError(f"segmentation {seg.shape} does not cover the output grid {grid.output_shape} "
                         f"(stride {s}, y offset {y}): strided it gives {out.shape}")
    return out


def _nearest_voxels(centroids: np.ndarray, grid: VideoGrid) -> tuple[np.ndarray, np.ndarray]:
    """Centroids (K, 3) full-res -> (flat C index of the nearest output voxel (K,), outside-grid mask (K,))."""
    s, shape = grid.stride, np.asarray(grid.output_shape)
    pos = (centroids - np.array([0.0, grid.y_offset, 0.0])) / np.array([s, s, 1.0])   # output-grid units
    idx = np.clip(np.rint(pos).astype(np.int64), 0, shape - 1)                          # nearest, clamped
    outside = ((pos < 0) | (pos >= shape)).any(axis=1)                                 # beyond the covered box
    flat = np.ravel_multi_index(idx.T, grid.output_shape) if len(idx) else np.zeros(0, np.int64)
    return np.asarray(flat, np.int64), outside
