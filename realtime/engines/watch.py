"""Engine hot swap: watch a registry name directory and hand newer, validated versions to the forecaster.

`EngineWatcher` polls `<registry>/<name>/` in a daemon thread. When a version newer than the one serving
appears (training publishes it by an atomic rename; hidden `.staging-*` dirs are never looked at), it is
loaded and validated in that thread, never in the frame loop: it must serve the serving engine's stage
(same task, signal and stimulus covariate count K), the serving context C (the pipeline's context buffer
is fixed) and the pipeline's neuron count, and give a finite warm-up output on zeros (zero covariates
where it takes them). Only then is it put in a
lock-protected slot; the forecast stage `take()`s it at a frame boundary. A refused version is counted
in `loopcast_engine_load_failures_total{reason}`, logged, and not retried until its directory changes.
"""
from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np

from loopcast.realtime.engines.base import Engine
from loopcast.realtime.engines.manifest import MANIFEST_FILE, VERSION_RE, EngineError, EngineManifest
from loopcast.realtime.metrics import Metrics

log = logging.getLogger(__name__)
Loader = Callable[[Path], Engine]
Fingerprint = tuple[tuple[str, int, int], ...]


class CandidateRefused(EngineError):
    """A newer version that may not serve; `reason` is the metric label."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def watch_dir(path: str | Path) -> Path | None:
    """The registry name directory to watch for an engine path, or None for a pinned version dir."""
    p = Path(path)
    if (p / MANIFEST_FILE).is_file() or VERSION_RE.match(p.name):
        return None
    return p


def version_number(name: str) -> int:
    """v0007 -> 7; -1 for a name that is not a registry version."""
    m = VERSION_RE.match(name)
    return int(m.group(1)) if m else -1


def newer_versions(name_dir: Path, than: int) -> list[Path]:
    """Published version dirs numbered above `than`, newest first ([] if the dir is unreadable)."""
    try:
        found = [(version_number(d.name), d) for d in name_dir.iterdir() if d.is_dir()]
    except OSError:
        return []
    return [d for n, d in sorted(found, reverse=True) if n > than]


def fingerprint(path: Path) -> Fingerprint:
    """Names, sizes and mtimes of a version dir's files: a refused version is retried only if it changes."""
    try:
        stats = [(f.name, f.stat()) for f in path.iterdir()]
    except OSError:
        return ()
    return tuple(sorted((name, st.st_size, st.st_mtime_ns) for name, st in stats))


def close_engine(engine: object) -> None:
    """Release an engine's runtime resources where it has a close()."""
    close = getattr(engine, "close", None)
    if callable(close):
        close()


