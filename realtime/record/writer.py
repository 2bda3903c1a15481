"""The session record's writer, in a child process of the pipeline (realtime.record.session starts it): it
receives the pipeline's items over a pipe, scores the forecasts (realtime.record.skill), appends to the zarr
tables (realtime.record.store), flushing every `flush_s` seconds and whenever a chunk fills, and sends the live
skill back for the gauges. In a process of its own, zarr's Python (~1 ms per array write) and the scoring never
hold the pipeline's GIL. When the pipeline is killed the pipe ends: the writer flushes what it received and
exits, leaving the store without `complete`.

Messages (pickled over a private pipe between two processes of one loopcast run; nothing on a wire):
parent -> child: ("frame" | "rows" | "forecast", ...) as SessionRecorder queues them, then ("stop", dropped);
child -> parent: ("skill", [(model, lead, rolling_mae, rolling_baseline_mae), ...]), ("error", text) when it
fails, ("closed",) after a clean close.
"""
from __future__ import annotations

import json
import logging
import os
import time
import traceback
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from loopcast.realtime.record.config import (
    DFF_INDEX,
    FORECAST_CODES,
    FORECAST_INDEX,
    FRAME_INDEX,
    LATENCY_COLUMNS,
    NO_REGISTRATION,
    REGISTRATION_COLUMNS,
    SKILL_INDEX,
    SKILL_VALUES,
    RecordConfig,
    StageInfo,
)
from loopcast.realtime.record.skill import SkillRow, SkillTracker
from loopcast.realtime.record.store import Column, GrowingTable

log = logging.getLogger(__name__)


def writer_main(inbox: Connection, outbox: Connection, cfg: RecordConfig, path: str, neurons: np.ndarray,
                stages: list[StageInfo]) -> None:
    """The child process: write until ("stop", dropped) arrives, then close the store; report a failure."""
    writer = None
    try:
        _lower_priority(cfg)
        writer = SessionWriter(cfg, Path(path), neurons, stages, outbox)
        writer.run(inbox)
        tell(outbox, ("closed",))
    except EOFError:   # the pipeline is gone (killed): keep what came, leave the store marked incomplete
        if writer is not None:
            writer.flush()
    except BaseException as exc:   # raised in the pipeline's thread by SessionRecorder.check()
        tell(outbox, ("error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))


def tell(outbox: Connection, message: tuple[Any, ...]) -> bool:
    """Send to the pipeline; False when it is gone (it was killed: what it sent before still gets written)."""
    try:
        outbox.send(message)
    except OSError:
        return False
    return True


def _lower_priority(cfg: RecordConfig) -> None:
    """nice and (Linux) SCHED_IDLE for this process, as configured; lowering needs no privilege."""
    if cfg.writer_nice:
        os.nice(cfg.writer_nice)
    if cfg.writer_idle and hasattr(os, "SCHED_IDLE"):
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))


def leave_idle() -> bool:
    """Back from SCHED_IDLE to the normal policy (still niced) once the session ends, so that closing the
    store does not wait for a busy CPU to go idle. Linux allows it with CAP_SYS_NICE or an RLIMIT_NICE that
    covers the nice value; without either the writer stays idle (False) and closing takes what CPU is spare."""
    if not hasattr(os, "SCHED_IDLE") or os.sched_getscheduler(0) != os.SCHED_IDLE:
        return True
    try:
        os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
    except PermissionError:
        log.info("session record: closing under SCHED_IDLE (leaving it needs CAP_SYS_NICE or RLIMIT_NICE)")
        return False
    return True


