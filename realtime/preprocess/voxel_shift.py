"""A downsampled volume moved back into the reference's frame, for the per-voxel video path.

The per-voxel path (`voxel_dff`) works on `downsample_xy`'s float32 C-order (X, Y, Z) volumes. Given such a
volume and its registration shift d = (dx, dy, dz) in *its* voxels (`Shift` is in full-resolution voxels:
the caller divides dx and dy by the downsampling factor), `shift_back` writes the registered volume

    out(p) = volume(p + d),

sampled trilinearly, each coordinate clamped to the volume's edge (the edge voxels repeat outside it), so
out is in the reference's frame (registration.py: moving(p) = ref(p - d)). An integer shift is np.roll(-d)
with the edge repeated instead of wrapped.

`shift_back` is one compiled pass, parallel over x: per output (x, y) it blends the (at most) four input
z-rows of its x and y corners into one row, then reads that row at z + dz (two taps). The weights are
float32; a corner whose weight is exactly 0 (an axis whose shift is an integer) is not read at all.
Non-finite input voxels: so a zero or integer shift copies every voxel exactly, NaN and inf included (a NaN
stays one voxel); with a fractional shift on some axes, a non-finite voxel reaches every output voxel whose
interpolation cell holds it (2, 4 or 8 of them: NaN stays NaN, inf gives inf, or NaN next to -inf).
`VoxelDff` then repairs and counts them as any non-finite voxel.

`shift_back_torch` does the same on a torch tensor (any device), as three separable 1-D passes (per axis:
the two taps as slices with the edge repeated, then their blend; the same skipping of a zero weight); it
imports torch when called.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numba
import numpy as np
from numpy.typing import ArrayLike, NDArray

from loopcast.realtime.jit import njit, read_only

if TYPE_CHECKING:
    import torch


@njit(parallel=True, nogil=True)
def _shift_back(vol: NDArray[np.float32], ix: NDArray[np.int64], iy: NDArray[np.int64], iz: NDArray[np.int64],
                w: NDArray[np.float32], out: NDArray[np.float32]) -> None:  # pragma: no cover (compiled)
    """out[i, j, k] = trilinear blend of vol at the (2, n) clamped source indices ix[:, i], iy[:, j],
    iz[:, k] with the per-axis weights w (3, 2) (low tap, high tap; a high tap of weight 0 is skipped)."""
    nx, ny, nz = out.shape
    for i in numba.prange(nx):
        row = np.empty(vol.shape[2], np.float32)
        for j in range(ny):
            _blend_xy(vol, ix[0, i], ix[1, i], iy[0, j], iy[1, j], w, row)
            o = out[i, j]
            if w[2, 1] == 0:
                for k in range(nz):
                    o[k] = row[iz[0, k]]
            else:
                for k in range(nz):
                    o[k] = w[2, 0] * row[iz[0, k]] + w[2, 1] * row[iz[1, k]]


@njit(nogil=True, inline="always")
def _blend_xy(vol: NDArray[np.float32], x0: int, x1: int, y0: int, y1: int, w: NDArray[np.float32],
              row: NDArray[np.float32]) -> None:  # pragma: no cover (compiled)
    """row = the z-row at (x, y) interpolated from its four corner rows; zero-weight corners not read."""
    a = vol[x0, y0]
    c = w[0, 0] * w[1, 0]
    for k in range(row.size):
        row[k] = c * a[k]
    if w[1, 1] != 0:
        _add_row(row, w[0, 0] * w[1, 1], vol[x0, y1])
    if w[0, 1] != 0:
        _add_row(row, w[0, 1] * w[1, 0], vol[x1, y0])
        if w[1, 1] != 0:
            _add_row(row, w[0, 1] * w[1, 1], vol[x1, y1])


@njit(nogil=True, inline="always")
def _add_row(row: NDArray[np.float32], c: float, src: NDArray[np.float32]) -> None:  # pragma: no cover (compiled)
    for k in range(row.size):
        row[k] += c * src[k]


def _split(d: float) -> tuple[int, float]:
    """A shift's integer part (floor) and fraction in [0, 1), the fraction representable as a float32 < 1."""
    base = math.floor(d)
    frac = d - base
    if np.float32(frac) == 1.0:                      # d just below an integer: round up to it
        return base + 1, 0.0
    return base, frac


