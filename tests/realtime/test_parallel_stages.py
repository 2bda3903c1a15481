"""Stages served beside the first run in their own threads (pipeline.forecast.also_schedule = "newest"):
a slow stage skips to the newest frame and counts what it skipped while the first stage publishes every
frame; a failing worker's streak stops the pipeline in its own thread; stop and close leave no thread.

Deterministic: the slow engine blocks until the test releases it, and the frame source waits for the
engine to have started before handing over more frames, so which frames run and which are skipped does
not depend on timing. Real ONNX toy engines (tests/conftest.py), outputs on real ZeroMQ (127.0.0.1)."""
from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from loopcast.realtime.engines.onnx_runtime import OnnxEngine
from loopcast.realtime.forecast.activation import ActivationStage
from loopcast.realtime.forecast.stage import ForecastConfig, ForecastStage, also_loader
from loopcast.realtime.forecast.worker import MAX_CONSECUTIVE_FAILURES
from loopcast.realtime.ingest import RigConfig
from loopcast.realtime.metrics import Metrics, MetricsConfig
from loopcast.realtime.pipeline import Pipeline, PipelineConfig
from loopcast.realtime.preprocess.dff import DffConfig
from loopcast.realtime.preprocess.stage import PreprocessConfig
from loopcast.realtime.wire.codec import FrameHeader, decode_forecast, encode_frame
from loopcast.realtime.wire.transport import Publisher, Subscriber

N, C, K = 10, 3, 2
SHAPE = (8, 8, 2)
FRAMES = 12
FIRST = C - 1                       # the first frame every stage is ready for (dF/F warm-up 2 < C)
NICE = 7
RIG = RigConfig(shape=SHAPE, dtype="uint16", n_covariates=K)
WAIT_S = 10.0


def config(schedule: str = "newest", idle: bool = False) -> PipelineConfig:
    return PipelineConfig(preprocess=PreprocessConfig(dff=DffConfig(warmup=2)),
                          forecast=ForecastConfig(also_schedule=schedule, also_nice=NICE, also_idle=idle))


def segmentation() -> np.ndarray:
    return (np.arange(np.prod(SHAPE), dtype=np.uint32).reshape(SHAPE) % N) + 1


def frame(seq: int) -> list[Any]:
    vol = np.random.default_rng(seq).integers(100, 300, size=SHAPE).astype(np.uint16)
    return encode_frame(FrameHeader(seq, time.time_ns(), SHAPE, "uint16", stimulus=(float(seq), 0.0)), vol)


class Feed:
    """One frame per call; `before(seq)` runs before frame `seq` is handed over, and `before(n)` once all
    n were; `endless` keeps going."""

    def __init__(self, n: int, before: Callable[[int], None] = lambda seq: None, endless: bool = False) -> None:
        self.n, self.seq, self.before, self.endless = n, 0, before, endless

    @property
    def finished(self) -> bool:
        done = not self.endless and self.seq >= self.n
        if done and self.seq == self.n:
            self.seq += 1
            self.before(self.n)
        return done

    def recv_all(self, timeout_ms: int, limit: int = 64) -> list[Sequence[Any]]:
        if self.finished:
            return []
        self.before(self.seq)
        self.seq += 1
        if self.endless:
            time.sleep(0.002)       # a frame every ~2 ms: the worker gets the CPU too
        return [frame(self.seq - 1)]

    def close(self) -> None:
        self.n, self.endless = 0, False


