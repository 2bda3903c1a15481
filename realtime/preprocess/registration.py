"""Online rigid registration: each volume's 3-D shift against a reference, and traces read through it.

Estimation (`ShiftEstimator`), per volume (x, y, z):
1. one compiled pass (in the volume's memory order) makes three sum projections: over z (XY), over y (XZ) and
   over x (YZ). x and y can be
   point-sampled with a stride (`RegistrationConfig.stride`) so that a raw ZAPBench volume is read at
   1/stride^2 of its bytes; z is never subsampled (short, coarse and anisotropic: 16 or 72 planes).
2. each projection: mean removed, separable Tukey window, rfft2 (scipy.fft, `workers` threads).
3. cross-power spectrum against the reference's, whitened by |R|^whiten (1: phase correlation), inverse FFT;
   the integer peak is searched within `max_shift`; it is refined to sub-voxel by evaluating the surface on
   an `upsample`-times finer grid over +-0.75 voxel around it (matrix-multiply DFT of the half spectrum,
   Guizar-Sicairos et al. 2008), then a parabolic fit on that grid.
4. x is the mean of the XY and XZ estimates, y of XY and YZ, z of XZ and YZ (times the stride for x, y).
Sign: `Shift` (dx, dy, dz) is where the reference's content is in the moving volume: moving(p) = ref(p - d).

Confidence: per projection, (peak - mean) / std of the correlation surface outside a radius-2 neighbourhood
of the peak; `Shift.confidence` is the minimum over the three projections. A volume unrelated to the
reference (or pure noise) gives the largest of ~1e4-1e5 roughly Gaussian values: ~4-6; a true match tens.

Reference: the mean of the first `warmup_frames` volumes' projection spectra. A volume whose shift against
the mean so far exceeds `warmup_align_min` voxels on some axis (the fish moved during warm-up) is aligned
first (a Fourier phase ramp of its spectra); the others are added as they are: aligning every volume by its
noisy sub-voxel estimate would move the reference's origin by a random walk (measured: a bias of ~0.3 voxel
at SNR 2).
Refresh rule: after warm-up, a frame whose confidence >= `refresh_min_confidence` and whose |shift| <=
`refresh_max_shift` on every axis is aligned to the reference (phase ramp) and blended in:
ref <- (1 - refresh_rate) * ref + refresh_rate * aligned(frame). It follows slow changes of the image
(bleaching, expression) without letting a jump or a bad frame in; refresh_rate = 0 turns it off.
(The window is applied in frame coordinates, so an aligned frame's window is shifted by the <= 2 voxels.)
The traces are read through the shift by `realtime.preprocess.shifted_traces.ShiftedTraces`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numba
import numpy as np
import scipy.fft
from numpy.typing import NDArray

from loopcast.realtime.jit import njit, read_only
from loopcast.realtime.wire.codec import volume_order

Plane = tuple[int, int]
INTERPOLATIONS = ("trilinear", "nearest")
PLANES: tuple[Plane, ...] = ((0, 1), (0, 2), (1, 2))       # XY, XZ, YZ: the axes each projection keeps


@dataclass(frozen=True)
class RegistrationConfig:
    """Online rigid registration settings (see the module docstring for the method and refresh rule)."""

    enabled: bool = False
    stride: tuple[int, int] = (1, 1)         # x, y point-sampling stride of the projections (z: none)
    warmup_frames: int = 20                  # the reference: mean of this many first volumes
    warmup_align_min: float = 0.5            # a warm-up volume shifted more (any axis) is aligned first
    refresh_rate: float = 0.02               # EMA weight of an accepted frame (0: no refresh)
    refresh_min_confidence: float = 8.0       # pure noise: ~2-5; a true match at SNR 2: ~10-15
    refresh_max_shift: float = 2.0           # voxels, every axis
    upsample: int = 10                       # sub-voxel grid: 1 / upsample voxel, then a parabolic fit
    whiten: float = 0.5                      # cross-power spectrum / |.|^whiten (1: phase correlation)
    window: float = 0.25                     # Tukey window's tapered fraction
    max_shift: tuple[float, float, float] = (20.0, 20.0, 4.0)   # voxels searched per axis
    workers: int = 2                         # scipy.fft threads
    interpolation: str = "trilinear"         # how traces read the sub-voxel shift; "nearest": whole voxels,
    #                                          one read per voxel (the plain trace pass's cost)

    def __post_init__(self) -> None:
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"registration.interpolation {self.interpolation!r}: expected one of "
                             f"{list(INTERPOLATIONS)}")


@dataclass(frozen=True)
class Shift:
    """Shift (voxels) of the moving volume relative to the reference, and how sure the estimate is."""

    dx: float
    dy: float
    dz: float
    confidence: float

    def as_array(self) -> NDArray[np.float64]:
        """(3,) float64 (dx, dy, dz)."""
        return np.array([self.dx, self.dy, self.dz])


@njit(parallel=True, nogil=True)
def _project(vol: NDArray[np.generic], sx: int, sy: int, pxy: NDArray[np.float64], pxz: NDArray[np.float64],
             parts: NDArray[np.float64]) -> None:  # pragma: no cover (compiled)
    nxp, nyp = pxy.shape
    nz = pxz.shape[1]
    n_chunks = parts.shape[0]
    for c in numba.prange(n_chunks):
        part = parts[c]
        part[:] = 0.0
        for i in range(c * nxp // n_chunks, (c + 1) * nxp // n_chunks):
            row = pxz[i]
            row[:] = 0.0
            for j in range(nyp):
                s = 0.0
                for k in range(nz):
                    v = float(vol[i * sx, j * sy, k])
                    s += v
                    row[k] += v
                    part[j, k] += v
                pxy[i, j] = s


@njit(parallel=True, nogil=True)
def _project_f(vt: NDArray[np.generic], sx: int, sy: int, parts: NDArray[np.float64], pzx: NDArray[np.float64],
               pyz: NDArray[np.float64]) -> None:  # pragma: no cover (compiled)
    """`_project` of an F-order volume, given as its (z, y, x) C-order transpose: x (contiguous) innermost and
    every sum written contiguously (the XY sums as (y, x), the XZ ones as (z, x)), parallel over chunks of
    planes (each chunk's XY sum in `parts`; a plane's XZ and YZ sums are its own)."""
    nz = vt.shape[0]
    n_chunks, nyp, nxp = parts.shape
    for c in numba.prange(n_chunks):
        part = parts[c]
        part[:] = 0.0
        for k in range(c * nz // n_chunks, (c + 1) * nz // n_chunks):
            col = pzx[k]
            col[:] = 0.0
            for j in range(nyp):
                row = vt[k, j * sy]
                acc = part[j]
                s = 0.0
                for i in range(nxp):
                    v = float(row[i * sx])
                    s += v
                    acc[i] += v
                    col[i] += v
                pyz[j, k] = s


@njit(nogil=True)
def _dft_surface(e0: NDArray[np.complex128], cross: NDArray[np.complex128],
                 e1: NDArray[np.complex128]) -> NDArray[np.float64]:  # pragma: no cover (compiled)
    """Re(e0 @ cross @ e1) without BLAS: OpenBLAS's spinning threads stall the loop's numba threads on
    a 2-core machine (measured: ~8 ms per frame at the demo scale)."""
    m0, n0 = e0.shape
    n1, m1 = e1.shape
    tmp = np.zeros((m0, n1), np.complex128)
    for a in range(m0):
        for k in range(n0):
            c = e0[a, k]
            for j in range(n1):
                tmp[a, j] += c * cross[k, j]
    out = np.zeros((m0, m1))
    for a in range(m0):
        for b in range(m1):
            s = 0j
            for j in range(n1):
                s += tmp[a, j] * e1[j, b]
            out[a, b] = s.real
    return out


def _tukey(n: int, alpha: float) -> NDArray[np.float64]:
    """Tukey window of length n, `alpha` of it tapered (0: flat)."""
    w = np.ones(n)
    m = int(alpha * (n - 1) / 2)
    if m > 0:
        ramp = 0.5 * (1 - np.cos(np.pi * np.arange(m) / m))
        w[:m], w[n - m:] = ramp, ramp[::-1]
    return w


class _PlaneCorrelator:
    """Phase correlation of one projection plane: its window, frequencies and search mask."""

    def __init__(self, shape: Plane, cfg: RegistrationConfig, max_shift: tuple[float, float],
                 taper: tuple[float, float]) -> None:
        self.shape, self.cfg = shape, cfg
        self.window = np.outer(_tukey(shape[0], taper[0]), _tukey(shape[1], taper[1]))  # complex64 spectra:
        # float32 FFTs are ~2x faster, and their precision is far below the noise
        self.f0 = np.fft.fftfreq(shape[0])
        self.f1 = np.fft.rfftfreq(shape[1])
        self.w1 = np.where((self.f1 == 0) | (self.f1 == 0.5), 1.0, 2.0)
        lags = [np.abs(np.fft.fftfreq(n) * n) <= m for n, m in zip(shape, max_shift, strict=True)]
        self.allowed = np.outer(lags[0], lags[1])

    def spectrum(self, proj: NDArray[np.float64]) -> NDArray[np.complex64]:
        """Mean-removed, windowed projection -> its rfft2."""
        out: NDArray[np.complex64] = scipy.fft.rfft2(((proj - proj.mean()) * self.window).astype(np.float32),
                                                     workers=self.cfg.workers)
        return out

    def ramp(self, d: tuple[float, float]) -> NDArray[np.complex64]:
        """Phase ramp that moves a spectrum's content by -d (aligns a frame shifted by d)."""
        return np.outer(np.exp(2j * np.pi * self.f0 * d[0]), np.exp(2j * np.pi * self.f1 * d[1])).astype(np.complex64)

    def correlate(self, moving: NDArray[np.complex64], ref: NDArray[np.complex64]) -> tuple[float, float, float]:
        """(d0, d1, confidence) of `moving` relative to `ref` (both spectra)."""
        cross = moving * np.conj(ref)
        if self.cfg.whiten:
            cross /= np.maximum(np.abs(cross), 1e-30) ** self.cfg.whiten
        surface = scipy.fft.irfft2(cross, s=self.shape, workers=self.cfg.workers)
        flat = int(np.argmax(np.where(self.allowed, surface, -np.inf)))
        i, j = divmod(flat, self.shape[1])
        conf = self._confidence(surface, i, j)
        peak = (i - self.shape[0] if i > self.shape[0] // 2 else i, j - self.shape[1] if j > self.shape[1] // 2 else j)
        d0, d1 = self._refine(cross, peak)
        return d0, d1, conf

    def _confidence(self, surface: NDArray[np.float64], i: int, j: int) -> float:
        """(peak - mean) / std of the surface outside a radius-2 neighbourhood of the peak (i, j)."""
        rows = np.arange(i - 2, i + 3) % self.shape[0]
        cols = np.arange(j - 2, j + 3) % self.shape[1]
        near = surface[np.ix_(rows, cols)]
        n = surface.size - near.size
        mean = (surface.sum() - near.sum()) / n
        var = ((surface**2).sum() - (near**2).sum()) / n - mean**2
        return float((surface[i, j] - mean) / np.sqrt(max(var, 1e-30)))

    def _refine(self, cross: NDArray[np.complex64], peak: tuple[int, int]) -> tuple[float, float]:
        """Sub-voxel peak: the surface on an upsampled grid around `peak`, then a parabolic fit there."""
        up = self.cfg.upsample
        m = int(np.ceil(1.5 * up)) | 1
        grid = (np.arange(m) - m // 2) / up
        p0, p1 = peak[0] + grid, peak[1] + grid
        e0 = np.exp(2j * np.pi * np.outer(p0, self.f0))
        e1 = np.exp(2j * np.pi * np.outer(self.f1, p1)) * self.w1[:, None]
        fine = _dft_surface(e0, cross.astype(np.complex128), e1)
        a, b = divmod(int(np.argmax(fine)), m)
        return p0[a] + _parabola(fine[:, b], a) / up, p1[b] + _parabola(fine[a, :], b) / up


def _parabola(values: NDArray[np.float64], k: int) -> float:
    """Offset in (-0.5, 0.5) of the vertex of the parabola through values[k - 1 : k + 2] (0 at an edge)."""
    if k == 0 or k == values.size - 1:
        return 0.0
    lo, mid, hi = values[k - 1], values[k], values[k + 1]
    denom = lo - 2 * mid + hi
    return float(np.clip(0.5 * (lo - hi) / denom, -0.5, 0.5)) if denom < 0 else 0.0


class EstimatorSteps:
    """What both backends' estimators share, built on their `_spectra`, `_combine` and `commit`: `measure`, the
    warm-up and per-frame steps, `ready` and the refresh rule's test."""

    cfg: RegistrationConfig
    n_reference: int

    @property
    def ready(self) -> bool:
        """Whether the reference is complete (`warmup_frames` volumes added)."""
        return self.n_reference >= self.cfg.warmup_frames

    _ref: list[Any] | None
    _pending: tuple[list[Any], Shift | None] | None

    def _spectra(self, volume: Any) -> list[Any]:
        raise NotImplementedError

    def _combine(self, spectra: list[Any], ref: list[Any]) -> Shift:
        raise NotImplementedError

    def measure(self, volume: Any) -> Shift | None:
        """The volume's shift against the reference so far (None for the very first volume), without
        touching the reference: `commit` then lets the volume in (warm-up) or applies the refresh rule."""
        spectra = self._spectra(volume)
        shift = None if self._ref is None else self._combine(spectra, self._ref)
        self._pending = (spectra, shift)
        return shift

    def commit(self) -> None:
        raise NotImplementedError

    def add_reference_frame(self, volume: Any) -> None:
        """Add a warm-up volume to the reference (aligned to the reference so far); ignored once ready."""
        if not self.ready:
            self.measure(volume)
            self.commit()

    def estimate(self, volume: Any) -> Shift:
        """The volume's shift against the complete reference (refreshing it per the refresh rule)."""
        if not self.ready:
            raise RuntimeError(f"the reference is not complete ({self.n_reference} of "
                               f"{self.cfg.warmup_frames} volumes): add_reference_frame() first")
        shift = self.measure(volume)
        assert shift is not None
        self.commit()
        return shift

    def _accept(self, shift: Shift) -> bool:
        """The refresh rule's test (module docstring)."""
        return (self.cfg.refresh_rate > 0 and shift.confidence >= self.cfg.refresh_min_confidence
                and bool(np.all(np.abs(shift.as_array()) <= self.cfg.refresh_max_shift)))


def combine_planes(cfg: RegistrationConfig, planes: list[tuple[float, float, float]]) -> Shift:
    """The XY, XZ and YZ planes' (d0, d1, confidence) -> one Shift in voxels (x, y times the stride): x from XY
    and XZ, y from XY and YZ, z from XZ and YZ; the lowest confidence."""
    (xy0, xy1, c0), (xz0, xz1, c1), (yz0, yz1, c2) = planes
    sx, sy = cfg.stride
    return Shift(0.5 * (xy0 + xz0) * sx, 0.5 * (xy1 + yz0) * sy, 0.5 * (xz1 + yz1), min(c0, c1, c2))


class ShiftEstimator(EstimatorSteps):
    """Reference from the first volumes, then each volume's shift against it (module docstring)."""

    def __init__(self, shape: tuple[int, int, int], cfg: RegistrationConfig = RegistrationConfig()) -> None:
        self.cfg, self.shape = cfg, tuple(int(s) for s in shape)
        sx, sy = cfg.stride
        self._dims = (-(-self.shape[0] // sx), -(-self.shape[1] // sy), self.shape[2])
        scale, taper = (sx, sy, 1), (cfg.window, cfg.window, 0.0)
        self._planes = [_PlaneCorrelator((self._dims[a], self._dims[b]), cfg,
                                         (cfg.max_shift[a] / scale[a], cfg.max_shift[b] / scale[b]),
                                         (taper[a], taper[b]))
                        for a, b in PLANES]
        self._n_chunks = max(2 * numba.get_num_threads(), 1)
        self._ref: list[NDArray[np.complex64]] | None = None
        self._pending: tuple[list[NDArray[np.complex64]], Shift | None] | None = None
        self.n_reference = 0

    def projections(self, volume: NDArray[np.generic]) -> list[NDArray[np.float64]]:
        """The XY, XZ and YZ sum projections of the (strided) volume."""
        if tuple(volume.shape) != self.shape:
            raise ValueError(f"volume shape {volume.shape} != registration shape {self.shape}")
        nx, ny, nz = self._dims
        sx, sy = self.cfg.stride
        if volume_order(volume) == "F":   # a camera's (and ZAPBench's) order: read x innermost
            parts, pzx, pyz = np.empty((min(self._n_chunks, nz), ny, nx)), np.empty((nz, nx)), np.empty((ny, nz))
            _project_f(read_only(volume).T, sx, sy, parts, pzx, pyz)
            return [parts.sum(axis=0).T, pzx.T, pyz]
        pxy, pxz = np.empty((nx, ny)), np.empty((nx, nz))
        parts = np.empty((self._n_chunks, ny, nz))
        _project(read_only(volume), sx, sy, pxy, pxz, parts)
        return [pxy, pxz, parts.sum(axis=0)]

    def _spectra(self, volume: NDArray[np.generic]) -> list[NDArray[np.complex64]]:
        return [p.spectrum(proj) for p, proj in zip(self._planes, self.projections(volume), strict=True)]

    def commit(self) -> None:
        """The last measured volume joins the reference: averaged in during warm-up (aligned first when it
        moved), blended in by the refresh rule after. Once per `measure`; a second call does nothing."""
        if self._pending is None:
            return
        (spectra, shift), self._pending = self._pending, None
        if self._ref is None or shift is None:
            self._ref = spectra
            self.n_reference = 1
        elif not self.ready:
            moved = np.any(np.abs(shift.as_array()) > self.cfg.warmup_align_min)
            aligned = self._align(spectra, shift) if moved else spectra
            n = self.n_reference
            self._ref = [(r * n + a) / (n + 1) for r, a in zip(self._ref, aligned, strict=True)]
            self.n_reference += 1
        elif self._accept(shift):
            r = self.cfg.refresh_rate
            self._ref = [(1 - r) * ref + r * a for ref, a in zip(self._ref, self._align(spectra, shift), strict=True)]

    def _combine(self, spectra: list[NDArray[np.complex64]], ref: list[NDArray[np.complex64]]) -> Shift:
        """Per-plane correlations -> one Shift in voxels (x, y scaled back by the stride)."""
        return combine_planes(self.cfg, [p.correlate(s, r) for p, s, r in zip(self._planes, spectra, ref,
                                                                               strict=True)])

    def _align(self, spectra: list[NDArray[np.complex64]], shift: Shift) -> list[NDArray[np.complex64]]:
        """Spectra moved by -shift (strided units), i.e. into the reference's frame."""
        d = (shift.dx / self.cfg.stride[0], shift.dy / self.cfg.stride[1], shift.dz)
        return [s * p.ramp((d[a], d[b])) for s, p, (a, b) in zip(spectra, self._planes, PLANES, strict=True)]