class EngineWatcher:
    """Loads and validates newer versions of the serving engine in the background; `take()` hands
    the newest valid one over (once), `stop()` ends the thread."""

    def __init__(self, name_dir: str | Path, loader: Loader, metrics: Metrics,
                 interval_s: float = 1.0) -> None:
        if interval_s <= 0:
            raise ValueError(f"watch interval must be > 0 s, got {interval_s}")
        self.name_dir = Path(name_dir)
        self.loader = loader
        self.metrics = metrics
        self.interval_s = interval_s
        self._lock = threading.Lock()
        self._ready: Engine | None = None
        self._refused: dict[str, Fingerprint] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._serving, self._serving_name, self._context, self._n = -1, "", 0, 0
        self._like: EngineManifest | None = None

    def start(self, serving: Engine, n_neurons: int) -> None:
        """Watch for versions newer than `serving` that could replace it in its stage (task, signal,
        covariates, context) for `n_neurons`."""
        self._like = serving.manifest
        self._serving = version_number(serving.manifest.engine_dir.name)
        self._serving_name = serving.version
        self._context, self._n = serving.manifest.context, n_neurons
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="engine-watch", daemon=True)
            self._thread.start()
            log.info("watching %s for engine versions newer than %s", self.name_dir, serving.version)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.poll()
            except Exception:  # never let one bad scan end the watch
                log.exception("engine watch of %s failed; retrying", self.name_dir)

    def poll(self) -> Engine | None:
        """One scan: offer the newest newer version that loads and validates (None if there is none)."""
        for path in newer_versions(self.name_dir, self._serving):
            if self._stop.is_set():
                return None
            if self._refused.get(path.name) == fingerprint(path):
                continue
            engine = self._try(path)
            if engine is not None:
                self._offer(path, engine)
                return engine
        return None

    def _try(self, path: Path) -> Engine | None:
        before = fingerprint(path)
        try:
            return self._load_checked(path)
        except CandidateRefused as exc:
            self._refused[path.name] = before
            self.metrics.engine_load_failures.labels(reason=exc.reason).inc()
            log.warning("engine %s refused (%s): %s; %s keeps serving", path, exc.reason, exc,
                        self._serving_name)
            return None

    def _load_checked(self, path: Path) -> Engine:
        try:
            manifest = EngineManifest.load(path / MANIFEST_FILE)
        except EngineError as exc:
            raise CandidateRefused("manifest", str(exc)) from exc
        self._check_manifest(manifest)
        try:
            engine = self.loader(path)
        except Exception as exc:  # runtimes raise their own types too
            raise CandidateRefused("load", str(exc)) from exc
        try:
            self._check_engine(engine)
        except CandidateRefused:
            close_engine(engine)
            raise
        return engine

    def _check_manifest(self, m: EngineManifest) -> None:
        like = self._like
        if like is None:
            raise RuntimeError("EngineWatcher.start() first")
        if m.task != like.task:
            raise CandidateRefused("task", f"a {m.task!r} engine cannot replace the {like.task!r} engine")
        if m.context != self._context:
            raise CandidateRefused("context", f"context {m.context} != the pipeline's {self._context}")
        if m.n_covariates != like.n_covariates:
            raise CandidateRefused("covariates", f"takes {m.n_covariates} stimulus covariates; the stage "
                                   f"feeds {like.n_covariates}")
        if m.signal != like.signal:
            raise CandidateRefused("signal", f"reads {m.signal!r}; the stage feeds {like.signal!r}")

    def _check_engine(self, engine: Engine) -> None:
        try:
            engine.check_neurons(self._n)
        except EngineError as exc:
            raise CandidateRefused("neurons", str(exc)) from exc
        m = engine.manifest
        want = (m.output_rows, self._n)
        cov = np.zeros((m.context + m.horizon, m.n_covariates), np.float32) if m.n_covariates else None
        try:
            y = engine.run(np.zeros((self._context, self._n), np.float32), cov)
        except Exception as exc:
            raise CandidateRefused("warmup", f"warm-up run failed: {exc}") from exc
        if not isinstance(y, np.ndarray) or y.shape != want or not np.all(np.isfinite(y)):
            got = y.shape if isinstance(y, np.ndarray) else type(y).__name__
            raise CandidateRefused("warmup", f"warm-up output must be finite {want}, got {got}")

    def _offer(self, path: Path, engine: Engine) -> None:
        stale: Engine | None
        with self._lock:
            if self._stop.is_set():  # stopped while it loaded: it will never be taken
                stale = engine
            else:
                stale, self._ready = self._ready, engine
        self._serving, self._serving_name = version_number(path.name), engine.version
        if stale is not None:
            close_engine(stale)  # superseded before it was taken: it never served
        log.info("engine %s loaded and validated; it serves from the next frame", engine.version)

    def take(self) -> Engine | None:
        """The validated engine waiting to serve, once (None if there is none)."""
        with self._lock:
            engine, self._ready = self._ready, None
        return engine

    def stop(self, timeout_s: float = 5.0) -> None:
        """End the watch thread and release a candidate that was never taken."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
        stale = self.take()
        if stale is not None:
            close_engine(stale)