class GatedEngine(OnnxEngine):
    """A real engine whose run waits for `release` (set by the test): a stage as slow as the test wants.
    Records the frames it ran on (by the order it was called) and its thread's nice value."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.started, self.release = threading.Event(), threading.Event()
        self.calls = 0
        self.nice: int | None = None
        self.policy: int | None = None
        self.thread = ""

    def run(self, context: np.ndarray, covariates: np.ndarray | None = None) -> np.ndarray:
        self.calls += 1
        self.nice = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
        self.policy = os.sched_getscheduler(0)        # the calling thread's, on Linux
        self.thread = threading.current_thread().name
        self.started.set()
        assert self.release.wait(WAIT_S), "the test never released the engine"
        return super().run(context, covariates)


class BrokenEngine(OnnxEngine):
    def run(self, context: np.ndarray, covariates: np.ndarray | None = None) -> np.ndarray:
        raise RuntimeError("activation engine exploded")


def pipeline(stages: list[ForecastStage], source: Feed, metrics: Metrics, schedule: str = "newest",
             idle: bool = False) -> Pipeline:
    return Pipeline(config(schedule, idle), RIG, source, segmentation(), stages, metrics)


def receive(sub: Subscriber, n: int) -> list[Any]:
    msgs: list[Any] = []
    deadline = time.monotonic() + WAIT_S
    while len(msgs) < n and time.monotonic() < deadline:
        msgs += sub.recv_all(100, limit=10_000)
    return [decode_forecast(m) for m in msgs]


def stage_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("stage ") and t.is_alive()]


def test_a_slow_stage_skips_to_the_newest_frame_and_counts_while_the_first_publishes_every_frame(
        toy_engines: dict[str, Path]) -> None:
    metrics = Metrics("run", MetricsConfig(enabled=False))
    pub = Publisher("tcp://127.0.0.1:*", sndhwm=10_000)
    sub = Subscriber(pub.endpoint, topics=(b"",), rcvhwm=10_000)
    assert pub.wait_for_subscribers(1, 5)
    slow = GatedEngine(toy_engines["act"])

    def before(seq: int) -> None:
        if seq == FIRST + 1:          # the slow stage has taken the first frame before any other comes
            assert slow.started.wait(WAIT_S)
        if seq == FRAMES:             # all frames handed over: let the slow stage go on (to the newest)
            slow.release.set()

    fast = ForecastStage(OnnxEngine(toy_engines["mean"]), pub, metrics)
    pipe = pipeline([fast, ActivationStage(slow, pub, metrics)], Feed(FRAMES, before), metrics)
    report = pipe.run()
    got = receive(sub, sum(report.published.values()))
    pipe.close()
    sub.close()

    ready = list(range(FIRST, FRAMES))
    by = {kind: [m.header.seq for m in got if m.header.kind == kind] for kind in ("forecast", "activation")}
    assert by["forecast"] == ready                                         # every frame, none waited for
    assert by["activation"] == [FIRST, FRAMES - 1] == sorted(by["activation"])   # the first, then the newest
    skipped = len(ready) - 2
    assert report.published == {"forecast/toymean": len(ready), "activation/toyact": 2}
    assert report.skipped == {"activation/toyact": skipped} and report.failures == {}
    assert metrics.count("loopcast_stage_frames_skipped_total", stage="activation/toyact") == skipped
    assert metrics.count("loopcast_stage_frames_skipped_total", stage="forecast/toymean") == 0
    assert slow.calls == 2 and slow.thread == "stage activation/toyact"
    assert slow.nice == os.getpriority(os.PRIO_PROCESS, 0) + NICE            # below the pipeline's thread
    assert metrics.latency("activation").summary()["count"] == 2
    assert report.latency == {"forecast/toymean": "forecast", "activation/toyact": "activation"}
    assert not stage_threads()


def test_also_idle_runs_the_stage_under_sched_idle_and_leaves_the_loop_thread_alone(
        toy_engines: dict[str, Path]) -> None:
    metrics = Metrics("run", MetricsConfig(enabled=False))
    pub = Publisher("tcp://127.0.0.1:*")
    slow = GatedEngine(toy_engines["act"])
    slow.release.set()
    stages = [ForecastStage(OnnxEngine(toy_engines["mean"]), pub, metrics), ActivationStage(slow, pub, metrics)]
    pipe = pipeline(stages, Feed(FIRST + 1), metrics, idle=True)
    report = pipe.run()
    pipe.close()
    assert report.published == {"forecast/toymean": 1, "activation/toyact": 1}
    assert slow.policy == os.SCHED_IDLE and slow.thread == "stage activation/toyact"
    assert os.sched_getscheduler(0) == os.SCHED_OTHER                       # the loop's thread is untouched


def test_a_failing_worker_stage_stops_the_pipeline_in_its_thread(toy_engines: dict[str, Path]) -> None:
    metrics = Metrics("run", MetricsConfig(enabled=False))
    pub = Publisher("tcp://127.0.0.1:*")
    good = ForecastStage(OnnxEngine(toy_engines["mean"]), pub, metrics)
    bad = ActivationStage(BrokenEngine(toy_engines["act"]), pub, metrics)
    pipe = pipeline([good, bad], Feed(100_000, endless=True), metrics)
    with pytest.raises(RuntimeError, match="activation engine exploded"):
        pipe.run()
    assert not pipe.workers[0].alive                       # the streak ended the worker ...
    assert pipe.report.failures == {"activation/toyact": MAX_CONSECUTIVE_FAILURES}   # ... at the 10th in a row
    assert metrics.count("loopcast_errors_total", kind="activation") == MAX_CONSECUTIVE_FAILURES
    assert pipe.report.published["forecast/toymean"] >= MAX_CONSECUTIVE_FAILURES      # the first stage went on
    pipe.close()
    assert not stage_threads()


def test_close_stops_a_busy_stage_cleanly(toy_engines: dict[str, Path]) -> None:
    """close() waits for the frame in flight, leaves the pending one unrun (counted as skipped), stops
    every thread and closes the stages."""
    metrics = Metrics("run", MetricsConfig(enabled=False))
    pub = Publisher("tcp://127.0.0.1:*")
    slow = GatedEngine(toy_engines["act"])
    fast = ForecastStage(OnnxEngine(toy_engines["mean"]), pub, metrics)
    pipe = pipeline([fast, ActivationStage(slow, pub, metrics)], Feed(FRAMES), metrics)
    for _ in range(FIRST + 1):                   # frames 0..FIRST: FIRST is handed to the worker
        assert pipe.step() == 1
    assert slow.started.wait(WAIT_S)
    for _ in range(3):                           # three more: each replaces the pending one
        pipe.step()
    assert stage_threads()
    releaser = threading.Timer(0.2, slow.release.set)
    releaser.start()
    pipe.close()
    releaser.join()
    assert not stage_threads() and slow.calls == 1
    assert pipe.report.published == {"forecast/toymean": 4, "activation/toyact": 1}
    assert pipe.report.skipped == {"activation/toyact": 3}          # two replaced, one left pending at close
    assert pipe.forecast.publisher.sock.closed


def test_serial_schedule_runs_every_stage_on_the_loops_thread(toy_engines: dict[str, Path]) -> None:
    """The previous behaviour: no threads; a second stage of one kind has its own latency label."""
    metrics = Metrics("run", MetricsConfig(enabled=False))
    pub = Publisher("tcp://127.0.0.1:*")
    stages = [ForecastStage(OnnxEngine(toy_engines[k]), pub, metrics) for k in ("mean", "cov")]
    pipe = pipeline(stages, Feed(FRAMES), metrics, schedule="serial")
    report = pipe.run()
    pipe.close()
    assert pipe.workers == [] and not stage_threads()
    assert report.published == {"forecast/toymean": FRAMES - FIRST, "forecast/toycov": FRAMES - FIRST}
    assert report.latency == {"forecast/toymean": "forecast", "forecast/toycov": "forecast/toycov"}
    assert metrics.latency("forecast").summary()["count"] == FRAMES - FIRST
    assert metrics.latency("forecast/toycov").summary()["count"] == FRAMES - FIRST
    assert report.skipped == {}


def test_also_workers_processes_serves_the_also_stages_from_children(toy_engines: dict[str, Path]) -> None:
    """The first stage in-process, the `also` stages (forecast and activation) each in a child: every
    frame published by all three, with the outputs the in-process stages give."""
    metrics = Metrics("run", MetricsConfig(enabled=False))
    outputs = {}
    for workers in ("threads", "processes"):
        load = also_loader(ForecastConfig(also_workers=workers))
        pub = Publisher("tcp://127.0.0.1:*", sndhwm=10_000)
        sub = Subscriber(pub.endpoint, topics=(b"forecast/", b"activation/"))
        time.sleep(0.2)
        stages = [ForecastStage(OnnxEngine(toy_engines["mean"]), pub, metrics),
                  ForecastStage(load(toy_engines["cov"]), pub, metrics),
                  ActivationStage(load(toy_engines["act"]), pub, metrics)]
        assert [type(s.engine).__name__ for s in stages[1:]] == ["ProcessEngine" if workers == "processes"
                                                                  else "OnnxEngine"] * 2
        pipe = pipeline(stages, Feed(8), metrics, schedule="every")
        pipe.run()
        got = receive(sub, 3 * 6)
        pipe.close()
        sub.close()
        outputs[workers] = {(f.header.model, f.header.seq): f.data for f in got}
    assert len(outputs["processes"]) == 3 * 6 and outputs["processes"].keys() == outputs["threads"].keys()
    for key, data in outputs["threads"].items():
        np.testing.assert_allclose(outputs["processes"][key], data, rtol=1e-6, atol=1e-6)
