"""Online rigid registration on a torch device (CUDA on GPU rigs): `realtime.preprocess.registration`'s
method with its arrays kept on the device.

`TorchShiftEstimator` runs `ShiftEstimator`'s algorithm step by step, with its interface (`measure` then
`commit`, or `add_reference_frame` / `estimate`; see registration.py's docstring for the method, the sign
of a shift, the confidence and the reference's warm-up and refresh rules); its planes, windows,
frequencies and search masks are those of a `ShiftEstimator` built for the same shape and config.
On the device: the three sum projections of the (x/y-strided) volume (float32 sums), mean removal, window
and rfft2 (torch.fft, complex64 spectra), the whitened cross-power spectrum and its inverse FFT, the
integer peak within `max_shift`, the confidence (float64), and the matrix-multiply DFT of the half spectrum
on the `upsample`-times finer grid around the peak (complex128). One device -> host copy per volume: each
plane's confidence, integer peak and m x m upsampled surface (m = 15 at upsample 10: ~5 KB in all). On the
host: the grid's argmax and parabolic fit (`registration._parabola`), the planes' combination into a
`Shift`, and the refresh rule's test; the reference spectra stay on the device (blended in place).

`TorchShiftedTraces` is `ShiftedTraces`' math vectorised over all labelled voxels: the 8 corners of
(voxel + shift), each coordinate clamped to the volume, are gathered at once, weighted by the trilinear
weights (`registration._weights`, float32), summed per voxel and `index_add_`-ed per neuron. As in
`ShiftedTraces`, a non-finite voxel reaches a neuron through a zero weight too (0 * nan = nan), except at a
whole-voxel shift, which reads one voxel per labelled voxel.

Volumes are (x, y, z) tensors already on the device, in any memory layout (a numpy C- or F-order volume
moved with `device_volume` keeps its layout): float (float16/32/64) or int32/int64 (int16 is refused: a
uint16 volume travels as int16 bits and must be widened first, which `device_volume` does). torch is
imported inside functions only, so importing this module does not load torch (tests/test_layering.py lets
only the torch twins it lists import torch at module level).
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray

from loopcast.realtime.metrics import Metrics
from loopcast.realtime.preprocess.motion import MotionCorrection
from loopcast.realtime.preprocess.registration import (
    PLANES,
    EstimatorSteps,
    RegistrationConfig,
    Shift,
    ShiftEstimator,
    _parabola,
    _PlaneCorrelator,
    combine_planes,
)
from loopcast.realtime.preprocess.shifted_traces import _weights
from loopcast.realtime.preprocess.traces import TraceExtractor, TraceStats

if TYPE_CHECKING:
    import torch


def device_volume(volume: np.ndarray, device: str | torch.device = "cpu") -> torch.Tensor:
    """numpy volume (x, y, z), C or F order -> the same (x, y, z) tensor on `device`, its layout kept;
    uint16 travels as int16 bits and is widened to int32 there, other dtypes are kept."""
    import torch

    unsigned16 = volume.dtype == np.uint16
    dev = torch.from_numpy(volume.view(np.int16) if unsigned16 else volume).to(device, non_blocking=True)
    return dev.to(torch.int32) & 0xFFFF if unsigned16 else dev


def _check_volume(volume: torch.Tensor, shape: tuple[int, ...]) -> None:
    """Raise unless `volume` has `shape` and a dtype the module takes (see the module docstring)."""
    import torch

    if tuple(volume.shape) != shape:
        raise ValueError(f"volume shape {tuple(volume.shape)} != {shape}")
    if not (volume.dtype.is_floating_point or volume.dtype in (torch.int32, torch.int64)):
        raise TypeError(f"volume dtype {volume.dtype}: need float or int32/int64 (widen uint16 first: "
                        "device_volume)")


class _TorchPlane:
    """One projection plane's phase correlation on the device (the twin of `_PlaneCorrelator`)."""

    def __init__(self, plane: _PlaneCorrelator, device: torch.device) -> None:
        import torch

        self.shape, self.cfg = plane.shape, plane.cfg
        self.window = torch.as_tensor(plane.window, dtype=torch.float32, device=device)
        self.f0, self.f1, self.w1 = (torch.as_tensor(a, device=device) for a in (plane.f0, plane.f1, plane.w1))
        self.blocked = torch.as_tensor(~plane.allowed, device=device)
        self.size = torch.as_tensor(self.shape, device=device)
        self.near = torch.arange(-2, 3, device=device)
        up = self.cfg.upsample
        self.m = int(np.ceil(1.5 * up)) | 1
        self.grid = (np.arange(self.m) - self.m // 2) / up
        self.grid_dev = torch.as_tensor(self.grid, device=device)

    def spectrum(self, proj: torch.Tensor) -> torch.Tensor:
        """Mean-removed, windowed projection (float32) -> its rfft2 (complex64)."""
        import torch

        out: torch.Tensor = torch.fft.rfft2((proj - proj.mean()) * self.window)
        return out

    def ramp(self, d: tuple[float, float]) -> torch.Tensor:
        """Phase ramp that moves a spectrum's content by -d (aligns a frame shifted by d)."""
        import torch

        e0 = torch.exp(2j * math.pi * d[0] * self.f0)
        e1 = torch.exp(2j * math.pi * d[1] * self.f1)
        return torch.outer(e0, e1).to(torch.complex64)

    def correlate(self, moving: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
        """(3 + m * m,) float64 on the device: confidence, signed integer peak (2), the upsampled surface."""
        import torch

        cross = moving * ref.conj()
        if self.cfg.whiten:
            cross = cross / cross.abs().clamp_min(1e-30) ** self.cfg.whiten
        surface = torch.fft.irfft2(cross, s=self.shape)
        flat = surface.masked_fill(self.blocked, -math.inf).argmax()
        i, j = flat // self.shape[1], flat % self.shape[1]
        conf = self._confidence(surface.double(), i, j)
        peak = torch.stack([i, j])
        peak = torch.where(peak > self.size // 2, peak - self.size, peak).double()
        return torch.cat([conf.reshape(1), peak, self._fine(cross, peak).reshape(-1)])

    def _confidence(self, surface: torch.Tensor, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        """(peak - mean) / std of the surface outside a radius-2 neighbourhood of the peak (i, j)."""
        rows, cols = (i + self.near) % self.shape[0], (j + self.near) % self.shape[1]
        near = surface[rows[:, None], cols[None, :]]
        n = surface.numel() - near.numel()
        mean = (surface.sum() - near.sum()) / n
        var = ((surface * surface).sum() - (near * near).sum()) / n - mean * mean
        return (surface[i, j] - mean) / var.clamp_min(1e-30).sqrt()

    def _fine(self, cross: torch.Tensor, peak: torch.Tensor) -> torch.Tensor:
        """Re of the correlation surface on the upsampled (m, m) grid around `peak` (matrix-multiply DFT)."""
        import torch

        p = peak[:, None] + self.grid_dev                                   # (2, m) lags
        e0 = torch.exp(2j * math.pi * torch.outer(p[0], self.f0))
        e1 = torch.exp(2j * math.pi * torch.outer(self.f1, p[1])) * self.w1[:, None]
        return (e0 @ cross.to(torch.complex128) @ e1).real

    def finish(self, values: NDArray[np.float64]) -> tuple[float, float, float]:
        """Host side: `correlate`'s values -> (d0, d1, confidence), the surface's peak refined by a parabola."""
        m, up = self.m, self.cfg.upsample
        fine = values[3:].reshape(m, m)
        a, b = divmod(int(np.argmax(fine)), m)
        d0 = values[1] + self.grid[a] + _parabola(fine[:, b], a) / up
        d1 = values[2] + self.grid[b] + _parabola(fine[a, :], b) / up
        return float(d0), float(d1), float(values[0])


class TorchShiftEstimator(EstimatorSteps):
    """`ShiftEstimator` on a torch device: reference from the first volumes, then each volume's shift."""

    def __init__(self, shape: tuple[int, int, int], cfg: RegistrationConfig,
                 device: str | torch.device = "cpu") -> None:
        import torch

        base = ShiftEstimator(shape, cfg)                 # the planes' geometry, windows and search masks
        self.cfg, self.shape, self.device = cfg, base.shape, torch.device(device)
        self._planes = [_TorchPlane(p, self.device) for p in base._planes]
        self._ref: list[torch.Tensor] | None = None
        self._pending: tuple[list[torch.Tensor], Shift | None] | None = None
        self.n_reference = 0

    def projections(self, volume: torch.Tensor) -> list[torch.Tensor]:
        """The XY, XZ and YZ float32 sum projections of the (strided) volume, on the device."""
        import torch

        _check_volume(volume, self.shape)
        v = volume[::self.cfg.stride[0], ::self.cfg.stride[1]]
        return [v.sum(2, dtype=torch.float32), v.sum(1, dtype=torch.float32), v.sum(0, dtype=torch.float32)]

    def _spectra(self, volume: torch.Tensor) -> list[torch.Tensor]:
        return [p.spectrum(proj) for p, proj in zip(self._planes, self.projections(volume), strict=True)]

    def commit(self) -> None:
        """The last measured volume joins the reference: averaged in during warm-up (aligned first when it
        moved), blended in by the refresh rule after (in place, on the device). Once per `measure`."""
        if self._pending is None:
            return
        (spectra, shift), self._pending = self._pending, None
        if self._ref is None or shift is None:
            self._ref, self.n_reference = spectra, 1
        elif not self.ready:
            moved = np.any(np.abs(shift.as_array()) > self.cfg.warmup_align_min)
            n = self.n_reference
            for ref, a in zip(self._ref, self._align(spectra, shift) if moved else spectra, strict=True):
                ref.mul_(n / (n + 1)).add_(a, alpha=1 / (n + 1))
            self.n_reference += 1
        elif self._accept(shift):
            rate = self.cfg.refresh_rate
            for ref, a in zip(self._ref, self._align(spectra, shift), strict=True):
                ref.mul_(1 - rate).add_(a, alpha=rate)

    def _combine(self, spectra: list[torch.Tensor], ref: list[torch.Tensor]) -> Shift:
        """Per-plane correlations (one device -> host copy) -> one Shift in voxels (x, y times the stride)."""
        import torch

        packed = torch.cat([p.correlate(s, r) for p, s, r in zip(self._planes, spectra, ref, strict=True)])
        host = packed.cpu().numpy()
        return combine_planes(self.cfg, [p.finish(v) for p, v in
                                         zip(self._planes, np.split(host, len(self._planes)), strict=True)])

    def _align(self, spectra: list[torch.Tensor], shift: Shift) -> list[torch.Tensor]:
        """Spectra moved by -shift (strided units), i.e. into the reference's frame."""
        d = (shift.dx / self.cfg.stride[0], shift.dy / self.cfg.stride[1], shift.dz)
        return [s * p.ramp((d[a], d[b])) for s, p, (a, b) in zip(spectra, self._planes, PLANES, strict=True)]


class TorchShiftedTraces:
    """`ShiftedTraces` on a torch device: per-neuron means of a volume sampled at (voxel + shift), trilinear."""

    def __init__(self, extractor: TraceExtractor, device: str | torch.device = "cpu") -> None:
        import torch

        self.shape, self.n_neurons, self.device = extractor.shape, extractor.n_neurons, torch.device(device)
        coords = np.unravel_index(extractor.indices("C").astype(np.int64), self.shape)
        self._coords = [torch.as_tensor(c, device=self.device) for c in coords]     # x, y, z of each voxel
        counts = np.diff(extractor.offsets)
        labels = np.repeat(np.arange(self.n_neurons), counts)                       # neuron of each voxel
        self._labels = torch.as_tensor(labels, device=self.device)
        self._inv = torch.as_tensor(1.0 / counts.astype(np.float32), device=self.device)
        self._bits = torch.arange(2, device=self.device)[:, None]

    def process(self, volume: torch.Tensor, shift: Shift | NDArray[np.float64]) -> torch.Tensor:
        """volume (x, y, z) on the device, any layout, and its shift -> (N,) float32 neuron means there."""
        return self.process_with_stats(volume, shift)[0]

    def process_with_stats(self, volume: torch.Tensor, shift: Shift | NDArray[np.float64],
                           sat_value: float = math.inf) -> tuple[torch.Tensor, TraceStats]:
        """The means and, as `ShiftedTraces`, the saturation counts: samples whose nearest voxel is >=
        `sat_value` (the source dtype's maximum; the tensor may be widened)."""
        import torch

        _check_volume(volume, self.shape)
        d = shift.as_array() if isinstance(shift, Shift) else np.asarray(shift, np.float64)
        base = np.floor(d).astype(np.int64)
        flat, strides = _flat(volume)
        index = self._corner_index(base, strides)                                   # (8, V)
        if not (d - base).any():        # a whole-voxel shift: one read per voxel, as ShiftedTraces
            index = index[:1]
            weight = torch.ones(1, device=self.device)
        else:
            weight = torch.as_tensor(_weights(d - base).astype(np.float32), device=self.device)
        values = flat[index].to(torch.float32)                                      # (corners, V)
        per_voxel = (values * weight[:, None]).sum(0)
        sums = torch.zeros(self.n_neurons, dtype=torch.float32, device=self.device)
        means = sums.index_add_(0, self._labels, per_voxel) * self._inv
        return means, self._saturation(values, weight, sat_value)

    def _saturation(self, values: torch.Tensor, weight: torch.Tensor, sat_value: float) -> TraceStats:
        if math.isinf(sat_value):
            return TraceStats(0, 0)
        import torch

        from loopcast.realtime.preprocess.traces_torch import count_saturated

        hit = values[int(torch.argmax(weight))] >= sat_value                      # (V,) the nearest voxel
        return count_saturated(hit, self._labels, self.n_neurons)

    def _corner_index(self, base: NDArray[np.int64], strides: list[int]) -> torch.Tensor:
        """(8, V) flat indices of every voxel's 8 corners at voxel + base (+ the x, y, z bits of c = 0..7),
        each coordinate clamped to the volume."""
        ox, oy, oz = ((c + int(b) + self._bits).clamp_(0, n - 1) * s                 # (2, V) per axis
                      for c, b, n, s in zip(self._coords, base, self.shape, strides, strict=True))
        return (ox[:, None, None] + oy[None, :, None] + oz[None, None, :]).reshape(8, -1)


def _flat(volume: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """A dense 1-D view of `volume` (a copy only if it is not dense in some axis order) and the element
    stride of its x, y and z in that view."""
    perm = sorted(range(volume.ndim), key=volume.stride, reverse=True)
    dense = volume.permute(perm).contiguous()
    strides = [0] * volume.ndim
    for k, axis in enumerate(perm):
        strides[axis] = dense.stride(k)
    return dense.view(-1), strides


class TorchMotionCorrection(MotionCorrection):
    """The preprocess stage's motion correction on a torch device (realtime/preprocess/motion.py): the volume
    the torch trace path put on the device is registered and read there; the voxel path stays on the host."""

    def __init__(self, extractor: Any, cfg: RegistrationConfig, metrics: Metrics, device: str) -> None:
        self.device = device
        super().__init__(extractor.base, cfg, metrics)
        self._traces = TorchShiftedTraces(extractor.base, device)

    def new_estimator(self) -> TorchShiftEstimator:
        return TorchShiftEstimator(self.shape, self.cfg, self.device)

    def volume(self, volume: NDArray[np.generic]) -> torch.Tensor:
        return device_volume(volume, self.device)

    def measure(self, volume: Any) -> Shift | None:
        """`volume`: the (x, y, z) tensor on the device, or the torch trace path's (flat, order, dtype)."""
        return super().measure(xyz_view(volume, self.shape))

    def traces(self, volume: Any, shift: Shift) -> tuple[Any, TraceStats]:
        """((N,) float32 tensor on the device, saturation counts: with the source dtype's maximum when the
        volume comes as the torch trace path's (flat, order, dtype))."""
        dtype = volume[2] if isinstance(volume, tuple) else None
        sat = float(np.iinfo(dtype).max) if dtype is not None and dtype.kind in "ui" else math.inf
        out: tuple[Any, TraceStats] = self._traces.process_with_stats(xyz_view(volume, self.shape),
                                                                      self.read_at(shift), sat)
        return out


def xyz_view(volume: Any, shape: tuple[int, ...]) -> Any:
    """The (x, y, z) tensor view (no copy) of what `TorchTraceExtractor.to_device` returns, or the tensor itself."""
    if not isinstance(volume, tuple):
        return volume
    flat, order, _ = volume
    return flat.view(shape) if order == "C" else flat.view(shape[::-1]).permute(2, 1, 0)
