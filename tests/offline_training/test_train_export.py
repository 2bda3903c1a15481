from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
import torch

from loopcast.config import load_config
from models.linear import NLinear, NLinearConfig
from offline_training.export import ExportError, check_parity, export_engine
from offline_training.registry import list_engines, versions
from offline_training.train import TrainConfig, TrainResult, data_fingerprint, first_window, train
from realtime.engine import OnnxEngine, resolve_engine

CFG = TrainConfig(context=4, horizon=8, batch_size=16, max_epochs=12, patience=3, threads=1, lr=5e-3)
MANIFEST_KEYS = {"format", "format_version", "name", "version", "model", "model_config", "context",
                 "horizon", "lead_times", "n_neurons", "inputs", "outputs", "normalisation", "metrics",
                 "parity", "data", "code_version", "created", "files"}


@pytest.fixture(scope="module")
def trained(traces: np.ndarray, offsets: tuple[int, ...]) -> TrainResult:
    return train(traces, offsets, CFG, progress=False)


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory, trained: TrainResult, traces: np.ndarray,
             offsets: tuple[int, ...]) -> Path:
    root = tmp_path_factory.mktemp("engines")
    export_engine(trained.model, CFG, root, traces.shape[1], trained.metrics,
                  data_fingerprint(traces, offsets), "synthetic:test",
                  parity_input=first_window(traces, offsets, CFG))
    return root


def test_training_beats_mean_baseline(trained: TrainResult) -> None:
    val = trained.metrics["val"]
    assert len(val["model"]["mae_per_step"]) == CFG.horizon
    assert val["model"]["mae"] < 0.8 * val["mean_baseline"]["mae"], val
    assert val["conditions"] == ["condition0", "condition1", "condition2"]  # condition 3 held out
    assert trained.history and trained.best_epoch >= 1
    assert min(h["val_mae"] for h in trained.history) == pytest.approx(
        [h for h in trained.history if h["epoch"] == trained.best_epoch][0]["val_mae"])


def test_training_is_seeded(traces: np.ndarray, offsets: tuple[int, ...]) -> None:
    cfg = dataclasses.replace(CFG, max_epochs=2, steps_per_epoch=5)
    a = train(traces, offsets, cfg, progress=False).model.state_dict()
    b = train(traces, offsets, cfg, progress=False).model.state_dict()
    c = train(traces, offsets, dataclasses.replace(cfg, seed=1), progress=False).model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["linear.weight"], c["linear.weight"])


def test_checkpoint_resume_matches_uninterrupted(tmp_path: Path, traces: np.ndarray,
                                                 offsets: tuple[int, ...]) -> None:
    cfg = dataclasses.replace(CFG, max_epochs=4, steps_per_epoch=5, patience=10)
    full = train(traces, offsets, cfg, progress=False)
    ckpt = tmp_path / "run.pt"
    train(traces, offsets, dataclasses.replace(cfg, max_epochs=2), progress=False, checkpoint=ckpt)
    resumed = train(traces, offsets, cfg, progress=False, checkpoint=ckpt)
    assert [h["epoch"] for h in resumed.history] == [1, 2, 3, 4]
    for k, v in full.model.state_dict().items():
        assert torch.equal(v, resumed.model.state_dict()[k])
    with pytest.raises(ValueError, match="different training config"):
        train(traces, offsets, dataclasses.replace(cfg, lr=0.1), progress=False, checkpoint=ckpt)


