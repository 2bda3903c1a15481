"""The pipeline's session record: per-frame timing and validity, the dF/F, the published forecasts and the
live forecast skill, in a zarr store that grows as the session runs (format: docs/record.md).

The pipeline's thread only copies the recorded neurons' values and queues them (`rejected`, `rows`,
`frame`, `forecast`; stage threads call `forecast` too). A sender thread passes them through a pipe to a
writer in a child process (realtime.record.writer), which scores the forecasts, appends to the tables and
flushes; a receiver thread sets the skill gauges from what the child sends back. The store's Python work
(zarr's ~1 ms per array write, the scoring) so never holds the pipeline's GIL. The queue is bounded
(`max_queue` items): when the writer falls behind, an item is dropped and counted in
`loopcast_record_dropped_total{item}` rather than letting memory grow or the loop wait. A failure of the
writer (e.g. the disk is full, or the child dies) is kept and `check()` raises it in the pipeline's thread:
the loop stops loudly rather than run on unrecorded.
"""
from __future__ import annotations

import logging
import multiprocessing as mp
import queue
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from loopcast.realtime.metrics import Metrics
from loopcast.realtime.record.config import FORMAT, VERSION, RecordConfig, StageInfo
from loopcast.realtime.record.writer import writer_main

log = logging.getLogger(__name__)
_STOP = ("stop",)


def select_neurons(spec: str, n_neurons: int, extra: np.ndarray | None = None) -> np.ndarray:
    """The recorded neurons: `spec` ('all', 'stride:k', 'indices:i,j,...') plus `extra`, sorted (int64)."""
    kind, _, arg = spec.strip().partition(":")
    try:
        if kind == "all" and not arg:
            idx = np.arange(n_neurons)
        elif kind == "stride" and int(arg) >= 1:
            idx = np.arange(0, n_neurons, int(arg))
        elif kind == "indices":
            idx = np.array([int(x) for x in arg.split(",") if x.strip()], dtype=np.int64)
        else:
            raise ValueError("unknown form")
    except ValueError:
        raise ValueError(f"pipeline.record.neurons {spec!r}: expected 'all', 'stride:k' (k >= 1) or "
                         f"'indices:i,j,...'") from None
    if idx.size and (idx.min() < 0 or idx.max() >= n_neurons):
        raise ValueError(f"pipeline.record.neurons {spec!r}: indices outside [0, {n_neurons})")
    if extra is not None:
        idx = np.concatenate([idx, np.asarray(extra, dtype=np.int64)])
    out = np.unique(idx).astype(np.int64)
    if out.size == 0:
        raise ValueError(f"pipeline.record.neurons {spec!r} selects no neurons")
    return out


