"""A small seeded synthetic SessionData (and its segmentation) shared by the session tests.

60 frames handled: seqs 0..57 arrive valid except seq 30 (a drop), plus 3 rejected messages (2 'malformed', one
of them without a readable seq, 1 'wrong_shape'); S = 20 recorded neurons (the even neuron indices of a
40-label segmentation); one forecast stage (forecast.nlinear, H = 4) from the 5th valid frame on, its skill; an
audit log with start, state, control, forecast (4 sent, 3 suppressed, 1 unusable, the rest below_level),
invalid and stop records.
"""
from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from loopcast.session.data import ForecastSeries, FrameTable, SessionData, SkillTable, TraceTable

T0_NS = 1_780_315_200_000_000_000        # 2026-06-01 12:00:00 UTC
PERIOD_S = 0.9141
N_LABELS, RECORDED = 40, np.arange(0, 40, 2, dtype=np.int64)
MONITOR, TARGETS = [0, 1, 2, 4, 6], [10, 12, 14]       # neuron 1 is monitored but not recorded
LEVEL, LEAD = 0.3, 2
SENT = (8, 20, 33, 45)                                 # forecast numbers (0-based) whose trigger was sent
SUPPRESSED = {2: "disarmed", 9: "min_interval", 21: "min_interval"}
UNUSABLE = 30
REASONS = ("malformed", "wrong_shape")
REJECTED = {10: (1, -1), 25: (2, 24), 40: (1, 38)}     # arrival position -> (status, seq as read)


def make_segmentation() -> np.ndarray:
    """(16, 12, 4) labels 1..40: label l is a 2 x 2 x 1 patch (grid cell l - 1 of 8 x 5, plane l % 4)."""
    seg = np.zeros((16, 12, 4), np.int32)
    for label in range(1, N_LABELS + 1):
        cx, cy = divmod(label - 1, 5)
        seg[2 * cx:2 * cx + 2, 2 * cy:2 * cy + 2, label % 4] = label
    return seg


def _frames(rng: np.random.Generator) -> tuple[FrameTable, np.ndarray, np.ndarray]:
    """The frames table plus the valid seqs and their source times."""
    valid_seq = np.array([s for s in range(58) if s != 30], dtype=np.int64)
    t_src = T0_NS + 500_000_000 + (valid_seq * PERIOD_S * 1e9).astype(np.int64) + rng.integers(0, 200_000, 57)
    rows: list[tuple[int, int, int, int]] = []     # seq, t_src, status, forecast code
    it = iter(range(57))
    for pos in range(60):
        if pos in REJECTED:
            bad_status, bad_seq = REJECTED[pos]
            rows.append((bad_seq, 0 if bad_seq < 0 else int(t_src[max(0, pos - 3)]) + 1000, bad_status, 4))
        else:
            i = next(it)
            rows.append((int(valid_seq[i]), int(t_src[i]), 0, 0 if i < 4 else 1))
    seq, src, status, code = (np.array(c, dtype=np.int64) for c in zip(*rows, strict=True))
    recv = np.where(src > 0, src, T0_NS + 600_000_000) + rng.integers(2_000_000, 5_000_000, 60)
    lat = np.column_stack([rng.uniform(2, 5, 60), rng.uniform(6, 10, 60), rng.uniform(12, 20, 60)]).astype(np.float32)
    lat[status > 0] = np.nan
    lat[code != 1, 2] = np.nan
    table = FrameTable(seq=seq, t_src_ns=src, t_recv_ns=recv, status=status.astype(np.int8), reasons=REASONS,
                       forecast=code.astype(np.int8), latency_ms=lat)
    return table, valid_seq, t_src