def test_manifest_has_every_field(registry: Path, traces: np.ndarray) -> None:
    vdir = registry / "nlinear-c4-h8" / "v0001"
    manifest: dict[str, Any] = json.loads((vdir / "manifest.json").read_text())
    assert MANIFEST_KEYS <= set(manifest)
    assert manifest["format"] == "loopcast-engine" and manifest["format_version"] == 1
    assert (manifest["name"], manifest["version"]) == ("nlinear-c4-h8", "v0001")
    assert manifest["lead_times"] == list(range(1, 9)) and manifest["n_neurons"] == traces.shape[1]
    assert manifest["inputs"] == [{"name": "context", "shape": ["batch", 4, "neurons"], "dtype": "float32"}]
    assert manifest["outputs"][0]["shape"] == ["batch", 8, "neurons"]
    assert manifest["parity"]["max_abs_diff"] <= 1e-5 and manifest["parity"]["tolerance"] == 1e-5
    val = manifest["metrics"]["val"]
    assert val["model"]["mae"] < val["mean_baseline"]["mae"]
    assert manifest["data"]["fingerprint"].startswith("sha256:")
    assert {p.name for p in vdir.iterdir()} == {"model.onnx", "manifest.json", "config.toml"}
    assert load_config(TrainConfig, vdir / "config.toml") == CFG


def test_onnx_matches_torch_on_same_input(registry: Path, trained: TrainResult) -> None:
    session = ort.InferenceSession(str(registry / "nlinear-c4-h8" / "v0001" / "model.onnx"),
                                   providers=["CPUExecutionProvider"])
    x = np.random.default_rng(3).normal(0, 0.5, size=(3, 4, 33)).astype(np.float32)  # other B and N
    got = session.run(["forecast"], {"context": x})[0]
    with torch.no_grad():
        want = trained.model(torch.from_numpy(x)).numpy()
    assert got.shape == (3, 8, 33)
    assert np.max(np.abs(got - want)) <= 1e-5


def test_second_export_is_v0002_and_resolved(registry: Path, trained: TrainResult,
                                             traces: np.ndarray) -> None:
    path = export_engine(trained.model, CFG, registry, traces.shape[1], trained.metrics,
                         "sha256:x", "synthetic:test")
    assert path == registry / "nlinear-c4-h8" / "v0002"
    assert versions(registry / "nlinear-c4-h8") == ["v0001", "v0002"]
    assert list_engines(registry) == {"nlinear-c4-h8": ["v0001", "v0002"]}
    assert resolve_engine(registry / "nlinear-c4-h8") == path
    assert not [p for p in (registry / "nlinear-c4-h8").iterdir() if p.name.startswith(".")]
    engine = OnnxEngine(registry / "nlinear-c4-h8")
    assert engine.version == "nlinear-c4-h8/v0002"


def test_parity_failure_raises(registry: Path) -> None:
    torch.manual_seed(123)
    other = NLinear(NLinearConfig(4, 8)).eval()
    x = np.ones((1, 4, 5), dtype=np.float32)
    with pytest.raises(ExportError, match="max abs diff"):
        check_parity(registry / "nlinear-c4-h8" / "v0001" / "model.onnx", other, [x])


def test_failed_export_leaves_no_version(tmp_path: Path, trained: TrainResult) -> None:
    with pytest.raises(ExportError, match="parity_input shape"):
        export_engine(trained.model, CFG, tmp_path, 64, {}, "sha256:x", "t",
                      parity_input=np.zeros((3, 64), dtype=np.float32))
    assert list_engines(tmp_path) == {}
    assert list((tmp_path / "nlinear-c4-h8").iterdir()) == []


@pytest.mark.parametrize("model", ["tsmixer", "timemix"])
def test_mixer_models_train_export_and_run_in_the_engine_runtime(model: str, tmp_path: Path, traces: np.ndarray,
                                                                 offsets: tuple[int, ...]) -> None:
    """TSMixer gets the data's neuron count from training; both export with parity and run in ORT."""
    cfg = dataclasses.replace(CFG, model=model, max_epochs=2)
    result = train(traces, offsets, cfg, progress=False)
    n = traces.shape[1]
    assert getattr(result.model.config, "n_neurons", n) == n
    path = export_engine(result.model, cfg, tmp_path, n, result.metrics, data_fingerprint(traces, offsets),
                         "synthetic:test", parity_input=first_window(traces, offsets, cfg))
    engine = OnnxEngine(path)
    assert engine.manifest.model == model
    window = first_window(traces, offsets, cfg)
    with torch.no_grad():
        expected = result.model(torch.from_numpy(window)[None])[0].numpy()
    np.testing.assert_allclose(engine.run(window), expected, atol=1e-5)
