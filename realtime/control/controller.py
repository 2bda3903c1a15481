"""The optogenetic-trigger controller: forecasts or activation predictions (ZeroMQ SUB) -> policy ->
interlocks -> MQTT trigger.

The SUB subscribes to the prefix of the messages its policy reads (`forecast/` for kind
forecast_threshold, `activation/` for activation_threshold, followed by the policy's `model` when it names
one): one subscription per controller, so a publisher's `wait_subscribers` still counts consumers, and
nothing is received or decoded that the policy ignores (a pipeline serving several engines publishes a
(H, N) message per engine per frame: 9 MB for TSMixer's H = 32 at 71,721 neurons).

MQTT topics (ARCHITECTURE.md): `loopcast/<rig>/trigger` (QoS 1 TriggerCommand JSON),
`loopcast/<rig>/status` (retained JSON state, also the last will: offline and disarmed),
`loopcast/<rig>/control` (arm, disarm, stop, reset). The controller starts disarmed unless
`interlocks.armed_at_start`; a failed trigger publish, a lost broker connection or an unexpected error in
its forecast or control handler (`fail_safe`) disarms it, until an operator arms it again. `sent` keeps the
newest SENT_KEPT triggers; the audit log keeps them all.

Audit log (docs/record.md; realtime/record/audit.py for the crash and fsync guarantees): given an
`audit_path`, every forecast the policy reads, every message that does not decode, every control message and
every change of armed / emergency stop / broker connection is one JSON line, written with one `write(2)` when
the decision is made (a sent trigger: after its PUBACK, and after its latency was observed). A record that
cannot be written disarms the controller: no trigger is sent while the log fails to take its records.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiomqtt
import numpy as np
import zmq
import zmq.asyncio

from loopcast.realtime.control import records
from loopcast.realtime.control.drift import DriftConfig, drift_cause
from loopcast.realtime.control.interlocks import InterlockConfig, Interlocks
from loopcast.realtime.control.policy import Decision, PolicyConfig, PolicyError, make_policy
from loopcast.realtime.control.watchdog import Watchdog
from loopcast.realtime.metrics import Metrics
from loopcast.realtime.record.audit import AuditConfig
from loopcast.realtime.wire.codec import (
    ACTIVATION_PREFIX,
    FORECAST_PREFIX,
    ControlMessage,
    Forecast,
    TriggerCommand,
    WireError,
    control_sender,
    decode_forecast,
    mqtt_topic,
    parse_control_message,
)
from loopcast.realtime.wire.mqtt_security import MqttSecurity, MqttSecurityError, client_options, explain

log = logging.getLogger(__name__)
SENT_KEPT = 1000   # triggers kept in memory (Controller.sent); the audit log has every one


@dataclass(frozen=True)
class MqttConfig:
    """Broker connection and rig name (topics are `loopcast/<rig>/...`)."""

    host: str = "127.0.0.1"
    port: int = 1883
    rig: str = "rig0"
    client_id: str = "loopcast-controller"
    keepalive_s: int = 30
    publish_timeout_s: float = 2.0   # no PUBACK within this -> publish failed
    reconnect_s: float = 1.0         # first wait before reconnecting after the broker connection is lost;
    reconnect_max_s: float = 10.0    # doubling after each failed attempt up to this
    security: MqttSecurity = field(default_factory=MqttSecurity)   # login and TLS (from [mqtt])


@dataclass(frozen=True)
class ControllerConfig:
    """Everything the controller process needs."""

    forecasts: str = "tcp://127.0.0.1:5556"  # ZeroMQ endpoint a SUB connects to (forecast/ or activation/)
    mqtt: MqttConfig = field(default_factory=MqttConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    interlocks: InterlockConfig = field(default_factory=InterlockConfig)
    audit: AuditConfig = field(default_factory=AuditConfig)
    heartbeat_s: float = 1.0
    watchdog_s: float = 5.0   # armed, forecasts came, then none for this long -> disarm (0 = off)
    drift: DriftConfig = field(default_factory=DriftConfig)   # the fish moved from the reference -> disarm

    def __post_init__(self) -> None:
        if self.heartbeat_s <= 0:
            raise ValueError(f"heartbeat_s must be > 0, got {self.heartbeat_s}")
        if not self.watchdog_s >= 0:
            raise ValueError(f"watchdog_s must be >= 0 (0 = off), got {self.watchdog_s}")
        self.interlocks.check_duration(self.policy.duration_ms / 1000)


class Controller:
    """Turns forecasts into trigger commands inside the safety interlocks. One per rig."""

    def __init__(self, cfg: ControllerConfig, monitor: np.ndarray, targets: np.ndarray,
                 metrics: Metrics, n_neurons: int | None = None, audit_path: Path | None = None) -> None:
        self.cfg = cfg
        self.metrics = metrics
        self.policy = make_policy(cfg.policy, monitor, targets, n_neurons)
        prefix = ACTIVATION_PREFIX if self.policy.kind == "activation" else FORECAST_PREFIX
        self.topic = prefix + cfg.policy.model    # one model's messages only, where the policy names one
        self.interlocks = Interlocks(cfg.interlocks)
        self.sent: deque[TriggerCommand] = deque(maxlen=SENT_KEPT)   # the newest; every one is in the audit log
        self.forecasts_seen = 0
        self.invalid = 0
        self.last_control: dict[str, Any] | None = None  # {"command": ..., "accepted": ...}
        self.last_disarm: str | None = None   # why the controller last disarmed itself (watchdog, drift, error)
        self.last_registration: dict[str, Any] | None = None   # the newest forecast's frame registration
        self.watchdog = Watchdog(cfg.watchdog_s)
        self.clock: Callable[[], int] = time.time_ns   # decision and PUBACK times (the forecasts' clock)
        if self.interlocks.armed:   # armed_at_start
            self.watchdog.armed(time.monotonic())
        self.ready = asyncio.Event()   # set once subscribed to control and the first status is out
        self._client: aiomqtt.Client | None = None
        self._topics = {k: mqtt_topic(cfg.mqtt.rig, k) for k in ("trigger", "status", "control")}
        self._trigger_latency = metrics.latency("trigger")
        metrics.armed.set(int(self.interlocks.armed))
        self._connected = False
        self._backoff = cfg.mqtt.reconnect_s   # the next reconnect's wait (reset once connected)
        self.audit = records.AuditTrail(audit_path, cfg.audit, metrics, self._on_audit_failed)
        self.audit.start(records.start_fields(cfg.mqtt.rig, cfg.policy, cfg.interlocks, monitor, targets,
                                              self.interlocks.armed, self.interlocks.estop), self._snapshot())

    # --- audit log ----------------------------------------------------------------------------
    def _on_audit_failed(self, exc: OSError) -> None:
        if self.interlocks.armed:   # fail safe: no trigger is sent without its record
            self.interlocks.disarm()
            self.metrics.armed.set(0)
            log.error("audit log write failed (%s): DISARMED", exc)
            self._note_state(f"audit log write failed: {exc}")

    def _audit_forecast(self, forecast: Forecast, topic: str | None, decision: str, t_decision_ns: int,
                        **fields: Any) -> None:
        if self.audit.enabled:
            self.audit.write("forecast", **records.forecast_fields(forecast, topic, self.cfg.policy, decision,
                                                                   t_decision_ns, **fields))

    def _snapshot(self) -> records.StateSnapshot:
        return records.StateSnapshot(self.interlocks.armed, self.interlocks.estop, self._connected)

    def _note_state(self, cause: str) -> None:
        self.audit.state(self._snapshot(), cause)

    # --- lifecycle ----------------------------------------------------------------------------
    async def run(self, stop: asyncio.Event) -> None:
        """Run until `stop` is set; reconnects to the broker (disarmed) if the connection drops."""
        ctx = zmq.asyncio.Context()
        sub = ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.LINGER, 0)
        sub.setsockopt(zmq.SUBSCRIBE, self.topic.encode())
        sub.connect(self.cfg.forecasts)
        log.info("controller rig=%s: %s* from %s, broker %s:%d, policy %s (%s), %s",
                 self.cfg.mqtt.rig, self.topic, self.cfg.forecasts, self.cfg.mqtt.host, self.cfg.mqtt.port,
                 self.cfg.policy.name, self.cfg.policy.kind, "ARMED at start" if self.interlocks.armed else "disarmed")
        try:
            while not stop.is_set():
                try:
                    await self._session(sub, stop)
                except (aiomqtt.MqttError, MqttSecurityError) as exc:   # refused logins and certificates too
                    self._on_connection_lost(exc)
                except Exception as exc:   # a bug on the connection (status, heartbeat, watchdog): a new one
                    await self.fail_safe("broker_handling", exc, "the broker connection's tasks")
                    self._on_connection_lost(exc)
                if not stop.is_set():
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(stop.wait(), self._backoff)
                    self._backoff = min(2 * self._backoff, self.cfg.mqtt.reconnect_max_s)
        finally:
            sub.close(linger=0)
            ctx.term()
            self.interlocks.disarm()
            self.metrics.armed.set(0)
            self._note_state("controller stopping")
            self.audit.close(forecasts=self.forecasts_seen, sent=self.interlocks.sent,
                             suppressed=dict(self.interlocks.suppressed))
            log.info("controller stopped: %d triggers sent, suppressed %s",
                     self.interlocks.sent, dict(self.interlocks.suppressed))

    def _on_connection_lost(self, exc: BaseException) -> None:
        m = self.cfg.mqtt
        cause = explain(exc, m.host, m.port, m.security)   # one line: the broker, the cause, the key to check
        self._client = None
        self._connected = False
        self.ready.clear()
        self.metrics.errors.labels(kind="mqtt_connection").inc()
        if self.interlocks.armed:
            self.interlocks.disarm()
            self.metrics.armed.set(0)
            log.error("broker connection lost (%s): DISARMED; re-arm over MQTT after reconnect", cause)
        else:
            log.error("broker connection lost (%s); retrying in %.1f s", cause, self._backoff)
        self._note_state(f"broker connection lost: {cause}")

    async def _session(self, sub: zmq.asyncio.Socket, stop: asyncio.Event) -> None:
        m = self.cfg.mqtt
        will = aiomqtt.Will(self._topics["status"], self._status_payload(online=False), qos=1, retain=True)
        async with aiomqtt.Client(m.host, m.port, identifier=m.client_id, keepalive=m.keepalive_s,
                                  will=will, timeout=m.publish_timeout_s, **client_options(m.security)) as client:
            client.pending_calls_threshold = 1000  # default 10 logs a warning under bursts
            self._client = client
            self._connected = True
            self._backoff = m.reconnect_s
            self._note_state(f"connected to broker {m.host}:{m.port} as {m.client_id}")
            await client.subscribe(self._topics["control"], qos=1)
            await self._publish_status()
            self.ready.set()
            log.info("connected to broker %s:%d as %s (%s)", m.host, m.port, m.client_id, m.security.describe())
            try:
                await self._run_tasks(client, sub, stop)
            finally:
                if stop.is_set():
                    await self._publish_final_status()
                self._client = None

    async def _run_tasks(self, client: aiomqtt.Client, sub: zmq.asyncio.Socket, stop: asyncio.Event) -> None:
        tasks = [asyncio.create_task(c) for c in (
            self._forecast_loop(sub), self._control_loop(client), self._heartbeat_loop(), self._watchdog_loop(),
            stop.wait())]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        for t in done:
            exc = None if t.cancelled() else t.exception()
            if exc is not None:
                raise exc

    async def _publish_final_status(self) -> None:
        self.interlocks.disarm()
        self.metrics.armed.set(0)
        self._note_state("controller stopping")
        with contextlib.suppress(aiomqtt.MqttError):
            await self._publish_status(online=False)

    # --- forecasts ----------------------------------------------------------------------------
    async def _forecast_loop(self, sub: zmq.asyncio.Socket) -> None:
        while True:
            parts = await sub.recv_multipart(copy=False)
            topic = parts[0].bytes.decode(errors="replace") if parts and self.audit.enabled else None
            try:
                forecast = decode_forecast(parts)
            except WireError as exc:
                self.invalid += 1
                self.metrics.frames_invalid.labels(reason=exc.reason).inc()
                log.warning("invalid forecast message dropped: %s", exc)
                self.audit.write("invalid", topic=topic, reason=exc.reason, error=str(exc))
                continue
            self.forecasts_seen += 1
            self.watchdog.forecast(time.monotonic())
            try:
                await self.handle_forecast(forecast, topic)
            except Exception as exc:  # a bug must neither take the controller down nor leave it armed
                await self.fail_safe("forecast_handling", exc, f"forecast seq={forecast.header.seq}")

    async def handle_forecast(self, forecast: Forecast, topic: str | None = None) -> TriggerCommand | None:
        """Policy, interlocks and (if allowed) the trigger publish for one forecast; one audit record for
        each message the policy reads, whatever the outcome."""
        if not self.policy.accepts(forecast):
            return None
        await self._check_drift(forecast)
        try:
            decision = self.policy.evaluate(forecast)
        except PolicyError as exc:
            self.metrics.errors.labels(kind=f"policy_{exc.reason}").inc()
            log.warning("forecast seq=%d not usable by policy %s: %s",
                        forecast.header.seq, self.cfg.policy.name, exc)
            self._audit_forecast(forecast, topic, "unusable", self.clock(), error=str(exc))
            return None
        if decision is None:
            self._audit_forecast(forecast, topic, "below_level", self.clock(), value=self.policy.last_value)
            return None
        now = self.clock()
        reason = self.interlocks.check(now, forecast.header.t_src_ns, decision.duration_ms / 1000, decision.targets)
        if reason is not None:
            self.metrics.triggers_suppressed.labels(interlock=reason).inc()
            log.info("trigger suppressed by %s: seq=%d value=%.3f", reason, decision.seq, decision.value)
            self._audit_forecast(forecast, topic, "suppressed", now, value=decision.value, interlock=reason)
            return None
        return await self._send_trigger(forecast, decision, now, topic)

    async def _send_trigger(self, forecast: Forecast, decision: Decision, now_ns: int,
                            topic: str | None = None) -> TriggerCommand | None:
        cmd = decision.command(uuid.uuid4().hex, self.cfg.mqtt.rig, now_ns)
        try:
            if self._client is None:
                raise aiomqtt.MqttError("not connected to the broker")
            await self._client.publish(self._topics["trigger"], cmd.to_json(), qos=1)
        except aiomqtt.MqttError as exc:
            self._audit_forecast(forecast, topic, "publish_failed", now_ns, value=decision.value, trigger=cmd)
            await self._on_publish_failed(cmd, exc)
            return None
        t_ack = self.clock()
        self.interlocks.record(t_ack, decision.duration_ms / 1000, decision.targets)
        self.metrics.triggers_sent.inc()
        self._trigger_latency.observe_since_ns(forecast.t_recv_ns, t_ack)
        self.sent.append(cmd)
        log.info("TRIGGER %s sent: seq=%d model=%s value=%.3f lead=%d pattern=%s %d targets %.1f mW %.0f ms",
                 cmd.trigger_id[:8], cmd.seq, cmd.model, cmd.value, cmd.lead, cmd.pattern,
                 len(cmd.targets), cmd.power_mw, cmd.duration_ms)
        self._audit_forecast(forecast, topic, "sent", now_ns, value=decision.value, trigger=cmd, t_puback_ns=t_ack)
        return cmd

    async def _on_publish_failed(self, cmd: TriggerCommand, exc: BaseException) -> None:
        self.metrics.errors.labels(kind="mqtt_publish").inc()
        self.interlocks.disarm()
        self.metrics.armed.set(0)
        log.error("trigger %s (seq=%d) publish failed: %s -> DISARMED", cmd.trigger_id[:8], cmd.seq, exc)
        self._note_state(f"trigger publish failed: {exc}")
        with contextlib.suppress(aiomqtt.MqttError):
            await self._publish_status()

    # --- control and status -------------------------------------------------------------------
    async def fail_safe(self, where: str, exc: BaseException, what: str) -> None:
        """An unexpected error: disarm (until an operator arms again), count it in loopcast_errors_total{kind},
        record it (an `error` record, and the `disarmed` state), publish the status. The controller goes on."""
        self.metrics.errors.labels(kind=where).inc()
        was_armed = self.interlocks.armed
        log.error("unexpected error in %s (%s): %s: %s -> %s", where, what, type(exc).__name__, exc,
                  "DISARMED" if was_armed else "stays disarmed", exc_info=exc)
        self.interlocks.disarm()
        self.metrics.armed.set(0)
        self.last_disarm = f"unexpected error in {where}: {type(exc).__name__}: {exc}"
        self.audit.write("error", where=where, what=what, error=f"{type(exc).__name__}: {exc}", armed_before=was_armed)
        self._note_state(f"unexpected error in {where}: {type(exc).__name__}: {exc}")
        try:
            await self._publish_status()
        except Exception as failed:   # disarmed and recorded already; the next status (heartbeat) says so
            log.error("status not published after the error in %s: %s: %s", where, type(failed).__name__, failed)

    async def _control_loop(self, client: aiomqtt.Client) -> None:
        async for message in client.messages:
            try:
                await self._on_control(message)
            except aiomqtt.MqttError:
                raise                   # the broker connection: _on_connection_lost disarms and reconnects
            except Exception as exc:    # a bug must neither take the controller down nor leave it armed
                await self.fail_safe("control_handling", exc, f"control message on {message.topic}")

    async def _on_control(self, message: aiomqtt.Message) -> None:
        msg = self._control_message(message)
        if msg is not None:
            self.apply_control(msg.command, msg.sender, message.topic.value)
            await self._publish_status()

    def _control_message(self, message: aiomqtt.Message) -> ControlMessage | None:
        """The control message, or None (logged, counted and recorded) if it is not one to apply."""
        if not message.topic.matches(self._topics["control"]):
            log.debug("ignoring message on %s (not subscribed here)", message.topic)
            return None
        raw = message.payload
        payload = raw if isinstance(raw, (bytes, bytearray, str)) else str(raw)
        try:
            msg = parse_control_message(payload)
        except WireError as exc:
            self.metrics.errors.labels(kind="bad_control").inc()
            log.warning("control message on %s ignored: %s", message.topic, exc)
            self._audit_control(None, message.topic.value, control_sender(payload), False, str(exc))
            return None
        if message.retain:  # a stale retained "arm" must never arm a freshly started controller
            self.metrics.errors.labels(kind="bad_control").inc()
            log.warning("retained control message on %s ignored: control must be live", message.topic)
            self._audit_control(msg.command, message.topic.value, msg.sender, False,
                                "retained message ignored: control must be live")
            return None
        return msg

    def _audit_control(self, command: str | None, source: str, sender: str | None, accepted: bool,
                       error: str | None) -> None:
        self.audit.write("control", **records.control_fields(command, source, sender, accepted, error,
                                                        self.interlocks.armed, self.interlocks.estop))

    def apply_control(self, command: str, sender: str | None = None, source: str | None = None) -> bool:
        """Apply arm/disarm/stop/reset; False when refused (arm while the emergency stop is latched).
        Recorded (a `control` record, then a `state` record per change) with its sender and topic."""
        ok = True
        if command == "arm":
            ok = self.interlocks.arm()
            if ok:
                self.watchdog.armed(time.monotonic())
        elif command == "disarm":
            self.interlocks.disarm()
        elif command == "stop":
            self.interlocks.stop()
        elif command == "reset":
            self.interlocks.reset()
        self.metrics.armed.set(int(self.interlocks.armed))
        self.last_control = {"command": command, "accepted": ok}
        if ok:
            log.warning("control %s -> armed=%s estop=%s", command.upper(), self.interlocks.armed,
                        self.interlocks.estop)
        else:
            log.error("control ARM refused: emergency stop latched; send 'reset' first")
        self._audit_control(command, source or self._topics["control"], sender, ok,
                            None if ok else "refused: emergency stop latched; send 'reset' first")
        self._note_state(f"control {command} from {sender or 'an unnamed sender (plain-text command)'}")
        return ok

    async def _watchdog_loop(self) -> None:
        """Disarm when forecasts stopped while armed (realtime/control/watchdog.py), checked 4x per timeout."""
        if not self.cfg.watchdog_s:
            await asyncio.Event().wait()
        while True:
            await asyncio.sleep(self.cfg.watchdog_s / 4)
            silent = self.watchdog.silent_for(time.monotonic())
            if silent is None or not self.interlocks.armed:
                continue
            cause = f"watchdog: no forecast for {silent:.1f} s (controller.watchdog_s = {self.cfg.watchdog_s:g})"
            await self._disarm_for(cause, "watchdog", "arm again when forecasts resume")

    async def _check_drift(self, forecast: Forecast) -> None:
        """The drift interlock (realtime/control/drift.py): keep the frame's registration for the status and
        disarm when the fish moved too far from the reference or its registration is unsure."""
        h = forecast.header
        reg = h.registration
        self.last_registration = None if not reg else {"seq": h.seq, "shift": list(reg[:3]), "confidence": reg[3]}
        cause = drift_cause(self.cfg.drift, reg)
        if cause is not None and self.interlocks.armed:
            with contextlib.suppress(aiomqtt.MqttError):
                await self._disarm_for(f"{cause} at seq {h.seq}", "drift", "re-reference or re-place the fish, "
                                       "then arm again")

    async def _disarm_for(self, cause: str, kind: str, remedy: str) -> None:
        """Disarm on a safety cause (watchdog, drift): counted in loopcast_errors_total{kind}, recorded
        (audit `state`, status `last_disarm`), published; an operator must arm again."""
        log.error("%s: DISARMED; %s", cause, remedy)
        self.metrics.errors.labels(kind=kind).inc()
        self.interlocks.disarm()
        self.metrics.armed.set(0)
        self.watchdog.disarmed()
        self.last_disarm = cause
        self._note_state(cause)
        await self._publish_status()

    async def _heartbeat_loop(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.heartbeat_s)
            await self._publish_status()

    def status(self, online: bool = True) -> dict[str, Any]:
        """The status document (retained on `loopcast/<rig>/status`)."""
        return {"rig": self.cfg.mqtt.rig, "online": online, **self.interlocks.state(),
                "policy": self.cfg.policy.name, "forecasts": self.forecasts_seen,
                "invalid_forecasts": self.invalid, "last_control": self.last_control,
                "audit_log": None if self.audit.path is None else str(self.audit.path),
                "last_disarm": self.last_disarm, "registration": self.last_registration,
                "heartbeat_ns": time.time_ns()}

    def _status_payload(self, online: bool = True) -> bytes:
        doc = self.status(online)
        if not online:
            doc["armed"] = False
        return json.dumps(doc, separators=(",", ":")).encode()

    async def _publish_status(self, online: bool = True) -> None:
        if self._client is None:
            return
        await self._client.publish(self._topics["status"], self._status_payload(online), qos=1, retain=True)