def _forecast_records(series: ForecastSeries, monitored_cols: np.ndarray) -> list[dict[str, Any]]:
    recs = []
    for i in range(len(series.seq)):
        t_recv = int(series.t_pub_ns[i]) + 1_000_000
        value = float(series.data[i, LEAD - 1, monitored_cols].mean())
        r: dict[str, Any] = {"kind": "forecast", "topic": "forecasts", "msg_kind": "forecast",
                             "seq": int(series.seq[i]), "t_src_ns": int(series.t_src_ns[i]),
                             "t_recv_ns": t_recv, "model": "nlinear",
                             "engine_version": "v0001", "policy": "ens-above", "value": value, "level": LEVEL,
                             "lead": LEAD, "decision": "below_level", "interlock": None, "error": None,
                             "trigger": None, "t_decision_ns": t_recv + 100_000, "t_puback_ns": None,
                             "t_ns": t_recv + 200_000}
        if i in SENT:
            r |= {"decision": "sent", "value": LEVEL + 0.05, "t_puback_ns": t_recv + 1_100_000,
                  "t_ns": t_recv + 1_200_000, "trigger": {
                      "trigger_id": uuid.UUID(int=i).hex, "rig": "rig0", "pattern": "ensemble-3",
                      "targets": TARGETS, "power_mw": 5.0, "duration_ms": 2000.0, "seq": r["seq"], "model": "nlinear",
                      "engine_version": "v0001", "decision_time_ns": r["t_decision_ns"], "policy": "ens-above",
                      "value": LEVEL + 0.05, "lead": LEAD, "v": 1}}
        elif i in SUPPRESSED:
            r |= {"decision": "suppressed", "value": LEVEL + 0.02, "interlock": SUPPRESSED[i]}
        elif i == UNUSABLE:
            r |= {"decision": "unusable", "value": None, "error": "lead 2 missing", "t_decision_ns": None}
        recs.append(r)
    return recs


def _other_records(t_src: np.ndarray) -> list[dict[str, Any]]:
    def at(frame: int) -> int:
        return int(t_src[frame]) + 500_000_000
    start = {"kind": "start", "t_ns": T0_NS, "format": "loopcast-audit", "rig": "rig0", "pid": 123,
             "policy": {"name": "ens-above", "kind": "forecast_threshold", "model": "nlinear", "lead": LEAD,
                        "level": LEVEL, "monitor": "indices:0,1,2,4,6", "targets": "indices:10,12,14"},
             "interlocks": {"min_interval_s": 2.0, "max_per_minute": 20, "max_forecast_age_s": 0.5},
             "monitor": MONITOR, "targets": TARGETS, "armed": False, "estop": False}
    sender = "alice@rig-pc (loopcast control)"
    return [
        start,
        {"kind": "state", "t_ns": T0_NS + 1000, "event": "broker_connected", "cause": "start", "armed": False,
         "estop": False},
        {"kind": "control", "t_ns": at(7), "command": "arm", "source": "loopcast/rig0/control", "sender": sender,
         "accepted": True, "error": None, "armed": True, "estop": False},
        {"kind": "state", "t_ns": at(7) + 1000, "event": "armed", "cause": "control arm", "armed": True,
         "estop": False},
        {"kind": "control", "t_ns": at(15), "command": None, "source": "loopcast/rig0/control", "sender": None,
         "accepted": False, "error": "unreadable command", "armed": True, "estop": False},
        {"kind": "invalid", "t_ns": at(16), "reason": "malformed_forecast", "error": "not msgpack"},
        {"kind": "control", "t_ns": at(55), "command": "estop", "source": "loopcast/rig0/control", "sender": sender,
         "accepted": True, "error": None, "armed": False, "estop": True},
        {"kind": "state", "t_ns": at(55) + 1000, "event": "estop", "cause": "control estop", "armed": False,
         "estop": True},
        {"kind": "stop", "t_ns": int(t_src[-1]) + 900_000_000, "forecasts": 53, "sent": 4,
         "suppressed": {"disarmed": 1, "min_interval": 2}},
    ]


