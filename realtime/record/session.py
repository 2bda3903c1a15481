"""The pipeline's session record: per-frame timing and validity, the dF/F, the published forecasts and the
live forecast skill, in a zarr store that grows as the session runs (format: docs/record.md).

The pipeline's thread only copies the recorded neurons' values and queues them (`rejected`, `rows`,
`frame`, `forecast`; stage threads call `forecast` too); one writer thread of the recorder scores the
forecasts (realtime.record.skill), sets the skill gauges and appends to the tables
(realtime.record.store), flushing every `flush_s` seconds and whenever a chunk fills. The queue is
bounded (`max_queue` items): when the writer falls behind, an item is dropped and counted in
`loopcast_record_dropped_total{item}` rather than letting memory grow or the loop wait. A failure of the
writer (e.g. the disk is full) ends it and `check()` raises it in the pipeline's thread: the loop stops
loudly rather than run on unrecorded.
"""
from __future__ import annotations

import json
import logging
import queue
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from loopcast.realtime.metrics import Metrics
from loopcast.realtime.record.skill import SkillRow, SkillTracker
from loopcast.realtime.record.store import Column, GrowingTable

log = logging.getLogger(__name__)
FORMAT, VERSION = "loopcast-session", 1
FORECAST_CODES = ("not_ready", "forecast", "skipped", "failed", "invalid")
LATENCY_COLUMNS = ("ingest", "preprocess", "forecast")
# Each table keeps its integer columns side by side in one int64 array `index` (one zarr write per flush instead
# of one per column: each costs ~1 ms of Python, GIL held); attrs `index_columns` names them.
FRAME_INDEX = ("seq", "t_src_ns", "t_recv_ns", "status", "forecast")
DFF_INDEX = ("seq", "t_src_ns")
FORECAST_INDEX = ("seq", "t_src_ns", "t_pub_ns", "engine")
SKILL_INDEX = ("source_seq", "target_seq", "lead")
SKILL_VALUES = ("mae", "baseline_mae", "rolling_mae", "rolling_baseline_mae")
_STOP = ("stop",)


@dataclass(frozen=True)
class RecordConfig:
    """`[pipeline.record]`: what the session store keeps (docs/record.md; disk rates in docs/fullscale.md)."""

    enabled: bool = True
    path: str = "session.zarr"      # inside the run directory
    neurons: str = "all"            # "all", "stride:k" (every k-th neuron) or "indices:i,j,..."; the
    #                                 controller policy's monitored and target neurons are always added
    frame_every: int = 1            # keep the dF/F of every k-th valid frame and every k-th forecast per stage
    forecasts: bool = True          # keep the published forecasts and activation predictions
    skill_window: int = 100         # live forecast skill: rolling mean over this many scored forecasts per lead
    flush_s: float = 5.0            # a killed session loses at most this much
    chunk_mb: float = 1.0           # target chunk size of each array (at most 1024 rows)
    max_queue: int = 512            # items waiting for the writer before new ones are dropped (counted)

    def __post_init__(self) -> None:
        if self.frame_every < 1 or self.skill_window < 1 or self.max_queue < 1:
            raise ValueError("frame_every, skill_window and max_queue must be >= 1")
        if self.flush_s <= 0 or self.chunk_mb <= 0:
            raise ValueError(f"flush_s and chunk_mb must be > 0, got {self.flush_s}, {self.chunk_mb}")


