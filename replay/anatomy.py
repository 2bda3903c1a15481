"""Anatomy of the synthetic fish: brain mask, nucleus placement, segmentation, neuropil and ensembles.

Nuclei are ellipsoidal blobs of `radius` voxels (the same physical radius on every axis: at ZAPBench's
0.406 x 0.406 x 4 um voxels a ~5 um nucleus is about (6, 6, 0.6) voxels, i.e. one z plane) placed at
random inside a brain-shaped union of ellipsoids, at least `min_spacing` radii apart. Voxels between
nuclei are unsegmented neuropil; voxels outside the brain are background.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.spatial import cKDTree

# Brain as a union of ellipsoids in unit grid coordinates: cx, cy, cz, rx, ry, rz
# (telencephalon, two optic tecta, cerebellum/midbrain, hindbrain; x is rostro-caudal).
BRAIN_ELLIPSOIDS = np.array([
    (0.14, 0.50, 0.50, 0.13, 0.26, 0.48),
    (0.36, 0.30, 0.52, 0.19, 0.25, 0.48),
    (0.36, 0.70, 0.52, 0.19, 0.25, 0.48),
    (0.56, 0.50, 0.50, 0.14, 0.34, 0.48),
    (0.79, 0.50, 0.48, 0.21, 0.24, 0.48)])
MAX_PLACEMENT_ROUNDS = 40


@dataclass(frozen=True)
class Anatomy:
    """Where the neurons are: centroids, label volume and functional ensemble of each neuron."""

    positions: np.ndarray     # (N, 3) float32 voxel centroids x, y, z
    segmentation: np.ndarray  # (x, y, z) uint32 (C order), 0 = background, label i+1 = neuron i
    ensemble: np.ndarray      # (N,) int32 ensemble id per neuron (spatially clustered)


@dataclass(frozen=True)
class Nuclei:
    """The segmented voxels, sorted by their flat index in the volume's Fortran (x fastest) order."""

    idx: np.ndarray           # (M,) int64 flat F-order voxel index
    lab: np.ndarray           # (M,) int32 0-based neuron id
    w: np.ndarray             # (M,) float32 brightness profile, 1 at the centre, 0.7 at the rim


def brain_mask(shape: tuple[int, int, int]) -> np.ndarray:
    """(x, y, z) bool, Fortran order: voxels inside the brain-shaped union of ellipsoids (per z slice)."""
    axes = [(np.arange(n, dtype=np.float32) + 0.5) / n for n in shape]
    mask = np.zeros(shape, bool, order="F")
    for e in BRAIN_ELLIPSOIDS:
        dx = ((axes[0] - e[0]) / e[3]) ** 2
        dy = ((axes[1] - e[1]) / e[4]) ** 2
        xs, ys = np.flatnonzero(dx <= 1.0), np.flatnonzero(dy <= 1.0)
        if not len(xs) or not len(ys):
            continue
        bx, by = slice(xs[0], xs[-1] + 1), slice(ys[0], ys[-1] + 1)     # the ellipsoid's bounding box
        dxy = dx[bx, None] + dy[None, by]                                 # (x, y) inside the box
        for z, az in enumerate(axes[2]):
            room = 1.0 - ((az - e[2]) / e[5]) ** 2
            if room >= 0:
                mask[bx, by, z] |= dxy <= room
    return mask


def _inside_brain(u: np.ndarray) -> np.ndarray:
    """u: (M, 3) unit grid coordinates -> (M,) bool."""
    d = (((u[:, None, :] - BRAIN_ELLIPSOIDS[:, :3]) / BRAIN_ELLIPSOIDS[:, 3:]) ** 2).sum(-1)
    return (d <= 1.0).any(axis=1)


def place_centres(shape: tuple[int, int, int], n: int, radius: tuple[float, float, float], min_spacing: float,
                  rng: np.random.Generator) -> np.ndarray:
    """(n, 3) int64 nucleus centres inside the brain, >= min_spacing radii apart (random sequential
    placement in batches), ordered by C-order flat index."""
    r, shp = np.asarray(radius, np.float64), np.asarray(shape)
    kept = np.empty((0, 3))
    for _ in range(MAX_PLACEMENT_ROUNDS):
        need = n - len(kept)
        cand = np.rint(rng.uniform(-0.5, shp - 0.5, (min(max(4 * need, 256), 1 << 22), 3)))
        cand = cand[_inside_brain((cand + 0.5) / shp)]
        if len(kept) and len(cand):
            d, _ = cKDTree(kept / r).query(cand / r, distance_upper_bound=min_spacing)
            cand = cand[~np.isfinite(d)]                      # away from every kept centre
        close = cKDTree(cand / r).query_pairs(min_spacing, output_type="ndarray")
        if len(close):
            cand = np.delete(cand, np.unique(close[:, 1]), axis=0)
        kept = np.concatenate([kept, cand[:need]])
        if len(kept) == n:
            pts = kept.astype(np.int64)
            return pts[np.argsort(np.ravel_multi_index(tuple(pts.T), shape))]
    raise ValueError(f"cannot place {n} neurons {min_spacing} nucleus radii apart in a {shape} grid "
                     f"(placed {len(kept)}): lower n_neurons, min_spacing or nucleus_radius_vox, or grow shape")


