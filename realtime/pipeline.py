"""The real-time pipeline: source -> ingest -> preprocess -> context -> forecast stage(s) -> publish.

One loop in one thread. Every queued frame is validated and preprocessed (dF/F state stays exact),
but only the newest of a backlog is forecast: latency stays bounded and what was skipped is counted
in `loopcast_frames_dropped_total{reason="forecast_skipped"}`. Several stages (e.g. a forecaster and an
activation predictor) may run side by side: each has its own context buffer of its engine's rows and
runs once its context is full and its inputs (dF/F, spike estimates) are past warm-up.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence

import numpy as np

from realtime.context import ContextBuffer
from realtime.forecast import ForecastConfig, ForecastStage
from realtime.ingest import Ingest, RigConfig
from realtime.metrics import Metrics
from realtime.preprocess import Preprocess, PreprocessConfig
from realtime.wire import Frame, FrameHeader

log = logging.getLogger(__name__)
MAX_CONSECUTIVE_FAILURES = 10  # a broken engine stops the pipeline loudly instead of limping on


@dataclass(frozen=True)
class SourceConfig:
    """Where frames come from (ZeroMQ SUB) and how much may queue."""

    rcvhwm: int = 4
    poll_ms: int = 100
    max_batch: int = 16


@dataclass(frozen=True)
class PipelineConfig:
    """`loopcast run`: stage settings; endpoints and the rig come from the top-level config."""

    source: SourceConfig = field(default_factory=SourceConfig)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    forecast: ForecastConfig = field(default_factory=ForecastConfig)
    max_frames: int = 0          # stop after this many valid frames (0 = run until stopped)
    idle_timeout_s: float = 0.0  # stop when no frame arrived for this long after the first (0 = never)


class FrameSource(Protocol):
    """Anything that yields raw multipart messages: a live ZeroMQ subscriber
    (realtime.transport.Subscriber) or a recording read in process (replay.player.RecordingSource)."""

    @property
    def finished(self) -> bool: ...
    def recv_all(self, timeout_ms: int, limit: int = 64) -> list[Sequence[Any]]: ...
    def close(self) -> None: ...


@dataclass
class PipelineReport:
    """What a run did, for the summary file and the demo. `forecasts` and `first_forecast_seq` are the
    first stage's (`Pipeline.forecast`); `published` and `failures` count per stage, keyed by its topic
    ('forecast/<model>', 'activation/<model>')."""

    frames: int = 0
    forecasts: int = 0
    last_seq: int | None = None
    first_forecast_seq: int | None = None
    published: dict[str, int] = field(default_factory=dict)
    failures: dict[str, int] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)


class Pipeline:
    """Owns the stages; `run` loops until stopped, `step` handles one batch (used by tests).
    `forecast` is one stage or a sequence of them; `self.forecast` / `self.context` are the first
    stage and its buffer, `self.stages` / `self.contexts` all of them."""

    def __init__(self, cfg: PipelineConfig, rig: RigConfig, source: FrameSource,
                 segmentation: np.ndarray, forecast: ForecastStage | Sequence[ForecastStage], metrics: Metrics,
                 shm_dir: str = "/dev/shm") -> None:
        self.cfg = cfg
        self.source = source
        self.metrics = metrics
        self.ingest = Ingest(rig, metrics, shm_dir)
        self.preprocess = Preprocess(segmentation, cfg.preprocess, rig.frame_period_s, metrics)
        self.stages = list(forecast) if isinstance(forecast, (list, tuple)) else [forecast]
        if not self.stages:
            raise ValueError("a pipeline needs at least one forecast stage")
        names = [s.name for s in self.stages]
        if len(set(names)) != len(names):
            raise ValueError(f"two stages would publish on the same topic: {names}")
        n = self.preprocess.n_neurons
        for stage in self.stages:
            stage.setup(n)
            stage.check_stimulus(rig.n_covariates)
        self.contexts = [ContextBuffer(s.context, s.row_size(n)) for s in self.stages]
        self.forecast, self.context = self.stages[0], self.contexts[0]
        self.report = PipelineReport()
        self._failures = [0] * len(self.stages)
        self.stop_event = threading.Event()

    def step(self, timeout_ms: int | None = None) -> int:
        """Receive what is queued, process it; returns the number of valid frames handled."""
        msgs = self.source.recv_all(self.cfg.source.poll_ms if timeout_ms is None else timeout_ms,
                                    self.cfg.source.max_batch)
        received = [f for f in (self.ingest.process(m) for m in msgs) if f is not None]
        frames, ready = [], [False] * len(self.stages)
        for frame in received:
            pre = self.preprocess.process(frame)
            if pre is None:
                continue
            frames.append(frame)
            for i, (stage, buf) in enumerate(zip(self.stages, self.contexts)):
                if stage.takes_row(pre):
                    buf.push(stage.frame_row(pre, frame.header))
                ready[i] = stage.ready(pre) and buf.full
        if frames:
            self._account(frames, ready)
        return len(frames)

    def _account(self, frames: list[Frame], ready: list[bool]) -> None:
        self.report.frames += len(frames)
        self.report.last_seq = frames[-1].header.seq
        header = frames[-1].header
        for i, stage in enumerate(self.stages):
            if ready[i] and self._run_stage(i, header) and i == 0:
                self._first_stage_done(header.seq)
        if any(ready) and len(frames) > 1:
            self.metrics.frames_dropped.labels(reason="forecast_skipped").inc(len(frames) - 1)

    def _run_stage(self, i: int, header: FrameHeader) -> bool:
        """Run stage i on its window; True if it published. Failures are counted per stage and escalate
        after MAX_CONSECUTIVE_FAILURES in a row."""
        stage = self.stages[i]
        try:
            stage.process(self.contexts[i].window(), header)
        except Exception:
            self._failures[i] += 1
            self.report.failures[stage.name] = self.report.failures.get(stage.name, 0) + 1
            self.metrics.errors.labels(kind=stage.kind).inc()
            log.exception("%s failed for seq %d (%d in a row)", stage.name, header.seq, self._failures[i])
            if self._failures[i] >= MAX_CONSECUTIVE_FAILURES:
                raise
            return False
        self._failures[i] = 0
        self.report.published[stage.name] = self.report.published.get(stage.name, 0) + 1
        return True

    def _first_stage_done(self, seq: int) -> None:
        self.report.forecasts += 1
        if self.report.first_forecast_seq is None:
            self.report.first_forecast_seq = seq
            log.info("first forecast at seq %d (warm-up done)", seq)

    def run(self) -> PipelineReport:
        """Loop until stop(), max_frames, or idle_timeout_s after the last frame."""
        last_frame = None
        while not self.stop_event.is_set():
            if self.step():
                last_frame = time.monotonic()
            if self.cfg.max_frames and self.report.frames >= self.cfg.max_frames:
                log.info("reached max_frames=%d", self.cfg.max_frames)
                break
            if self.source.finished:
                log.info("source finished after %d frames", self.report.frames)
                break
            idle = self.cfg.idle_timeout_s
            if idle and last_frame is not None and time.monotonic() - last_frame > idle:
                log.info("no frame for %.1f s: source finished", idle)
                break
        return self.report

    def stop(self) -> None:
        self.stop_event.set()

    def close(self) -> None:
        self.source.close()
        self.ingest.close()
        for stage in self.stages:
            stage.close()
