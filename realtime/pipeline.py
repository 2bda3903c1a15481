"""The real-time pipeline: source -> ingest -> preprocess -> context -> forecast stage(s) -> publish.

One loop in one thread. Every queued frame is validated and preprocessed (dF/F state stays exact),
but only the newest of a backlog is forecast: latency stays bounded and what was skipped is counted
in `loopcast_frames_dropped_total{reason="forecast_skipped"}`. Several stages (e.g. a forecaster and an
activation predictor) may run side by side: each has its own context buffer of its engine's rows and
runs once its context is full and its inputs (dF/F, spike estimates) are past warm-up.

The first stage (the main forecaster) runs on the loop's thread. The others run as
`pipeline.forecast.also_schedule` says (realtime.forecast.stage.SCHEDULES): by default each in its own
thread on the newest frame it can take (realtime.forecast.worker), so no stage waits for another and a
slow one skips frames, counted per stage (`PipelineReport.skipped`,
`loopcast_stage_frames_skipped_total{stage}`). Every stage has its own hot swap and failure count; a
worker's failure streak is raised in the loop's thread.

A new session of the source (ingest saw the frame header's `session` change: a new acquisition, its seq
starting again) resets the preprocessing (dF/F windows and warm-up, spike estimator, voxel baselines) and
every stage's context, as at a fresh start, before that frame is preprocessed.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from loopcast.realtime.forecast.context import ContextBuffer
from loopcast.realtime.forecast.stage import ForecastConfig, ForecastStage
from loopcast.realtime.forecast.worker import MAX_CONSECUTIVE_FAILURES as MAX_CONSECUTIVE_FAILURES
from loopcast.realtime.forecast.worker import StageRunner, StageWorker
from loopcast.realtime.ingest import Ingest, RigConfig
from loopcast.realtime.jit import cache_dir as kernel_cache_dir
from loopcast.realtime.metrics import Metrics
from loopcast.realtime.preprocess.motion import registration_tuple
from loopcast.realtime.preprocess.stage import Preprocess, PreprocessConfig, Preprocessed
from loopcast.realtime.record.config import RecordConfig, StageInfo
from loopcast.realtime.record.session import SessionRecorder
from loopcast.realtime.wire.codec import ForecastHeader, Frame

log = logging.getLogger(__name__)
DRAIN_TIMEOUT_S = 60.0   # at the end of a run, how long the stages beside the first may take to finish


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
    record: RecordConfig = field(default_factory=RecordConfig)
    max_frames: int = 0          # stop after this many valid frames (0 = run until stopped)
    idle_timeout_s: float = 0.0  # stop when no frame arrived for this long after the first (0 = never)


class FrameSource(Protocol):
    """Anything that yields raw multipart messages: a live ZeroMQ subscriber
    (realtime.wire.transport.Subscriber) or a recording read in process (replay.player.RecordingSource)."""

    @property
    def finished(self) -> bool: ...
    def recv_all(self, timeout_ms: int, limit: int = 64) -> Sequence[Sequence[Any]]: ...
    def close(self) -> None: ...


class _Unconnected:
    """The source of a pipeline built without one, until `Pipeline.connect`."""

    finished = False

    def recv_all(self, timeout_ms: int, limit: int = 64) -> Sequence[Sequence[Any]]:
        raise RuntimeError("the pipeline has no frame source yet: warm_up(), then connect(source)")

    def close(self) -> None:
        pass


def _timed(fn: Callable[[], None]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


@dataclass
class PipelineReport:
    """What a run did, for the summary file and the demo. `forecasts` and `first_forecast_seq` are the
    first stage's (`Pipeline.forecast`); `published`, `failures` and `skipped` (frames a stage was
    ready for but did not run on, being busy) count per stage, keyed by its topic ('forecast/<model>',
    'activation/<model>'); `latency` names each stage's label of loopcast_stage_latency_seconds{stage}."""

    frames: int = 0
    forecasts: int = 0
    last_seq: int | None = None
    first_forecast_seq: int | None = None
    session_changes: int = 0   # new sessions of the source after the first (each reset the preprocessing)
    published: dict[str, int] = field(default_factory=dict)
    failures: dict[str, int] = field(default_factory=dict)
    skipped: dict[str, int] = field(default_factory=dict)
    latency: dict[str, str] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)


