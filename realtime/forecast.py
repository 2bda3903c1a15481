"""Forecast stage: context window -> engine -> forecast published on ZeroMQ with the frame's header."""
from __future__ import annotations

import time
from dataclasses import dataclass
import numpy as np

from realtime.engine import Engine, EngineError
from realtime.metrics import Metrics
from realtime.transport import Publisher
from realtime.wire import FrameHeader, ForecastHeader, encode_forecast


@dataclass(frozen=True)
class ForecastConfig:
    """Which engine to run and how forecasts are published."""

    engine: str = ""        # a registry entry (newest version) or one version dir; "" = what `train` makes
    runtime: str = "onnxruntime"
    threads: int = 1
    sndhwm: int = 16
    wait_subscribers: int = 0                # wait for this many forecast subscribers at start
    wait_timeout_s: float = 10.0


class ForecastStage:
    """Stage 3. One forecast per call, stamped with the producing frame's seq and t_src_ns."""

    def __init__(self, engine: Engine, publisher: Publisher, metrics: Metrics) -> None:
        if engine.manifest.task != "forecast":
            raise EngineError(f"{engine.manifest.path}: a {engine.manifest.task!r} engine cannot run as the "
                              f"forecaster; point [pipeline.forecast] engine at a forecast engine")
        self.engine = engine
        self.publisher = publisher
        self.metrics = metrics
        self._latency = metrics.latency("forecast")
        self.model = engine.manifest.model
        self.context = engine.manifest.context
        self.lead_times = tuple(engine.manifest.lead_times)
        self._count = metrics.forecasts.labels(model=self.model)
        self.published = 0

    def setup(self, n_neurons: int) -> None:
        self.engine.check_neurons(n_neurons)

    def process(self, window: np.ndarray, frame: FrameHeader) -> tuple[ForecastHeader, np.ndarray]:
        """window (C, N) float32 -> forecast (H, N) float32, published; returns both."""
        pred = self.engine.run(window)
        header = ForecastHeader(seq=frame.seq, t_src_ns=frame.t_src_ns, model=self.model,
                                engine_version=self.engine.version, lead_times=self.lead_times,
                                shape=tuple(pred.shape), t_pub_ns=time.time_ns(), frame=frame.to_wire())
        self.publisher.send(encode_forecast(header, pred))
        self._latency.observe_since_ns(frame.t_src_ns, time.time_ns())
        self._count.inc()
        self.published += 1
        return header, pred

    def close(self) -> None:
        self.publisher.close()
