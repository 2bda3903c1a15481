"""A run directory's record as one `SessionData`: the pipeline's session store and the controller's audit
log (formats: docs/record.md), read with every problem reported as a `RecordError` naming the file.

Times stay `time.time_ns()` integers here; `SessionData.t0_ns` is the session's start (the earliest of
the pipeline's start and the audit log's first record), from which the report and the NWB file count
seconds.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

FORECAST_CODES = ("not_ready", "forecast", "skipped", "failed", "invalid")  # frames/forecast values 0..4
LATENCY_COLUMNS = ("ingest", "preprocess", "forecast")
REGISTRATION_COLUMNS = ("dx", "dy", "dz", "confidence")


class RecordError(ValueError):
    """A run directory (or a file in it) that cannot be read as a session record; the message names the file."""


@dataclass(frozen=True)
class FrameTable:
    """Every message the pipeline handled (T rows), in the order it finished with them."""

    seq: np.ndarray          # (T,) int64; -1 when a rejected message had no readable seq
    t_src_ns: np.ndarray     # (T,) int64; 0 when unknown
    t_recv_ns: np.ndarray    # (T,) int64
    status: np.ndarray       # (T,) int8: 0 valid, k > 0 rejected for reasons[k - 1]
    reasons: tuple[str, ...]
    forecast: np.ndarray     # (T,) int8: index into FORECAST_CODES
    latency_ms: np.ndarray   # (T, 3) float32: LATENCY_COLUMNS, NaN where the stage did not run
    registration: np.ndarray | None = None   # (T, 4) float32: REGISTRATION_COLUMNS, NaN when not registered

    def __len__(self) -> int:
        return int(self.seq.shape[0])

    @property
    def valid(self) -> np.ndarray:
        return self.status == 0


@dataclass(frozen=True)
class TraceTable:
    """The dF/F the loop computed for the recorded neurons (R stored frames x S neurons)."""

    seq: np.ndarray          # (R,) int64
    t_src_ns: np.ndarray     # (R,) int64
    data: np.ndarray         # (R, S) float32


@dataclass(frozen=True)
class ForecastSeries:
    """What one forecast stage published (F messages), restricted to the recorded neurons."""

    name: str                         # "<kind>.<model>", e.g. "forecast.tsmixer"
    kind: str                         # "forecast" or "activation"
    model: str
    signal: str                       # "dff" or "spike_prob": what the engine forecasts
    lead_times: tuple[int, ...]       # (H,): axis 1 of `data` (activation: (window H,), one row)
    seq: np.ndarray                   # (F,) int64: the frame each was computed from
    t_src_ns: np.ndarray              # (F,) int64: that frame's source time
    t_pub_ns: np.ndarray              # (F,) int64: when it was published
    engine_version: tuple[str, ...]   # (F,) the engine that made each
    latency_ms: np.ndarray            # (F,) float32: t_src_ns -> published
    data: np.ndarray                  # (F, H, S) float32


@dataclass(frozen=True)
class SkillTable:
    """Live forecast skill of one trace forecast stage: one row per (forecast, lead) scored (P rows)."""

    model: str
    window: int                       # rolling window, in scored forecasts per lead
    lead: np.ndarray                  # (P,) int16
    source_seq: np.ndarray            # (P,) int64: frame the forecast was computed from
    target_seq: np.ndarray            # (P,) int64: frame it was scored against (source_seq + lead)
    mae: np.ndarray                   # (P,) float32: mean |forecast - actual| over the recorded neurons
    baseline_mae: np.ndarray          # (P,) float32: the same for the mean-of-context baseline
    rolling_mae: np.ndarray           # (P,) float32: mean of `mae` over the last `window` rows of this lead
    rolling_baseline_mae: np.ndarray  # (P,) float32


@dataclass(frozen=True)
class SessionData:
    """One run directory's record. Parts that are absent (a controller-only run has no session store) are
    None or empty; `problems` lists what was incomplete (e.g. a killed session), in words."""

    run_dir: Path
    config: dict[str, Any]                              # the resolved config.toml
    attrs: dict[str, Any]                               # the session store's attributes ({} without one)
    neurons: np.ndarray                                 # (S,) int64 recorded neuron indices
    frames: FrameTable | None
    dff: TraceTable | None
    forecasts: dict[str, ForecastSeries] = field(default_factory=dict)
    skill: dict[str, SkillTable] = field(default_factory=dict)
    audit: list[dict[str, Any]] = field(default_factory=list)   # the audit log's records, in order
    audit_path: Path | None = None
    manifests: dict[str, dict[str, Any]] = field(default_factory=dict)   # engine version -> manifest
    problems: tuple[str, ...] = ()
    t0_ns: int = 0                                      # session start: times in the report and NWB count from here

    def seconds(self, t_ns: np.ndarray | int) -> Any:
        """Seconds from the session start (float64) of one time or an array of them."""
        return (np.asarray(t_ns, dtype=np.int64) - self.t0_ns) / 1e9

    def records(self, kind: str) -> list[dict[str, Any]]:
        """The audit log's records of one kind ('forecast', 'control', 'state', ...)."""
        return [r for r in self.audit if r.get("kind") == kind]

    @property
    def frame_period_s(self) -> float:
        return float(self.attrs.get("frame_period_s") or self.config.get("rig", {}).get("frame_period_s", 0.9141))


