"""Each local broker kind carries a QoS-1 publish/subscribe round trip and a retained message."""
from __future__ import annotations

import asyncio
import socket
import uuid

import aiomqtt
import pytest

from loopcast.broker import Broker, BrokerKind, EmbeddedBroker, MosquittoBroker, find_mosquitto, start_broker

pytestmark = pytest.mark.timeout(30)

KINDS = [
    "embedded",
    pytest.param("mosquitto", marks=pytest.mark.skipif(find_mosquitto() is None,
                                                         reason="mosquitto binary not installed")),
]


async def _round_trip(host: str, port: int) -> tuple[aiomqtt.Message, aiomqtt.Message]:
    base = f"loopcast/test-{uuid.uuid4().hex[:8]}"  # the session broker is shared: own topics, own ids
    async with aiomqtt.Client(host, port, identifier=f"{base}-sub") as sub, \
            aiomqtt.Client(host, port, identifier=f"{base}-pub") as pub:
        await sub.subscribe(f"{base}/#", qos=1)
        await pub.publish(f"{base}/status", b"retained", qos=1, retain=True)
        await pub.publish(f"{base}/trigger", b'{"x":1}', qos=1)
        got = []
        async with asyncio.timeout(5):
            async for message in sub.messages:
                if not message.topic.matches(f"{base}/#"):
                    continue  # amqtt 0.12 also sends retained messages of other clients' subscriptions
                got.append(message)
                if len(got) == 2:
                    break
    async with aiomqtt.Client(host, port, identifier=f"{base}-late") as late:
        await late.subscribe(f"{base}/status", qos=1)
        async with asyncio.timeout(5):
            async for retained in late.messages:
                if retained.topic.matches(f"{base}/status"):
                    break
    return got[1], retained


@pytest.mark.parametrize("kind", KINDS)
def test_qos1_round_trip(kind: BrokerKind) -> None:
    with start_broker(kind) as broker:
        assert isinstance(broker, Broker) and broker.kind == kind and broker.port > 0
        message, retained = asyncio.run(_round_trip(broker.host, broker.port))
    assert message.topic.value.endswith("/trigger")
    assert message.payload == b'{"x":1}' and message.qos == 1
    assert retained.payload == b"retained" and retained.retain


@pytest.mark.parametrize("kind", KINDS)
def test_stop_releases_port(kind: str) -> None:
    broker = EmbeddedBroker() if kind == "embedded" else MosquittoBroker()
    broker.start()
    port = broker.port
    broker.stop()
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0


def test_session_fixture_is_usable(mqtt_broker: Broker) -> None:
    message, _ = asyncio.run(_round_trip(mqtt_broker.host, mqtt_broker.port))
    assert message.qos == 1


def test_unknown_kind_is_rejected() -> None:
    with pytest.raises(ValueError, match="unknown broker kind"):
        start_broker("rabbit")  # type: ignore[arg-type]
