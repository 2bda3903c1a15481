"""Motion correction inside the preprocess stage: the per-frame shift, the gauges, and reading through it.

Per frame, in this order (`Preprocess.process`):
1. `measure(volume)`: the volume's shift against the reference (`ShiftEstimator.measure`), reference untouched;
2. the traces are read through that shift (`traces`), the per-voxel volume moved back (`voxels`);
3. only if the frame's shared-memory slot stayed intact: `commit()` lets the volume into the reference
   (warm-up) or applies the refresh rule, and the gauges are set.
During the reference's warm-up (the first `warmup_frames` volumes of a session) `measure` returns None: the
traces are read unregistered and the stage is not ready (no forecast is made from them). After a new
session of the source (`reset`) the reference is built again.

Backends: numpy (compiled kernels; realtime.preprocess.registration) or torch on a device
(realtime.preprocess.registration_torch), chosen with the preprocess stage's backend.
"""
from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import NDArray

from loopcast.realtime.metrics import Metrics
from loopcast.realtime.preprocess.registration import RegistrationConfig, Shift, ShiftEstimator
from loopcast.realtime.preprocess.shifted_traces import ShiftedTraces
from loopcast.realtime.preprocess.traces import TraceExtractor, TraceStats
from loopcast.realtime.preprocess.voxel_shift import shift_back

AXES = ("x", "y", "z")


class MotionCorrection:
    """Online rigid registration for the preprocess stage (numpy backend; see the module docstring)."""

    def __init__(self, extractor: TraceExtractor, cfg: RegistrationConfig, metrics: Metrics) -> None:
        self.cfg = cfg
        x, y, z = extractor.shape
        self.shape = (x, y, z)
        self._traces: Any = ShiftedTraces(extractor)
        self._gauges = [metrics.registration_shift.labels(axis=a) for a in AXES]
        self._confidence = metrics.registration_confidence
        self.last: Shift | None = None
        self.reset()

    def new_estimator(self) -> Any:
        """A fresh estimator of this backend (no reference yet)."""
        return ShiftEstimator(self.shape, self.cfg)

    def reset(self) -> None:
        """A new reference from the next volumes (a new session of the source)."""
        self.estimator = self.new_estimator()
        self._measured: Shift | None = None

    @property
    def ready(self) -> bool:
        """Whether the reference is complete."""
        return bool(self.estimator.ready)

    def warm_up(self, dtype: str) -> None:
        """Compile every kernel of a frame on a throwaway estimator (both memory orders); state untouched."""
        est = self.new_estimator()
        for order in ("F", "C"):
            vol = self.volume(np.zeros(self.shape, dtype, order=order))
            est.add_reference_frame(vol)
            self._traces.process(vol, Shift(0.5, 0.5, 0.5, 0.0))
        shift_back(np.zeros((2, 2, 2), np.float32), (0.5, 0.5, 0.5))

    def volume(self, volume: NDArray[np.generic]) -> Any:
        """A host volume as this backend's `measure` and `traces` take it (numpy: itself)."""
        return volume

    def measure(self, volume: Any) -> Shift | None:
        """This volume's shift against the complete reference; None while the reference is being built."""
        ready = self.estimator.ready
        shift = self.estimator.measure(volume)
        self._measured = shift if ready else None
        return self._measured

    def read_at(self, shift: Shift) -> Shift:
        """Where the traces and voxels are read: the shift, or its whole voxels (`interpolation = "nearest"`)."""
        if self.cfg.interpolation != "nearest":
            return shift
        d = np.round(shift.as_array())
        return Shift(float(d[0]), float(d[1]), float(d[2]), shift.confidence)

    def commit(self) -> None:
        """The frame was read intact: the reference takes it in (its rules), the gauges show its shift."""
        self.estimator.commit()
        shift, self._measured = self._measured, None
        if shift is None:
            return
        self.last = shift
        for gauge, value in zip(self._gauges, shift.as_array(), strict=True):
            gauge.set(value)
        self._confidence.set(shift.confidence)

    def traces(self, volume: Any, shift: Shift) -> tuple[Any, TraceStats]:
        """((N,) float32 neuron means of the volume read at voxel + shift, saturation counts)."""
        out: tuple[Any, TraceStats] = self._traces.process_with_stats(volume, self.read_at(shift))
        return out

    def voxels(self, downsampled: NDArray[np.float32], shift: Shift, factor: int,
               out: NDArray[np.float32] | None = None) -> NDArray[np.float32]:
        """The xy-downsampled volume moved back into the reference's frame (shift in its voxels)."""
        at = self.read_at(shift)
        return shift_back(downsampled, (at.dx / factor, at.dy / factor, at.dz), out=out)


def registration_tuple(shift: Shift | None) -> tuple[float, ...]:
    """(dx, dy, dz, confidence) for a forecast header, () without a shift."""
    return () if shift is None else (shift.dx, shift.dy, shift.dz, shift.confidence)
