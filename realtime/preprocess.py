"""Preprocess stage: volume -> traces -> causal dF/F -> causal spike estimates, per frame."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from realtime.dff import CausalDff, DffConfig
from realtime.metrics import Metrics
from realtime.spikes import CausalSpikes, SpikeConfig, SpikeEstimate
from realtime.traces import TraceExtractor
from realtime.wire import Frame


@dataclass(frozen=True)
class PreprocessConfig:
    """Online dF/F and spike inference settings."""

    dff: DffConfig = field(default_factory=DffConfig)
    spikes: SpikeConfig = field(default_factory=SpikeConfig)


@dataclass(frozen=True)
class Preprocessed:
    """Per-neuron results for one frame (arrays (N,) float32)."""

    seq: int
    fluorescence: np.ndarray
    dff: np.ndarray
    spikes: SpikeEstimate
    ready: bool


class Preprocess:
    """Stage 2. Non-finite samples and floored baselines are repaired and counted, never fatal."""

    def __init__(self, segmentation: np.ndarray, cfg: PreprocessConfig, frame_period_s: float,
                 metrics: Metrics) -> None:
        self.cfg = cfg
        self.frame_period_s = frame_period_s
        self.metrics = metrics
        self.traces = TraceExtractor(segmentation)
        self.n_neurons = self.traces.n_neurons
        self._latency = metrics.latency("preprocess")
        self._nonfinite = metrics.values_invalid.labels(kind="nonfinite_fluorescence")
        self._floored = metrics.values_invalid.labels(kind="floored_baseline")
        self._overrun = metrics.frames_invalid.labels(reason="shm_overrun")
        self.setup()

    def setup(self) -> None:
        self.dff = CausalDff(self.n_neurons, self.cfg.dff)
        self.spikes = CausalSpikes(self.n_neurons, self.cfg.spikes, self.frame_period_s)

    def process(self, frame: Frame) -> Preprocessed | None:
        """One frame -> per-neuron results; None (counted) if its shared-memory slot was reused while
        the traces were extracted, before any state was touched."""
        f = self.traces.process(frame.data)
        if not frame.intact():
            self._overrun.inc()
            return None
        dff, stats = self.dff.process(f)
        if stats.nonfinite:
            self._nonfinite.inc(stats.nonfinite)
        if stats.floored:
            self._floored.inc(stats.floored)
        spikes = self.spikes.process(dff)
        self._latency.observe_since_ns(frame.header.t_src_ns, time.time_ns())
        return Preprocessed(frame.header.seq, f, dff, spikes, ready=self.dff.ready)

    def close(self) -> None:
        pass
