"""Video engines: export (ONNX + torch program + manifest, parity-checked, atomic) and evaluation of
video forecasters against trace baselines on the same ZAPBench test targets."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from loopcast.models.zoo import build_model
from loopcast.offline_training.eval.harness import EvalConfig, baseline_forecasters, scoring_windows
from loopcast.offline_training.export.engine import ExportError
from loopcast.offline_training.export.versions import list_engines
from loopcast.offline_training.video.data import VideoData, VideoDataConfig, prepare_video
from loopcast.offline_training.video.eval import evaluate_video, is_video_engine
from loopcast.offline_training.video.export import export_video_engine
from loopcast.offline_training.video.forecasters import VideoEngineForecaster, VideoTorchForecaster
from loopcast.offline_training.video.train import VideoTrainConfig
from loopcast.realtime.engines.loader import load_engine
from loopcast.replay.fish import FishConfig
from loopcast.replay.synth import SynthConfig, synthesize

C, H, SR = 2, 3, 1
CFG = VideoTrainConfig(context=C, horizon=H, seed=3, model_options={
    "features": 8, "features_sr": 8, "groups": 4, "downsample": ((2, 2, 1),), "super_resolution": SR,
    "lead_dim": 8})
NAME = f"video_unet-c{C}-h{H}"
EVAL = EvalConfig(max_context=4, batch_size=8)
MANIFEST_KEYS = {"format", "format_version", "name", "version", "task", "signal", "model", "model_config",
                 "context", "horizon", "lead_times", "n_neurons", "inputs", "outputs", "video", "normalisation",
                 "metrics", "parity", "data", "code_version", "created", "files"}


@pytest.fixture(scope="module")
def recording(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny synthesized recording with its level-2 dF/F video prepared."""
    out = tmp_path_factory.mktemp("videorec") / "tiny"
    fish = FishConfig(seed=7, shape=(48, 32, 8), n_neurons=100, n_ensembles=4, nucleus_radius_vox=(3.0, 3.0, 1.0))
    synthesize(SynthConfig(fish=fish, n_frames=200, baseline_stride=4), out, progress=False)
    prepare_video(out, progress=False)
    return out


@pytest.fixture(scope="module")
def data(recording: Path) -> VideoData:
    return VideoData(recording, super_resolution=SR)


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(CFG.model, CFG.model_config()).eval()


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory, model: torch.nn.Module, data: VideoData) -> Path:
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("video-engines")
    export_video_engine(model, CFG, root, data, {"val": {"mae": 0.5}}, "fp123", "synthetic:video-test")
    return root


@torch.no_grad()
def _torch_frames(model: torch.nn.Module, volumes: np.ndarray, lead: np.ndarray) -> np.ndarray:
    return model(torch.from_numpy(volumes), torch.from_numpy(lead)).numpy()


@pytest.mark.parametrize("runtime", ["onnxruntime", "torch"])
def test_engine_runs_like_the_model(registry: Path, model: torch.nn.Module, data: VideoData,
                                    runtime: str) -> None:
    manifest = json.loads((registry / NAME / "v0001" / "manifest.json").read_text())
    if runtime == "torch" and "torch" not in manifest["files"]:
        pytest.skip("torch.export could not capture the model: no model.pt2")
    engine = load_engine(registry / NAME, runtime=runtime)
    assert engine.manifest.task == "video" and engine.version.endswith("v0001")
    if runtime == "torch":   # the archive holds the program, not the exporter's example batch of volumes
        assert torch.export.load(str(registry / NAME / "v0001" / "model.pt2")).example_inputs is None
    volumes = data.inputs(np.array([5, 40, 120]), C)                      # (3, C, X, Y, Z)
    for lead in (np.array([1, 2, 3]), np.array([3, 3, 1])):
        got = engine.run_video(volumes, lead)
        np.testing.assert_allclose(got, _torch_frames(model, volumes, lead), atol=1e-4, rtol=0)
    one = engine.run_video(volumes[:1], np.array([H]))
    assert one.shape == (1, *data.output_shape)


def test_manifest_follows_the_contract(registry: Path, model: torch.nn.Module, data: VideoData) -> None:
    vdir = registry / NAME / "v0001"
    m = json.loads((vdir / "manifest.json").read_text())
    assert set(m) == MANIFEST_KEYS
    x, y, z = data.input_shape
    assert (m["task"], m["model"], m["context"], m["horizon"]) == ("video", "video_unet", C, H)
    assert m["lead_times"] == list(range(1, H + 1)) and m["n_neurons"] == data.n_neurons == 100
    assert m["inputs"] == [{"name": "volumes", "shape": ["batch", C, x, y, z], "dtype": "float32"},
                           {"name": "lead_time", "shape": ["batch"], "dtype": "int64"}]
    assert m["outputs"] == [{"name": "frame", "shape": ["batch", *data.output_shape], "dtype": "float32"}]
    assert m["video"] == data.manifest_video()
    assert m["video"]["dff"]["baseline"] == "centered" and m["video"]["super_resolution"] == SR
    assert m["model_config"]["features"] == 8 and m["model_config"]["context"] == C
    assert m["parity"]["max_abs_diff"] <= m["parity"]["tolerance"] == 1e-4
    assert m["metrics"] == {"val": {"mae": 0.5}}
    assert m["data"] == {"fingerprint": "fp123", "source": "synthetic:video-test"}
    assert m["files"]["onnx"] == "model.onnx" and m["files"]["config"] == "config.toml"
    assert all((vdir / f).is_file() for f in m["files"].values())
    assert "context = 2" in (vdir / "config.toml").read_text()
    assert not [p for p in (registry / NAME).iterdir() if p.name.startswith(".")]  # no staging left