class SessionWriter:
    """Tables and skill trackers of one session store (created by the parent with its attributes)."""

    def __init__(self, cfg: RecordConfig, path: Path, neurons: np.ndarray, stages: list[StageInfo],
                 outbox: Connection) -> None:
        self.cfg = cfg
        self.stages = {st.name: st for st in stages}
        self.outbox = outbox
        s = int(np.asarray(neurons).size)
        self.root = zarr.open_group(str(path), mode="r+")
        chunk = int(cfg.chunk_mb * (1 << 20))
        self.reasons: list[str] = []
        self.frames = GrowingTable(self.root, "frames", {
            "index": Column("int64", (len(FRAME_INDEX),)), "latency_ms": Column("float32", (3,)),
            "registration": Column("float32", (len(REGISTRATION_COLUMNS),))},
            {"index_columns": list(FRAME_INDEX), "codes": list(FORECAST_CODES), "reasons": [],
             "latency_columns": list(LATENCY_COLUMNS), "registration_columns": list(REGISTRATION_COLUMNS)}, chunk)
        self.dff = GrowingTable(self.root, "dff", {"index": Column("int64", (len(DFF_INDEX),)),
                                                   "data": Column("float32", (s,))},
                                {"index_columns": list(DFF_INDEX)}, chunk)
        self.forecasts = {st.name: self._forecast_table(st, s, chunk) for st in stages} if cfg.forecasts else {}
        self.versions: dict[str, list[str]] = {st.name: [] for st in stages}
        self.trackers = {st.name: SkillTracker(st.lead_times, st.context, cfg.skill_window)
                         for st in stages if st.kind == "forecast"}
        self.skill = {name: self._skill_table(self.stages[name], chunk) for name in self.trackers}
        self.engines: dict[str, Any] = {}   # engine version -> its manifest (the store's attribute `engines`)
        self.n_valid = 0
        self.n_forecasts = {st.name: 0 for st in stages}
        self._scores: list[tuple[str, int, float, float]] = []

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
                             "window": self.cfg.skill_window, "lead_times": list(st.lead_times),
                             "signal": st.signal, "context": st.context}, chunk)

    def run(self, inbox: Connection) -> None:
        """Handle items until ("stop", dropped); flush every flush_s and send the scores of each item."""
        next_flush = time.monotonic() + self.cfg.flush_s
        while True:
            if inbox.poll(max(0.0, next_flush - time.monotonic())):
                item = inbox.recv()
                if item[0] == "stop":
                    leave_idle()
                    self.close(item[1])
                    return
                getattr(self, f"_on_{item[0]}")(*item[1:])
                if self._scores:
                    tell(self.outbox, ("skill", self._scores))
                    self._scores = []
            if time.monotonic() >= next_flush:
                self.flush()
                next_flush = time.monotonic() + self.cfg.flush_s

    def _on_frame(self, seq: int, t_src: int, t_recv: int, reason: str, code: str, lat: tuple[float, ...],
                  registration: tuple[float, ...] = ()) -> None:
        if reason and reason not in self.reasons:
            self.reasons.append(reason)
            self.frames.set_attrs(reasons=list(self.reasons))
        status = self.reasons.index(reason) + 1 if reason else 0
        self.frames.append(index=(seq, t_src, t_recv, status, FORECAST_CODES.index(code)), latency_ms=lat,
                           registration=registration or NO_REGISTRATION)

    def _on_rows(self, seq: int, t_src: int, dff: np.ndarray, spikes: np.ndarray | None) -> None:
        if self.n_valid % self.cfg.frame_every == 0:
            self.dff.append(index=(seq, t_src), data=dff)
        self.n_valid += 1
        for name, tracker in self.trackers.items():
            row = dff if self.stages[name].signal == "dff" else spikes
            if row is not None:
                self._scored(name, tracker.observe(seq, row))

    def _on_forecast(self, name: str, seq: int, t_src: int, t_pub: int, version: str, manifest: Path,
                     latency_ms: float, pred: np.ndarray) -> None:
        versions = self.versions[name]
        if version not in versions:
            versions.append(version)
            self._new_engine(name, version, manifest)
        if name in self.forecasts and self.n_forecasts[name] % self.cfg.frame_every == 0:
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
        model = self.stages[name].model
        for r in rows:
            self.skill[name].append(index=(r.source_seq, r.target_seq, r.lead),
                                    values=(r.mae, r.baseline_mae, r.rolling_mae, r.rolling_baseline_mae))
            self._scores.append((model, r.lead, r.rolling_mae, r.rolling_baseline_mae))

    def _tables(self) -> list[GrowingTable]:
        return [self.frames, self.dff, *self.forecasts.values(), *self.skill.values()]

    def flush(self) -> None:
        for table in self._tables():
            table.flush()

    def close(self, dropped: dict[str, int]) -> None:
        """Flush, shrink and mark every table complete, then the store (with the parent's dropped counts)."""
        for table in self._tables():
            table.close()
        self.root.attrs.update({"complete": True, "ended_ns": time.time_ns(), "dropped": dict(dropped)})
