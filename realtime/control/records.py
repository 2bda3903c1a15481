"""The controller's audit records (docs/record.md, "The controller's audit log"): the fields of each kind,
built from the controller's objects (pure functions), and `AuditTrail`, the controller's handle on its
`AuditLog` (crash and fsync guarantees: realtime/record/audit.py)."""
from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from loopcast.realtime.control.interlocks import InterlockConfig
from loopcast.realtime.control.policy import PolicyConfig
from loopcast.realtime.metrics import Metrics
from loopcast.realtime.record.audit import AuditConfig, AuditLog
from loopcast.realtime.wire.codec import ACTIVATION_PREFIX, FORECAST_PREFIX, Forecast, ForecastHeader, TriggerCommand

log = logging.getLogger(__name__)

DECISIONS = ("sent", "below_level", "suppressed", "unusable", "publish_failed")
STATE_EVENTS = ("armed", "disarmed", "estop", "estop_reset", "broker_connected", "broker_lost")


@dataclasses.dataclass(frozen=True)
class StateSnapshot:
    """What `state` records track: armed, emergency stop latched, connected to the broker."""

    armed: bool
    estop: bool
    connected: bool


def start_fields(rig: str, policy: PolicyConfig, interlocks: InterlockConfig, monitor: np.ndarray,
                 targets: np.ndarray, armed: bool, estop: bool) -> dict[str, Any]:
    """The `start` record's fields (the writer adds `format`)."""
    return {"rig": rig, "pid": os.getpid(), "policy": dataclasses.asdict(policy),
            "interlocks": dataclasses.asdict(interlocks), "monitor": np.asarray(monitor).tolist(),
            "targets": np.asarray(targets).tolist(), "armed": armed, "estop": estop}


def forecast_topic(header: ForecastHeader) -> str:
    """The ZeroMQ topic a message of this header is published on (`forecast/<model>`, `activation/<model>`)."""
    return (FORECAST_PREFIX if header.kind == "forecast" else ACTIVATION_PREFIX) + header.model


def forecast_fields(forecast: Forecast, topic: str | None, policy: PolicyConfig, decision: str, t_decision_ns: int,
                    value: float | None = None, interlock: str | None = None, error: str | None = None,
                    trigger: TriggerCommand | None = None, t_puback_ns: int | None = None) -> dict[str, Any]:
    """A `forecast` record's fields: every field present, null where it does not apply to `decision`."""
    h = forecast.header
    return {"topic": topic or forecast_topic(h), "msg_kind": h.kind, "seq": h.seq, "t_src_ns": h.t_src_ns,
            "t_recv_ns": forecast.t_recv_ns, "model": h.model, "engine_version": h.engine_version,
            "policy": policy.name, "value": value, "level": policy.level, "lead": policy.lead,
            "decision": decision, "interlock": interlock, "error": error,
            "trigger": None if trigger is None else trigger_fields(trigger),
            "t_decision_ns": t_decision_ns, "t_puback_ns": t_puback_ns,
            "registration": list(h.registration) if h.registration else None}


def trigger_fields(cmd: TriggerCommand) -> dict[str, Any]:
    """The command as published (the fields of `TriggerCommand.to_json`)."""
    d = {f.name: getattr(cmd, f.name) for f in dataclasses.fields(cmd)}
    d["targets"] = list(cmd.targets)
    return d


def control_fields(command: str | None, source: str, sender: str | None, accepted: bool, error: str | None,
                   armed: bool, estop: bool) -> dict[str, Any]:
    """A `control` record's fields; `armed` and `estop` as they are after the message."""
    return {"command": command, "source": source, "sender": sender, "accepted": accepted, "error": error,
            "armed": armed, "estop": estop}


def state_events(before: StateSnapshot, after: StateSnapshot) -> list[str]:
    """The `state` events between two snapshots, in cause order: broker, emergency stop, armed."""
    events = []
    if before.connected != after.connected:
        events.append("broker_connected" if after.connected else "broker_lost")
    if before.estop != after.estop:
        events.append("estop" if after.estop else "estop_reset")
    if before.armed != after.armed:
        events.append("armed" if after.armed else "disarmed")
    return events


class AuditTrail:
    """The controller's audit log, or nothing (no path given, or disabled). A write that fails is counted
    (`loopcast_errors_total{kind="audit_log"}`), logged once per run of failures, and handed to `on_failure`
    (the controller disarms): never raised into the controller's loops."""

    def __init__(self, path: Path | None, cfg: AuditConfig, metrics: Metrics,
                 on_failure: Callable[[OSError], None]) -> None:
        self.path = path if path is not None and cfg.enabled else None
        self.metrics = metrics
        self.on_failure = on_failure
        self._log = None if self.path is None else AuditLog(self.path, cfg)
        self._failing = False
        self._recorded: StateSnapshot | None = None

    @property
    def enabled(self) -> bool:
        return self._log is not None

    def start(self, fields: dict[str, Any], state: StateSnapshot) -> None:
        """The start record; OSError (the log closed) if it cannot be written: the controller does not start."""
        self._recorded = state
        if self._log is None:
            return
        try:
            self._log.write("start", **fields)
        except BaseException:
            self._log.close()
            self._log = None
            raise

    def write(self, kind: str, **fields: Any) -> None:
        """Append one record (nothing when disabled); a failure goes to `on_failure`."""
        if self._log is None:
            return
        try:
            self._log.write(kind, **fields)
        except OSError as exc:
            self.metrics.errors.labels(kind="audit_log").inc()
            if not self._failing:
                log.error("audit log %s: write failed (%s); records are being lost", self.path, exc)
            self._failing = True
            self.on_failure(exc)
        else:
            self._failing = False

    def state(self, now: StateSnapshot, cause: str) -> None:
        """A `state` record for every change since the last snapshot recorded."""
        before, self._recorded = self._recorded or now, now
        for event in state_events(before, now):
            self.write("state", event=event, cause=cause, armed=now.armed, estop=now.estop)

    def close(self, **stop_fields: Any) -> None:
        """The stop record, then fsync and close; failures are logged and counted (the controller is stopping)."""
        audit, self._log = self._log, None
        if audit is None:
            return
        try:
            audit.write("stop", **stop_fields)
        except OSError as exc:
            self._close_failed("stop record not written", exc)
        try:
            audit.close()
        except OSError as exc:
            self._close_failed("fsync or close failed", exc)

    def _close_failed(self, what: str, exc: OSError) -> None:
        self.metrics.errors.labels(kind="audit_log").inc()
        log.error("audit log %s: %s: %s", self.path, what, exc)
