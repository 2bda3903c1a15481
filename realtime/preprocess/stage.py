"""Preprocess stage: volume -> traces -> causal dF/F -> causal spike estimates (+ per-voxel dF/F), per frame.

Two backends behind one stage. "numpy" (the default, any machine): compiled CPU kernels. "torch": traces,
dF/F and streaming OASIS on a torch device (CUDA on GPU machines), results brought back as numpy.
Nothing here is fatal to the loop: non-finite samples, floored baselines and saturated voxels are repaired
or kept as documented and counted in `loopcast_values_invalid_total{kind=...}`.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from loopcast.realtime.metrics import Metrics
from loopcast.realtime.preprocess.dff import CausalDff, DffConfig, DffStats
from loopcast.realtime.preprocess.motion import MotionCorrection
from loopcast.realtime.preprocess.registration import RegistrationConfig, Shift
from loopcast.realtime.preprocess.traces import METHODS as TRACE_METHODS
from loopcast.realtime.preprocess.traces import TraceExtractor, TraceStats
from loopcast.realtime.preprocess.voxel_dff import VoxelDff, VoxelDffConfig, downsample_xy
from loopcast.realtime.spikes.stage import EngineSpikes, SpikeConfig, SpikeEstimate, make_spike_estimator
from loopcast.realtime.wire.codec import Frame

BACKENDS = ("numpy", "torch")


@dataclass(frozen=True)
class VoxelStageConfig:
    """Per-voxel causal dF/F of the 4x-downsampled volume (the video forecaster's input); off by default."""

    enabled: bool = False
    factor: int = 4
    dff: VoxelDffConfig = field(default_factory=VoxelDffConfig)


@dataclass(frozen=True)
class PreprocessConfig:
    """Online traces, dF/F and spike inference settings."""

    backend: str = "numpy"       # "torch": traces, dF/F and OASIS on `device`
    device: str = "cpu"          # torch backend only, e.g. "cuda"
    traces: str = "csr"          # numpy backend: "csr" or the naive "bincount"
    dff: DffConfig = field(default_factory=DffConfig)
    spikes: SpikeConfig = field(default_factory=SpikeConfig)
    voxels: VoxelStageConfig = field(default_factory=VoxelStageConfig)
    registration: RegistrationConfig = field(default_factory=RegistrationConfig)

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"unknown preprocess backend {self.backend!r}; available: {list(BACKENDS)}")
        if self.traces not in TRACE_METHODS:
            raise ValueError(f"unknown trace extraction method {self.traces!r}; available: {list(TRACE_METHODS)}")
        if self.backend == "torch" and self.spikes.method == "ar1_threshold":
            raise ValueError("the torch backend runs spike methods 'oasis' or 'engine', not 'ar1_threshold'")


@dataclass(frozen=True)
class Preprocessed:
    """Per-neuron results for one frame (arrays (N,) float32); voxel_dff (X/f, Y/f, Z) when enabled.
    `ready`: the dF/F baselines (and, with the voxel stage, the voxel baselines) are past warm-up, and with
    registration this volume was registered (its reference complete); `spikes_ready`: the spike estimator
    is past its warm-up (its estimates are zeros before); `shift`: the volume's registration shift (None
    when registration is off or warming up)."""

    seq: int
    fluorescence: np.ndarray
    dff: np.ndarray
    spikes: SpikeEstimate
    ready: bool
    voxel_dff: np.ndarray | None = None
    spikes_ready: bool = True
    shift: Shift | None = None


class _NumpyPath:
    """Traces and dF/F on the CPU (compiled kernels)."""

    def __init__(self, segmentation: np.ndarray, cfg: PreprocessConfig) -> None:
        self.traces = TraceExtractor(segmentation, cfg.traces)
        self.n_neurons = self.traces.n_neurons
        self.reset(cfg)

    def reset(self, cfg: PreprocessConfig) -> None:
        self.dff = CausalDff(self.n_neurons, cfg.dff)

    def process(self, volume: np.ndarray) -> tuple[np.ndarray, TraceStats]:
        return self.traces.process_with_stats(volume)

    def device_volume(self, volume: np.ndarray) -> np.ndarray:
        return volume

    def dff_step(self, f: np.ndarray) -> tuple[np.ndarray, DffStats, np.ndarray]:
        """f -> (dF/F, repair stats, the spike estimator's input: the same dF/F)."""
        dff, stats = self.dff.process(f)
        return dff, stats, dff


