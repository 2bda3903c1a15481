"""Running forecast stages: one stage's runs with its failure rule (`StageRunner`), and a stage served
beside the first in its own thread (`StageWorker`), so that stages serving several engines on one frame
run at the same time instead of one after the other.

A worker holds at most one pending frame (its window copied at hand-over, with the frame's header).
While it is busy with one frame, a newer frame replaces the pending one: the stage always runs on the
newest frame it can, and every frame it did not run on is counted
(`loopcast_stage_frames_skipped_total{stage}`, `StageRunner.skipped`). A fast stage is free when the
next frame comes and runs on every frame.

ONNX Runtime and torch release the GIL while they compute, and so do the numba kernels of
preprocessing, so threads are enough for the engines to use the cores together. On a machine with few
cores the workers can run at a lower OS priority (`nice`, a per-thread nice on Linux) so that the
pipeline thread (ingest, preprocessing, the first stage) takes the CPU first. That covers the work done
on the worker's own thread: ONNX Runtime with one intra-op thread computes there; with more, its pool
threads are those of the session and keep the priority of the thread that loaded the engine.

Failures follow one rule for every stage (`StageRunner.run`): each is counted and logged, and after
MAX_CONSECUTIVE_FAILURES in a row of one stage the exception is raised. In a worker that ends the
thread; the exception is kept and `check()` raises it in the pipeline's thread, which stops the
pipeline loudly, as a failing first stage does.
"""
from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable

import numpy as np

from loopcast.realtime.forecast.stage import ForecastStage
from loopcast.realtime.metrics import Metrics
from loopcast.realtime.wire.codec import ForecastHeader, FrameHeader

log = logging.getLogger(__name__)
MAX_CONSECUTIVE_FAILURES = 10  # a broken engine stops the pipeline loudly instead of limping on
Tally = Callable[[str, str], None]   # (stage name, "published" | "failures" | "skipped") -> count it
Published = Callable[[ForecastStage, ForecastHeader, np.ndarray], None]   # a stage published (header, data)
Item = tuple[np.ndarray, FrameHeader, tuple[float, ...]]   # a window, its frame, the frame's registration


class StageRunner:
    """One stage's runs: counts what it published, failed and skipped, and escalates a failure streak."""

    def __init__(self, stage: ForecastStage, metrics: Metrics, tally: Tally | None = None,
                 published: Published | None = None) -> None:
        self.stage = stage
        self.metrics = metrics
        self._tally = tally
        self._published = published   # e.g. the session record, called after each publish
        self.published = 0
        self.failures = 0
        self.skipped = 0
        self.in_a_row = 0

    @property
    def name(self) -> str:
        return self.stage.name

    def run(self, window: np.ndarray, header: FrameHeader, registration: tuple[float, ...] = ()) -> bool:
        """Run the stage on its window (the frame's registration goes into the header); True if it
        published. A failure is counted and logged; the MAX_CONSECUTIVE_FAILURES-th in a row is raised."""
        try:
            out = self.stage.process(window, header, registration)
        except Exception:
            self.in_a_row += 1
            self.failures += 1
            self._count("failures")
            self.metrics.errors.labels(kind=self.stage.kind).inc()
            log.exception("%s failed for seq %d (%d in a row)", self.name, header.seq, self.in_a_row)
            if self.in_a_row >= MAX_CONSECUTIVE_FAILURES:
                raise
            return False
        self.in_a_row = 0
        self.published += 1
        self._count("published")
        if self._published is not None:
            self._published(self.stage, *out)
        return True

    def skip(self, n: int = 1) -> None:
        """Count n frames the stage was ready for but did not run on (it was busy with an earlier one)."""
        self.skipped += n
        self.metrics.stage_skipped.labels(stage=self.name).inc(n)
        for _ in range(n):
            self._count("skipped")

    def _count(self, what: str) -> None:
        if self._tally is not None:
            self._tally(self.name, what)


class StageWorker:
    """A stage served beside the first: its own thread runs it on the newest frame handed over.

    `offer` never blocks; `wait_idle` waits until the worker has run what it was given; `check` raises,
    in the calling thread, the exception that ended the worker; `stop` ends the thread."""

    def __init__(self, runner: StageRunner, nice: int = 0, idle: bool = False) -> None:
        if not 0 <= nice <= 19:
            raise ValueError(f"a worker's nice increment must be in 0..19, got {nice}")
        self.runner = runner
        self.nice = nice
        self.idle = idle
        self.error: BaseException | None = None
        self._cond = threading.Condition()
        self._pending: Item | None = None
        self._busy = False
        self._stopping = False
        self._drain = False
        self._done = False
        self._thread: threading.Thread | None = None

    @property
    def name(self) -> str:
        return self.runner.name

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def offer(self, window: np.ndarray, header: FrameHeader, registration: tuple[float, ...] = ()) -> None:
        """Hand over the frame's window (copied here: the context buffer moves on). A pending frame the
        worker has not started is replaced and counted as skipped. Nothing is taken once the worker
        ended on an error (`check` raises it)."""
        item = (np.array(window, copy=True), header, registration)
        with self._cond:
            if self.error is not None or self._stopping:
                return
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name=f"stage {self.name}", daemon=True)
                self._thread.start()
            replaced = self._pending is not None
            self._pending = item
            self._cond.notify_all()
        if replaced:
            self.runner.skip()

    def wait_idle(self, timeout_s: float | None = None) -> bool:
        """Wait until the worker has nothing pending and nothing running (or ended); False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: (self._pending is None and not self._busy) or self._done, timeout_s)

    def check(self) -> None:
        """Raise the exception that ended the worker, if one did."""
        if self.error is not None:
            raise self.error

    def stop(self, drain: bool = False, timeout_s: float = 30.0) -> None:
        """End the thread: after the frame it is running, or with `drain` after the pending one too. A
        pending frame left unrun is counted as skipped. Waits up to `timeout_s` for the thread."""
        with self._cond:
            self._stopping, self._drain = True, drain
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                log.error("stage %s did not stop within %.0f s (an engine call still running)", self.name,
                          timeout_s)
        with self._cond:
            left, self._pending = self._pending, None
        if left is not None:
            self.runner.skip()

    def _take(self) -> Item | None:
        with self._cond:
            self._cond.wait_for(lambda: self._pending is not None or self._stopping)
            if self._pending is None or (self._stopping and not self._drain):
                return None
            item, self._pending = self._pending, None
            self._busy = True
            return item

    def _loop(self) -> None:
        self._lower_priority()
        try:
            while (item := self._take()) is not None:
                try:
                    self.runner.run(*item)
                finally:
                    with self._cond:
                        self._busy = False
                        self._cond.notify_all()
        except BaseException as exc:  # kept for the pipeline's thread: check() raises it there
            with self._cond:
                self.error = exc
        finally:
            with self._cond:
                self._done = True
                self._cond.notify_all()

    def _lower_priority(self) -> None:
        """Raise this thread's nice by `nice` (Linux: per thread), so the pipeline thread preempts it; with
        `idle`, put it under SCHED_IDLE: it then runs only on CPU time no other thread wants."""
        tid = threading.get_native_id()
        try:
            if self.nice:
                os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + self.nice))
            if self.idle:
                os.sched_setscheduler(tid, os.SCHED_IDLE, os.sched_param(0))
        except (OSError, AttributeError) as exc:
            log.warning("stage %s: cannot lower its thread's priority (%s); it runs at the pipeline's", self.name,
                        exc)
