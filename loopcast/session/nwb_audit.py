"""The controller's audit log (docs/record.md) as NWB tables (part of the NWB export, `nwb`).

- `/intervals/triggers` (core `TimeIntervals`): every trigger that reached the broker (forecast records with
  decision "sent"), one row each, sorted by start time: start = its PUBACK, stop = start + duration.
- `/events/<name>` (core `EventsTable`, NWB 2.9+; pynwb >= 3.1 writes it without an extension): the decisions and
  commands that happened at one instant: `suppressions`, `policy_decisions` (every forecast record, whatever its
  decision: the policy's value over the session), `publish_failures`, `control_commands`, `state_changes`,
  `invalid_messages`. A table with no rows is left out (nwbinspector: "This table has no data added to it").

Every row carries `audit_n`, the record's number in the log. Missing values: NaN (floats), -1 (ints), "" (text).
"""
from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from pynwb import NWBFile  # type: ignore[import-untyped]
from pynwb.epoch import TimeIntervals  # type: ignore[import-untyped]
from pynwb.event import (  # type: ignore[import-untyped]
    EventsTable,
    TimestampVectorData,
)

from loopcast.session.data import SessionData
from loopcast.session.nwb_tables import TIME_RESOLUTION_S, Col, bools, floats, ints, text, vector_columns

Records = Sequence[dict[str, Any]]


def _values(recs: Records, key: str) -> list[Any]:
    """One field of every record (None where a record lacks it)."""
    return [r.get(key) for r in recs]


def _seconds(data: SessionData, values: Sequence[Any]) -> np.ndarray:
    """Seconds from the session start of ns times (None -> NaN)."""
    ns = np.array([0 if v is None else int(v) for v in values], dtype=np.int64)
    s = np.asarray(data.seconds(ns), dtype=np.float64)
    s[np.array([v is None for v in values], dtype=bool)] = np.nan
    return s


def _decision_ns(r: dict[str, Any]) -> int:
    return int(r.get("t_decision_ns") or r["t_ns"])


def _forecast_cols(data: SessionData, recs: Records) -> list[Col]:
    """The forecast message behind a decision and what the policy made of it."""
    get = functools.partial(_values, recs)
    return [
        Col("seq", "frame the forecast was computed from", ints(get("seq"))),
        Col("source_time", "that frame's source time (s)", _seconds(data, get("t_src_ns"))),
        Col("recv_time", "when the controller received the forecast (s)", _seconds(data, get("t_recv_ns"))),
        Col("model", "forecast model", text(get("model"))),
        Col("engine_version", "engine that made the forecast", text(get("engine_version"))),
        Col("policy", "trigger policy", text(get("policy"))),
        Col("value", "the policy's value (mean predicted dF/F of the monitored neurons at `lead`, or the reduced "
            "activation probability); NaN when unusable", floats(get("value"))),
        Col("level", "the policy's threshold", floats(get("level"))),
        Col("lead", "lead time read (frames; activation: window)", ints(get("lead"))),
        Col("audit_n", "record number in the controller's audit log", ints(get("n"))),
    ]


def triggers_table(data: SessionData, sent: Records) -> TimeIntervals:
    """`/intervals/triggers`: one row per trigger sent, sorted by PUBACK time."""
    recs = sorted(sent, key=lambda r: int(r["t_puback_ns"]))
    cmd = [r.get("trigger") or {} for r in recs]
    start = _seconds(data, [r["t_puback_ns"] for r in recs])
    duration_ms = floats([c.get("duration_ms") for c in cmd])
    cols = [
        Col("start_time", "PUBACK of the trigger command (s)", start),
        Col("stop_time", "start_time + duration_ms (s)", start + duration_ms / 1e3),
        Col("trigger_id", "the command's id", text([c.get("trigger_id") for c in cmd])),
        Col("targets", "0-based neuron indices stimulated", [c.get("targets") or [] for c in cmd], ragged=True),
        Col("power_mw", "laser power (mW)", floats([c.get("power_mw") for c in cmd])),
        Col("duration_ms", "stimulation duration (ms)", duration_ms),
        Col("pattern", "stimulation pattern", text([c.get("pattern") for c in cmd])),
        Col("rig", "rig the command was sent to", text([c.get("rig") for c in cmd])),
        Col("decision_time", "when the policy decided (s)", _seconds(data, [_decision_ns(r) for r in recs])),
        *_forecast_cols(data, recs),
        Col("latency_ms", "controller receive -> PUBACK (ms)",
            np.array([(int(r["t_puback_ns"]) - int(r.get("t_recv_ns") or r["t_puback_ns"])) / 1e6 for r in recs])),
    ]
    return TimeIntervals(name="triggers", columns=vector_columns(cols),
                         description="Optogenetic triggers the controller sent (audit records of kind 'forecast' "
                         "with decision 'sent'): start = PUBACK, stop = start + duration; the forecast behind each.")


