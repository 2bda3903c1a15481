"""Shared fixtures for the whole test suite.

`mqtt_broker`: one MQTT broker for the session, Mosquitto when installed, else embedded amqtt
(`pytest --mqtt-broker=embedded|mosquitto` forces one kind).
Tests sharing it must use their own topics (e.g. a unique rig name): retained messages persist
for the whole session.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

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


# --- tiny real engines (torch modules exported through offline_training.export) ----------------------
TOY_N, TOY_C, TOY_H, TOY_K = 10, 3, 2, 2     # (C + H) * K == N: the covariate toy echoes every input
ACTIVATION_BLOCK = {"criterion": "mean_dff_above", "threshold": 0.1, "window": TOY_H}


@dataclass(frozen=True)
class ToyConfig:
    """Model config of the toy engines (saved into their manifests)."""

    n_neurons: int = TOY_N
    n_covariates: int = 0
    context: int = TOY_C
    horizon: int = TOY_H
    scale: float = 4.0


@dataclass(frozen=True)
class ToyExportConfig:
    """The training-config side of an export: model name, context, horizon, seed."""

    model: str
    context: int = TOY_C
    horizon: int = TOY_H
    seed: int = 0

    def model_config(self) -> dict[str, Any]:
        return {}


def toy_module(kind: str, scale: float = 4.0) -> Any:
    """A small torch module: 'act' (activation), 'cov' (covariate forecaster), 'mean' (forecaster)."""
    import torch
    from torch import nn

    class ToyActivation(nn.Module):
        """P(active) = sigmoid(scale * mean over the context - 1), per neuron."""

        def __init__(self) -> None:
            super().__init__()
            self.config = ToyConfig(scale=scale)
            self.scale = nn.Parameter(torch.tensor(scale))

        def forward(self, context: torch.Tensor) -> torch.Tensor:
            return torch.sigmoid(self.scale * context.mean(dim=1, keepdim=True) - 1.0)   # (B, 1, N)

    class ToyMean(nn.Module):
        """Every lead time: scale * the mean over the context, per neuron."""

        def __init__(self) -> None:
            super().__init__()
            self.config = ToyConfig(scale=scale)
            self.scale = nn.Parameter(torch.tensor(scale))

        def forward(self, context: torch.Tensor) -> torch.Tensor:
            mean = self.scale * context.mean(dim=1, keepdim=True)                        # (B, 1, N)
            return mean.repeat(1, TOY_H, 1)                                              # (B, H, N)

    class ToyCovariates(nn.Module):
        """Every lead time: the flattened covariates (C + H) * K = N values, plus 0 * the last context row
        (so the test can read back exactly what the engine was fed)."""

        uses_covariates = True

        def __init__(self) -> None:
            super().__init__()
            self.config = ToyConfig(n_covariates=TOY_K, scale=scale)

        def forward(self, context: torch.Tensor, covariates: torch.Tensor) -> torch.Tensor:
            flat = covariates.reshape(covariates.shape[0], 1, -1)                        # (B, 1, (C+H)K)
            return (flat + 0.0 * context[:, -1:, :]).repeat(1, TOY_H, 1)                 # (B, H, N)

    return {"act": ToyActivation, "mean": ToyMean, "cov": ToyCovariates}[kind]().eval()


@pytest.fixture(scope="session")
def export_toy() -> Callable[..., Path]:
    """export_toy(kind, registry, model=..., signal=..., scale=...) -> the exported version dir."""
    import torch

    from offline_training.export import export_engine
    torch.set_num_threads(1)

    def export(kind: str, registry: Path, model: str | None = None, signal: str = "dff",
               scale: float = 4.0) -> Path:
        task = "activation" if kind == "act" else "forecast"
        extra = {"activation": ACTIVATION_BLOCK} if task == "activation" else None
        cfg = ToyExportConfig(model=model or f"toy{kind}")
        return export_engine(toy_module(kind, scale), cfg, registry, TOY_N, {"val": {}}, "sha256:toy", "unit-test",
                             task=task, signal=signal, extra=extra)
    return export


@pytest.fixture(scope="session")
def toy_engines(tmp_path_factory: pytest.TempPathFactory, export_toy: Callable[..., Path]) -> dict[str, Path]:
    """Version dirs of the toy engines in one registry: act (activation on dF/F), cov (covariate
    forecaster), spk (forecaster on spike probabilities), mean (forecaster on dF/F)."""
    root = tmp_path_factory.mktemp("toy-registry")
    return {"act": export_toy("act", root), "cov": export_toy("cov", root),
            "spk": export_toy("mean", root, model="toyspk", signal="spike_prob"), "mean": export_toy("mean", root)}
