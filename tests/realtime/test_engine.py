from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from loopcast.models.linear import NLinear, NLinearConfig
from loopcast.offline_training.export.engine import export_engine
from loopcast.offline_training.trace.train import TrainConfig
from loopcast.realtime.engines.base import resolve_engine
from loopcast.realtime.engines.loader import load_engine
from loopcast.realtime.engines.manifest import EngineError, EngineManifest
from loopcast.realtime.engines.onnx_runtime import OnnxEngine

N = 16
CFG = TrainConfig(context=4, horizon=8, threads=1)


@pytest.fixture(scope="module")
def model() -> NLinear:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    return NLinear(NLinearConfig(4, 8)).eval()


@pytest.fixture(scope="module")
def engine_dir(tmp_path_factory: pytest.TempPathFactory, model: NLinear) -> Path:
    root = tmp_path_factory.mktemp("engines")
    return export_engine(model, CFG, root, N, {"val": {}}, "sha256:test", "unit-test")


def _copy(engine_dir: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "nlinear-c4-h8" / "v0001"
    shutil.copytree(engine_dir, dst)
    return dst


def test_run_matches_torch(engine_dir: Path, model: NLinear) -> None:
    engine = OnnxEngine(engine_dir.parent)
    assert engine.version == "nlinear-c4-h8/v0001"
    assert engine.manifest.lead_times == tuple(range(1, 9))
    x = np.random.default_rng(0).normal(0, 0.3, size=(4, N)).astype(np.float32)
    y = engine.run(x)
    assert y.shape == (8, N) and y.dtype == np.float32
    with torch.no_grad():
        want = model(torch.from_numpy(x)[None])[0].numpy()
    assert np.max(np.abs(y - want)) <= 1e-5
    assert isinstance(load_engine(engine_dir), OnnxEngine)


def test_rejects_wrong_neurons_shape_and_dtype(engine_dir: Path) -> None:
    engine = OnnxEngine(engine_dir)
    engine.check_neurons(N)
    with pytest.raises(EngineError, match=f"trained on {N} neurons"):
        engine.check_neurons(N + 1)
    with pytest.raises(EngineError, match="shape"):
        engine.run(np.zeros((4, N + 1), dtype=np.float32))
    with pytest.raises(EngineError, match="shape"):
        engine.run(np.zeros((1, 4, N), dtype=np.float32))
    with pytest.raises(EngineError, match="float32"):
        engine.run(np.zeros((4, N), dtype=np.float64))


def test_corrupt_manifest_names_the_file(engine_dir: Path, tmp_path: Path) -> None:
    vdir = _copy(engine_dir, tmp_path)
    (vdir / "manifest.json").write_text("{not json")
    with pytest.raises(EngineError, match=r"manifest\.json.*not valid JSON"):
        OnnxEngine(vdir)


def test_missing_or_wrong_field_is_named(engine_dir: Path, tmp_path: Path) -> None:
    vdir = _copy(engine_dir, tmp_path)
    raw = json.loads((vdir / "manifest.json").read_text())
    del raw["n_neurons"]
    (vdir / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(EngineError, match=r"manifest\.json.*'n_neurons'"):
        EngineManifest.load(vdir)
    raw["n_neurons"], raw["lead_times"] = N, [1, 2]
    (vdir / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(EngineError, match="lead_times"):
        EngineManifest.load(vdir)


def test_missing_onnx_file(engine_dir: Path, tmp_path: Path) -> None:
    vdir = _copy(engine_dir, tmp_path)
    (vdir / "model.onnx").unlink()
    with pytest.raises(EngineError, match="model.onnx is missing"):
        OnnxEngine(vdir)


def test_resolve_engine(engine_dir: Path, tmp_path: Path) -> None:
    assert resolve_engine(engine_dir) == engine_dir
    assert resolve_engine(engine_dir.parent) == engine_dir
    with pytest.raises(EngineError, match="loopcast train"):
        resolve_engine(tmp_path / "nothing-here")
    (tmp_path / "empty").mkdir()
    with pytest.raises(EngineError, match="loopcast train"):
        resolve_engine(tmp_path / "empty")
    name = tmp_path / "reg" / "nlinear-c4-h8"
    for v in ("v0002", "v0010", ".staging-abc"):
        (name / v).mkdir(parents=True)
    assert resolve_engine(name) == name / "v0010"
    with pytest.raises(EngineError, match="registry root"):
        resolve_engine(tmp_path / "reg")


def test_realtime_engine_imports_no_torch() -> None:
    code = ("import sys, loopcast.realtime.engines.loader; "
            "bad = [m for m in sys.modules if m.split('.')[0] == 'torch' "
            "or m.startswith(('loopcast.models', 'loopcast.offline_training'))]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-P", "-c", code], check=True, cwd=Path(__file__).resolve().parents[2])


# --- activation task and signal (toy engines from conftest.export_toy) -----------------------------------

def test_activation_engine_outputs_one_row_of_probabilities(toy_engines: dict[str, Path]) -> None:
    engine = OnnxEngine(toy_engines["act"])
    m = engine.manifest
    assert (m.task, m.signal, m.horizon, m.lead_times, m.output_rows) == ("activation", "dff", 2, (2,), 1)
    assert m.activation == {"criterion": "mean_dff_above", "threshold": 0.1, "window": 2}
    assert m.outputs[0].name == "activation"
    x = np.random.default_rng(0).normal(0, 0.3, size=(3, 10)).astype(np.float32)
    y = engine.run(x)
    assert y.shape == (1, 10) and y.dtype == np.float32
    np.testing.assert_allclose(y[0], 1 / (1 + np.exp(-(4 * x.mean(axis=0) - 1))), rtol=1e-5)
    assert engine.run_batch(np.stack([x, x, x])).shape == (3, 1, 10)


def test_signal_is_recorded_and_defaults_to_dff(toy_engines: dict[str, Path], engine_dir: Path) -> None:
    assert EngineManifest.load(toy_engines["spk"]).signal == "spike_prob"
    assert EngineManifest.load(toy_engines["mean"]).signal == "dff"
    assert json.loads((engine_dir / "manifest.json").read_text())["signal"] == "dff"
    assert EngineManifest.load(engine_dir).output_rows == 8


def test_forecaster_with_an_activation_shaped_output_is_refused(toy_engines: dict[str, Path],
                                                                tmp_path: Path) -> None:
    """A manifest that claims 'forecast' for the activation graph: the output-rows check catches it."""
    vdir = tmp_path / "toyact-c3-h2" / "v0001"
    shutil.copytree(toy_engines["act"], vdir)
    raw = json.loads((vdir / "manifest.json").read_text())
    raw.update(task="forecast", lead_times=[1, 2])
    del raw["activation"]
    raw["outputs"][0]["shape"] = ["batch", 2, "neurons"]
    (vdir / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(EngineError, match=r"output shape \(1, 1, 10\) != \(B, 2, N\)"):
        OnnxEngine(vdir).run(np.zeros((3, 10), np.float32))


@pytest.mark.parametrize("kw, match", [
    (dict(task="activation"), "needs extra="),
    (dict(task="activation", extra={"activation": {"criterion": "x", "threshold": 0.1, "window": 3}}),
     "window = horizon"),
    (dict(signal="spikes"), "signal must be one of"),
    (dict(extra={"horizon": 2}), r"may not override core fields \['horizon'\]"),
    (dict(task="activation", extra={"activation": {"criterion": "x", "threshold": "high", "window": 8}}),
     "exported manifest is invalid.*threshold a finite number"),
])
def test_export_checks_activation_signal_and_extra(model: NLinear, tmp_path: Path, kw: dict, match: str) -> None:
    from loopcast.offline_training.export.engine import ExportError
    with pytest.raises(ExportError, match=match):
        export_engine(model, CFG, tmp_path, N, {}, "sha256:test", "unit-test", **kw)
    assert not [p for p in tmp_path.rglob("*") if p.is_dir() and p.name.startswith("v")]