@dataclass(frozen=True)
class StageInfo:
    """What the record needs of a forecast stage."""

    name: str                    # its topic, '<kind>/<model>'
    kind: str                    # "forecast" or "activation"
    model: str
    signal: str                  # "dff" or "spike_prob"
    lead_times: tuple[int, ...]
    context: int


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
    """Writes `<run dir>/session.zarr` from a writer thread; see the module docstring."""

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
        self._writer = _Writer(self, attrs)
        self._thread = threading.Thread(target=self._writer.run, name="session record", daemon=True)
        self._thread.start()

    # --- called by the pipeline (any thread) ----------------------------------------------------
    def rejected(self, t_recv_ns: int, reason: str, seq: int | None, t_src_ns: int | None) -> None:
        """A message the pipeline did not accept (ingest's reason, or a reused shm slot)."""
        self._put(("frame", -1 if seq is None else seq, t_src_ns or 0, t_recv_ns, reason, "invalid",
                   (np.nan, np.nan, np.nan)))

    def rows(self, seq: int, t_src_ns: int, dff: np.ndarray, spike_prob: np.ndarray | None) -> None:
        """A preprocessed frame's signals (N,); spike_prob None before the spike estimator is ready."""
        spikes = spike_prob[self.neurons] if (self._needs_spikes and spike_prob is not None) else None
        self._put(("rows", seq, t_src_ns, dff[self.neurons], spikes))

    def frame(self, seq: int, t_src_ns: int, t_recv_ns: int, code: str, latency_ms: tuple[float, ...]) -> None:
        """A valid frame: what the first stage did with it (FORECAST_CODES) and its stage latencies (ms)."""
        self._put(("frame", seq, t_src_ns, t_recv_ns, "", code, latency_ms))

    def forecast(self, name: str, seq: int, t_src_ns: int, t_pub_ns: int, version: str, manifest: Path,
                 prediction: np.ndarray) -> None:
        """A published forecast or activation prediction (H, N) of stage `name`."""
        latency_ms = (time.time_ns() - t_src_ns) / 1e6
        self._put(("forecast", name, seq, t_src_ns, t_pub_ns, version, manifest, latency_ms,
                   prediction[:, self.neurons]))

    def check(self) -> None:
        """Raise, in the caller's thread, the failure that ended the writer."""
        if self.error is not None:
            raise RuntimeError(f"the session record {self.path} failed: {self.error}") from self.error

    def close(self, timeout_s: float = 60.0) -> None:
        """Write what is queued, close the tables and mark the store complete."""
        if self._thread.is_alive():
            self._queue.put(_STOP)
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                log.error("session record: writer still busy %.0f s after close; %s may be incomplete",
                          timeout_s, self.path)

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


