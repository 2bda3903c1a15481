"""Controller end to end: real ZeroMQ PUB -> Controller -> real MQTT broker -> aiomqtt observer."""
from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import aiomqtt
import numpy as np
import pytest
import zmq
import zmq.asyncio

from loopcast.broker import Broker, BrokerKind, find_mosquitto, start_broker
from loopcast.realtime.control.controller import Controller, ControllerConfig, MqttConfig
from loopcast.realtime.control.interlocks import InterlockConfig
from loopcast.realtime.control.policy import PolicyConfig
from loopcast.realtime.metrics import Metrics, MetricsConfig
from loopcast.realtime.wire.codec import ForecastHeader, TriggerCommand, encode_forecast

pytestmark = pytest.mark.timeout(15)

N = 4
TIMEOUT = 5.0


class Harness:
    """A controller on its own rig name, a ZeroMQ XPUB feeding it and an MQTT observer."""

    def __init__(self, broker: Broker, interlocks: InterlockConfig | None = None,
                 policy: PolicyConfig | None = None, watchdog_s: float = 5.0) -> None:
        self.rig = f"rig-{uuid.uuid4().hex[:8]}"  # the session broker is shared: unique topics
        self.broker = broker
        self.watchdog_s = watchdog_s
        self.interlocks = interlocks or InterlockConfig(min_interval_s=0.0, max_per_minute=1000)
        self.metrics = Metrics("controller-test", MetricsConfig(enabled=False))
        self.triggers: asyncio.Queue[TriggerCommand] = asyncio.Queue()
        self.statuses: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.policy = policy or PolicyConfig(name="ensemble-threshold", mode="above", level=0.5, lead=2,
                                             pattern="p0", power_mw=2.5, duration_ms=100.0)
        self.seq = 0

    async def __aenter__(self) -> Harness:
        self.zctx = zmq.asyncio.Context()
        self.pub = self.zctx.socket(zmq.XPUB)
        self.pub.setsockopt(zmq.LINGER, 0)
        self.pub.bind("tcp://127.0.0.1:*")
        endpoint = self.pub.getsockopt_string(zmq.LAST_ENDPOINT)
        cfg = ControllerConfig(
            forecasts=endpoint, heartbeat_s=0.2,
            mqtt=MqttConfig(host=self.broker.host, port=self.broker.port, rig=self.rig,
                            client_id=f"ctl-{self.rig}", reconnect_s=0.2),
            policy=self.policy, interlocks=self.interlocks, watchdog_s=self.watchdog_s)
        self.controller = Controller(cfg, np.array([0, 1]), np.array([2, 3]), self.metrics)
        # The observer subscribes before the controller connects: amqtt 0.12 can crash a session
        # whose CONNECT overlaps another client's SUBSCRIBE ("dictionary changed size").
        self.mqtt = aiomqtt.Client(self.broker.host, self.broker.port, identifier=f"obs-{self.rig}")
        await self.mqtt.__aenter__()
        await self.mqtt.subscribe(f"loopcast/{self.rig}/#", qos=1)
        self.reader = asyncio.create_task(self._read())
        self.stop = asyncio.Event()
        self.task = asyncio.create_task(self.controller.run(self.stop))
        async with asyncio.timeout(TIMEOUT):  # slow joiner: wait until the SUB's subscription is in
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
            if not m.topic.matches(f"loopcast/{self.rig}/#"):
                continue  # amqtt 0.12 also sends retained messages of other clients' subscriptions
            assert isinstance(m.payload, bytes)
            if m.topic.value.endswith("/trigger"):
                self.triggers.put_nowait(TriggerCommand.from_json(m.payload))
            elif m.topic.value.endswith("/status"):
                self.statuses.put_nowait(json.loads(m.payload))

    async def send_forecast(self, value: float, t_src_ns: int | None = None, model: str = "tsmixer") -> None:
        """A forecast whose lead-2 row is `value` everywhere (lead 1 is 0)."""
        data = np.zeros((2, N), dtype=np.float32)
        data[1] = value
        self.seq += 1
        header = ForecastHeader(seq=self.seq, t_src_ns=t_src_ns or time.time_ns(), model=model,
                                engine_version="e1", lead_times=(1, 2), shape=data.shape)
        await self.pub.send_multipart(encode_forecast(header, data))

    async def send_activation(self, probs: list[float], window: int = 8, model: str = "quantformer") -> None:
        """An activation message: (1, N) probabilities over a window of `window` frames."""
        data = np.asarray(probs, dtype=np.float32)[None]
        self.seq += 1
        header = ForecastHeader(seq=self.seq, t_src_ns=time.time_ns(), model=model, engine_version="qf/v0001",
                                lead_times=(window,), shape=data.shape, kind="activation")
        await self.pub.send_multipart(encode_forecast(header, data))

    async def control(self, command: str) -> None:
        await self.mqtt.publish(f"loopcast/{self.rig}/control", command.encode(), qos=1)

    async def status_where(self, predicate: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
        """The next status message that satisfies `predicate` (heartbeats come every 0.2 s)."""
        async with asyncio.timeout(TIMEOUT):
            while True:
                status = await self.statuses.get()
                if predicate(status):
                    return status

    async def arm(self) -> None:
        await self.control("arm")
        await self.status_where(lambda s: s["armed"])

    async def processed(self, count: int) -> None:
        """Wait until the controller has taken in `count` forecasts (valid or not)."""
        await until(lambda: self.controller.forecasts_seen + self.controller.invalid >= count)


async def until(cond: Callable[[], bool]) -> None:
    async with asyncio.timeout(TIMEOUT):
        while not cond():
            await asyncio.sleep(0.01)


def run(broker: Broker, body: Callable[[Harness], Awaitable[None]], **kw: Any) -> None:
    async def main() -> None:
        async with Harness(broker, **kw) as h:
            await body(h)
    asyncio.run(main())


def test_starts_disarmed_and_suppresses(mqtt_broker: Broker) -> None:
    async def body(h: Harness) -> None:
        first = await h.status_where(lambda s: True)
        assert first["online"] and not first["armed"] and not first["estop"]
        await h.send_forecast(0.9)
        await h.processed(1)
        assert h.triggers.empty() and list(h.controller.sent) == []
        assert h.metrics.count("loopcast_triggers_suppressed_total", interlock="disarmed") == 1
    run(mqtt_broker, body)


def test_armed_over_mqtt_sends_trigger(mqtt_broker: Broker) -> None:
    async def body(h: Harness) -> None:
        await h.arm()
        await h.send_forecast(0.1)   # below the level: nothing
        await h.send_forecast(0.9)
        async with asyncio.timeout(TIMEOUT):
            cmd = await h.triggers.get()
        assert cmd.rig == h.rig and cmd.seq == 2 and cmd.model == "tsmixer" and cmd.engine_version == "e1"
        assert cmd.targets == (2, 3) and cmd.pattern == "p0" and cmd.power_mw == 2.5 and cmd.duration_ms == 100.0
        assert cmd.lead == 2 and cmd.value == pytest.approx(0.9) and cmd.policy == "ensemble-threshold"
        async with asyncio.timeout(TIMEOUT):  # the subscriber may see the trigger before the QoS 1 publish returns
            while not h.controller.sent:
                await asyncio.sleep(0.01)
        assert list(h.controller.sent) == [cmd] and h.triggers.empty()
        assert h.metrics.count("loopcast_triggers_sent_total") == 1
        assert h.metrics.latency("trigger").summary()["count"] == 1
        assert h.metrics.registry.get_sample_value("loopcast_controller_armed") == 1
    run(mqtt_broker, body)


def test_disarm_and_stop_over_mqtt(mqtt_broker: Broker) -> None:
    async def body(h: Harness) -> None:
        await h.arm()
        await h.control("disarm")
        await h.status_where(lambda s: not s["armed"])
        await h.send_forecast(0.9)
        await h.processed(1)         # forecasts (ZeroMQ) and control (MQTT) are not ordered
        await h.arm()
        await h.control("stop")
        await h.status_where(lambda s: s["estop"] and not s["armed"])
        await h.send_forecast(0.9)
        await h.control("arm")       # refused: the emergency stop latches
        refused = await h.status_where(lambda s: s["last_control"] == {"command": "arm", "accepted": False})
        assert refused["estop"] and not refused["armed"]
        await h.send_forecast(0.9)
        await h.processed(3)
        assert h.triggers.empty() and list(h.controller.sent) == []
        assert h.metrics.count("loopcast_triggers_suppressed_total", interlock="disarmed") == 1
        assert h.metrics.count("loopcast_triggers_suppressed_total", interlock="estop") == 2
        await h.control("reset")
        await h.status_where(lambda s: not s["estop"] and not s["armed"])
        await h.arm()
        await h.send_forecast(0.9)
        async with asyncio.timeout(TIMEOUT):
            assert (await h.triggers.get()).seq == 4
    run(mqtt_broker, body)


def test_malformed_forecast_is_counted_and_next_one_triggers(mqtt_broker: Broker) -> None:
    async def body(h: Harness) -> None:
        await h.arm()
        await h.pub.send_multipart([b"forecast/tsmixer", b"\xc1not msgpack", b"\x00"])
        await h.pub.send_multipart([b"forecast/tsmixer", b"only two parts"])
        await h.send_forecast(0.9)
        async with asyncio.timeout(TIMEOUT):
            cmd = await h.triggers.get()
        assert cmd.seq == 1 and h.controller.invalid == 2
        assert h.metrics.count("loopcast_frames_invalid_total", reason="malformed_header") == 1
        assert h.metrics.count("loopcast_frames_invalid_total", reason="bad_parts") == 1
    run(mqtt_broker, body)


def test_bad_control_and_unusable_forecast_are_counted(mqtt_broker: Broker) -> None:
    async def body(h: Harness) -> None:
        await h.control("launch")
        await h.control('{"command": "arm"}')   # JSON form works too
        await h.status_where(lambda s: s["armed"])
        assert h.metrics.count("loopcast_errors_total", kind="bad_control") == 1
        data = np.ones((1, N), dtype=np.float32)  # lead 2 missing
        header = ForecastHeader(seq=9, t_src_ns=time.time_ns(), model="tsmixer", engine_version="e1",
                                lead_times=(1,), shape=data.shape)
        await h.pub.send_multipart(encode_forecast(header, data))
        await h.processed(1)
        assert h.metrics.count("loopcast_errors_total", kind="policy_lead_missing") == 1
        assert h.triggers.empty()
    run(mqtt_broker, body)


def test_stale_forecast_and_min_interval(mqtt_broker: Broker) -> None:
    async def body(h: Harness) -> None:
        await h.arm()
        await h.send_forecast(0.9, t_src_ns=time.time_ns() - 5_000_000_000)
        await h.send_forecast(0.9)
        await h.send_forecast(0.9)   # within min_interval of the trigger before
        await h.processed(3)
        async with asyncio.timeout(TIMEOUT):
            assert (await h.triggers.get()).seq == 2
        assert h.metrics.count("loopcast_triggers_suppressed_total", interlock="stale_forecast") == 1
        assert h.metrics.count("loopcast_triggers_suppressed_total", interlock="min_interval") == 1
    run(mqtt_broker, body, interlocks=InterlockConfig(min_interval_s=60.0))


def test_retained_status_reflects_armed_and_estop(mqtt_broker: Broker) -> None:
    async def late_status(h: Harness) -> dict[str, Any]:
        async with aiomqtt.Client(h.broker.host, h.broker.port, identifier=f"late-{uuid.uuid4().hex[:6]}") as c:
            await c.subscribe(f"loopcast/{h.rig}/status", qos=1)
            async with asyncio.timeout(TIMEOUT):
                async for m in c.messages:
                    if m.topic.matches(f"loopcast/{h.rig}/status"):
                        break
        assert m.retain and isinstance(m.payload, bytes)
        return json.loads(m.payload)

    async def body(h: Harness) -> None:
        await h.arm()
        s = await late_status(h)
        assert s["armed"] and not s["estop"] and s["rig"] == h.rig and s["heartbeat_ns"] > 0
        await h.control("stop")
        await h.status_where(lambda s: s["estop"])
        s = await late_status(h)
        assert s["estop"] and not s["armed"]

    async def main() -> None:
        async with Harness(mqtt_broker) as h:
            await body(h)
        s = await late_status(h)   # after a clean stop: offline and disarmed
        assert not s["online"] and not s["armed"]
    asyncio.run(main())


def test_publish_failure_disarms(mqtt_broker: Broker, caplog: pytest.LogCaptureFixture) -> None:
    async def body(h: Harness) -> None:
        await h.arm()
        client = h.controller._client
        assert client is not None

        async def broken_publish(topic: str, *a: Any, **kw: Any) -> None:
            if topic.endswith("/trigger"):
                raise aiomqtt.MqttError("simulated publish failure")
            await real_publish(topic, *a, **kw)
        real_publish = client.publish
        client.publish = broken_publish  # type: ignore[method-assign]
        with caplog.at_level(logging.ERROR, logger="loopcast.realtime.control.controller"):
            await h.send_forecast(0.9)
            await h.status_where(lambda s: not s["armed"])
        assert h.metrics.count("loopcast_errors_total", kind="mqtt_publish") == 1
        assert not h.controller.interlocks.armed and list(h.controller.sent) == []
        assert "DISARMED" in caplog.text
    run(mqtt_broker, body)


def test_retained_control_message_is_ignored(mqtt_broker: Broker) -> None:
    """A stale retained "arm" left on the control topic must not arm a freshly started controller."""
    async def main() -> None:
        h = Harness(mqtt_broker)
        control = f"loopcast/{h.rig}/control"
        async with aiomqtt.Client(mqtt_broker.host, mqtt_broker.port, identifier=f"ret-{h.rig}") as c:
            await c.publish(control, b"arm", qos=1, retain=True)
        try:
            async with h:
                # >= 1: amqtt 0.12 delivers a retained message twice to a new subscriber
                await until(lambda: h.metrics.count("loopcast_errors_total", kind="bad_control") >= 1)
                assert not h.controller.interlocks.armed
                await h.send_forecast(0.9)
                await h.processed(1)
                assert h.triggers.empty()
        finally:
            async with aiomqtt.Client(mqtt_broker.host, mqtt_broker.port, identifier=f"clr-{h.rig}") as c:
                await c.publish(control, b"", qos=1, retain=True)  # clear it from the shared broker
    asyncio.run(main())


@pytest.mark.parametrize("kind", ["embedded", pytest.param("mosquitto", marks=pytest.mark.skipif(
    find_mosquitto() is None, reason="mosquitto binary not installed"))])
def test_broker_loss_disarms_and_reconnects(kind: BrokerKind) -> None:
    """A private broker dies under an armed controller: it disarms, reconnects, and stays disarmed."""
    broker = start_broker(kind)

    async def main() -> None:
        nonlocal broker
        async with Harness(broker) as h:
            await h.arm()
            await asyncio.to_thread(broker.stop)  # not on this loop: the clients must keep running
            await until(lambda: h.metrics.count("loopcast_errors_total", kind="mqtt_connection") >= 1)
            assert not h.controller.interlocks.armed and not h.controller.ready.is_set()
            broker = await asyncio.to_thread(start_broker, kind, broker.port)
            await asyncio.wait_for(h.controller.ready.wait(), TIMEOUT)
            assert not h.controller.interlocks.armed
            h.reader.cancel()  # the observer lost its connection too; the test ends here

    try:
        asyncio.run(main())
    finally:
        broker.stop()


ACTIVATION = PolicyConfig(name="qf-any", kind="activation_threshold", reduce="any", lead=8, level=0.5,
                          mode="above", model="quantformer", pattern="p1", power_mw=1.5, duration_ms=50.0)


def test_activation_policy_triggers_on_activation_messages(mqtt_broker: Broker) -> None:
    async def body(h: Harness) -> None:
        assert h.controller.topic == "activation/quantformer"   # the policy names its model
        await h.arm()
        await h.send_forecast(0.9)                       # forecast/ topic: not subscribed, never seen
        await h.send_activation([0.2, 0.2, 0.9, 0.9])    # monitored 0, 1: any = 1 - 0.8 * 0.8 = 0.36
        await h.send_activation([0.5, 0.4, 0.0, 0.0])    # 1 - 0.5 * 0.6 = 0.7 > 0.5
        async with asyncio.timeout(TIMEOUT):
            cmd = await h.triggers.get()
        assert (cmd.seq, cmd.model, cmd.engine_version, cmd.policy, cmd.lead) == (3, "quantformer", "qf/v0001",
                                                                                   "qf-any", 8)
        assert cmd.value == pytest.approx(0.7) and cmd.targets == (2, 3) and cmd.pattern == "p1"
        assert h.controller.forecasts_seen == 2 and h.controller.invalid == 0
    run(mqtt_broker, body, policy=ACTIVATION)


def test_a_policy_naming_a_model_receives_only_that_models_forecasts(mqtt_broker: Broker) -> None:
    async def body(h: Harness) -> None:
        assert h.controller.topic == "forecast/nlinear"
        await h.arm()
        await h.send_forecast(0.9, model="tsmixer")      # another engine's forecast: not subscribed, never seen
        await h.send_forecast(0.9, model="nlinear")
        async with asyncio.timeout(TIMEOUT):
            cmd = await h.triggers.get()
        assert (cmd.seq, cmd.model) == (2, "nlinear") and h.controller.forecasts_seen == 1
    run(mqtt_broker, body, policy=PolicyConfig(name="nlinear-only", model="nlinear", mode="above", level=0.5,
                                               lead=2, pattern="p0", power_mw=2.5, duration_ms=100.0))


def test_activation_window_mismatch_is_counted(mqtt_broker: Broker) -> None:
    async def body(h: Harness) -> None:
        await h.arm()
        await h.send_activation([0.9] * N, window=4)
        await h.send_activation([0.9] * N, model="other")   # another model: ignored, no error
        await h.send_activation([0.9] * N)
        async with asyncio.timeout(TIMEOUT):
            assert (await h.triggers.get()).seq == 3
        assert h.metrics.count("loopcast_errors_total", kind="policy_window_mismatch") == 1
        assert h.triggers.empty() and len(h.controller.sent) <= 1
    run(mqtt_broker, body, policy=ACTIVATION)


def test_config_loads_strictly_from_toml_tables() -> None:
    from loopcast.config import ConfigError, from_dict
    cfg = from_dict(ControllerConfig, {
        "forecasts": "tcp://10.0.0.2:5556", "heartbeat_s": 0.5,
        "mqtt": {"rig": "rig3", "port": 1884},
        "policy": {"mode": "above", "monitor": "indices:1,2", "lead": 2, "level": 0.3},
        "interlocks": {"armed_at_start": True, "max_per_minute": 4}})
    assert cfg.mqtt.rig == "rig3" and cfg.mqtt.host == "127.0.0.1" and cfg.policy.mode == "above"
    assert cfg.interlocks.max_per_minute == 4 and cfg.interlocks.min_interval_s == 2.0
    with pytest.raises(ConfigError, match="policy.mode"):
        from_dict(ControllerConfig, {"policy": {"mode": "sometimes"}})
    act = from_dict(ControllerConfig, {"policy": {"kind": "activation_threshold", "reduce": "max", "lead": 8}})
    assert act.policy.kind == "activation_threshold" and act.policy.reduce == "max"
    with pytest.raises(ConfigError, match="policy.reduce"):
        from_dict(ControllerConfig, {"policy": {"reduce": "median"}})
    with pytest.raises(ConfigError, match="interlocks"):
        from_dict(ControllerConfig, {"interlocks": {"max_per_minute": 0}})


def test_watchdog_disarms_when_forecasts_stop_and_waits_for_an_arm(mqtt_broker: Broker) -> None:
    async def body(h: Harness) -> None:
        await h.arm()
        await asyncio.sleep(0.6)                   # armed, no forecast yet: a pipeline warming up is no fault
        assert h.controller.interlocks.armed
        await h.send_forecast(0.1)
        status = await h.status_where(lambda s: not s["armed"])   # then none for 0.3 s
        assert status["last_disarm"].startswith("watchdog: no forecast for")
        assert h.metrics.count("loopcast_errors_total", kind="watchdog") == 1
        await h.send_forecast(0.9)                 # forecasts resume: nothing fires until an arm
        await h.processed(2)
        assert h.triggers.empty()
        await h.arm()
        await h.send_forecast(0.9)
        async with asyncio.timeout(TIMEOUT):
            assert (await h.triggers.get()).seq == 3
    run(mqtt_broker, body, watchdog_s=0.3)