SESSION_STORE = "session.zarr"
AUDIT_LOG = "controller.audit.jsonl"


def read_session(run_dir: str | Path, audit: str | Path | None = None) -> SessionData:
    """The record of `run_dir`: its config.toml, session store and audit log (or the log at `audit`).
    A RecordError names the file when the directory is missing, holds neither, or a part is unreadable or
    from another version; a session that did not end cleanly reads up to its last flush (`problems`)."""
    root = Path(run_dir)
    if not root.is_dir():
        raise RecordError(f"{root}: no such run directory")
    store, log_path = root / SESSION_STORE, Path(audit) if audit else root / AUDIT_LOG
    if not store.exists() and not log_path.exists():
        raise RecordError(f"{root}: holds neither a session store ({SESSION_STORE}) nor an audit log "
                          f"({AUDIT_LOG}); is it the run directory of `loopcast run`, `controller` or `demo`?")
    problems: list[str] = []
    config = _read_config(root / "config.toml", problems)
    parts = _read_store(store, problems) if store.exists() else _StoreParts()
    if not store.exists():
        problems.append(f"{store}: no session store (the pipeline did not run here)")
    records = _read_audit(log_path, problems) if log_path.exists() else []
    if not log_path.exists():
        problems.append(f"{log_path}: no audit log (the controller did not run here; --audit PATH)")
    starts = [int(parts.attrs.get("started_ns", 0))] if parts.attrs else []
    starts += [int(r["t_ns"]) for r in records[:1]]
    return SessionData(run_dir=root, config=config, attrs=parts.attrs, neurons=parts.neurons, frames=parts.frames,
                       dff=parts.dff, forecasts=parts.forecasts, skill=parts.skill, audit=records,
                       audit_path=log_path if log_path.exists() else None,
                       manifests=dict(parts.attrs.get("engines") or {}), problems=tuple(problems),
                       t0_ns=min(starts) if starts else 0)


@dataclass
class _StoreParts:
    attrs: dict[str, Any] = field(default_factory=dict)
    neurons: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    frames: FrameTable | None = None
    dff: TraceTable | None = None
    forecasts: dict[str, ForecastSeries] = field(default_factory=dict)
    skill: dict[str, SkillTable] = field(default_factory=dict)


def _read_config(path: Path, problems: list[str]) -> dict[str, Any]:
    from loopcast.config import ConfigError, load_toml
    if not path.is_file():
        problems.append(f"{path}: missing (the resolved config is not in the record)")
        return {}
    try:
        return load_toml(path)
    except (OSError, ConfigError) as exc:
        raise RecordError(f"{path}: unreadable config ({exc})") from None