class _Writer:
    """The recorder's thread: tables, skill trackers and gauges."""

    def __init__(self, rec: SessionRecorder, attrs: dict[str, Any]) -> None:
        self.rec = rec
        cfg, s = rec.cfg, rec.neurons.size
        self.root = zarr.open_group(str(rec.path), mode="w-")
        stages = [asdict(st) for st in rec.stages.values()]
        self.root.attrs.update({"format": FORMAT, "version": VERSION, "started_ns": time.time_ns(), **attrs,
                                "neurons_spec": cfg.neurons, "frame_every": cfg.frame_every, "stages": stages,
                                "engines": {}, "complete": False})
        self.root.create_array("neurons", data=rec.neurons)
        chunk = int(cfg.chunk_mb * (1 << 20))
        self.reasons: list[str] = []
        self.frames = GrowingTable(self.root, "frames", {
            "index": Column("int64", (len(FRAME_INDEX),)), "latency_ms": Column("float32", (3,))},
            {"index_columns": list(FRAME_INDEX), "codes": list(FORECAST_CODES), "reasons": [],
             "latency_columns": list(LATENCY_COLUMNS)}, chunk)
        self.dff = GrowingTable(self.root, "dff", {"index": Column("int64", (len(DFF_INDEX),)),
                                                   "data": Column("float32", (s,))},
                                {"index_columns": list(DFF_INDEX)}, chunk)
        self.forecasts = {st.name: self._forecast_table(st, s, chunk) for st in rec.stages.values()} \
            if cfg.forecasts else {}
        self.versions: dict[str, list[str]] = {name: [] for name in rec.stages}
        self.trackers = {st.name: SkillTracker(st.lead_times, st.context, cfg.skill_window)
                         for st in rec.stages.values() if st.kind == "forecast"}
        self.skill = {name: self._skill_table(rec.stages[name], chunk) for name in self.trackers}
        self.engines: dict[str, Any] = {}   # engine version -> its manifest (the store's attribute `engines`)
        self.n_valid = 0
        self.n_forecasts = {name: 0 for name in rec.stages}

    def _forecast_table(self, st: StageInfo, s: int, chunk: int) -> GrowingTable:
        h = len(st.lead_times) if st.kind == "forecast" else 1
        return GrowingTable(self.root.require_group("forecasts"), f"{st.kind}.{st.model}", {
            "index": Column("int64", (len(FORECAST_INDEX),)), "latency_ms": Column("float32"),
            "data": Column("float32", (h, s))},
            {"index_columns": list(FORECAST_INDEX), "kind": st.kind, "model": st.model, "signal": st.signal,
             "lead_times": list(st.lead_times), "engine_versions": []}, chunk)

    def _skill_table(self, st: StageInfo, chunk: int) -> GrowingTable:
        cols = {"index": Column("int64", (len(SKILL_INDEX),)), "values": Column("float32", (len(SKILL_VALUES),))}
        return GrowingTable(self.root.require_group("skill"), st.model, cols,
                            {"index_columns": list(SKILL_INDEX), "value_columns": list(SKILL_VALUES),
                             "window": self.rec.cfg.skill_window, "lead_times": list(st.lead_times),
                             "signal": st.signal, "context": st.context}, chunk)

    def run(self) -> None:
        try:
            self._loop()
            self._close()
        except BaseException as exc:   # raised in the pipeline's thread by check()
            log.exception("session record %s failed", self.rec.path)
            self.rec.error = exc

    def _loop(self) -> None:
        next_flush = time.monotonic() + self.rec.cfg.flush_s
        while True:
            try:
                item = self.rec._queue.get(timeout=max(0.0, next_flush - time.monotonic()))
            except queue.Empty:
                item = None
            if item is _STOP:
                return
            if item is not None:
                getattr(self, f"_on_{item[0]}")(*item[1:])
            if time.monotonic() >= next_flush:
                self._flush()
                next_flush = time.monotonic() + self.rec.cfg.flush_s

    def _on_frame(self, seq: int, t_src: int, t_recv: int, reason: str, code: str, lat: tuple[float, ...]) -> None:
        if reason and reason not in self.reasons:
            self.reasons.append(reason)
            self.frames.set_attrs(reasons=list(self.reasons))
        status = self.reasons.index(reason) + 1 if reason else 0
        self.frames.append(index=(seq, t_src, t_recv, status, FORECAST_CODES.index(code)), latency_ms=lat)

    def _on_rows(self, seq: int, t_src: int, dff: np.ndarray, spikes: np.ndarray | None) -> None:
        if self.n_valid % self.rec.cfg.frame_every == 0:
            self.dff.append(index=(seq, t_src), data=dff)
        self.n_valid += 1
        for name, tracker in self.trackers.items():
            row = dff if self.rec.stages[name].signal == "dff" else spikes
            if row is not None:
                self._scored(name, tracker.observe(seq, row))

    def _on_forecast(self, name: str, seq: int, t_src: int, t_pub: int, version: str, manifest: Path,
                     latency_ms: float, pred: np.ndarray) -> None:
        versions = self.versions[name]
        if version not in versions:
            versions.append(version)
            self._new_engine(name, version, manifest)
        if name in self.forecasts and self.n_forecasts[name] % self.rec.cfg.frame_every == 0:
            self.forecasts[name].append(index=(seq, t_src, t_pub, versions.index(version)), latency_ms=latency_ms,
                                        data=pred)
        self.n_forecasts[name] += 1
        if name in self.trackers:
            self._scored(name, self.trackers[name].add(seq, pred))

    def _new_engine(self, name: str, version: str, manifest: Path) -> None:
        if name in self.forecasts:
            self.forecasts[name].set_attrs(engine_versions=list(self.versions[name]))
        try:
            doc = json.loads(Path(manifest).read_text())
        except (OSError, ValueError) as exc:
            doc = {"error": f"manifest {manifest} unreadable: {exc}"}
        engines: dict[str, Any] = dict(self.engines)
        engines[version] = doc
        self.engines = engines
        self.root.attrs["engines"] = engines


    def _scored(self, name: str, rows: list[SkillRow]) -> None:
        model = self.rec.stages[name].model
        for r in rows:
            self.skill[name].append(index=(r.source_seq, r.target_seq, r.lead),
                                    values=(r.mae, r.baseline_mae, r.rolling_mae, r.rolling_baseline_mae))
            lead = str(r.lead)
            self.rec.metrics.forecast_mae.labels(model=model, lead=lead).set(r.rolling_mae)
            self.rec.metrics.forecast_baseline_mae.labels(model=model, lead=lead).set(r.rolling_baseline_mae)

    def _tables(self) -> list[GrowingTable]:
        return [self.frames, self.dff, *self.forecasts.values(), *self.skill.values()]

    def _flush(self) -> None:
        for table in self._tables():
            table.flush()

    def _close(self) -> None:
        for table in self._tables():
            table.close()
        self.root.attrs.update({"complete": True, "ended_ns": time.time_ns(), "dropped": dict(self.rec.dropped)})
