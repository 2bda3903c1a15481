"""The torch and TensorRT runtimes (realtime.engines.torch_runtime, realtime.engines.tensorrt) against ONNX Runtime.

TensorRT tests need `tensorrt` and a CUDA device and are skipped without them; the error paths, the
parity check and the CPU torch runtime run everywhere.
"""
from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from loopcast.models.zoo import build_model
from loopcast.offline_training.export.engine import export_engine
from loopcast.offline_training.trace.train import TrainConfig
from loopcast.realtime.engines.loader import load_engine
from loopcast.realtime.engines.manifest import EngineError
from loopcast.realtime.engines.onnx_runtime import OnnxEngine
from loopcast.realtime.engines.tensorrt import (
    PARITY_ATOL,
    TensorRTEngine,
    build_plan,
    check_trt_parity,
    fp16_available,
    parity_batch,
    plan_name,
)
from loopcast.realtime.engines.torch_runtime import TorchEngine

N, C, H, K = 16, 4, 8, 3
HAS_CUDA = torch.cuda.is_available()
HAS_TRT = importlib.util.find_spec("tensorrt") is not None
needs_trt = pytest.mark.skipif(not (HAS_TRT and HAS_CUDA), reason="TensorRT tests need `tensorrt` "
                               "(pip install tensorrt-cu12) and a CUDA device")
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
MODELS = {"nlinear": {"context": C, "horizon": H},
          "tsmixer": {"context": C, "horizon": H, "n_neurons": N, "n_blocks": 1, "mlp_dim": 32},
          "tide": {"context": C, "horizon": H, "n_covariates": K, "hidden": 16, "temporal_hidden": 8}}
FORECASTERS = ("nlinear", "tsmixer")