def _forecast_series(rng: np.random.Generator, dff: TraceTable) -> ForecastSeries:
    f = slice(4, None)
    n = len(dff.seq[f])
    data = np.stack([dff.data[4 + np.minimum(np.arange(n) + h, n - 1)] for h in range(1, 5)], axis=1)
    data = (data + rng.normal(0, 0.05, data.shape)).astype(np.float32)
    t_pub = dff.t_src_ns[f] + rng.integers(12_000_000, 20_000_000, n)
    return ForecastSeries(name="forecast.nlinear", kind="forecast", model="nlinear", signal="dff",
                          lead_times=(1, 2, 3, 4), seq=dff.seq[f].copy(), t_src_ns=dff.t_src_ns[f].copy(),
                          t_pub_ns=t_pub, engine_version=("v0001",) * n,
                          latency_ms=((t_pub - dff.t_src_ns[f]) / 1e6).astype(np.float32), data=data)


def _skill(rng: np.random.Generator, series: ForecastSeries) -> SkillTable:
    seqs = set(series.seq.tolist())
    rows = [(int(s), int(s) + h, h) for s in series.seq for h in series.lead_times if int(s) + h in seqs]
    src, tgt, lead = (np.array(c, dtype=np.int64) for c in zip(*rows))
    mae = rng.uniform(0.03, 0.08, len(rows)).astype(np.float32)
    base = (mae + 0.01).astype(np.float32)
    return SkillTable(model="nlinear", window=8, lead=lead.astype(np.int16), source_seq=src, target_seq=tgt,
                      mae=mae, baseline_mae=base, rolling_mae=mae * 0.9, rolling_baseline_mae=base * 0.9)


def make_session(run_dir: Path, seed: int = 0) -> SessionData:
    rng = np.random.default_rng(seed)
    frames, valid_seq, t_src = _frames(rng)
    t = valid_seq * PERIOD_S
    dff_data = (0.25 + 0.2 * np.sin(t[:, None] / 6 + np.arange(20) / 5) + rng.normal(0, 0.03, (57, 20)))
    dff = TraceTable(seq=valid_seq, t_src_ns=t_src, data=dff_data.astype(np.float32))
    series = _forecast_series(rng, dff)
    monitored_cols = np.flatnonzero(np.isin(RECORDED, MONITOR))
    audit = _other_records(t_src) + _forecast_records(series, monitored_cols)
    audit.sort(key=lambda r: r["t_ns"])
    audit = [{"v": 1, "n": n} | r for n, r in enumerate(audit)]
    manifest: dict[str, Any] = {
                "format": "loopcast-engine", "name": "nlinear-c4-h4", "version": "v0001", "lead_times": [1, 2, 3, 4],
                "inputs": [{"name": "context", "shape": ["batch", 4, "neurons"], "dtype": "float32"}],
                "normalisation": None, "metrics": {}}
    config = {"rig": {"name": "rig0", "shape": [16, 12, 4], "dtype": "uint16", "frame_period_s": PERIOD_S},
              "controller": {"policy": {"level": LEVEL, "lead": LEAD}}, "pipeline": {"record": {"flush_s": 5.0}}}
    attrs = {"format": "loopcast-session", "version": 1, "rig": "rig0", "frame_period_s": PERIOD_S,
             "started_ns": T0_NS + 100, "neurons_spec": "indices:0,2,...", "frame_every": 1,
             "stages": ["forecast.nlinear"], "engines": {"v0001": manifest}, "complete": True}
    return SessionData(run_dir=run_dir, config=config, attrs=attrs, neurons=RECORDED.copy(), frames=frames, dff=dff,
                       forecasts={series.name: series}, skill={"nlinear": _skill(rng, series)}, audit=audit,
                       audit_path=run_dir / "controller.audit.jsonl", manifests={"v0001": manifest},
                       problems=("session store: 1 chunk not flushed (synthetic)",), t0_ns=T0_NS)


@pytest.fixture(scope="session")
def session_data(tmp_path_factory: pytest.TempPathFactory) -> SessionData:
    return make_session(tmp_path_factory.mktemp("run") / "run-20260601-120000")


@pytest.fixture(scope="session")
def segmentation() -> np.ndarray:
    return make_segmentation()
