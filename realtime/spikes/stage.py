"""Causal spike inference from dF/F, one frame at a time, by one of three methods behind one interface.

  oasis          streaming thresholded AR(1) deconvolution (realtime.spikes.oasis), parameters per neuron from
                 the first `oasis.warmup` frames (the default)
  engine         the learned causal spike net, an exported engine with task "spikes" (ONNX Runtime),
                 fed the last C frames of dF/F
  ar1_threshold  one-step AR(1) inversion with a noise threshold (the walking skeleton's method)

Every method outputs, per neuron and frame, the expected spike count, the rate (count / dt) and the
probability of at least one spike, 1 - exp(-rate * dt): what the Sparse Brain Model consumes.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import numpy as np

from loopcast.realtime.engines.loader import load_engine
from loopcast.realtime.engines.manifest import EngineError
from loopcast.realtime.spikes.oasis import OasisConfig, StreamingOasis

if TYPE_CHECKING:
    from loopcast.realtime.spikes.oasis_torch import TorchStreamingOasis

METHODS = ("oasis", "engine", "ar1_threshold")


@dataclass(frozen=True)
class SpikeConfig:
    """Which estimator, and its parameters."""

    method: str = "oasis"
    dff_per_spike: float = 0.08       # a: dF/F of one spike; converts deconvolved amounts to counts
    oasis: OasisConfig = field(default_factory=OasisConfig)
    fit_in_background: bool = True    # oasis: the parameter fit ending the warm-up on its own thread, not the loop's
    engine: str = ""                  # method "engine": engine version dir or registry name dir
    engine_threads: int = 1
    # ar1_threshold only
    warmup: int = 30
    tau_decay_s: float = 0.0          # 0 = estimate the decay per neuron on warm-up data
    threshold_sigma: float = 2.0
    min_decay: float = 0.05
    max_decay: float = 0.98

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown spike inference method {self.method!r} (available: {', '.join(METHODS)})")
        if self.warmup < 3 or self.dff_per_spike <= 0 or self.threshold_sigma < 0:
            raise ValueError("warmup must be >= 3, dff_per_spike > 0, threshold_sigma >= 0")
        if self.method == "engine" and not self.engine:
            raise ValueError("spike method 'engine' needs `engine` = an exported spike engine directory")
        if self.engine_threads < 1:
            raise ValueError(f"engine_threads must be >= 1, got {self.engine_threads}")


@dataclass(frozen=True)
class SpikeEstimate:
    """Per-neuron outputs for one frame (all (N,) float32)."""

    count: np.ndarray
    rate_hz: np.ndarray
    prob: np.ndarray

    @classmethod
    def from_count(cls, count: np.ndarray, dt: float) -> SpikeEstimate:
        """Counts per frame (clipped at 0) -> count, rate = count / dt, prob = 1 - exp(-rate * dt)."""
        count = np.maximum(count, 0.0).astype(np.float32, copy=False)
        return cls(count, count / np.float32(dt), (-np.expm1(-count)).astype(np.float32))


class SpikeEstimator(Protocol):
    """What the preprocess stage needs from a method."""

    @property
    def ready(self) -> bool: ...

    def process(self, dff: np.ndarray) -> SpikeEstimate: ...

    def warm_up(self) -> None:
        """Run the method's compiled and lazily initialised paths once, leaving this estimator unchanged."""


def make_spike_estimator(n_neurons: int, cfg: SpikeConfig, frame_period_s: float,
                         device: str | None = None) -> SpikeEstimator:
    """The configured method for n_neurons at the rig's frame period; `device` (torch backend) runs
    OASIS there and takes its dF/F as a tensor on that device."""
    if cfg.method == "oasis":
        return OasisSpikes(n_neurons, cfg, frame_period_s, device)
    if cfg.method == "engine":
        return EngineSpikes(n_neurons, cfg, frame_period_s)
    return CausalSpikes(n_neurons, cfg, frame_period_s)


class OasisSpikes:
    """Streaming OASIS; counts = deconvolved amount / dff_per_spike, for frame t - oasis.lag."""

    def __init__(self, n_neurons: int, cfg: SpikeConfig, frame_period_s: float,
                 device: str | None = None) -> None:
        self.cfg, self.dt, self.device = cfg, frame_period_s, device
        if device is None:
            self.oasis: StreamingOasis | TorchStreamingOasis = StreamingOasis(
                n_neurons, None, cfg.oasis, frame_period_s, background=cfg.fit_in_background)
        else:
            from loopcast.realtime.spikes.oasis_torch import TorchStreamingOasis
            self.oasis = TorchStreamingOasis(n_neurons, None, cfg.oasis, frame_period_s, device=device,
                                             background=cfg.fit_in_background)
        self._zero = SpikeEstimate.from_count(np.zeros(n_neurons, np.float32), frame_period_s)

    @property
    def ready(self) -> bool:
        """True from the first frame after the warm-up with a real estimate (the frame that ends the
        warm-up, and those that come while the parameters are fitted in the background, report zeros)."""
        return self.oasis.ready and self.oasis.frames > self.cfg.oasis.warmup + self.cfg.oasis.lag

    def warm_up(self) -> None:
        """Run throwaway estimators of the same N (and device) on seeded noise, with a warm-up of
        `oasis.min_fit_frames` frames instead of `oasis.warmup`, through the end of their warm-up and
        two frames past it: the parameter fit, the replay of the warm-up frames into the pools and the
        per-frame step all run (numba `_run_block` and `_stream_step`, each seconds to compile, ran at
        the end of the live warm-up, frame 100). With the fit in the background, a second one takes
        that path too (its job's serial replay kernel), waited for. These estimators see nothing."""
        oasis = dataclasses.replace(self.cfg.oasis, warmup=self.cfg.oasis.min_fit_frames)
        for background in sorted({False, self.cfg.fit_in_background}):
            cfg = dataclasses.replace(self.cfg, oasis=oasis, fit_in_background=background)
            scratch = OasisSpikes(self.oasis.n, cfg, self.dt, self.device)
            rng = np.random.default_rng(0)
            for _ in range(oasis.warmup):
                scratch.process(rng.normal(0.0, 0.05, self.oasis.n).astype(np.float32))
            scratch.oasis.wait_for_fit()
            for _ in range(oasis.lag + 2):
                scratch.process(rng.normal(0.0, 0.05, self.oasis.n).astype(np.float32))
            if not scratch.ready:
                raise RuntimeError("the spike estimator's warm-up did not reach its per-frame step")

    def process(self, dff: np.ndarray) -> SpikeEstimate:
        s = self.oasis.process(dff)
        if not isinstance(s, np.ndarray):                     # TorchStreamingOasis: a tensor on its device
            s = s.cpu().numpy()
        if not self.ready:
            return self._zero
        return SpikeEstimate.from_count(s / np.float32(self.cfg.dff_per_spike), self.dt)