def _taps(n: int, d: float) -> tuple[NDArray[np.int64], NDArray[np.float32]]:
    """Source indices (2, n) of out[p] = in[p + d] along one axis (low, high; clamped) and their weights (2,)."""
    base, frac = _split(d)
    idx = np.clip(np.arange(n) + base + np.arange(2)[:, None], 0, n - 1)
    return idx.astype(np.int64), np.array([1.0 - frac, frac], np.float32)


def _as_shift(shift: ArrayLike) -> tuple[float, float, float]:
    d = np.asarray(shift, np.float64)
    if d.shape != (3,) or not np.all(np.isfinite(d)):
        raise ValueError(f"shift must be 3 finite numbers (dx, dy, dz), got {shift!r}")
    return float(d[0]), float(d[1]), float(d[2])


def shift_back(volume: NDArray[np.float32], shift: ArrayLike, out: NDArray[np.float32] | None = None
               ) -> NDArray[np.float32]:
    """volume (X, Y, Z) float32 C order and its shift (dx, dy, dz) in its own voxels -> out(p) =
    volume(p + shift), trilinear, coordinates clamped to the edge (module docstring). `out`: a float32
    C-order array of the same shape, not overlapping `volume` (allocated when None); returned."""
    if volume.ndim != 3 or volume.dtype != np.float32 or not volume.flags.c_contiguous:
        raise ValueError(f"need a 3-D float32 C-contiguous volume, got {volume.shape} {volume.dtype}")
    d = _as_shift(shift)
    if out is None:
        out = np.empty(volume.shape, np.float32)
    elif out.shape != volume.shape or out.dtype != np.float32 or not out.flags.c_contiguous:
        raise ValueError(f"out must be a C-contiguous float32 array of shape {volume.shape}")
    elif np.may_share_memory(out, volume):
        raise ValueError("out must not overlap volume (shift_back reads neighbours of what it writes)")
    (ix, wx), (iy, wy), (iz, wz) = (_taps(n, s) for n, s in zip(volume.shape, d, strict=True))
    _shift_back(read_only(volume), ix, iy, iz, np.stack([wx, wy, wz]), out)
    return out


def shift_back_torch(tensor: torch.Tensor, shift: ArrayLike) -> torch.Tensor:
    """`shift_back` for a float (X, Y, Z) tensor on any device, any layout -> a new tensor there (same
    dtype), from three separable 1-D passes (module docstring)."""
    import torch

    if tensor.ndim != 3 or not tensor.dtype.is_floating_point:
        raise ValueError(f"need a 3-D float tensor, got {tuple(tensor.shape)} {tensor.dtype}")
    out = tensor
    for axis, d in enumerate(_as_shift(shift)):
        base, frac = _split(d)
        moved = _clamped_roll(out, axis, base)
        if frac:
            moved = torch.add(moved * (1.0 - frac), _clamped_roll(out, axis, base + 1), alpha=frac)
        out = moved
    return tensor.clone(memory_format=torch.contiguous_format) if out is tensor else out.contiguous()


def _clamped_roll(t: torch.Tensor, axis: int, b: int) -> torch.Tensor:
    """out[..., p, ...] = t[..., clamp(p + b, 0, n - 1), ...] along `axis`: a slice and the repeated edge
    (torch's index_select along a tensor's last axis is ~50x slower on the CPU). May be a view of t."""
    import torch

    n = t.shape[axis]
    if b == 0:
        return t
    edge = t.narrow(axis, n - 1 if b > 0 else 0, 1)
    if abs(b) >= n:
        return edge.expand(t.shape)
    pad = edge.expand(*t.shape[:axis], abs(b), *t.shape[axis + 1:])
    return torch.cat([t.narrow(axis, b, n - b), pad] if b > 0 else [pad, t.narrow(axis, 0, n + b)], axis)
