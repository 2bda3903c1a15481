"""Shared fixtures for the whole test suite.

`mqtt_broker`: one MQTT broker for the session, Mosquitto when installed, else embedded amqtt
(`pytest --mqtt-broker=embedded|mosquitto` forces one kind).
Tests sharing it must use their own topics (e.g. a unique rig name): retained messages persist
for the whole session.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest

from loopcast.settings import load_settings, new_run_dir
from loopcast.workflows import ensure_engine, ensure_recording

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


def tiny_overrides(root: Path) -> list[str]:
    """A small fish and model, fast to synthesize and train on 2 cores."""
    return [f'paths.recording="{root}/rec"', f'paths.engines="{root}/engines"', f'paths.runs="{root}/runs"',
            "rig.shape=[48, 32, 8]", "synth.fish.n_neurons=300", "synth.fish.n_ensembles=4",
            "synth.n_frames=500", "train.horizon=4", "train.max_epochs=5",
            "pipeline.preprocess.dff.warmup=5", "pipeline.preprocess.spikes.warmup=10"]


@pytest.fixture(scope="session")
def loop_setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """(root, overrides): a synthesized tiny recording and an engine trained and exported from it."""
    root = tmp_path_factory.mktemp("loop")
    overrides = tiny_overrides(root)
    cfg = load_settings(overrides=overrides)
    ensure_recording(cfg, progress=False)
    ensure_engine(cfg, new_run_dir(cfg, "train"), progress=False)
    return root, overrides