@pytest.fixture(scope="module")
def engines(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A nlinear, a tsmixer and a TiDE (covariate) engine, exported to a tmp registry."""
    torch.set_num_threads(1)
    root, out = tmp_path_factory.mktemp("registry"), {}
    for name, cfg in MODELS.items():
        torch.manual_seed(0)
        model = build_model(name, cfg).eval()
        tcfg = TrainConfig(model=name, context=C, horizon=H, threads=1)
        out[name] = export_engine(model, tcfg, root, N, {"val": {}}, "sha256:test", "unit-test")
        assert (out[name] / json.loads((out[name] / "manifest.json").read_text())["files"]["torch"]).is_file()
    return out


def _copy(vdir: Path, tmp_path: Path) -> Path:
    dst = tmp_path / vdir.parent.name / vdir.name
    shutil.copytree(vdir, dst)
    return dst


def _edit_manifest(vdir: Path, **changes: Any) -> None:
    raw = json.loads((vdir / "manifest.json").read_text())
    raw.update(changes)
    (vdir / "manifest.json").write_text(json.dumps(raw))


def _batch(b: int, cov: bool = False, seed: int = 1) -> tuple[np.ndarray, np.ndarray | None]:
    rng = np.random.default_rng(seed)
    x = rng.normal(0, 0.3, size=(b, C, N)).astype(np.float32)
    return x, (rng.normal(0, 1, size=(b, C + H, K)).astype(np.float32) if cov else None)


# --- torch runtime -------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", FORECASTERS)
def test_torch_matches_onnxruntime(engines: dict[str, Path], name: str) -> None:
    ort_engine, torch_engine = OnnxEngine(engines[name]), TorchEngine(engines[name])
    assert torch_engine.runtime == "torch" and torch_engine.version == ort_engine.version
    x, _ = _batch(5)
    got = torch_engine.run_batch(x)
    assert got.shape == (5, H, N) and got.dtype == np.float32
    np.testing.assert_allclose(got, ort_engine.run_batch(x), rtol=0, atol=1e-5)
    y = torch_engine.run(x[0])
    assert y.shape == (H, N) and y.dtype == np.float32
    np.testing.assert_allclose(y, ort_engine.run(x[0]), rtol=0, atol=1e-5)


def test_torch_covariate_engine(engines: dict[str, Path]) -> None:
    ort_engine, torch_engine = OnnxEngine(engines["tide"]), TorchEngine(engines["tide"])
    x, cov = _batch(3, cov=True)
    assert cov is not None
    np.testing.assert_allclose(torch_engine.run_batch(x, cov), ort_engine.run_batch(x, cov), atol=1e-5)
    assert torch_engine.run(x[0], cov[0]).shape == (H, N)
    with pytest.raises(EngineError, match="needs stimulus covariates"):
        torch_engine.run(x[0])


def test_forecast_stage_serves_covariate_engine_of_the_rigs_k(engines: dict[str, Path]) -> None:
    """The stage feeds the frames' stimulus (see tests/realtime/test_multi_engine.py); it refuses a rig
    that sends another number of covariates."""
    from loopcast.realtime.forecast.stage import ForecastStage
    from loopcast.realtime.metrics import Metrics, MetricsConfig
    metrics = Metrics("test", MetricsConfig(enabled=False))
    stage = ForecastStage(OnnxEngine(engines["tide"]), None, metrics)  # type: ignore[arg-type]
    assert stage.n_covariates == K and stage.row_size(N) == N + K
    stage.check_stimulus(K)
    with pytest.raises(EngineError, match=f"takes {K} stimulus covariates; the rig sends rig.n_covariates = 26"):
        stage.check_stimulus(26)


def test_onnxruntime_without_memory_arena(engines: dict[str, Path]) -> None:
    """pipeline.forecast.memory_arena = false reaches the session; the outputs do not change."""
    from loopcast.realtime.forecast.stage import ForecastConfig, engine_loader
    off = engine_loader(ForecastConfig(memory_arena=False))(engines["tsmixer"])
    on = load_engine(engines["tsmixer"])
    assert isinstance(off, OnnxEngine) and isinstance(on, OnnxEngine)
    assert off.session.get_session_options().enable_cpu_mem_arena is False
    assert on.session.get_session_options().enable_cpu_mem_arena is True
    x, _ = _batch(2)
    np.testing.assert_array_equal(off.run_batch(x), on.run_batch(x))


def test_torch_bf16_precision(engines: dict[str, Path]) -> None:
    """precision "bf16" runs the program under bfloat16 autocast: float32 out, close to fp32, not equal."""
    from loopcast.realtime.forecast.stage import ForecastConfig, engine_loader
    bf16 = engine_loader(ForecastConfig(runtime="torch", precision="bf16"))(engines["tsmixer"])
    fp32 = load_engine(engines["tsmixer"], runtime="torch")
    x, _ = _batch(2)
    got, want = bf16.run_batch(x), fp32.run_batch(x)
    assert got.dtype == np.float32 and got.shape == want.shape
    assert 0 < np.abs(got - want).max() <= 0.05 * np.abs(want).max()
    with pytest.raises(EngineError, match="needs runtime 'torch'"):
        load_engine(engines["tsmixer"], precision="bf16")
    with pytest.raises(EngineError, match="unknown precision 'fp16'"):
        load_engine(engines["tsmixer"], runtime="torch", precision="fp16")
    with pytest.raises(ValueError, match="precision must be one of"):
        ForecastConfig(precision="fp16")


def test_load_engine_picks_runtime(engines: dict[str, Path]) -> None:
    assert isinstance(load_engine(engines["nlinear"], runtime="torch", threads=2), TorchEngine)
    assert isinstance(load_engine(engines["nlinear"], runtime="auto", device="cpu"), OnnxEngine)


def test_torch_missing_program_is_explained(engines: dict[str, Path], tmp_path: Path) -> None:
    vdir = _copy(engines["nlinear"], tmp_path)
    _edit_manifest(vdir, files={"onnx": "model.onnx", "config": "config.toml"})
    with pytest.raises(EngineError, match=r"manifest\.json.*re-export the engine with this version"):
        TorchEngine(vdir)
    (vdir / "model.onnx").rename(vdir / "x.onnx")
    _edit_manifest(vdir, files={"onnx": "x.onnx", "torch": "gone.pt2"})
    with pytest.raises(EngineError, match="gone.pt2 is missing"):
        TorchEngine(vdir)
    (vdir / "gone.pt2").write_bytes(b"not a zip")
    with pytest.raises(EngineError, match="gone.pt2.*cannot load"):
        TorchEngine(vdir)


def test_torch_bad_devices(engines: dict[str, Path]) -> None:
    with pytest.raises(EngineError, match="unknown device 'tpu'"):
        TorchEngine(engines["nlinear"], device="tpu")
    if not HAS_CUDA:
        with pytest.raises(EngineError, match="no CUDA device"):
            TorchEngine(engines["nlinear"], device="cuda")


@needs_cuda
def test_torch_on_cuda(engines: dict[str, Path]) -> None:
    engine = load_engine(engines["tsmixer"], runtime="torch", device="cuda")
    x, _ = _batch(3)
    np.testing.assert_allclose(engine.run_batch(x), OnnxEngine(engines["tsmixer"]).run_batch(x), atol=1e-4)


# --- TensorRT: what runs everywhere --------------------------------------------------------------------

@pytest.mark.skipif(HAS_TRT and HAS_CUDA, reason="this machine has TensorRT and CUDA")
def test_tensorrt_here_raises_clear_error(engines: dict[str, Path]) -> None:
    with pytest.raises(EngineError, match="TensorRT is not installed|needs a CUDA device"):
        TensorRTEngine(engines["nlinear"])
    with pytest.raises(EngineError, match="TensorRT is not installed|needs a CUDA device"):
        load_engine(engines["nlinear"], runtime="tensorrt", device="cuda")


def test_tensorrt_errors(engines: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(EngineError, match="needs a CUDA device, got device='cpu'"):
        TensorRTEngine(engines["nlinear"], device="cpu")
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # makes `import tensorrt` fail
    with pytest.raises(EngineError, match=r"TensorRT is not installed \(pip install tensorrt-cu12"):
        TensorRTEngine(engines["nlinear"])
    with pytest.raises(EngineError, match="TensorRT is not installed"):
        build_plan(engines["nlinear"] / "model.onnx", engines["nlinear"] / "x.plan", N)
    if not HAS_CUDA:
        monkeypatch.setitem(sys.modules, "tensorrt", types.ModuleType("tensorrt"))
        with pytest.raises(EngineError, match="needs a CUDA device; torch sees none"):
            TensorRTEngine(engines["nlinear"])


def test_check_trt_parity_tolerance(engines: dict[str, Path]) -> None:
    engine = OnnxEngine(engines["tsmixer"])  # stands in for a TensorRT engine: anything with run_batch
    inputs = parity_batch(engine)
    want = engine.run_batch(*inputs)
    assert check_trt_parity(engine, [want + PARITY_ATOL / 2], [inputs]) == pytest.approx(PARITY_ATOL / 2)
    with pytest.raises(EngineError, match="exceeds the fp16 tolerance"):
        check_trt_parity(engine, [want + 0.1], [inputs])
    with pytest.raises(EngineError, match="exceeds the fp16 tolerance"):
        check_trt_parity(engine, [np.full_like(want, np.nan)], [inputs])
    with pytest.raises(EngineError, match="shape"):
        check_trt_parity(engine, [want[:1]], [inputs])
    assert plan_name(16) == "model.fp16.n16.plan" and plan_name(7, fp16=False) == "model.fp32.n7.plan"


def _fake_tensorrt(inputs: dict[str, tuple[int, ...]], fp16: bool = True, parse_ok: bool = True,
                   plan: bytes | None = b"PLAN") -> tuple[types.ModuleType, dict[str, Any]]:
    """A stand-in `tensorrt` for the builder calls only (no CUDA needed); records what it is told."""
    trt: Any = types.ModuleType("tensorrt")             # attributes set below
    seen: dict[str, Any] = {"flags": [], "shapes": {}}
    trt.__version__ = "10.fake" if fp16 else "11.fake"
    trt.BuilderFlag = types.SimpleNamespace(**({"FP16": "fp16"} if fp16 else {}))
    trt.NetworkDefinitionCreationFlag = types.SimpleNamespace(STRONGLY_TYPED=1)
    trt.Logger = type("Logger", (), {"WARNING": 2, "__init__": lambda self, level: None})
    items = list(inputs.items())
    network = types.SimpleNamespace(num_inputs=len(items), get_input=lambda i: types.SimpleNamespace(
        name=items[i][0], shape=items[i][1]))
    profile = types.SimpleNamespace(set_shape=lambda name, *s: seen["shapes"].__setitem__(name, s))
    config = types.SimpleNamespace(set_flag=seen["flags"].append, add_optimization_profile=lambda p: 0)

    def create_network(flags: int) -> Any:
        seen["network_flags"] = flags
        return network

    trt.Builder = lambda logger: types.SimpleNamespace(
        create_network=create_network, create_builder_config=lambda: config,
        create_optimization_profile=lambda: profile, build_serialized_network=lambda net, cfg: plan)
    trt.OnnxParser = lambda net, logger: types.SimpleNamespace(
        parse_from_file=lambda p: parse_ok, num_errors=0 if parse_ok else 1, get_error=lambda i: "bad node")
    return trt, seen


def test_build_plan_calls(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, engines: dict[str, Path]) -> None:
    trt, seen = _fake_tensorrt({"context": (-1, C, -1), "covariates": (-1, C + H, K)})
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    out = build_plan(tmp_path / "model.onnx", tmp_path / "p.plan", N, max_batch=4)
    assert out.read_bytes() == b"PLAN" and seen["flags"] == ["fp16"] and seen["network_flags"] == 0
    assert seen["shapes"] == {"context": ((1, C, N), (1, C, N), (4, C, N)),
                              "covariates": ((1, C + H, K), (1, C + H, K), (4, C + H, K))}
    assert not list(tmp_path.glob(".*.tmp"))
    trt11, seen = _fake_tensorrt({"context": (-1, C, N)}, fp16=False)  # TensorRT 11: strongly typed
    monkeypatch.setitem(sys.modules, "tensorrt", trt11)
    onnx32 = shutil.copy(engines["nlinear"] / "model.onnx", tmp_path / "model.onnx")
    assert build_plan(onnx32, tmp_path / "q.plan", N).is_file() and seen["flags"] == []
    assert seen["network_flags"] == 1 << 1  # STRONGLY_TYPED, parsed from the fp16 copy of the graph
    _check_fp16_graph(tmp_path / "model.fp16.onnx", Path(onnx32))
    bad: list[tuple[dict[str, Any], tuple[int, ...], str]] = [
        ({"parse_ok": False}, (-1, C, N), "parser rejected.*bad node"),
        ({"plan": None}, (-1, C, N), "could not build a plan"), ({}, (-1, -1, N), "fixed steps")]
    for kwargs, shape, match in bad:
        monkeypatch.setitem(sys.modules, "tensorrt", _fake_tensorrt({"context": shape}, **kwargs)[0])
        with pytest.raises(EngineError, match=match):
            build_plan(tmp_path / "model.onnx", tmp_path / "r.plan", N)
    assert not (tmp_path / "r.plan").exists()


def _check_fp16_graph(fp16: Path, fp32: Path) -> None:
    """fp16 weights, float32 inputs/outputs, and ONNX Runtime agrees with the fp32 graph to fp16 accuracy."""
    import onnx
    import onnxruntime as ort
    graph = onnx.load(str(fp16)).graph
    types_ = {t.data_type for t in graph.initializer}
    assert onnx.TensorProto.FLOAT16 in types_ and onnx.TensorProto.FLOAT not in types_, types_
    assert all(v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT for v in [*graph.input, *graph.output])
    x = _batch(2)[0]
    run = [ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(None, {"context": x})[0]
           for p in (fp16, fp32)]
    np.testing.assert_allclose(run[0], run[1], rtol=PARITY_ATOL, atol=PARITY_ATOL)


def test_runtime_modules_import_no_model_code() -> None:
    code = ("import sys, loopcast.realtime.engines.torch_runtime, loopcast.realtime.engines.tensorrt; "
            "bad = [m for m in sys.modules if m.startswith(('loopcast.models', 'loopcast.offline_training'))]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-P", "-c", code], check=True, cwd=Path(__file__).resolve().parents[2])


# --- TensorRT on a CUDA machine ------------------------------------------------------------------------

def _plan(vdir: Path) -> Path:
    import tensorrt as trt
    return vdir / plan_name(N, fp16_available(trt))


@needs_trt
@pytest.mark.parametrize("name", FORECASTERS)
def test_tensorrt_builds_plan_and_matches_onnxruntime(engines: dict[str, Path], tmp_path: Path,
                                                      name: str) -> None:
    vdir = _copy(engines[name], tmp_path)
    engine = TensorRTEngine(vdir, max_batch=4)
    assert _plan(vdir).is_file() and engine.plan_path == _plan(vdir)
    assert engine.parity["max_abs_diff"] <= engine.atol + engine.rtol
    x, _ = _batch(6)  # > max_batch: served in chunks
    got, want = engine.run_batch(x), OnnxEngine(vdir).run_batch(x)
    assert got.shape == (6, H, N) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-2, atol=1e-2)
    np.testing.assert_allclose(engine.run(x[0]), want[0], rtol=1e-2, atol=1e-2)


@needs_trt
def test_tensorrt_reuses_cached_plan(engines: dict[str, Path], tmp_path: Path,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    vdir = _copy(engines["nlinear"], tmp_path)
    TensorRTEngine(vdir).close()
    stat = _plan(vdir).stat()

    def no_build(*args: Any, **kwargs: Any) -> Path:
        raise AssertionError("the cached plan should have been reused")

    monkeypatch.setattr("loopcast.realtime.engines.tensorrt.build_plan", no_build)
    engine = load_engine(vdir, runtime="tensorrt", device="cuda")
    assert isinstance(engine, TensorRTEngine)
    assert _plan(vdir).stat().st_mtime_ns == stat.st_mtime_ns
    assert not list(vdir.glob(".*.tmp"))


@needs_trt
def test_tensorrt_prebuilt_plan_and_covariates(engines: dict[str, Path], tmp_path: Path) -> None:
    vdir = _copy(engines["tide"], tmp_path)
    plan = build_plan(vdir / "model.onnx", vdir / "prebuilt.plan", N, max_batch=2)
    _edit_manifest(vdir, files={"onnx": "model.onnx", "tensorrt": plan.name})
    engine = TensorRTEngine(vdir)
    assert engine.plan_path == plan and not list(vdir.glob("model.*.plan"))
    x, cov = _batch(3, cov=True)
    np.testing.assert_allclose(engine.run_batch(x, cov), OnnxEngine(vdir).run_batch(x, cov),
                               rtol=1e-2, atol=1e-2)
