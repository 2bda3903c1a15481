"""Building the stages from the resolved config: shared by the CLI, the demo and the end-to-end tests."""
from __future__ import annotations

import asyncio
import logging
import signal
import sys
from collections.abc import Awaitable, Callable
from importlib.metadata import version
from pathlib import Path
from typing import Any, cast

import numpy as np

from loopcast import cpu
from loopcast.realtime.control.controller import Controller
from loopcast.realtime.control.policy import resolve_neuron_set
from loopcast.realtime.engines.base import Engine
from loopcast.realtime.engines.drill import DelayedEngine
from loopcast.realtime.engines.manifest import EngineError
from loopcast.realtime.engines.watch import Loader
from loopcast.realtime.forecast.activation import ActivationStage
from loopcast.realtime.forecast.stage import (
    ForecastConfig,
    ForecastStage,
    also_loader,
    engine_loader,
    engine_watcher,
)
from loopcast.realtime.forecast.video import VideoForecastStage
from loopcast.realtime.jit import set_cache_dir as set_kernel_cache
from loopcast.realtime.metrics import Metrics, MetricsConfig
from loopcast.realtime.pipeline import Pipeline
from loopcast.realtime.record.session import SessionRecorder, select_neurons
from loopcast.realtime.wire.mqtt_security import MqttSecurity, MqttSecurityError, client_options
from loopcast.realtime.wire.transport import Publisher, Subscriber
from loopcast.replay.fish import FishModel
from loopcast.replay.layout import Recording, RecordingError
from loopcast.replay.sim import LiveSim
from loopcast.replay.store import is_remote
from loopcast.settings import LoopcastConfig, TrainEngineRef

log = logging.getLogger("loopcast")