def _events(name: str, description: str, times: np.ndarray, cols: list[Col]) -> EventsTable:
    stamp = TimestampVectorData(name="timestamp", description="event time (s from session start)", data=times,
                                resolution=TIME_RESOLUTION_S)
    return EventsTable(name=name, description=description, source_description="controller audit log",
                       columns=[stamp, *vector_columns(cols)])


def _decision_events(name: str, description: str, extra: Callable[[Records], list[Col]]
                     ) -> Callable[[SessionData, Records], EventsTable]:
    def build(data: SessionData, recs: Records) -> EventsTable:
        times = _seconds(data, [_decision_ns(r) for r in recs])
        return _events(name, description, times, [*extra(recs), *_forecast_cols(data, recs)])
    return build


suppressions_table = _decision_events(
    "suppressions", "Triggers the policy wanted and an interlock blocked (decision 'suppressed'), at decision time.",
    lambda recs: [Col("interlock", "the interlock that blocked it", text([r.get("interlock") for r in recs]))])

publish_failures_table = _decision_events(
    "publish_failures", "Triggers that did not reach the broker (decision 'publish_failed'; the controller disarmed).",
    lambda recs: [Col("trigger_id", "the command's id",
                      text([(r.get("trigger") or {}).get("trigger_id") for r in recs])),
                  Col("error", "why", text([r.get("error") for r in recs]))])

decisions_table = _decision_events(
    "policy_decisions", "Every forecast or activation message the policy read, with its decision (sent, "
    "below_level, suppressed, unusable, publish_failed), at decision time (or the record's time).",
    lambda recs: [Col("decision", "what the controller did", text([r.get("decision") for r in recs])),
                  Col("msg_kind", "forecast or activation", text([r.get("msg_kind") for r in recs])),
                  Col("interlock", "blocking interlock (suppressed)", text([r.get("interlock") for r in recs])),
                  Col("error", "why unusable / failed", text([r.get("error") for r in recs]))])


def control_table(data: SessionData, recs: Records) -> EventsTable:
    """Control commands (arm, disarm, estop, ...) as the controller received them."""
    get = functools.partial(_values, recs)
    cols = [Col("command", "the command ('' when unreadable)", text(get("command"))),
            Col("source", "MQTT topic it came on", text(get("source"))),
            Col("sender", "the payload's sender ('' for a plain-text command)", text(get("sender"))),
            Col("accepted", "whether it was applied", bools(get("accepted"))),
            Col("error", "why it was refused or ignored", text(get("error"))),
            Col("armed", "armed after it", bools(get("armed"))),
            Col("estop", "emergency stop latched after it", bools(get("estop"))),
            Col("audit_n", "record number in the audit log", ints(get("n")))]
    return _events("control_commands", "Control messages the controller received.",
                   _seconds(data, get("t_ns")), cols)


def state_table(data: SessionData, recs: Records) -> EventsTable:
    """Changes of armed / emergency stop / broker connection."""
    get = functools.partial(_values, recs)
    cols = [Col("event", "armed, disarmed, estop, estop_reset, broker_connected, broker_lost", text(get("event"))),
            Col("cause", "what caused it", text(get("cause"))),
            Col("armed", "armed after it", bools(get("armed"))),
            Col("estop", "emergency stop latched after it", bools(get("estop"))),
            Col("audit_n", "record number in the audit log", ints(get("n")))]
    return _events("state_changes", "Controller state changes.", _seconds(data, get("t_ns")), cols)


def invalid_table(data: SessionData, recs: Records) -> EventsTable:
    """Messages on the forecast socket that did not decode."""
    cols = [Col("reason", "error class", text([r.get("reason") for r in recs])),
            Col("error", "the decoder's message", text([r.get("error") for r in recs])),
            Col("audit_n", "record number in the audit log", ints([r.get("n") for r in recs]))]
    return _events("invalid_messages", "Forecast-socket messages that did not decode.",
                   _seconds(data, [r["t_ns"] for r in recs]), cols)


def add_audit(nwbfile: NWBFile, data: SessionData) -> None:
    """The audit log's triggers (intervals) and events; empty tables are left out."""
    forecasts = data.records("forecast")
    by_decision: dict[str, list[dict[str, Any]]] = {}
    for r in forecasts:
        by_decision.setdefault(str(r.get("decision")), []).append(r)
    if by_decision.get("sent"):
        nwbfile.add_time_intervals(triggers_table(data, by_decision["sent"]))
    builders: list[tuple[Callable[[SessionData, Records], EventsTable], Records]] = [
        (suppressions_table, by_decision.get("suppressed", [])),
        (publish_failures_table, by_decision.get("publish_failed", [])),
        (decisions_table, forecasts),
        (control_table, data.records("control")),
        (state_table, data.records("state")),
        (invalid_table, data.records("invalid")),
    ]
    for build, recs in builders:
        if recs:
            nwbfile.add_events_table(build(data, recs))