def blob_offsets(radius: tuple[float, float, float]) -> tuple[np.ndarray, np.ndarray]:
    """Integer offsets (B, 3) inside the nucleus ellipsoid and their normalised squared distance (B,)."""
    r = np.asarray(radius)
    span = [np.arange(-int(np.floor(ri)), int(np.floor(ri)) + 1) for ri in r]
    off = np.stack(np.meshgrid(*span, indexing="ij"), -1).reshape(-1, 3)
    d2 = ((off / r) ** 2).sum(1)
    return off[d2 <= 1.0], d2[d2 <= 1.0]


def kmeans(pts: np.ndarray, k: int, rng: np.random.Generator, iters: int = 20) -> np.ndarray:
    """Lloyd's algorithm on (N, 3) points -> (N,) int32 cluster ids, every cluster non-empty."""
    centres = pts[rng.choice(len(pts), k, replace=False)]
    for _ in range(iters):
        d, lab = cKDTree(centres).query(pts)                   # (N,) nearest centre
        counts = np.bincount(lab, minlength=k)
        for c in np.flatnonzero(counts == 0):                  # reseed empty clusters (rare)
            far = int(d.argmax())
            centres[c], lab[far], d[far] = pts[far], c, 0.0
        counts = np.bincount(lab, minlength=k)
        centres = np.stack([np.bincount(lab, pts[:, a], k) / counts for a in range(3)], 1)
    return lab.astype(np.int32)


def _nuclear_voxels(shape: tuple[int, int, int], centres: np.ndarray,
                    radius: tuple[float, float, float]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Voxels of every nucleus, the nearest centre winning a shared voxel -> (vox (M, 3), lab (M,), d2 (M,)),
    sorted by flat F-order index."""
    off, d2 = blob_offsets(radius)                                      # (B, 3), (B,)
    n = len(centres)
    lab = np.repeat(np.arange(n, dtype=np.int32), len(off))
    dist = np.tile(d2.astype(np.float32), n)
    vox = (centres[:, None, :] + off[None]).reshape(-1, 3)              # (N*B, 3)
    ok = ((vox >= 0) & (vox < np.asarray(shape))).all(1)
    vox, lab, dist = vox[ok], lab[ok], dist[ok]
    flat = np.ravel_multi_index(tuple(vox.T), shape, order="F")
    order = np.lexsort((dist, flat))                                    # per voxel, nearest centre first
    keep = np.ones(len(order), bool)
    keep[1:] = flat[order[1:]] != flat[order[:-1]]
    win = order[keep]
    return vox[win], lab[win], dist[win]


def neuropil_field(shape: tuple[int, int, int], mask: np.ndarray, counts: float,
                   rng: np.random.Generator) -> np.ndarray:
    """(x, y, z) float32 Fortran order: brain mask times a low-frequency field in about [0.6, 1.4] x counts."""
    ax = [np.cos(2 * np.pi * (np.arange(n) / n * rng.uniform(0.5, 1.5) + rng.uniform())).astype(np.float32)
          for n in shape]
    fxy = (1.0 + 0.2 * ax[0][:, None] + 0.15 * ax[1][None, :]) * np.float32(counts)   # (x, y)
    out = np.empty(shape, np.float32, order="F")
    for z in range(shape[2]):                              # one contiguous slice at a time
        np.multiply(fxy + np.float32(0.05 * counts) * ax[2][z], mask[:, :, z], out=out[:, :, z])
    return out


def build_anatomy(shape: tuple[int, int, int], n_neurons: int, n_ensembles: int,
                  radius: tuple[float, float, float], min_spacing: float, neuropil_counts: float,
                  rng: np.random.Generator) -> tuple[Anatomy, Nuclei, np.ndarray]:
    """Place neurons, draw nuclei, cluster ensembles -> (anatomy, nuclei, neuropil (X*Y*Z,) float32 F-flat)."""
    mask = brain_mask(shape)
    centres = place_centres(shape, n_neurons, radius, min_spacing, rng)   # (N, 3)
    vox, lab, d2 = _nuclear_voxels(shape, centres, radius)
    seg = np.zeros(shape, np.uint32)
    seg[tuple(vox.T)] = lab + 1
    counts = np.bincount(lab, minlength=n_neurons)
    positions = np.stack([np.bincount(lab, vox[:, a], n_neurons) / counts for a in range(3)], 1)
    ensemble = kmeans(positions / np.asarray(radius), n_ensembles, rng)
    neuropil = neuropil_field(shape, mask, neuropil_counts, rng).reshape(-1, order="F")
    del mask
    idx = np.ravel_multi_index(tuple(vox.T), shape, order="F")
    neuropil[idx] = 0.0                                                   # nuclei hide the neuropil
    nuclei = Nuclei(idx, lab, (1.0 - 0.3 * d2).astype(np.float32))
    return Anatomy(positions.astype(np.float32), seg, ensemble), nuclei, neuropil
