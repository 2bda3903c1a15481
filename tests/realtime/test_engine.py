from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from models.linear import NLinear, NLinearConfig
from offline_training.export import export_engine
from offline_training.train import TrainConfig
from realtime.engine import EngineError, EngineManifest, OnnxEngine, load_engine, resolve_engine

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
    code = ("import sys, realtime.engine; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'models', 'offline_training')]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[2])