class _TorchPath:
    """Traces and dF/F on a torch device; the dF/F tensor stays there for the torch OASIS."""

    def __init__(self, segmentation: np.ndarray, cfg: PreprocessConfig) -> None:
        from loopcast.realtime.preprocess.traces_torch import TorchTraceExtractor
        self.traces = TorchTraceExtractor(segmentation, cfg.device)
        self.n_neurons = self.traces.n_neurons
        self.reset(cfg)

    def reset(self, cfg: PreprocessConfig) -> None:
        from loopcast.realtime.preprocess.dff_torch import TorchCausalDff
        self.dff = TorchCausalDff(self.n_neurons, cfg.dff, cfg.device)
        self._spikes_on_device = cfg.spikes.method == "oasis"

    def process(self, volume: Any) -> tuple[Any, TraceStats]:
        return self.traces.process_with_stats(volume)

    def device_volume(self, volume: np.ndarray) -> Any:
        """The volume copied to the device once, for the registration and the traces."""
        return self.traces.to_device(volume)

    def dff_step(self, f: Any) -> tuple[np.ndarray, DffStats, Any]:
        """f -> (dF/F as numpy, repair stats, the spike estimator's input: the device tensor for the
        torch OASIS, else the numpy copy)."""
        on_device, stats = self.dff.process(f)
        dff = on_device.cpu().numpy()
        return dff, stats, on_device if self._spikes_on_device else dff


def make_motion(extractor: Any, cfg: RegistrationConfig, metrics: Metrics, backend: str,
                device: str) -> MotionCorrection | None:
    """The stage's motion correction for its backend (the torch one on the torch trace path's extractor),
    or None when registration is off."""
    if not cfg.enabled:
        return None
    if backend == "torch":
        from loopcast.realtime.preprocess.registration_torch import TorchMotionCorrection
        return TorchMotionCorrection(extractor, cfg, metrics, device)
    return MotionCorrection(extractor, cfg, metrics)


