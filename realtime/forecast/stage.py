"""Forecast stage: context window -> engine -> forecast published on ZeroMQ with the frame's header.

Each stage feeds its engine the per-neuron signal its manifest names (`signal`: causal dF/F, or the
causal spike probabilities of the preprocess stage) and, for an engine with a `covariates` input, the
frames' stimulus covariates: a context row is then [signal (N); stimulus (K)] and the engine gets the C
context steps' stimuli followed by the newest one held for the H future steps. That hold is a known
train/serve skew (offline training sees the true future protocol); the live rig has no future feed.

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
from typing import Any

import numpy as np

from loopcast.realtime.engines.base import PRECISIONS, Engine
from loopcast.realtime.engines.loader import load_engine
from loopcast.realtime.engines.manifest import EngineError
from loopcast.realtime.engines.watch import EngineWatcher, Loader, close_engine, watch_dir
from loopcast.realtime.metrics import Metrics
from loopcast.realtime.preprocess.stage import Preprocessed
from loopcast.realtime.wire.codec import ForecastHeader, FrameHeader, encode_forecast
from loopcast.realtime.wire.transport import Publisher

log = logging.getLogger(__name__)
# How the stages of `also` engines run beside the first stage (which runs on the pipeline's thread):
#   newest  each in its own thread, on the newest frame when it is free; frames that came while it was busy
#           are skipped and counted (loopcast_stage_frames_skipped_total{stage}): no stage waits for another
#   every   each in its own thread on every frame; the pipeline waits for them before the next frame (no
#           skips, a frame costs the slowest stage: offline replays, deterministic tests)
#   serial  on the pipeline's thread after the first, one after the other (a frame costs their sum)
SCHEDULES = ("newest", "every", "serial")
# Where an `also` stage's engine computes: "threads" in the stage's thread (ONNX Runtime releases the GIL,
# the Python around each call does not); "processes" in a child process (realtime.engines.process), the
# stage's thread only waiting for it, so the pipeline's thread keeps the GIL (docs/cpu.md)
WORKERS = ("threads", "processes")


@dataclass(frozen=True)
class ForecastConfig:
    """Which engine(s) to run, on what, whether to follow new registry versions, how forecasts are published."""

    engine: str = ""        # a registry entry (newest version) or one version dir; "" = what `train` makes
    also: tuple[str, ...] = ()               # more engines served beside `engine`, same runtime settings
    also_schedule: str = "newest"            # how `also` stages run: SCHEDULES
    also_nice: int = 10                      # "newest"/"every": their threads' nice increment (0..19)
    also_idle: bool = False                  # "newest"/"every": their threads under SCHED_IDLE (Linux)
    also_workers: str = "threads"            # "processes": each `also` engine computes in a child process
    runtime: str = "onnxruntime"
    threads: int = 1                         # per engine; derived from [runtime] (loopcast/runtime.py)
    device: str = "cpu"                      # "cpu" or "cuda[:k]"
    memory_arena: bool = True                # ONNX Runtime CPU arena (off: large engines free their peak)
    precision: str = "fp32"                  # "bf16": runtime "torch" under bfloat16 autocast (for CUDA)
    watch: bool = True                       # hot swap to newer versions of a registry entry
    watch_interval_s: float = 1.0
    lead_times: tuple[int, ...] = ()         # video engines: lead times to forecast (() = all 1..H)
    lead_batch: int = 8                      # video engines: lead times per engine call
    sndhwm: int = 16
    wait_subscribers: int = 0                # wait for this many forecast subscribers at start
    wait_timeout_s: float = 10.0
    drill_delay_ms: float = 0.0              # drills only: each forecast of `engine` waits this long first

    def __post_init__(self) -> None:
        if not self.drill_delay_ms >= 0:
            raise ValueError(f"drill_delay_ms must be >= 0, got {self.drill_delay_ms}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {list(PRECISIONS)}, got {self.precision!r}")
        if self.also_schedule not in SCHEDULES:
            raise ValueError(f"also_schedule must be one of {list(SCHEDULES)}, got {self.also_schedule!r}")
        if self.also_workers not in WORKERS:
            raise ValueError(f"also_workers must be one of {list(WORKERS)}, got {self.also_workers!r}")
        if self.also_workers == "processes" and self.also_schedule == "serial":
            raise ValueError('also_workers = "processes" needs also_schedule "newest" or "every" (with '
                             '"serial" the stages run one after the other on the pipeline\'s thread anyway)')
        if not 0 <= self.also_nice <= 19:
            raise ValueError(f"also_nice must be in 0..19, got {self.also_nice}")
        if self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")


def engine_loader(cfg: ForecastConfig) -> Loader:
    """path -> engine with the configured runtime, threads and device."""
    return functools.partial(load_engine, runtime=cfg.runtime, threads=cfg.threads, device=cfg.device,
                             memory_arena=cfg.memory_arena, precision=cfg.precision)


def also_loader(cfg: ForecastConfig) -> Loader:
    """path -> engine for the `also` stages: as `engine_loader`, or with also_workers = "processes" a
    ProcessEngine whose child runs it (at nice `also_nice`)."""
    if cfg.also_workers == "threads":
        return engine_loader(cfg)
    from loopcast.realtime.engines.process import ProcessEngine
    return functools.partial(ProcessEngine, runtime=cfg.runtime, nice=cfg.also_nice, threads=cfg.threads,
                             device=cfg.device, memory_arena=cfg.memory_arena, precision=cfg.precision)


def engine_watcher(path: str | Path, cfg: ForecastConfig, loader: Loader,
                   metrics: Metrics) -> EngineWatcher | None:
    """A watcher of the registry entry `path`; None when watching is off or `path` pins one version."""
    name_dir = watch_dir(path) if cfg.watch else None
    if name_dir is None:
        return None
    return EngineWatcher(name_dir, loader, metrics, cfg.watch_interval_s)


class ForecastStage:
    """Stage 3. One forecast per call, stamped with the producing frame's seq and t_src_ns.

    Serves task "forecast" engines; subclasses serve other tasks (`task`) and publish other message
    kinds (`kind`: the header kind, topic prefix and latency label)."""

    task = "forecast"
    kind = "forecast"
    role = "forecaster"

    def __init__(self, engine: Engine, publisher: Publisher, metrics: Metrics,
                 watcher: EngineWatcher | None = None) -> None:
        self._check(engine)
        self.publisher = publisher
        self.metrics = metrics
        self.watcher = watcher
        self.latency_label = self.kind
        self._latency = metrics.latency(self.kind)
        m = engine.manifest
        self.context = m.context  # fixed for the stage's life: a swap keeps it
        self.signal = m.signal                 # ... and so are the signal and the covariate count K
        self.n_covariates = m.n_covariates
        self.published = 0
        self.swaps = 0
        self.missing_stimulus = 0
        self._row: np.ndarray | None = None     # scratch row [signal (N); stimulus (K)] of a covariate engine
        self._serve(engine)

    @property
    def name(self) -> str:
        """'<kind>/<model>': the topic the stage publishes on (and its key in pipeline reports)."""
        return f"{self.kind}/{self.model}"

    def record_latency_as(self, label: str) -> None:
        """Observe this stage's latency under `label` of loopcast_stage_latency_seconds{stage} (default:
        its kind; the pipeline gives a second stage of one kind its topic, so none mixes with another)."""
        self.latency_label = label
        self._latency = self.metrics.latency(label)

    def _serve(self, engine: Engine) -> None:
        m = engine.manifest
        self.engine = engine
        self.model = m.model
        self.lead_times = tuple(m.lead_times)
        self._cov = np.zeros((m.context + m.horizon, m.n_covariates), np.float32) if m.n_covariates else None
        self._count = self._counter().labels(model=self.model)
        future = m.future_covariates if m.n_covariates else "none"
        self.metrics.stage_engine.labels(stage=self.name).info({"engine": engine.version, "model": self.model,
                                                                "future_covariates": future})
        if future == "recorded":
            log.warning("engine %s was trained on the recorded future stimulus; the loop holds the newest "
                        "frame's stimulus for its %d future steps, so expect forecasts worse than its offline "
                        "metrics (train with future_covariates = \"held\" to match)", engine.version, m.horizon)
        if self.kind == "forecast":
            self.metrics.engine_info.info({"engine": engine.version, "model": self.model})

    def _counter(self) -> Any:
        """The published-messages counter (labelled by model) of this stage's kind."""
        return self.metrics.forecasts

    def _check(self, engine: Engine) -> None:
        m = engine.manifest
        if m.task != self.task:
            raise EngineError(f"{m.path}: a {m.task!r} engine cannot run as the {self.role}; point "
                              f"[pipeline.forecast] engine (or an `also` entry) at a {self.task!r} engine")

    def check_stimulus(self, rig_covariates: int) -> None:
        """EngineError unless the rig sends the K stimulus covariates a covariate engine takes."""
        k = self.n_covariates
        if k and k != rig_covariates:
            raise EngineError(f"engine {self.engine.version} takes {k} stimulus covariates; the rig sends "
                              f"rig.n_covariates = {rig_covariates}")

    def row_size(self, n_neurons: int) -> int:
        """Values per frame in the context buffer: one signal value per neuron (+ K stimulus values)."""
        return n_neurons + self.n_covariates

    def row(self, pre: Preprocessed) -> np.ndarray:
        """What one preprocessed frame adds to the context: its per-neuron signal (N,)."""
        return pre.spikes.prob if self.signal == "spike_prob" else pre.dff

    def frame_row(self, pre: Preprocessed, frame: FrameHeader) -> np.ndarray:
        """The context row of one frame: `row(pre)`, then the frame's stimulus for a covariate engine
        (zeros, counted in loopcast_values_invalid_total{kind="missing_stimulus"}, if it has none)."""
        signal = self.row(pre)
        if not self.n_covariates:
            return signal
        if self._row is None or self._row.shape[0] != signal.shape[0] + self.n_covariates:
            self._row = np.empty(signal.shape[0] + self.n_covariates, np.float32)
        n = signal.shape[0]
        self._row[:n] = signal
        if len(frame.stimulus) == self.n_covariates:
            self._row[n:] = frame.stimulus
        else:
            self._row[n:] = 0.0
            self._on_missing_stimulus(frame.seq)
        return self._row

    def _on_missing_stimulus(self, seq: int) -> None:
        self.missing_stimulus += 1
        self.metrics.values_invalid.labels(kind="missing_stimulus").inc()
        if self.missing_stimulus == 1:
            log.warning("frame seq %d carries no stimulus; engine %s gets zeros for it (counted in "
                        "loopcast_values_invalid_total{kind=\"missing_stimulus\"})", seq, self.engine.version)

    def takes_row(self, pre: Preprocessed) -> bool:
        """Whether this frame's row enters the context: always for dF/F (warm-up rows are dF/F against a
        provisional baseline, as offline), for spike probabilities only once the estimator is past its
        warm-up (before, its output is zeros, not an estimate)."""
        return self.signal != "spike_prob" or pre.spikes_ready

    def ready(self, pre: Preprocessed) -> bool:
        """Whether the stage may run on this frame: dF/F (and voxel) baselines past warm-up, and for a
        spike-signal engine the spike estimator too."""
        return pre.ready and (self.signal != "spike_prob" or pre.spikes_ready)

    def inputs(self, window: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """window (C, N [+ K]) -> context (C, N) and, for a covariate engine, covariates (C + H, K): the
        context steps' stimuli, then the newest held for the H future steps."""
        if self._cov is None:
            return window, None
        n, c = window.shape[1] - self.n_covariates, window.shape[0]
        self._cov[:c] = window[:, n:]
        self._cov[c:] = window[-1, n:]
        return window[:, :n], self._cov

    def _predict(self, engine: Engine, window: np.ndarray) -> np.ndarray:
        context, cov = self.inputs(window)
        return engine.run(context) if cov is None else engine.run(context, cov)

    def setup(self, n_neurons: int) -> None:
        """Check the neuron count; start watching for newer versions (valid for it) if configured."""
        self.engine.check_neurons(n_neurons)
        if self.watcher is not None:
            self.watcher.start(self.engine, n_neurons)

    def warm_up(self, n_neurons: int) -> float:
        """One forecast on a zero context before frames flow; returns its seconds. A GPU initialises lazily
        (CUDA context, cuBLAS/cuDNN handles, kernel choice) on an engine's first call: on the first live
        frame that stalled the loop long enough to lose a frame (H100 check, docs/gpu.md).
        Raises EngineError when the engine fails or gives a non-finite or misshapen output."""
        self.engine.check_neurons(n_neurons)
        window = np.zeros((self.context, self.row_size(n_neurons)), np.float32)
        t = time.perf_counter()
        try:
            pred = self._predict(self.engine, window)
        except EngineError:
            raise
        except Exception as exc:  # a runtime's own error types
            raise EngineError(f"engine {self.engine.version}: warm-up forecast failed "
                              f"({type(exc).__name__}: {exc})") from exc
        if not isinstance(pred, np.ndarray) or pred.ndim != 2 or not np.all(np.isfinite(pred)):
            raise EngineError(f"engine {self.engine.version}: the warm-up forecast on zeros is not a finite "
                              f"(rows, N) array")
        seconds = time.perf_counter() - t
        log.info("engine %s warmed up in %.0f ms", self.engine.version, seconds * 1e3)
        return seconds

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

    def process(self, window: np.ndarray, frame: FrameHeader,
                registration: tuple[float, ...] = ()) -> tuple[ForecastHeader, np.ndarray]:
        """window (C, N [+ K]) float32 -> output (H, N) float32 ((1, N) for activation), published with the
        frame's registration (dx, dy, dz, confidence; () without); returns both. A validated newer engine
        takes over here, before the forecast, so the header names the engine that made it."""
        self._swap_if_ready(frame.seq)
        engine = self.engine
        pred = self._predict(engine, window)
        header = ForecastHeader(seq=frame.seq, t_src_ns=frame.t_src_ns, model=self.model,
                                engine_version=engine.version, lead_times=self.lead_times,
                                shape=tuple(pred.shape), kind=self.kind, t_pub_ns=time.time_ns(),
                                frame=frame.to_wire(), registration=registration)
        self.publisher.send(encode_forecast(header, pred))
        self._latency.observe_since_ns(frame.t_src_ns, time.time_ns())
        self._count.inc()
        self.published += 1
        return header, pred

    def close(self) -> None:
        """Stop watching, release the serving engine (a ProcessEngine ends its child), close the publisher."""
        if self.watcher is not None:
            self.watcher.stop()
        close_engine(self.engine)
        self.publisher.close()
