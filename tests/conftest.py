"""Shared fixtures for the whole test suite.

`mqtt_broker`: one MQTT broker for the session, Mosquitto when installed, else embedded amqtt
(`pytest --mqtt-broker=embedded|mosquitto` forces one kind).
Tests sharing it must use their own topics (e.g. a unique rig name): retained messages persist
for the whole session.
"""
from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from loopcast.broker import Broker, BrokerKind, find_mosquitto, start_broker
from loopcast.settings import load_settings, new_run_dir
from loopcast.workflows import ensure_engine, ensure_recording


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


# --- pytest-xdist: `make test` runs `pytest -n 2 --dist loadfile` ------------------------------------------
# loadfile runs each file whole on one worker, so its module fixtures are built once per run. Files that share
# an expensive session fixture are made one unit here, so that one worker builds it, not both.
XDIST_UNITS = {"tests/test_e2e_activation.py": "tests/test_cli.py"}     # both use qf_sbm_engines


@pytest.hookimpl(optionalhook=True)                  # a hook of pytest-xdist, when it is installed
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    if config.getoption("dist", None) != "loadfile":
        return None                                   # any other --dist: xdist's own scheduler
    from xdist.scheduler import LoadFileScheduling

    class LoadFileWithUnits(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path = super()._split_scope(nodeid)
            return XDIST_UNITS.get(path, path)

    return LoadFileWithUnits(config, log)


@pytest.fixture(autouse=True)
def _torch_on_one_thread() -> None:
    """Every test starts with torch on one intra-op thread, whatever the test before it set (a training
    sets its config's `threads`). The tiny models here run several times slower on two threads than on
    one as soon as the other core is busy (a second pytest-xdist worker, another job)."""
    torch = sys.modules.get("torch")     # (loopcast.workflows, imported above, imports it)
    if torch is not None:
        torch.set_num_threads(1)


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


# Tiny QuantFormer and SBM trainings on the loop_setup recording (tests/test_cli.py, tests/test_e2e_activation.py).
QF_OVERRIDES = [
    "train_quantformer.context=8", "train_quantformer.horizon=4", "train_quantformer.model_options.patch=4",
    "train_quantformer.model_options.d_model=16", "train_quantformer.model_options.n_heads=2",
    "train_quantformer.model_options.n_layers=1", "train_quantformer.model_options.codebook_size=16",
    "train_quantformer.model_options.code_dim=8",
    "train_quantformer.pretrain_epochs=1", "train_quantformer.finetune_epochs=1",
    "train_quantformer.max_train_windows=64", "train_quantformer.neurons_per_batch=32",
    "train_quantformer.max_eval_windows=32", "train_quantformer.export_forecaster=false",
    "train_quantformer.max_context=8", "train_quantformer.threads=1"]
SPIKE_WARMUP = 20   # OASIS warm-up frames: the SBM's input starts after them (live and in training)
SBM_OVERRIDES = [
    "train_sbm.context=4", "train_sbm.max_steps=3", 'train_sbm.optimizer="adamw"', "train_sbm.threads=1",
    "train_sbm.eval.rollout_steps=2", "train_sbm.model_options.d_model=8", "train_sbm.model_options.n_layers=1",
    "train_sbm.model_options.cluster_size=64", f"pipeline.preprocess.spikes.oasis.warmup={SPIKE_WARMUP}"]


@dataclass(frozen=True)
class QfSbmEngines:
    """What `loopcast train-sbm` and `loopcast train-quantformer` left: engine entries, run dirs, stdout."""

    quantformer: Path            # <registry>/quantformer-act-c8-h4, its one version v0001
    sbm: Path                    # <registry>/sbm-c4-h1
    runs: dict[str, Path]        # command -> its --run-dir
    stdout: dict[str, str]       # command -> what it printed
    overrides: list[str]         # loop_setup's, plus QF_OVERRIDES and SBM_OVERRIDES


@pytest.fixture(scope="session")
def qf_sbm_engines(loop_setup: tuple[Path, list[str]], tmp_path_factory: pytest.TempPathFactory) -> QfSbmEngines:
    """QuantFormer (activation) and SBM engines trained once per session by the real console commands on
    the loop_setup recording, into a registry of their own (loop_setup's holds only its trace engine).
    Each training with its export is the slowest part of the tests that need it: they share it."""
    import contextlib
    import io

    from loopcast.cli import main
    _, overrides = loop_setup
    root = tmp_path_factory.mktemp("qf-sbm")
    sets = [*overrides, *QF_OVERRIDES, *SBM_OVERRIDES]
    argv = [a for s in [*sets, f'paths.engines="{root}/engines"'] for a in ("-s", s)]
    runs, stdout = {}, {}
    for command in ("train-sbm", "train-quantformer"):
        runs[command], out = root / command, io.StringIO()
        with contextlib.redirect_stdout(out):
            code = main([command, *argv, "--run-dir", str(runs[command])])
        stdout[command] = out.getvalue()
        assert code == 0, f"loopcast {command} exited {code}:\n{stdout[command][-3000:]}"
    return QfSbmEngines(root / "engines" / "quantformer-act-c8-h4", root / "engines" / "sbm-c4-h1", runs, stdout,
                        sets)


# --- tiny real engines (torch modules exported through offline_training.export.engine) ----------------------
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

    from loopcast.offline_training.export.engine import export_engine
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
