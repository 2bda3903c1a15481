"""Shared fixtures for the whole test suite.

`mqtt_broker`: one MQTT broker for the session, Mosquitto when installed, else embedded amqtt
(`pytest --mqtt-broker=embedded|mosquitto` forces one kind).
Tests sharing it must use their own topics (e.g. a unique rig name): retained messages persist
for the whole session.
"""
from __future__ import annotations

from typing import Iterator

import pytest

from loopcast.broker import Broker, BrokerKind, find_mosquitto, start_broker


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--mqtt-broker", choices=("auto", "mosquitto", "embedded"), default="auto",
                     help="MQTT broker for the tests: mosquitto if installed (auto), or force one")


def _broker_kind(config: pytest.Config) -> BrokerKind:
    return config.getoption("--mqtt-broker")


def pytest_report_header(config: pytest.Config) -> str:
    kind, binary = _broker_kind(config), find_mosquitto()
    if kind == "embedded" or (kind == "auto" and binary is None):
        which = "embedded amqtt" + (" (mosquitto not found)" if binary is None else "")
    else:
        which = f"mosquitto ({binary})"
    return f"loopcast mqtt_broker fixture: {which}"


@pytest.fixture(scope="session")
def mqtt_broker(pytestconfig: pytest.Config) -> Iterator[Broker]:
    """A running local MQTT broker (`.host`, `.port`, `.kind`) shared by the session."""
    broker = start_broker(_broker_kind(pytestconfig))
    try:
        yield broker
    finally:
        broker.stop()