class SessionRecorder:
    """Writes `<run dir>/session.zarr` through a writer process; see the module docstring. The store is created
    here, in the caller (an existing one is refused: FileExistsError)."""

    def __init__(self, cfg: RecordConfig, path: Path, neurons: np.ndarray, stages: list[StageInfo],
                 metrics: Metrics, attrs: dict[str, Any]) -> None:
        self.cfg = cfg
        self.path = path
        self.neurons = np.asarray(neurons, dtype=np.int64)
        self.metrics = metrics
        self.stages = {s.name: s for s in stages}
        self.error: BaseException | None = None
        self.dropped: dict[str, int] = {}
        self._queue: queue.Queue[tuple[Any, ...]] = queue.Queue(cfg.max_queue)
        self._needs_spikes = any(s.signal == "spike_prob" for s in stages)
        self._closed = False
        _create_store(cfg, path, self.neurons, stages, attrs)
        self._start_writer(stages)

    def _start_writer(self, stages: list[StageInfo]) -> None:
        ctx = mp.get_context("spawn")   # never fork a process with the pipeline's threads
        inbox, self._to_child = ctx.Pipe(duplex=False)
        self._from_child, outbox = ctx.Pipe(duplex=False)
        self._proc = ctx.Process(target=writer_main, args=(inbox, outbox, self.cfg, str(self.path), self.neurons,
                                                           stages), name="loopcast session record", daemon=True)
        self._proc.start()
        inbox.close()
        outbox.close()
        self._sender = threading.Thread(target=self._send_loop, name="session record sender", daemon=True)
        self._receiver = threading.Thread(target=self._recv_loop, name="session record receiver", daemon=True)
        self._sender.start()
        self._receiver.start()

    # --- called by the pipeline (any thread) ----------------------------------------------------
    def rejected(self, t_recv_ns: int, reason: str, seq: int | None, t_src_ns: int | None) -> None:
        """A message the pipeline did not accept (ingest's reason, or a reused shm slot)."""
        self._put(("frame", -1 if seq is None else seq, t_src_ns or 0, t_recv_ns, reason, "invalid",
                   (np.nan, np.nan, np.nan)))

    def rows(self, seq: int, t_src_ns: int, dff: np.ndarray, spike_prob: np.ndarray | None) -> None:
        """A preprocessed frame's signals (N,); spike_prob None before the spike estimator is ready."""
        spikes = spike_prob[self.neurons] if (self._needs_spikes and spike_prob is not None) else None
        self._put(("rows", seq, t_src_ns, dff[self.neurons], spikes))

    def frame(self, seq: int, t_src_ns: int, t_recv_ns: int, code: str, latency_ms: tuple[float, ...],
              registration: tuple[float, ...] = ()) -> None:
        """A valid frame: what the first stage did with it (FORECAST_CODES), its stage latencies (ms) and its
        registration (dx, dy, dz, confidence; () when not registered)."""
        self._put(("frame", seq, t_src_ns, t_recv_ns, "", code, latency_ms, registration))

    def forecast(self, name: str, seq: int, t_src_ns: int, t_pub_ns: int, version: str, manifest: Path,
                 prediction: np.ndarray) -> None:
        """A published forecast or activation prediction (H, N) of stage `name`."""
        latency_ms = (time.time_ns() - t_src_ns) / 1e6
        self._put(("forecast", name, seq, t_src_ns, t_pub_ns, version, manifest, latency_ms,
                   prediction[:, self.neurons]))

    def check(self) -> None:
        """Raise, in the caller's thread, the failure that ended the writer."""
        if self.error is None and not self._closed and self._proc.exitcode is not None:
            self.error = RuntimeError(f"the writer process exited with code {self._proc.exitcode}")
        if self.error is not None:
            raise RuntimeError(f"the session record {self.path} failed: {self.error}") from self.error

    def close(self, timeout_s: float = 60.0) -> None:
        """Write what is queued, close the tables and mark the store complete; ends the writer process."""
        if self._sender.is_alive():
            self._queue.put(_STOP)
        self._sender.join(timeout_s)
        self._receiver.join(timeout_s)
        self._proc.join(timeout_s)
        self._closed = True
        if self._proc.is_alive():
            log.error("session record: writer still busy %.0f s after close; %s may be incomplete (stopped)",
                      timeout_s, self.path)
            self._proc.kill()
        self._to_child.close()
        self._from_child.close()

    def _send_loop(self) -> None:
        """The queue -> the child's pipe (a blocked write releases the GIL); stop when told or when it fails."""
        while True:
            item = self._queue.get()
            try:
                self._to_child.send(("stop", dict(self.dropped)) if item is _STOP else item)
            except (OSError, ValueError) as exc:   # the child is gone: its receiver says why, if it could
                if self.error is None:
                    self.error = RuntimeError(f"the writer process is gone ({type(exc).__name__}: {exc})")
                return
            if item is _STOP:
                return

    def _recv_loop(self) -> None:
        """What the child sends back: skill for the gauges, its failure, or its clean close."""
        while True:
            try:
                msg = self._from_child.recv()
            except (EOFError, OSError):
                if not self._closed and self.error is None and self._proc.exitcode not in (None, 0):
                    self.error = RuntimeError(f"the writer process died (exit code {self._proc.exitcode})")
                return
            if msg[0] == "skill":
                for model, lead, mae, base in msg[1]:
                    self.metrics.forecast_mae.labels(model=model, lead=str(lead)).set(mae)
                    self.metrics.forecast_baseline_mae.labels(model=model, lead=str(lead)).set(base)
            elif msg[0] == "error":
                self.error = RuntimeError(msg[1])
                log.error("session record %s failed: %s", self.path, msg[1])
            elif msg[0] == "closed":
                return

    def _put(self, item: tuple[Any, ...]) -> None:
        if self.error is not None:
            return
        try:
            self._queue.put_nowait(item)
        except queue.Full:
            self.dropped[item[0]] = self.dropped.get(item[0], 0) + 1
            self.metrics.record_dropped.labels(item=item[0]).inc()
            if sum(self.dropped.values()) == 1:
                log.error("session record: writer behind by %d items; dropping (counted in "
                          "loopcast_record_dropped_total)", self.cfg.max_queue)


def _create_store(cfg: RecordConfig, path: Path, neurons: np.ndarray, stages: list[StageInfo],
                  attrs: dict[str, Any]) -> None:
    """The store's group, attributes and `neurons` (the writer process adds the tables)."""
    root = zarr.open_group(str(path), mode="w-")
    root.attrs.update({"format": FORMAT, "version": VERSION, "started_ns": time.time_ns(), **attrs,
                       "neurons_spec": cfg.neurons, "frame_every": cfg.frame_every,
                       "stages": [asdict(st) for st in stages], "engines": {}, "complete": False})
    root.create_array("neurons", data=neurons)
