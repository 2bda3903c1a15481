"""The controller's audit log as a controller writes it: every decision, control message and state change
through a real MQTT broker and ZeroMQ, and a `loopcast controller` process killed with SIGKILL
(the writer and reader alone: test_audit.py)."""
from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiomqtt
import numpy as np
import pytest
import zmq
import zmq.asyncio

from loopcast.broker import Broker, start_broker
from loopcast.control import control_payload
from loopcast.realtime.control.controller import Controller, ControllerConfig, MqttConfig
from loopcast.realtime.control.interlocks import InterlockConfig
from loopcast.realtime.control.policy import PolicyConfig
from loopcast.realtime.metrics import Metrics, MetricsConfig
from loopcast.realtime.record.audit import AuditError, AuditRead, read_audit
from loopcast.realtime.wire.codec import (
    ForecastHeader,
    TriggerCommand,
    encode_forecast,
)

pytestmark = pytest.mark.timeout(30)

TIMEOUT = 5.0
N = 4


def lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# --- the controller's records, through a real broker and ZeroMQ ------------------------------------------
class Rig:
    """A controller with an audit log, a ZeroMQ XPUB feeding it and an MQTT observer, on a rig name of its own."""

    def __init__(self, broker: Broker, log_path: Path, interlocks: InterlockConfig | None = None) -> None:
        self.rig = f"audit-{uuid.uuid4().hex[:8]}"   # the session broker is shared: unique topics
        self.broker = broker
        self.log_path = log_path
        self.interlocks = interlocks or InterlockConfig(min_interval_s=0.0, max_per_minute=1000)
        self.metrics = Metrics("audit-test", MetricsConfig(enabled=False))
        self.triggers: list[TriggerCommand] = []
        self.statuses: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.seq = 0

    async def __aenter__(self) -> Rig:
        self.zctx = zmq.asyncio.Context()
        self.pub = self.zctx.socket(zmq.XPUB)
        self.pub.setsockopt(zmq.LINGER, 0)
        self.pub.bind("tcp://127.0.0.1:*")
        cfg = ControllerConfig(
            forecasts=self.pub.getsockopt_string(zmq.LAST_ENDPOINT), heartbeat_s=0.2,
            mqtt=MqttConfig(host=self.broker.host, port=self.broker.port, rig=self.rig,
                            client_id=f"ctl-{self.rig}", reconnect_s=0.2),
            policy=PolicyConfig(name="audit-threshold", mode="above", level=0.5, lead=2, pattern="p0",
                                power_mw=2.5, duration_ms=100.0),
            interlocks=self.interlocks)
        self.controller = Controller(cfg, np.array([0, 1]), np.array([2, 3]), self.metrics, audit_path=self.log_path)
        # the observer subscribes before the controller connects (amqtt 0.12, see test_controller.py)
        self.mqtt = aiomqtt.Client(self.broker.host, self.broker.port, identifier=f"obs-{self.rig}")
        await self.mqtt.__aenter__()
        await self.mqtt.subscribe(f"loopcast/{self.rig}/#", qos=1)
        self.reader = asyncio.create_task(self._read())
        self.stop = asyncio.Event()
        self.task = asyncio.create_task(self.controller.run(self.stop))
        async with asyncio.timeout(TIMEOUT):
            assert await self.pub.recv() == b"\x01" + self.controller.topic.encode()
            await self.controller.ready.wait()
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.stop.set()
        await asyncio.wait_for(self.task, TIMEOUT)
        self.reader.cancel()
        await asyncio.gather(self.reader, return_exceptions=True)
        await self.mqtt.__aexit__(None, None, None)
        self.pub.close(linger=0)
        self.zctx.term()

    async def _read(self) -> None:
        async for m in self.mqtt.messages:
            if not m.topic.matches(f"loopcast/{self.rig}/#") or not isinstance(m.payload, bytes):
                continue
            if m.topic.value.endswith("/trigger"):
                self.triggers.append(TriggerCommand.from_json(m.payload))
            elif m.topic.value.endswith("/status"):
                self.statuses.put_nowait(json.loads(m.payload))

    async def forecast(self, value: float, t_src_ns: int | None = None, lead_times: tuple[int, ...] = (1, 2)) -> None:
        data = np.full((len(lead_times), N), value, dtype=np.float32)
        self.seq += 1
        header = ForecastHeader(seq=self.seq, t_src_ns=t_src_ns or time.time_ns(), model="tsmixer",
                                engine_version="e1", lead_times=lead_times, shape=data.shape)
        await self.pub.send_multipart(encode_forecast(header, data))

    async def control(self, payload: str, sender: str | None = None) -> None:
        body = json.dumps({"command": payload, "sender": sender}) if sender else payload
        await self.mqtt.publish(f"loopcast/{self.rig}/control", body.encode(), qos=1)

    async def arm(self, sender: str | None = None) -> None:
        """Send arm and wait until the status says armed."""
        await self.control("arm", sender)
        await self.status_where(lambda s: s["armed"])

    async def status_where(self, predicate: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
        async with asyncio.timeout(TIMEOUT):
            while True:
                status = await self.statuses.get()
                if predicate(status):
                    return status

    def records(self, kind: str) -> list[dict[str, Any]]:
        return [r for r in read_audit(self.log_path).records if r["kind"] == kind]

    async def wait_records(self, kind: str, count: int) -> list[dict[str, Any]]:
        await until(lambda: len(self.records(kind)) >= count)
        return self.records(kind)


async def until(cond: Callable[[], bool]) -> None:
    async with asyncio.timeout(TIMEOUT):
        while not cond():
            await asyncio.sleep(0.01)


def test_controller_records_every_forecast_decision(mqtt_broker: Broker, tmp_path: Path) -> None:
    log_path = tmp_path / "controller.audit.jsonl"

    async def main() -> Rig:
        async with Rig(mqtt_broker, log_path, InterlockConfig(min_interval_s=60.0, max_per_minute=10)) as r:
            assert r.controller.status()["audit_log"] == str(log_path)
            await r.arm("tester@lab (pytest)")
            await r.forecast(0.1)                                       # 1: below the level
            await r.forecast(0.9)                                       # 2: sent
            await r.forecast(0.9)                                       # 3: min_interval
            await r.forecast(0.9, t_src_ns=time.time_ns() - 5_000_000_000)   # 4: stale
            await r.forecast(0.9, lead_times=(1,))                      # 5: lead 2 missing: unusable
            await r.pub.send_multipart([b"forecast/tsmixer", b"\xc1not msgpack", b"\x00"])
            await r.wait_records("forecast", 5)
            await r.wait_records("invalid", 1)
            await until(lambda: len(r.triggers) == 1)
        return r

    r = asyncio.run(main())
    read = read_audit(log_path)
    assert not read.truncated_tail and not read.problems
    recs = read.records
    assert [x["n"] for x in recs] == list(range(len(recs)))
    start, stop = recs[0], recs[-1]
    assert start["kind"] == "start" and start["rig"] == r.rig and start["pid"] == os.getpid()
    assert start["policy"]["name"] == "audit-threshold" and start["interlocks"]["min_interval_s"] == 60.0
    assert (start["monitor"], start["targets"], start["armed"], start["estop"]) == ([0, 1], [2, 3], False, False)
    assert stop["kind"] == "stop" and stop["forecasts"] == 5 and stop["sent"] == 1
    assert stop["suppressed"] == {"min_interval": 1, "stale_forecast": 1}

    below, sent, interval, stale, unusable = (x for x in recs if x["kind"] == "forecast")
    assert [x["seq"] for x in (below, sent, interval, stale, unusable)] == [1, 2, 3, 4, 5]
    for x in (below, sent, interval, stale, unusable):
        assert (x["topic"], x["msg_kind"], x["model"], x["engine_version"]) == ("forecast/tsmixer", "forecast",
                                                                               "tsmixer", "e1")
        assert (x["policy"], x["level"], x["lead"]) == ("audit-threshold", 0.5, 2)
        assert x["t_recv_ns"] <= x["t_decision_ns"] <= x["t_ns"]
    assert below["decision"] == "below_level" and below["value"] == pytest.approx(0.1)
    assert below["interlock"] is None and below["trigger"] is None and below["t_puback_ns"] is None

    (cmd,) = r.triggers
    assert sent["decision"] == "sent" and sent["value"] == pytest.approx(0.9) and sent["error"] is None
    assert sent["trigger"] == json.loads(cmd.to_json())          # the command as published
    assert sent["t_decision_ns"] == cmd.decision_time_ns <= sent["t_puback_ns"] <= sent["t_ns"]
    assert r.metrics.latency("trigger").summary()["count"] == 1

    assert (interval["decision"], interval["interlock"]) == ("suppressed", "min_interval")
    assert (stale["decision"], stale["interlock"], stale["trigger"]) == ("suppressed", "stale_forecast", None)
    assert unusable["decision"] == "unusable" and unusable["value"] is None
    assert unusable["error"].startswith("lead_missing: lead 2 not in forecast lead_times [1]")
    (invalid,) = (x for x in recs if x["kind"] == "invalid")
    assert (invalid["topic"], invalid["reason"]) == ("forecast/tsmixer", "malformed_header")


def test_controller_records_control_messages_and_state(mqtt_broker: Broker, tmp_path: Path) -> None:
    log_path = tmp_path / "controller.audit.jsonl"
    alice, bob = "alice@rig-pc (loopcast control)", "bob@lab (loopcast control)"

    async def main() -> Rig:
        async with Rig(mqtt_broker, log_path) as r:
            await r.arm(alice)
            await r.control("disarm")                                   # plain text: no sender
            await r.status_where(lambda s: not s["armed"])
            await r.arm(alice)
            await r.control("stop", sender=bob)
            await r.status_where(lambda s: s["estop"])
            await r.control("arm", sender=alice)                        # refused: e-stop latched
            await r.status_where(lambda s: s["last_control"] == {"command": "arm", "accepted": False})
            await r.control("launch", sender="mallory@x")               # malformed
            await r.wait_records("control", 6)
            await r.control("reset", sender=bob)
            await r.status_where(lambda s: not s["estop"])
            await r.wait_records("control", 7)
        return r

    r = asyncio.run(main())
    recs = read_audit(log_path).records
    controls = [x for x in recs if x["kind"] == "control"]
    topic = f"loopcast/{r.rig}/control"
    assert [(x["command"], x["sender"], x["accepted"]) for x in controls] == [
        ("arm", alice, True), ("disarm", None, True), ("arm", alice, True), ("stop", bob, True),
        ("arm", alice, False), (None, "mallory@x", False), ("reset", bob, True)]
    assert all(x["source"] == topic for x in controls)
    assert [x["error"] is None for x in controls] == [True, True, True, True, False, False, True]
    assert "emergency stop latched" in controls[4]["error"] and controls[4]["estop"] and not controls[4]["armed"]
    assert "malformed_control" in controls[5]["error"] and "launch" in controls[5]["error"]
    assert (controls[3]["armed"], controls[3]["estop"], controls[6]["estop"]) == (False, True, False)

    states = [x for x in recs if x["kind"] == "state"]
    assert [x["event"] for x in states] == ["broker_connected", "armed", "disarmed", "armed", "estop", "disarmed",
                                            "estop_reset"]
    assert states[0]["cause"].startswith(f"connected to broker {mqtt_broker.host}:{mqtt_broker.port}")
    assert states[1]["cause"] == f"control arm from {alice}" and states[1]["armed"]
    assert states[2]["cause"].startswith("control disarm from an unnamed sender")
    assert states[4]["cause"] == states[5]["cause"] == f"control stop from {bob}"
    assert (states[4]["armed"], states[4]["estop"]) == (False, True)
    # each control record comes before the state changes it caused
    by_n = {id(x): x["n"] for x in recs}
    assert by_n[id(controls[0])] < by_n[id(states[1])] and by_n[id(controls[3])] < by_n[id(states[4])]


def test_retained_control_is_recorded_never_applied(mqtt_broker: Broker, tmp_path: Path) -> None:
    log_path = tmp_path / "controller.audit.jsonl"

    async def main() -> None:
        r = Rig(mqtt_broker, log_path)
        control = f"loopcast/{r.rig}/control"
        async with aiomqtt.Client(mqtt_broker.host, mqtt_broker.port, identifier=f"ret-{r.rig}") as c:
            await c.publish(control, json.dumps({"command": "arm", "sender": "stale@x"}).encode(), qos=1, retain=True)
        try:
            async with r:
                (rec, *_) = await r.wait_records("control", 1)   # amqtt may deliver a retained message twice
                assert not r.controller.interlocks.armed
        finally:
            async with aiomqtt.Client(mqtt_broker.host, mqtt_broker.port, identifier=f"clr-{r.rig}") as c:
                await c.publish(control, b"", qos=1, retain=True)
        assert (rec["command"], rec["sender"], rec["accepted"], rec["armed"]) == ("arm", "stale@x", False, False)
        assert "retained" in rec["error"] and rec["source"] == control
        assert not [x for x in read_audit(log_path).records if x["kind"] == "state" and x["event"] == "armed"]
    asyncio.run(main())


def test_audit_write_failure_disarms(mqtt_broker: Broker, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The log's file turns into /dev/full (ENOSPC on every write): the trigger in flight goes out, then the
    controller disarms and cannot be re-armed while the log fails; its loops keep running."""
    log_path = tmp_path / "controller.audit.jsonl"

    async def main() -> None:
        async with Rig(mqtt_broker, log_path) as r:
            await r.arm()
            log_fd = r.controller.audit._log._fd  # type: ignore[union-attr]
            full = os.open("/dev/full", os.O_WRONLY)
            os.dup2(full, log_fd)
            os.close(full)
            with caplog.at_level(logging.ERROR):
                await r.forecast(0.9)
                await r.status_where(lambda s: not s["armed"])
            assert len(r.triggers) <= 1 and r.metrics.count("loopcast_errors_total", kind="audit_log") >= 1
            assert "DISARMED" in caplog.text and "No space left on device" in caplog.text
            await r.control("arm")                                      # its control record fails: disarmed again
            await r.status_where(lambda s: s["last_control"] == {"command": "arm", "accepted": True})
            assert not r.controller.interlocks.armed
            await r.forecast(0.9)
            await until(lambda: r.controller.forecasts_seen == 2)
            assert len(r.controller.sent) == 1
            assert r.metrics.count("loopcast_triggers_suppressed_total", interlock="disarmed") == 1
    asyncio.run(main())
    read = read_audit(log_path)                   # what was written before the failure reads fine
    assert [x["kind"] for x in read.records][-1] == "state" and read.records[-1]["event"] == "armed"


def test_publish_failure_is_recorded(mqtt_broker: Broker, tmp_path: Path) -> None:
    """The broker stays real; the controller's client refuses trigger publishes (as in test_controller.py)."""
    log_path = tmp_path / "controller.audit.jsonl"

    async def main() -> None:
        async with Rig(mqtt_broker, log_path) as r:
            await r.arm()
            client = r.controller._client
            assert client is not None
            real_publish = client.publish

            async def broken_publish(topic: str, *a: Any, **kw: Any) -> None:
                if topic.endswith("/trigger"):
                    raise aiomqtt.MqttError("simulated publish failure")
                await real_publish(topic, *a, **kw)
            client.publish = broken_publish  # type: ignore[method-assign]
            await r.forecast(0.9)
            await r.status_where(lambda s: not s["armed"])
    asyncio.run(main())
    recs = read_audit(log_path).records
    (failed,) = (x for x in recs if x["kind"] == "forecast")
    assert failed["decision"] == "publish_failed" and failed["t_puback_ns"] is None
    assert failed["trigger"]["seq"] == 1 and failed["trigger"]["targets"] == [2, 3]
    disarmed = next(x for x in recs if x["kind"] == "state" and x["event"] == "disarmed")
    assert disarmed["cause"] == "trigger publish failed: simulated publish failure" and disarmed["n"] > failed["n"]


@pytest.mark.parametrize("where", ["forecast_handling", "control_handling"])
def test_an_unexpected_error_in_a_handler_disarms_until_armed_again(
        mqtt_broker: Broker, tmp_path: Path, where: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A bug injected into the forecast handler (the policy) or the control handler (applying a command):
    the controller disarms, counts and records it, publishes the state, carries on, and fires again only
    after an operator's arm."""
    log_path = tmp_path / "controller.audit.jsonl"

    def bug(*a: Any, **kw: Any) -> None:
        raise RuntimeError("injected bug")

    async def main() -> Rig:
        async with Rig(mqtt_broker, log_path) as r:
            await r.arm()
            ctl = r.controller
            if where == "forecast_handling":
                monkeypatch.setattr(ctl.policy, "evaluate", bug)
                await r.forecast(0.9)
            else:
                monkeypatch.setattr(ctl, "apply_control", bug)
                await r.control("reset")
            status = await r.status_where(lambda s: not s["armed"])
            assert status["online"] and not status["estop"]
            assert r.metrics.count("loopcast_errors_total", kind=where) == 1
            monkeypatch.undo()
            await r.forecast(0.9)                                       # still disarmed: suppressed
            await r.wait_records("forecast", 1)
            assert not r.triggers
            await r.arm()
            await r.forecast(0.9)
            await until(lambda: len(r.triggers) == 1)
        return r

    asyncio.run(main())
    recs = read_audit(log_path).records
    (error,) = (x for x in recs if x["kind"] == "error")
    assert (error["where"], error["error"], error["armed_before"]) == (where, "RuntimeError: injected bug", True)
    disarmed = next(x for x in recs if x["kind"] == "state" and x["event"] == "disarmed")
    assert disarmed["cause"] == f"unexpected error in {where}: RuntimeError: injected bug"
    assert disarmed["n"] > error["n"]
    suppressed, sent = (x for x in recs if x["kind"] == "forecast")
    assert (suppressed["decision"], suppressed["interlock"], sent["decision"]) == ("suppressed", "disarmed", "sent")


def test_broker_loss_is_recorded(tmp_path: Path) -> None:
    broker = start_broker("embedded")
    log_path = tmp_path / "controller.audit.jsonl"

    async def main() -> None:
        nonlocal broker
        async with Rig(broker, log_path) as r:
            await r.arm()
            await asyncio.to_thread(broker.stop)
            await until(lambda: any(x["event"] == "broker_lost" for x in r.records("state")))
            broker = await asyncio.to_thread(start_broker, "embedded", broker.port)
            await asyncio.wait_for(r.controller.ready.wait(), TIMEOUT)
            r.reader.cancel()

    try:
        asyncio.run(main())
    finally:
        broker.stop()
    states = [x for x in read_audit(log_path).records if x["kind"] == "state"]
    events = [x["event"] for x in states]
    assert events[:5] == ["broker_connected", "armed", "broker_lost", "disarmed", "broker_connected"], events
    assert states[2]["cause"].startswith("broker connection lost: ") and states[3]["cause"] == states[2]["cause"]
    assert not states[3]["armed"]


# --- a real `loopcast controller`, killed -------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_recording(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """Overrides naming a small synthesized recording (the controller reads its neuron count from it)."""
    from loopcast.settings import load_settings
    from loopcast.workflows import ensure_recording
    root = tmp_path_factory.mktemp("audit-rec")
    overrides = [f'paths.recording="{root}/rec"', f'paths.engines="{root}/engines"', f'paths.runs="{root}/runs"',
                 "rig.shape=[48, 32, 8]", "synth.fish.n_neurons=300", "synth.fish.n_ensembles=4",
                 "synth.n_frames=100"]
    ensure_recording(load_settings(overrides=overrides), progress=False)
    return overrides


def test_build_controller_puts_the_log_in_the_run_dir(small_recording: list[str], tmp_path: Path) -> None:
    from loopcast import app
    from loopcast.settings import load_settings
    cfg = load_settings(overrides=small_recording)
    rec = app.open_recording(cfg)
    metrics = Metrics("audit-test", MetricsConfig(enabled=False))
    first = app.build_controller(cfg, metrics, rec, tmp_path)
    assert first.status()["audit_log"] == str(tmp_path / "controller.audit.jsonl")
    with pytest.raises(app.UserError, match="controller.audit.jsonl: .*in use by another process"):
        app.build_controller(cfg, metrics, rec, tmp_path)     # a second controller on the run directory
    first.audit.close(forecasts=0, sent=0, suppressed={})
    assert [r["kind"] for r in read_audit(tmp_path / "controller.audit.jsonl").records] == ["start", "stop"]
    off = load_settings(overrides=[*small_recording, "controller.audit.enabled=false"])
    assert app.build_controller(off, metrics, rec, tmp_path / "off").status()["audit_log"] is None
    assert app.build_controller(cfg, metrics, rec).audit.path is None       # no run directory: no log
    assert not (tmp_path / "off").exists()


@pytest.fixture()
def zmq_pub() -> Iterator[zmq.Socket[bytes]]:
    ctx = zmq.Context()
    pub = ctx.socket(zmq.XPUB)
    pub.setsockopt(zmq.LINGER, 0)
    pub.bind("tcp://127.0.0.1:*")
    yield pub
    pub.close(linger=0)
    ctx.term()


def test_killed_controller_leaves_a_readable_log(mqtt_broker: Broker, small_recording: list[str], tmp_path: Path,
                                                 zmq_pub: zmq.Socket[bytes]) -> None:
    """SIGKILL while forecasts stream in: the log reads, its numbers are consecutive, at most the last line is
    cut short, and its sent triggers are those the broker delivered (the last one may lack its record)."""
    from loopcast.settings import load_settings, new_run_dir
    rig = f"kill-{uuid.uuid4().hex[:8]}"
    endpoint = zmq_pub.getsockopt_string(zmq.LAST_ENDPOINT)
    cfg = load_settings(overrides=[
        *small_recording, f'rig.name="{rig}"', f'endpoints.forecasts="{endpoint}"', f"mqtt.port={mqtt_broker.port}",
        f'mqtt.host="{mqtt_broker.host}"', "metrics.controller=0", 'controller.policy.monitor="indices:0,1"',
        'controller.policy.targets="indices:2,3"', "controller.policy.level=0.5", "controller.policy.lead=2",
        'controller.policy.mode="above"', "controller.interlocks.min_interval_s=0", "controller.heartbeat_s=0.2",
        "controller.interlocks.max_per_minute=100000", "controller.interlocks.max_forecast_age_s=5"])
    run_dir = new_run_dir(cfg, "controller", str(tmp_path / "run"))
    log_path = run_dir / "controller.audit.jsonl"
    triggers: list[TriggerCommand] = []

    async def main(proc: subprocess.Popen[bytes]) -> None:
        async with aiomqtt.Client(mqtt_broker.host, mqtt_broker.port, identifier=f"obs-{rig}") as c:
            await c.subscribe(f"loopcast/{rig}/#", qos=1)
            reader = asyncio.create_task(observe(c, rig, triggers))
            await arm_when_online(mqtt_broker, rig)
            assert zmq_pub.poll(int(TIMEOUT * 1000)) and zmq_pub.recv() == b"\x01forecast/"
            seq = 0
            while count_forecasts(log_path) < 20:
                assert proc.poll() is None and seq < 2000, "the controller did not log the forecasts"
                seq += 1
                data = np.full((2, 300), 0.9 if seq % 2 else 0.1, dtype=np.float32)
                header = ForecastHeader(seq=seq, t_src_ns=time.time_ns(), model="tsmixer", engine_version="e1",
                                        lead_times=(1, 2), shape=data.shape)
                zmq_pub.send_multipart(encode_forecast(header, data))
                await asyncio.sleep(0.005)
            os.kill(proc.pid, signal.SIGKILL)
            await asyncio.to_thread(proc.wait, TIMEOUT)
            logged = {r["trigger"]["trigger_id"] for r in sent_records(log_path)}
            await until(lambda: logged <= {t.trigger_id for t in triggers})   # in flight to the observer
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)

    with open(run_dir / "controller.log", "wb") as out:
        proc = subprocess.Popen([sys.executable, "-P", "-m", "loopcast.cli", "controller", "-c",
                                 str(run_dir / "config.toml"), "--run-dir", str(run_dir)], stdout=out,
                                stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        try:
            asyncio.run(main(proc))
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert proc.returncode == -signal.SIGKILL, (run_dir / "controller.log").read_text()[-3000:]
    assert f"audit log: {log_path}" in (run_dir / "controller.log").read_text()
    read = read_audit(log_path)
    assert not read.problems and read.records[0]["kind"] == "start" and read.records[0]["pid"] == proc.pid
    assert [r["n"] for r in read.records] == list(range(len(read.records)))
    assert "stop" not in {r["kind"] for r in read.records}
    *complete, tail = log_path.read_bytes().split(b"\n")     # at most the last line is cut short
    assert [json.loads(line) for line in complete] == read.records[:len(complete)]
    assert len(read.records) == len(complete) + (0 if read.truncated_tail or not tail else 1)
    logged = [r["trigger"]["trigger_id"] for r in sent_records(log_path)]
    received = [t.trigger_id for t in triggers]
    assert len(logged) >= 5 and len(set(received)) == len(received)
    assert received[:len(logged)] == logged and len(received) - len(logged) <= 1, (received, logged)


def count_forecasts(path: Path) -> int:
    try:
        return sum(1 for r in read_audit(path).records if r["kind"] == "forecast")
    except AuditError:
        return 0                     # not there yet


def sent_records(path: Path) -> list[dict[str, Any]]:
    read: AuditRead = read_audit(path)
    return [r for r in read.records if r["kind"] == "forecast" and r["decision"] == "sent"]


async def observe(client: aiomqtt.Client, rig: str, triggers: list[TriggerCommand]) -> None:
    async for m in client.messages:
        if m.topic.matches(f"loopcast/{rig}/trigger") and isinstance(m.payload, bytes):
            triggers.append(TriggerCommand.from_json(m.payload))


async def arm_when_online(broker: Broker, rig: str) -> None:
    """Arm the controller (`loopcast control`'s message) once its status says online; return when armed."""
    async with aiomqtt.Client(broker.host, broker.port, identifier=f"arm-{rig}") as c:
        await c.subscribe(f"loopcast/{rig}/status", qos=1)
        sent = False
        async with asyncio.timeout(3 * TIMEOUT):           # the process starts: imports, config, recording
            async for m in c.messages:
                if not m.topic.matches(f"loopcast/{rig}/status") or not isinstance(m.payload, bytes):
                    continue
                status = json.loads(m.payload)
                if status.get("armed"):
                    return
                if status.get("online") and not sent:
                    await c.publish(f"loopcast/{rig}/control", control_payload("arm"), qos=1)
                    sent = True


def test_an_unexpected_error_on_the_broker_connection_disarms_and_reconnects(
        mqtt_broker: Broker, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A bug in the connection's own tasks (here publishing the status, as the heartbeat does): the controller
    disarms, counts it as broker_handling, records it, drops the connection and makes a new one, and stays
    disarmed until an operator arms it."""
    log_path = tmp_path / "controller.audit.jsonl"

    async def bug(*a: Any, **kw: Any) -> None:
        raise RuntimeError("injected bug")

    async def main() -> None:
        async with Rig(mqtt_broker, log_path) as r:
            await r.arm()
            ctl = r.controller
            monkeypatch.setattr(ctl, "_publish_status", bug)
            await until(lambda: r.metrics.count("loopcast_errors_total", kind="broker_handling") >= 1)
            assert not ctl.interlocks.armed
            monkeypatch.undo()
            status = await r.status_where(lambda s: s["online"])
            assert not status["armed"] and "broker_handling" in status["last_disarm"]
            await r.forecast(0.9)
            await r.wait_records("forecast", 1)
            assert not r.triggers
            await r.arm()
            await r.forecast(0.9)
            await until(lambda: len(r.triggers) == 1)

    asyncio.run(main())
    recs = read_audit(log_path).records
    error = next(x for x in recs if x["kind"] == "error")
    assert (error["where"], error["error"], error["armed_before"]) == ("broker_handling", "RuntimeError: injected bug",
                                                                      True)
    events = [x["event"] for x in recs if x["kind"] == "state"]
    assert events.index("disarmed") < events.index("broker_lost") < len(events) - events[::-1].index("broker_connected")