def _read_audit(path: Path, problems: list[str]) -> list[dict[str, Any]]:
    from loopcast.realtime.record.audit import AuditError, read_audit
    try:
        read = read_audit(path)
    except AuditError as exc:
        raise RecordError(str(exc)) from None
    problems.extend(read.problems)
    if read.truncated_tail:
        problems.append(f"{path}: its last record was cut off (the controller was killed while writing it)")
    return list(read.records)


def _read_store(path: Path, problems: list[str]) -> _StoreParts:
    import zarr
    from zarr.errors import GroupNotFoundError
    try:
        root = zarr.open_group(str(path), mode="r")
        attrs = dict(root.attrs)
    except (GroupNotFoundError, OSError, ValueError, KeyError) as exc:
        raise RecordError(f"{path}: not a readable zarr group ({type(exc).__name__}: {exc})") from None
    if attrs.get("format") != "loopcast-session":
        raise RecordError(f"{path}: not a loopcast session store (format {attrs.get('format')!r})")
    if attrs.get("version") != 1:
        raise RecordError(f"{path}: session store version {attrs.get('version')!r}, written by another "
                          f"version of loopcast; this one reads version 1")
    if not attrs.get("complete"):
        problems.append(f"{path}: the session did not end cleanly; read up to its last flush")
    try:
        return _store_parts(root, attrs)
    except (KeyError, ValueError, OSError) as exc:
        raise RecordError(f"{path}: incomplete or damaged session store ({type(exc).__name__}: {exc})") from None


def _table(root: Any, name: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    from loopcast.realtime.record.store import read_table
    group = root[name]
    return read_table(group), dict(group.attrs)


def _columns(table: dict[str, np.ndarray], attrs: dict[str, Any], packed: str = "index",
             names: str = "index_columns") -> dict[str, np.ndarray]:
    """The table's columns, with its packed array (`index`: integers side by side) split by name."""
    out = {k: v for k, v in table.items() if k != packed}
    for i, name in enumerate(attrs[names]):
        out[name] = table[packed][:, i]
    return out


def _store_parts(root: Any, attrs: dict[str, Any]) -> _StoreParts:
    t, ta = _table(root, "frames")
    f = _columns(t, ta)
    frames = FrameTable(f["seq"], f["t_src_ns"], f["t_recv_ns"], f["status"].astype(np.int8),
                        tuple(ta.get("reasons", ())), f["forecast"].astype(np.int8), f["latency_ms"],
                        f.get("registration"))
    t, ta = _table(root, "dff")
    d = _columns(t, ta)
    parts = _StoreParts(attrs, np.asarray(root["neurons"][:], dtype=np.int64), frames,
                        TraceTable(d["seq"], d["t_src_ns"], d["data"]))
    if "forecasts" in root:
        for name in sorted(root["forecasts"].group_keys()):
            t, ta = _table(root, f"forecasts/{name}")
            c, versions = _columns(t, ta), list(ta.get("engine_versions", []))
            parts.forecasts[name] = ForecastSeries(
                name, ta["kind"], ta["model"], ta.get("signal", "dff"), tuple(ta["lead_times"]), c["seq"],
                c["t_src_ns"], c["t_pub_ns"], tuple(versions[i] if i < len(versions) else "?" for i in c["engine"]),
                c["latency_ms"], c["data"])
    if "skill" in root:
        for name in sorted(root["skill"].group_keys()):
            t, ta = _table(root, f"skill/{name}")
            c = _columns(_columns(t, ta), ta, "values", "value_columns")
            parts.skill[name] = SkillTable(name, int(ta["window"]), c["lead"].astype(np.int16), c["source_seq"],
                                           c["target_seq"], c["mae"], c["baseline_mae"], c["rolling_mae"],
                                           c["rolling_baseline_mae"])
    return parts