class Preprocess:
    """Stage 2: setup / process / close."""

    def __init__(self, segmentation: np.ndarray, cfg: PreprocessConfig, frame_period_s: float,
                 metrics: Metrics) -> None:
        self.cfg = cfg
        self.frame_period_s = frame_period_s
        self.metrics = metrics
        self.path = _TorchPath(segmentation, cfg) if cfg.backend == "torch" else _NumpyPath(segmentation, cfg)
        self.n_neurons = self.path.n_neurons
        self.volume_shape = tuple(segmentation.shape)
        self.motion = make_motion(self.path.traces, cfg.registration, metrics, cfg.backend, cfg.device)
        self._latency = metrics.latency("preprocess")
        invalid = metrics.values_invalid
        self._count = {k: invalid.labels(kind=k) for k in
                       ("nonfinite_fluorescence", "floored_baseline", "saturated_neuron", "nonfinite_voxel",
                        "floored_voxel_baseline")}
        self._overrun = metrics.frames_invalid.labels(reason="shm_overrun")
        self.setup()

    def setup(self) -> None:
        """Fresh online state (dF/F windows, spike estimator, voxel baselines, registration reference)."""
        self.path.reset(self.cfg)
        if self.motion is not None:
            self.motion.reset()
        device = self.cfg.device if self.cfg.backend == "torch" else None
        self.spikes = make_spike_estimator(self.n_neurons, self.cfg.spikes, self.frame_period_s, device)
        self._fresh_voxels()

    def _fresh_voxels(self) -> None:
        self.voxels: VoxelDff | None = None
        if self.cfg.voxels.enabled:
            x, y, z = self.volume_shape
            f = self.cfg.voxels.factor
            self.voxels = VoxelDff((x // f, y // f, z), self.cfg.voxels.dff)
            self._ds = np.empty(self.voxels.shape, np.float32)
            self._ds_moved = np.empty(self.voxels.shape, np.float32) if self.motion is not None else None

    def reset(self) -> None:
        """A new session of the source: the online state starts over exactly as `setup` makes it (dF/F windows
        and warm-up, spike estimator, voxel baselines), except that a spike engine stays loaded and warm: only
        its window and frame count start over."""
        spikes = self.spikes
        if not isinstance(spikes, EngineSpikes):
            self.setup()
            return
        spikes.frames = 0
        spikes._ring.fill(0)
        self.path.reset(self.cfg)
        self._fresh_voxels()
        if self.motion is not None:
            self.motion.reset()

    def warm_up(self, dtype: str) -> dict[str, float]:
        """Run every compiled or lazily initialised path of `process` once, before frames flow: trace
        extraction on synthetic volumes of the segmentation's shape in `dtype` (both memory orders), dF/F
        and the spike estimator on throwaway instances of the same N (and device), and with the voxel
        stage the downsampling (both orders) and the voxel baselines (which start over after), with
        registration its kernels on a throwaway estimator. This stage's state and counters are left as they
        were. Returns seconds per part: traces, dff, spikes (, voxels) (, registration)."""
        times: dict[str, float] = {}
        t = time.perf_counter()

        def lap(part: str) -> None:
            nonlocal t
            now = time.perf_counter()
            times[part], t = now - t, now

        self.path.traces.warm_up(dtype)
        lap("traces")
        self.path.dff.warm_up()
        lap("dff")
        self.spikes.warm_up()
        lap("spikes")
        if self.voxels is not None:
            for order in ("F", "C"):
                downsample_xy(np.zeros(self.volume_shape, dtype, order=order), self.cfg.voxels.factor, out=self._ds)
            self.voxels.warm_up()
            lap("voxels")
        if self.motion is not None:
            self.motion.warm_up(dtype)
            lap("registration")
        return times

    def process(self, frame: Frame) -> Preprocessed | None:
        """One frame -> per-neuron results; None (counted) if its shared-memory slot was reused while
        it was read, before any state was touched. With registration, the volume's shift is measured first
        and the traces (and voxels) are read through it (realtime/preprocess/motion.py)."""
        shift, f, tstats = self._traces(frame.data)
        voxel_in = self._downsample(frame.data)
        if not frame.intact():
            self._overrun.inc()
            return None
        if self.motion is not None:
            self.motion.commit()
        self._inc("saturated_neuron", tstats.saturated_neurons)
        dff, stats, spike_in = self.path.dff_step(f)
        self._inc("nonfinite_fluorescence", stats.nonfinite)
        self._inc("floored_baseline", stats.floored)
        spikes = self.spikes.process(spike_in)
        voxel_dff = self._voxel_dff(self._moved_back(voxel_in, shift))
        self._latency.observe_since_ns(frame.header.t_src_ns, time.time_ns())
        f_np = f if isinstance(f, np.ndarray) else f.cpu().numpy()
        ready = (self.path.dff.ready and (self.voxels is None or self.voxels.ready)
                 and (self.motion is None or shift is not None))
        return Preprocessed(frame.header.seq, f_np, dff, spikes, ready, voxel_dff, bool(self.spikes.ready), shift)

    def _traces(self, volume: np.ndarray) -> tuple[Shift | None, Any, TraceStats]:
        """(shift, traces, saturation): unregistered without registration or during its warm-up; through
        the shift after."""
        if self.motion is None:
            return None, *self.path.process(volume)
        on_device = self.path.device_volume(volume)
        shift = self.motion.measure(on_device)
        if shift is None:
            return None, *self.path.process(on_device)
        return shift, *self.motion.traces(on_device, shift)

    def _moved_back(self, ds: np.ndarray | None, shift: Shift | None) -> np.ndarray | None:
        if ds is None or shift is None or self.motion is None:
            return ds
        return self.motion.voxels(ds, shift, self.cfg.voxels.factor, out=self._ds_moved)

    def _downsample(self, volume: np.ndarray) -> np.ndarray | None:
        if self.voxels is None:
            return None
        return downsample_xy(volume, self.cfg.voxels.factor, out=self._ds)

    def _voxel_dff(self, ds: np.ndarray | None) -> np.ndarray | None:
        if ds is None or self.voxels is None:
            return None
        out, stats = self.voxels.process(ds)
        self._inc("nonfinite_voxel", stats.nonfinite)
        self._inc("floored_voxel_baseline", stats.floored)
        return out

    def _inc(self, kind: str, n: int) -> None:
        if n:
            self._count[kind].inc(n)

    def close(self) -> None:
        pass