class Pipeline:
    """Owns the stages; `run` loops until stopped, `step` handles one batch (used by tests).
    `forecast` is one stage or a sequence of them; `self.forecast` / `self.context` are the first
    stage and its buffer, `self.stages` / `self.contexts` all of them."""

    def __init__(self, cfg: PipelineConfig, rig: RigConfig, source: FrameSource | None,
                 segmentation: np.ndarray, forecast: ForecastStage | Sequence[ForecastStage], metrics: Metrics,
                 shm_dir: str = "/dev/shm") -> None:
        self.cfg = cfg
        self.rig = rig
        self.source: FrameSource = source if source is not None else _Unconnected()
        self.metrics = metrics
        self.ingest = Ingest(rig, metrics, shm_dir)
        self.preprocess = Preprocess(segmentation, cfg.preprocess, rig.frame_period_s, metrics)
        self.stages = [forecast] if isinstance(forecast, ForecastStage) else list(forecast)
        if not self.stages:
            raise ValueError("a pipeline needs at least one forecast stage")
        names = [s.name for s in self.stages]
        if len(set(names)) != len(names):
            raise ValueError(f"two stages would publish on the same topic: {names}")
        n = self.preprocess.n_neurons
        for stage in self.stages:
            stage.setup(n)
            stage.check_stimulus(rig.n_covariates)
        self.forecast = self.stages[0]
        self._fresh_contexts()
        self.report = PipelineReport()
        self._report_lock = threading.Lock()
        kinds: set[str] = set()
        for stage in self.stages:   # the first stage of a kind keeps its label ('forecast'), others their topic
            if stage.kind in kinds:
                stage.record_latency_as(stage.name)
            kinds.add(stage.kind)
            self.report.latency[stage.name] = stage.latency_label
        self.recorder: SessionRecorder | None = None
        self.runners = [StageRunner(s, metrics, self._tally, self._published) for s in self.stages]
        self.schedule = cfg.forecast.also_schedule
        self.workers = [] if self.schedule == "serial" else \
            [StageWorker(r, cfg.forecast.also_nice, cfg.forecast.also_idle) for r in self.runners[1:]]
        self.stop_event = threading.Event()

    def _fresh_contexts(self) -> None:
        """Every stage's context buffer, empty (`self.context` is the first stage's)."""
        n = self.preprocess.n_neurons
        self.contexts = [ContextBuffer(s.context, s.row_size(n)) for s in self.stages]
        self.context = self.contexts[0]

    def _new_session(self, frame: Frame) -> None:
        """The source started a new session at this frame: preprocessing and contexts start over."""
        self.preprocess.reset()
        self._fresh_contexts()
        self.report.session_changes += 1
        log.info("session %s from seq %d: preprocessing and %d stage context(s) reset",
                 frame.header.session, frame.header.seq, len(self.contexts))

    def warm_up(self) -> dict[str, float]:
        """Run every stage's compiled and lazily initialised paths once, on synthetic input of the real
        shapes (the rig's volume shape and dtype, in both memory orders; the segmentation's N), before
        any frame is subscribed to (`loopcast.app.build_pipeline` calls it, then `connect`). On a fresh
        install numba compiled the preprocessing kernels on the first frames (~10 s at the demo scale)
        and a GPU engine set itself up on its first call, while frames queued and were lost. No stage's
        state changes: no warm-up frame reaches a dF/F window, the spike estimator, a context buffer or a
        counter. Returns seconds per part ('ingest', 'preprocess.traces', ..., one per forecast stage
        by its topic), also logged."""
        t0 = time.perf_counter()
        times = {"ingest": _timed(self.ingest.warm_up)}
        times.update({f"preprocess.{k}": v for k, v in self.preprocess.warm_up(self.rig.dtype).items()})
        n = self.preprocess.n_neurons
        for stage in self.stages:
            times[stage.name] = stage.warm_up(n)
        log.info("warm-up before subscribing to frames: %.0f ms (%s; numba kernel cache %s)",
                 (time.perf_counter() - t0) * 1e3, ", ".join(f"{k} {v * 1e3:.0f} ms" for k, v in times.items()),
                 kernel_cache_dir() or "off")
        return times

    def connect(self, source: FrameSource) -> None:
        """Take frames from `source` from now on (after `warm_up`: a subscription makes a source send)."""
        self.source = source

    def stage_infos(self) -> list[StageInfo]:
        """What the session record needs of each forecast stage."""
        return [StageInfo(s.name, s.kind, s.model, s.signal, tuple(s.lead_times), s.context) for s in self.stages]

    def attach(self, recorder: SessionRecorder) -> None:
        """Record the session from the next frame on (every frame handled, every stage's publications)."""
        self.recorder = recorder

    def _published(self, stage: ForecastStage, header: ForecastHeader, data: np.ndarray) -> None:
        if self.recorder is not None:
            self.recorder.forecast(stage.name, header.seq, header.t_src_ns, header.t_pub_ns, header.engine_version,
                                   stage.engine.manifest.path, data)

    def step(self, timeout_ms: int | None = None) -> int:
        """Receive what is queued, process it; returns the number of valid frames handled. Raises a
        stage's failure streak, a worker's included, and a failure of the session record."""
        self._check_workers()
        msgs = self.source.recv_all(self.cfg.source.poll_ms if timeout_ms is None else timeout_ms,
                                    self.cfg.source.max_batch)
        received = [r for r in (self._ingest(m) for m in msgs) if r is not None]
        frames, timing, ready = [], [], [False] * len(self.stages)
        for frame, t_in, new_session in received:
            if new_session:
                self._new_session(frame)
            pre = self._preprocess(frame)
            t_pre = time.time_ns()
            if pre is None:
                continue
            frames.append(frame)
            timing.append((t_in, t_pre, registration_tuple(pre.shift)))
            self._record_rows(frame, pre)
            for i, (stage, buf) in enumerate(zip(self.stages, self.contexts)):
                if stage.takes_row(pre):
                    buf.push(stage.frame_row(pre, frame.header))
                ready[i] = stage.ready(pre) and buf.full
        if frames:
            first = self._account(frames, ready, timing[-1][2])
            self._record_frames(frames, timing, ready[0], first)
        return len(frames)

    def _preprocess(self, frame: Frame) -> Preprocessed | None:
        """Preprocess one frame; None (counted and recorded) if its shm file no longer covers it (checked
        just before the volume is read: a read would fault) or its slot was reused while it was read."""
        h = frame.header
        if not frame.mapped():
            self.metrics.frames_invalid.labels(reason="bad_shm").inc()
            self.ingest.throttle.warning("bad_shm", "dropped frame %d: its shm ring %s shrank under the reader",
                                         h.seq, h.shm.path if h.shm else "?")
            self._record_rejected(frame.t_recv_ns, "bad_shm", h.seq, h.t_src_ns)
            return None
        pre = self.preprocess.process(frame)
        if pre is None:
            self._record_rejected(frame.t_recv_ns, "shm_overrun", h.seq, h.t_src_ns)
        return pre

    def _ingest(self, msg: Sequence[Any]) -> tuple[Frame, int, bool] | None:
        frame = self.ingest.process(msg)
        t = time.time_ns()
        if frame is not None:
            return frame, t, self.ingest.new_session
        r = self.ingest.rejected
        if r is not None:
            self._record_rejected(t, r.reason, r.seq, r.t_src_ns)
        return None

    def _record_rejected(self, t_recv_ns: int, reason: str, seq: int | None, t_src_ns: int | None) -> None:
        if self.recorder is not None:
            self.recorder.rejected(t_recv_ns, reason, seq, t_src_ns)

    def _record_rows(self, frame: Frame, pre: Preprocessed) -> None:
        if self.recorder is not None:
            self.recorder.rows(frame.header.seq, frame.header.t_src_ns, pre.dff,
                               pre.spikes.prob if pre.spikes_ready else None)

    def _record_frames(self, frames: list[Frame], timing: list[tuple[int, int, tuple[float, ...]]], ready: bool,
                       first: tuple[bool, int] | None) -> None:
        """The frames table's rows: stage latencies from the source time, and what the first stage did
        (only the newest of a batch is forecast; the others were skipped if it was ready)."""
        rec = self.recorder
        if rec is None:
            return
        rec.check()
        for i, (frame, (t_in, t_pre, registration)) in enumerate(zip(frames, timing)):
            h, last = frame.header, i == len(frames) - 1
            t_fc = first[1] if (last and first is not None and first[0]) else None
            if not ready:
                code = "not_ready"
            elif not last:
                code = "skipped"
            else:
                code = "forecast" if t_fc is not None else "failed"
            lat = ((t_in - h.t_src_ns) / 1e6, (t_pre - h.t_src_ns) / 1e6,
                   (t_fc - h.t_src_ns) / 1e6 if t_fc is not None else float("nan"))
            rec.frame(h.seq, h.t_src_ns, frame.t_recv_ns, code, lat, registration)

    def _account(self, frames: list[Frame], ready: list[bool],
                 registration: tuple[float, ...]) -> tuple[bool, int] | None:
        """Run the stages on the newest frame (of registration (dx, dy, dz, confidence), or ());
        returns (the first stage published, when) if it ran."""
        self.report.frames += len(frames)
        self.report.last_seq = frames[-1].header.seq
        header = frames[-1].header
        first = None
        if ready[0]:   # first: its latency comes first
            ok = self.runners[0].run(self.context.window(), header, registration)
            first = (ok, time.time_ns())
            if ok:
                self._first_stage_done(header.seq)
        for i in range(1, len(self.stages)):
            if not ready[i]:
                continue
            if self.workers:
                self.workers[i - 1].offer(self.contexts[i].window(), header, registration)
            else:
                self.runners[i].run(self.contexts[i].window(), header, registration)
        if self.schedule == "every":
            for worker in self.workers:
                worker.wait_idle()
        if any(ready) and len(frames) > 1:
            self.metrics.frames_dropped.labels(reason="forecast_skipped").inc(len(frames) - 1)
        self._check_workers()
        return first

    def _tally(self, name: str, what: str) -> None:
        """Count one published, failed or skipped frame of a stage in the report (workers call it too)."""
        with self._report_lock:
            counts: dict[str, int] = getattr(self.report, what)
            counts[name] = counts.get(name, 0) + 1

    def _check_workers(self) -> None:
        """Raise, here in the loop's thread, the failure streak that ended a worker."""
        for worker in self.workers:
            worker.check()

    def drain(self, timeout_s: float = DRAIN_TIMEOUT_S) -> bool:
        """Wait until every stage beside the first has run the frames it was given (False on timeout);
        raises a worker's failure streak."""
        done = all([w.wait_idle(timeout_s) for w in self.workers])
        self._check_workers()
        return done

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
        if not self.stop_event.is_set() and not self.drain():
            log.warning("stages still busy %.0f s after the last frame", DRAIN_TIMEOUT_S)
        return self.report

    def stop(self) -> None:
        self.stop_event.set()

    def close(self) -> None:
        """Stop the stages' threads (a frame still pending is counted as skipped), then close the source,
        ingest and the stages. No thread of the pipeline's is left running."""
        for worker in self.workers:
            worker.stop()
        self.source.close()
        self.ingest.close()
        for stage in self.stages:
            stage.close()
        if self.recorder is not None:
            self.recorder.close()
            self.recorder.check()