def test_parity_failure_publishes_nothing(tmp_path: Path, model: torch.nn.Module, data: VideoData) -> None:
    with pytest.raises(ExportError, match="tolerance"):
        export_video_engine(model, CFG, tmp_path, data, {}, "fp", "src", tolerance=-1.0)
    assert list_engines(tmp_path) == {}
    assert list((tmp_path / NAME).iterdir()) == []       # the staging directory was removed too


def test_export_rejects_a_model_for_other_data(tmp_path: Path, model: torch.nn.Module,
                                               recording: Path) -> None:
    with pytest.raises(ExportError, match="super_resolution"):
        export_video_engine(model, CFG, tmp_path, VideoData(recording, super_resolution=0), {}, "fp", "src")


def test_torch_forecaster_equals_a_naive_loop(model: torch.nn.Module, data: VideoData) -> None:
    starts = np.array([0, 17, 150])
    got = VideoTorchForecaster(model, data, lead_batch=2).predict(None, None, 0, starts)
    want = np.empty((len(starts), H, data.n_neurons), np.float32)
    for i, s in enumerate(starts):
        volumes = data.inputs(np.array([s]), C)                            # (1, C, X, Y, Z)
        for h in range(1, H + 1):
            want[i, h - 1] = data.reducer.reduce(_torch_frames(model, volumes, np.array([h])))[0]
    assert got.shape == (3, H, data.n_neurons)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def test_engine_forecaster_equals_torch_forecaster(registry: Path, model: torch.nn.Module,
                                                   data: VideoData) -> None:
    engine = VideoEngineForecaster(load_engine(registry / NAME), data, lead_batch=3)
    assert (engine.context, engine.horizon) == (C, H)
    starts = np.array([3, 99])
    want = VideoTorchForecaster(model, data).predict(None, None, 0, starts)
    np.testing.assert_allclose(engine.predict(None, None, 0, starts), want, atol=1e-4, rtol=0)


def test_evaluate_video_scores_video_and_baselines_on_the_same_targets(
        registry: Path, model: torch.nn.Module, data: VideoData) -> None:
    video = {"video": VideoEngineForecaster(load_engine(registry / NAME), data)}
    trace = baseline_forecasters(["mean", "last"], [C], H, data.traces, data.offsets, None, EVAL)
    result = evaluate_video(video, data, trace, EVAL, progress=False)
    assert result.models == ("video", "mean-c2", "last") and result.baselines == {"mean-c2", "last"}
    assert result.meta["video"]["models"] == ["video"]
    rows = {r["model"]: r for r in result.table() if r["condition"] == "average"}
    assert set(rows) == {"video", "mean-c2", "last"}
    assert all(np.isfinite(rows[m]["mean"]) for m in rows)
    assert [c.name for c in result.conditions][:2] == ["gain", "dots"]
    # the video MAE recomputed by hand on the scored windows' trace targets
    _, starts = scoring_windows(data.offsets, C, H, EVAL, data.rec.condition_names)
    k = next(k for k, s in starts.items() if len(s))
    pred = VideoTorchForecaster(model, data).predict(None, None, k, starts[k])
    mae = np.abs(pred - data.all_targets(starts[k], C, H)).mean(axis=(0, 2))
    np.testing.assert_allclose(result.mae["video"][k], mae, atol=1e-5)


def test_mismatched_data_is_refused(registry: Path, model: torch.nn.Module, recording: Path) -> None:
    engine = load_engine(registry / NAME)
    cropped = VideoData(recording, VideoDataConfig(crop_y=6), super_resolution=SR)
    with pytest.raises(ValueError, match="crop_y.*input_shape|input_shape.*crop_y"):
        VideoEngineForecaster(engine, cropped)
    with pytest.raises(ValueError, match="super_resolution"):
        VideoEngineForecaster(engine, VideoData(recording, super_resolution=0))
    with pytest.raises(ValueError, match="super_resolution"):
        VideoTorchForecaster(model, VideoData(recording, super_resolution=0))


def test_is_video_engine(registry: Path, tmp_path: Path) -> None:
    assert is_video_engine(registry / NAME) and is_video_engine(registry / NAME / "v0001")
    trace = tmp_path / "trace" / "v0001"
    shutil.copytree(registry / NAME / "v0001", trace)
    manifest = json.loads((trace / "manifest.json").read_text())
    (trace / "manifest.json").write_text(json.dumps({**manifest, "task": "forecast"}))
    assert not is_video_engine(trace.parent)
