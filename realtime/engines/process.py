"""An engine served by a child process: the same interface, the compute in another interpreter.

Stages served beside the first (`pipeline.forecast.also`) run in threads of the pipeline's process.
ONNX Runtime releases the GIL while it computes, but each call's Python around it (input checks,
the session's feeds and outputs, the stage's header and publish) still takes the GIL from the
pipeline's thread, which needs it between its preprocessing kernels. `ProcessEngine` moves the
engine call into a child process (`pipeline.forecast.also_workers = "processes"`), so the pipeline's
process keeps only a thread that waits on a pipe, without the GIL, while the child computes.

Protocol (one call at a time, in order). The parent creates one file in /dev/shm holding the inputs
and the output at their manifest shapes and starts the child (multiprocessing "spawn": a fresh
interpreter that imports only the runtime). The child maps the file, loads the engine with the
parent's runtime settings, checks it (neurons), and answers "ready" or the error. Per call the parent
copies the inputs in and sends ("run", batch, has_covariates); the child runs the engine and copies
its output into the file, then answers "ok" or ("error", text). A child that dies makes the call fail
with an EngineError (counted by the stage's failure rule, which stops the pipeline after 10 in a row).
Hot swap needs nothing more: the watcher's loader makes a new `ProcessEngine` (a new child, loaded and
checked in the background), and closing the old one ends its child.
"""
from __future__ import annotations

import logging
import mmap
import multiprocessing as mp
import os
import tempfile
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np

from loopcast.realtime.engines.base import EngineBase
from loopcast.realtime.engines.manifest import EngineError

log = logging.getLogger(__name__)
START_TIMEOUT_S = 120.0     # the child imports its runtime and loads the engine
SHM_DIR = "/dev/shm"


class ProcessEngine(EngineBase):
    """A trace engine (forecast, activation) run by a child process; `nice` lowers the child's priority."""

    runtime = "process"

    def __init__(self, path: str | Path, runtime: str = "onnxruntime", nice: int = 0, **options: Any) -> None:
        super().__init__(path)
        m = self.manifest
        if m.task not in ("forecast", "activation"):
            raise EngineError(f"engine {self.version}: a {m.task!r} engine cannot run in a child process "
                              "(forecast and activation engines only)")
        self.inner_runtime = runtime
        self._layout = _Layout(m.context, m.horizon, m.n_covariates, m.output_rows, self.n_neurons)
        self._file = _shm_file(self._layout.nbytes)
        self._map = np.memmap(self._file, dtype=np.float32, mode="r+", shape=(self._layout.nbytes // 4,))
        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=serve, name=f"engine {self.version}", daemon=True,
                                 args=(child, str(self.path), self._file, self._layout, runtime, self.n_neurons,
                                       nice, options))
        self._proc.start()
        child.close()
        self._closed = False
        try:
            self._expect("ready", START_TIMEOUT_S)
        except BaseException:
            self.close()
            raise

    def _infer(self, x: np.ndarray, extra: np.ndarray | None) -> np.ndarray:
        """x (1, C, N), extra (1, C + H, K) or None -> (1, rows, N), computed by the child."""
        if x.shape[0] != 1:
            raise EngineError(f"engine {self.version} (in a child process) runs one window at a time, "
                              f"got a batch of {x.shape[0]}")
        lay = self._layout
        np.copyto(lay.view(self._map, "x"), x[0])
        if extra is not None:
            np.copyto(lay.view(self._map, "cov"), extra[0])
        self._send(("run", extra is not None))
        self._expect("ok", None)
        return lay.view(self._map, "y")[None].copy()

    def _send(self, message: tuple[Any, ...]) -> None:
        try:
            self._conn.send(message)
        except (OSError, ValueError) as exc:
            raise EngineError(f"engine {self.version}: its process is gone ({self._exit()})") from exc

    def _expect(self, word: str, timeout_s: float | None) -> None:
        """Wait for the child's answer `word`; EngineError on its error, its death or the timeout."""
        try:
            if timeout_s is not None and not self._conn.poll(timeout_s):
                raise EngineError(f"engine {self.version}: its process did not answer within {timeout_s:.0f} s")
            answer = self._conn.recv()
        except (EOFError, OSError) as exc:
            raise EngineError(f"engine {self.version}: its process died ({self._exit()})") from exc
        if answer != word:
            raise EngineError(f"engine {self.version}: {answer[1] if isinstance(answer, tuple) else answer}")

    def _exit(self) -> str:
        self._proc.join(1.0)
        code = self._proc.exitcode
        return "still running" if code is None else f"exit code {code}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid

    def close(self) -> None:
        """End the child (asked, then terminated) and remove the shared file."""
        if self._closed:
            return
        self._closed = True
        try:
            if self._proc.is_alive():
                try:
                    self._conn.send(("stop",))
                except (OSError, ValueError):
                    pass
                self._proc.join(5.0)
                if self._proc.is_alive():
                    self._proc.terminate()
                    self._proc.join(5.0)
        finally:
            self._conn.close()
            del self._map
            Path(self._file).unlink(missing_ok=True)


class _Layout:
    """Where the inputs and the output lie in the shared file (float32 offsets)."""

    def __init__(self, context: int, horizon: int, n_covariates: int, rows: int, n: int) -> None:
        self.shapes = {"x": (context, n), "cov": (context + horizon, n_covariates), "y": (rows, n)}
        self.offsets: dict[str, int] = {}
        at = 0
        for key, shape in self.shapes.items():
            self.offsets[key] = at
            at += int(np.prod(shape))
        self.nbytes = max(at, 1) * 4

    def view(self, flat: np.ndarray, key: str) -> np.ndarray:
        shape = self.shapes[key]
        at = self.offsets[key]
        return flat[at:at + int(np.prod(shape))].reshape(shape)


def _shm_file(nbytes: int) -> str:
    directory = SHM_DIR if os.path.isdir(SHM_DIR) and os.access(SHM_DIR, os.W_OK) else None
    fd, name = tempfile.mkstemp(prefix="loopcast-engine-", dir=directory)
    try:
        os.ftruncate(fd, nbytes)
    finally:
        os.close(fd)
    return name


def serve(conn: Connection, path: str, file: str, layout: _Layout, runtime: str, n_neurons: int, nice: int,
          options: dict[str, Any]) -> None:
    """The child: lower its priority by `nice` (before any thread is made: they inherit it), load the
    engine, answer "ready", then run each request until "stop" or the pipe closes."""
    from loopcast.realtime.engines.loader import load_engine
    try:
        if nice:
            os.nice(nice)
        engine = load_engine(path, runtime=runtime, **options)
        engine.check_neurons(n_neurons)
        with open(file, "r+b") as fh:
            mm = mmap.mmap(fh.fileno(), layout.nbytes)
        flat = np.frombuffer(mm, dtype=np.float32)
    except Exception as exc:
        conn.send(("error", f"cannot load it in its process: {type(exc).__name__}: {exc}"))
        return
    conn.send("ready")
    while True:
        try:
            message = conn.recv()
        except EOFError:                            # the parent went away
            return
        if message[0] != "run":
            return
        try:
            cov = layout.view(flat, "cov")[None] if message[1] else None
            y = engine.run_batch(layout.view(flat, "x")[None], cov)
            layout.view(flat, "y")[...] = y[0]
        except Exception as exc:
            conn.send(("error", f"{type(exc).__name__}: {exc}"))
            continue
        conn.send("ok")
