"""Forecast stage: context window -> engine -> forecast published on ZeroMQ with the frame's header.

With an `EngineWatcher` the stage hot-swaps engines: a newer registry version, loaded and validated in
the background, replaces the serving engine at the start of a `process` call (the frame boundary), so
no frame is dropped and every forecast's header names the engine version that produced it.
"""
from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from realtime.engine import Engine, EngineError, load_engine
from realtime.engine_watch import EngineWatcher, Loader, close_engine, watch_dir
from realtime.metrics import Metrics
from realtime.preprocess import Preprocessed
from realtime.transport import Publisher
from realtime.wire import FrameHeader, ForecastHeader, encode_forecast

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ForecastConfig:
    """Which engine to run, on what, whether to follow new registry versions, how forecasts are published."""

    engine: str = ""        # a registry entry (newest version) or one version dir; "" = what `train` makes
    runtime: str = "onnxruntime"
    threads: int = 1
    device: str = "cpu"                      # "cpu" or "cuda[:k]"
    watch: bool = True                       # hot swap to newer versions of a registry entry
    watch_interval_s: float = 1.0
    lead_times: tuple[int, ...] = ()         # video engines: lead times to forecast (() = all 1..H)
    lead_batch: int = 8                      # video engines: lead times per engine call
    sndhwm: int = 16
    wait_subscribers: int = 0                # wait for this many forecast subscribers at start
    wait_timeout_s: float = 10.0


def engine_loader(cfg: ForecastConfig) -> Loader:
    """path -> engine with the configured runtime, threads and device."""
    return functools.partial(load_engine, runtime=cfg.runtime, threads=cfg.threads, device=cfg.device)


def engine_watcher(path: str | Path, cfg: ForecastConfig, loader: Loader,
                   metrics: Metrics) -> EngineWatcher | None:
    """A watcher of the registry entry `path`; None when watching is off or `path` pins one version."""
    name_dir = watch_dir(path) if cfg.watch else None
    if name_dir is None:
        return None
    return EngineWatcher(name_dir, loader, metrics, cfg.watch_interval_s)


def _check_forecaster(engine: Engine) -> None:
    if engine.manifest.task != "forecast":
        raise EngineError(f"{engine.manifest.path}: a {engine.manifest.task!r} engine cannot run as the "
                          f"forecaster; point [pipeline.forecast] engine at a forecast engine")
    if engine.manifest.n_covariates:
        raise EngineError(f"{engine.manifest.path}: engine {engine.version} needs future stimulus covariates "
                          f"and the live pipeline has no stimulus feed; serve a trace-only engine")


class ForecastStage:
    """Stage 3. One forecast per call, stamped with the producing frame's seq and t_src_ns."""

    def __init__(self, engine: Engine, publisher: Publisher, metrics: Metrics,
                 watcher: EngineWatcher | None = None) -> None:
        self._check(engine)
        self.publisher = publisher
        self.metrics = metrics
        self.watcher = watcher
        self._latency = metrics.latency("forecast")
        self.context = engine.manifest.context  # fixed for the stage's life: a swap keeps it
        self.published = 0
        self.swaps = 0
        self._serve(engine)

    def _serve(self, engine: Engine) -> None:
        self.engine = engine
        self.model = engine.manifest.model
        self.lead_times = tuple(engine.manifest.lead_times)
        self._count = self.metrics.forecasts.labels(model=self.model)
        self.metrics.engine_info.info({"engine": engine.version, "model": self.model})

    def _check(self, engine: Engine) -> None:
        _check_forecaster(engine)

    def row_size(self, n_neurons: int) -> int:
        """Values per frame in the context buffer: one dF/F value per neuron."""
        return n_neurons

    def row(self, pre: Preprocessed) -> np.ndarray:
        """What one preprocessed frame adds to the context: its per-neuron dF/F (N,)."""
        return pre.dff

    def _predict(self, engine: Engine, window: np.ndarray) -> np.ndarray:
        return engine.run(window)

    def setup(self, n_neurons: int) -> None:
        """Check the neuron count; start watching for newer versions (valid for it) if configured."""
        self.engine.check_neurons(n_neurons)
        if self.watcher is not None:
            self.watcher.start(self.engine, n_neurons)

    def _swap_if_ready(self, seq: int) -> None:
        new = self.watcher.take() if self.watcher is not None else None
        if new is None:
            return
        old = self.engine
        self._serve(new)
        self.swaps += 1
        self.metrics.engine_swaps.inc()
        log.info("engine swap at frame seq %d: %s -> %s", seq, old.version, new.version)
        close_engine(old)

    def process(self, window: np.ndarray, frame: FrameHeader) -> tuple[ForecastHeader, np.ndarray]:
        """window (C, N) float32 -> forecast (H, N) float32, published; returns both. A validated newer
        engine takes over here, before the forecast, so the header names the engine that made it."""
        self._swap_if_ready(frame.seq)
        engine = self.engine
        pred = self._predict(engine, window)
        header = ForecastHeader(seq=frame.seq, t_src_ns=frame.t_src_ns, model=self.model,
                                engine_version=engine.version, lead_times=self.lead_times,
                                shape=tuple(pred.shape), t_pub_ns=time.time_ns(), frame=frame.to_wire())
        self.publisher.send(encode_forecast(header, pred))
        self._latency.observe_since_ns(frame.t_src_ns, time.time_ns())
        self._count.inc()
        self.published += 1
        return header, pred

    def close(self) -> None:
        if self.watcher is not None:
            self.watcher.stop()
        self.publisher.close()