class UserError(RuntimeError):
    """Something the user must fix (missing recording, no engine, bad config): printed, exit 2."""


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("amqtt", "transitions", "asyncio", "onnxscript", "onnx_ir", "torch.onnx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def configure_process(cfg: LoopcastConfig, process: str = "") -> dict[str, Any]:
    """The process-level settings ([runtime]) of a command, applied at its start before any kernel runs:
    where numba caches the loop's compiled kernels (loopcast.realtime.jit.set_cache_dir), and the
    process's CPU use (loopcast.cpu.apply: threads per library, the CPUs of `process` = the command).
    Returns the CPU settings applied."""
    set_kernel_cache(cfg.runtime.kernel_cache)
    return cpu.apply(cfg, process)


def process_metrics(cfg: LoopcastConfig, process: str, run_dir: Path | None = None) -> Metrics:
    """The one Metrics of this process, serving /metrics on the port configured for it (0 = any free
    port); the bound port is also written to <run_dir>/<process>.metrics-port for tools to find."""
    port = getattr(cfg.metrics, process)
    m = Metrics(process, MetricsConfig(host=cfg.metrics.host, port=port))
    m.serve()
    log.info("%s metrics on http://%s:%s/metrics", process, cfg.metrics.host, m.port)
    if run_dir is not None:
        (run_dir / f"{process}.metrics-port").write_text(f"{m.port}\n")
    return m


def recording_present(location: str) -> bool:
    """Whether there is something to open at `location` (a gs:// URL is checked when opened)."""
    return is_remote(location) or Path(location).exists()


def open_recording(cfg: LoopcastConfig, path: str | None = None) -> Recording:
    path = path or cfg.paths.recording
    try:
        return Recording.open(path)
    except RecordingError as exc:
        raise UserError(f"{exc}\n  (make a synthetic one with `loopcast synth`, or point "
                        f"paths.recording at a ZAPBench-layout store)") from exc


def neuron_groups(rec: Recording) -> dict[str, np.ndarray]:
    """Named neuron groups a policy may refer to ("ensemble:<k>"), where the recording has them."""
    try:
        return {"ensemble": rec.ground_truth("ensemble")}
    except RecordingError:
        return {}


def engine_path(cfg: LoopcastConfig) -> Path:
    """The configured engine, or the registry entry `loopcast train` writes for [train] (read without
    importing the training code: TrainEngineRef)."""
    if cfg.pipeline.forecast.engine:
        return Path(cfg.pipeline.forecast.engine)
    return Path(cfg.paths.engines) / TrainEngineRef.of(cfg).name


def build_pipeline(cfg: LoopcastConfig, metrics: Metrics, segmentation: np.ndarray, run_dir: Path | None = None,
                   groups: dict[str, np.ndarray] | None = None) -> Pipeline:
    """Forecast publisher first, then one stage per engine ([pipeline.forecast] engine, then each `also`
    entry), the pipeline with its ingest and preprocess stages, every stage warmed up (`Pipeline.warm_up`),
    optionally a wait for a controller, and only then the frame subscriber: a source starts sending once
    it sees that subscription (`wait_subscribers`), so nothing slow may come after it (on a fresh install
    the first frame waited ~10 s for numba's kernels, and 192 of the demo's 300 frames were lost).
    With a `run_dir` (and [pipeline.record] enabled) the session is recorded in it from the first frame
    (`groups`: the recording's neuron groups, to add the controller policy's neurons to the record)."""
    fc = cfg.pipeline.forecast
    paths = [engine_path(cfg), *(Path(p) for p in fc.also)]
    loaders = [engine_loader(fc), *[also_loader(fc)] * len(fc.also)]
    engines = load_engines(paths, loaders)
    if fc.drill_delay_ms:
        log.warning("DRILL: every forecast of %s waits %.0f ms first (pipeline.forecast.drill_delay_ms)",
                    engines[0].version, fc.drill_delay_ms)
        engines[0] = cast(Engine, DelayedEngine(engines[0], fc.drill_delay_ms))
    publisher = Publisher(cfg.endpoints.forecasts, sndhwm=fc.sndhwm)
    stages: list[ForecastStage] = []
    try:
        for engine, path, loader in zip(engines, paths, loaders):
            stages.append(forecast_stage(engine, publisher, metrics, segmentation, fc, path, loader))
    except (EngineError, ValueError) as exc:
        for stage in stages:
            stage.close()
        publisher.close()
        raise UserError(f"cannot start the forecaster: {exc}") from exc
    try:
        pipeline = Pipeline(cfg.pipeline, cfg.rig, None, segmentation, stages, metrics, cfg.transport.shm_dir)
    except (EngineError, ValueError) as exc:
        for stage in stages:
            stage.close()
        publisher.close()
        raise UserError(f"cannot start the pipeline: {exc}") from exc
    try:
        pipeline.warm_up()
    except (EngineError, ValueError) as exc:
        pipeline.close()
        raise UserError(f"cannot start the pipeline: warm-up failed: {exc}") from exc
    if run_dir is not None and cfg.pipeline.record.enabled:
        try:
            pipeline.attach(session_recorder(cfg, pipeline, metrics, run_dir, groups or {}))
        except (OSError, ValueError) as exc:
            pipeline.close()
            raise UserError(f"cannot start the session record in {run_dir}: {exc}") from exc
    if fc.wait_subscribers and not publisher.wait_for_subscribers(fc.wait_subscribers, fc.wait_timeout_s):
        log.warning("no forecast subscriber after %.0f s; publishing anyway", fc.wait_timeout_s)
    pipeline.connect(Subscriber(cfg.endpoints.frames, topics=(b"frame",), rcvhwm=cfg.pipeline.source.rcvhwm))
    return pipeline


def session_recorder(cfg: LoopcastConfig, pipeline: Pipeline, metrics: Metrics, run_dir: Path,
                     groups: dict[str, np.ndarray]) -> SessionRecorder:
    """The session record of `pipeline` at <run_dir>/<pipeline.record.path>: the configured neurons plus the
    controller policy's monitored and target neurons (where they resolve against `groups`)."""
    n, pol = pipeline.preprocess.n_neurons, cfg.controller.policy
    try:
        extra = np.concatenate([resolve_neuron_set(pol.monitor, n, groups), resolve_neuron_set(pol.targets, n, groups)])
    except ValueError as exc:
        log.warning("session record: the policy's neurons are not added (%s)", exc)
        extra = None
    rc = cfg.pipeline.record
    neurons = select_neurons(rc.neurons, n, extra)
    attrs = {"rig": cfg.rig.name, "frame_period_s": cfg.rig.frame_period_s, "shape": list(cfg.rig.shape),
             "dtype": cfg.rig.dtype, "n_neurons": n, "recording": cfg.paths.recording,
             "loopcast_version": version("loopcast")}
    log.info("session record %s: %d of %d neurons, dF/F and forecasts of %s", run_dir / rc.path, neurons.size, n,
             "every frame" if rc.frame_every == 1 else f"every {rc.frame_every}th frame")
    return SessionRecorder(rc, run_dir / rc.path, neurons, pipeline.stage_infos(), metrics, attrs)


def load_engines(paths: list[Path], loaders: list[Loader]) -> list[Engine]:
    """Every configured engine, each by its loader; a UserError naming the one that fails (those loaded
    before it are closed: an engine may hold a child process)."""
    engines: list[Engine] = []
    for path, loader in zip(paths, loaders):
        try:
            engine = loader(path)
        except EngineError as exc:
            for loaded in engines:
                loaded.close()
            raise UserError(str(exc)) from exc
        log.info("engine %s: task %s, signal %s, %d stimulus covariates (%s)", engine.version,
                 engine.manifest.task, engine.manifest.signal, engine.manifest.n_covariates,
                 engine.manifest.engine_dir)
        engines.append(engine)
    return engines


def forecast_stage(engine: Engine, publisher: Publisher, metrics: Metrics, segmentation: np.ndarray,
                   fc: ForecastConfig, path: Path, loader: Loader) -> ForecastStage:
    """The stage for the engine's task: a video stage (volumes in), an activation stage or a trace
    forecast stage (both hot-swap)."""
    task = engine.manifest.task
    if task == "video":
        if fc.watch:
            log.info("hot swap serves trace engines; the video engine %s stays for this run", engine.version)
        return VideoForecastStage(engine, publisher, metrics, segmentation, fc.lead_times, fc.lead_batch)
    stage = ActivationStage if task == "activation" else ForecastStage
    return stage(engine, publisher, metrics, engine_watcher(path, fc, loader, metrics))


def build_controller(cfg: LoopcastConfig, metrics: Metrics, rec: Recording | None,
                     run_dir: Path | None = None) -> Controller:
    """Resolve the policy's neuron sets (against the recording's groups, if any) and build it; with a run
    directory, its audit log is <run_dir>/<controller.audit.file> (unless controller.audit.enabled is false)."""
    n = rec.n_neurons if rec is not None else None
    groups = neuron_groups(rec) if rec is not None else {}
    mqtt_security(cfg)
    if n is None:
        raise UserError("the controller needs the neuron count: set paths.recording to the rig's recording")
    pol = cfg.controller.policy
    try:
        monitor = resolve_neuron_set(pol.monitor, n, groups)
        targets = resolve_neuron_set(pol.targets, n, groups)
    except ValueError as exc:
        raise UserError(f"controller.policy: {exc}") from exc
    audit_path = run_dir / cfg.controller.audit.file if run_dir is not None else None
    try:
        return Controller(cfg.controller, monitor, targets, metrics, n_neurons=n, audit_path=audit_path)
    except OSError as exc:
        raise UserError(f"controller audit log {audit_path}: {exc}") from exc


def build_sim(cfg: LoopcastConfig, metrics: Metrics, mqtt: bool = True, run_dir: Path | None = None) -> LiveSim:
    """The live simulated rig; with a run directory, a moving fish's true shifts go to <run_dir>/sim.shifts.npy."""
    fish = FishModel(cfg.synth.fish)
    broker = (cfg.mqtt.host, cfg.mqtt.port) if mqtt else None
    security = mqtt_security(cfg) if mqtt else None
    shifts = run_dir / "sim.shifts.npy" if run_dir is not None else None
    return LiveSim(fish, cfg.sim, cfg.rig.name, cfg.endpoints.frames, metrics, broker, cfg.transport, security,
                   shifts_path=shifts)


def mqtt_security(cfg: LoopcastConfig) -> MqttSecurity:
    """[mqtt]'s login and TLS, checked before a process starts (password file, certificates, keys): a
    UserError names the key and the file. Each connect reads the files again."""
    try:
        client_options(cfg.mqtt.security)
    except MqttSecurityError as exc:
        raise UserError(str(exc)) from None
    return cfg.mqtt.security


def run_until_signalled(main: Callable[[asyncio.Event], Awaitable[Any]]) -> Any:
    """asyncio.run(main(stop)) where SIGINT/SIGTERM set `stop` for a clean shutdown."""
    async def runner() -> Any:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        return await main(stop)
    return asyncio.run(runner())