class EngineSpikes:
    """The learned causal net: a ring of the last C dF/F frames -> engine -> counts of the current frame."""

    def __init__(self, n_neurons: int, cfg: SpikeConfig, frame_period_s: float) -> None:
        self.engine = load_engine(cfg.engine, threads=cfg.engine_threads)
        m = self.engine.manifest
        if m.task != "spikes":
            raise EngineError(f"{m.path}: spike method 'engine' needs a task 'spikes' engine, this one is "
                              f"{m.task!r}")
        self.engine.check_neurons(n_neurons)
        self.dt, self.frames = frame_period_s, 0
        self._ring = np.zeros((2 * m.context, n_neurons), np.float32)   # doubled: each window is one slice
        self._zero = SpikeEstimate.from_count(np.zeros(n_neurons, np.float32), frame_period_s)

    @property
    def ready(self) -> bool:
        return self.frames >= self.engine.manifest.context

    def warm_up(self) -> None:
        """One engine call on a zero window (the runtime's lazy set-up); the ring and frame count stay."""
        self.engine.run(np.zeros((self.engine.manifest.context, self._ring.shape[1]), np.float32))

    def process(self, dff: np.ndarray) -> SpikeEstimate:
        c = self.engine.manifest.context
        i = self.frames % c
        self._ring[i] = self._ring[i + c] = dff
        self.frames += 1
        if not self.ready:
            return self._zero
        window = self._ring[i + 1:i + 1 + c]                             # (C, N), oldest first
        return SpikeEstimate.from_count(self.engine.run(window)[0], self.dt)


class CausalSpikes:
    """One-step AR(1) inversion: s_t ~ (dff_t - g dff_{t-1}) / a above `threshold_sigma` noise; g and sigma
    per neuron from the first `warmup` frames (g = acov(2)/acov(1), unbiased by white noise)."""

    def __init__(self, n_neurons: int, config: SpikeConfig, frame_period_s: float) -> None:
        self.cfg = config
        self.dt = frame_period_s
        self.n = n_neurons
        self._warm = np.zeros((config.warmup, n_neurons), dtype=np.float32)
        self._prev = np.zeros(n_neurons, dtype=np.float32)
        self.frames = 0
        self.decay = np.zeros(n_neurons, dtype=np.float32)
        self.sigma = np.ones(n_neurons, dtype=np.float32)

    @property
    def ready(self) -> bool:
        return self.frames >= self.cfg.warmup

    def warm_up(self) -> None:
        """Run a throwaway estimator through its warm-up and one frame past it (numpy only: nothing is
        compiled, but the interface is the same); this one sees nothing."""
        scratch = CausalSpikes(self.n, self.cfg, self.dt)
        rng = np.random.default_rng(0)
        for _ in range(self.cfg.warmup + 1):
            scratch.process(rng.normal(0.0, 0.05, self.n).astype(np.float32))

    def process(self, dff: np.ndarray) -> SpikeEstimate:
        """dff (N,) -> spike estimate for this frame (zeros in warm-up)."""
        if not self.ready:
            self._warm[self.frames] = dff
            self.frames += 1
            if self.ready:
                self._estimate(self._warm)
            self._prev = dff.astype(np.float32, copy=True)
            return SpikeEstimate.from_count(np.zeros(self.n, np.float32), self.dt)
        self.frames += 1
        resid = dff - self.decay * self._prev
        self._prev = dff.astype(np.float32, copy=True)
        count = np.where(resid > self.cfg.threshold_sigma * self.sigma, resid / self.cfg.dff_per_spike, 0.0)
        return SpikeEstimate.from_count(count, self.dt)

    def _estimate(self, x: np.ndarray) -> None:
        """Per-neuron decay and noise from warm-up data x (W, N)."""
        if self.cfg.tau_decay_s > 0:
            g = np.full(self.n, math.exp(-self.dt / self.cfg.tau_decay_s), dtype=np.float32)
        else:
            xc = x - x.mean(axis=0)
            acov1 = (xc[1:] * xc[:-1]).mean(axis=0)
            acov2 = (xc[2:] * xc[:-2]).mean(axis=0)
            g = np.divide(acov2, acov1, out=np.zeros(self.n), where=acov1 > 0)
        self.decay = np.clip(g, self.cfg.min_decay, self.cfg.max_decay).astype(np.float32)
        mad = np.median(np.abs(np.diff(x, axis=0)), axis=0)
        self.sigma = np.maximum(mad / 0.6745 / math.sqrt(2.0), 1e-4).astype(np.float32)
