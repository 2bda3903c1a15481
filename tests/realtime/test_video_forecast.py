"""The video forecaster in the loop: raw frames -> causal voxel dF/F ring buffer -> video engine at the
configured lead times -> per-neuron forecasts, published with the trace models' header. Checked against
an offline reference built from the same real parts (downsample, VoxelDff, engine, reducer)."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from loopcast import app
from loopcast.models.zoo import build_model
from loopcast.offline_training.video.data import VideoData, VideoPrepConfig, prepare_video
from loopcast.offline_training.video.export import export_video_engine
from loopcast.offline_training.video.train import VideoTrainConfig
from loopcast.realtime.engines.loader import load_engine
from loopcast.realtime.engines.manifest import EngineError, EngineManifest
from loopcast.realtime.forecast.stage import ForecastStage
from loopcast.realtime.forecast.video import VideoForecastStage
from loopcast.realtime.forecast.video_reduce import VideoGrid, VolumeReducer
from loopcast.realtime.metrics import Metrics
from loopcast.realtime.pipeline import Pipeline
from loopcast.realtime.preprocess.voxel_dff import VoxelDff, downsample_xy
from loopcast.realtime.wire.codec import decode_forecast
from loopcast.realtime.wire.transport import Publisher, Subscriber
from loopcast.replay.fish import FishConfig
from loopcast.replay.layout import Recording
from loopcast.replay.player import RecordingSource
from loopcast.replay.synth import SynthConfig, synthesize
from loopcast.settings import LoopcastConfig, load_settings

C, H, FRAMES = 3, 4, 40
SHAPE = (48, 40, 8)
LEADS = (1, 3, 4)
CFG = VideoTrainConfig(context=C, horizon=H, seed=1, model_options={
    "features": 8, "features_sr": 8, "groups": 4, "downsample": ((2, 2, 1),), "lead_dim": 8})


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Recording, Path]:
    """A tiny recording (raw volumes, 10 x 10 x 8 after 4x downsampling, cropped to 8 rows in y) and a
    random-weight video engine exported from it."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("video-loop")
    fish = FishConfig(seed=5, shape=SHAPE, n_neurons=80, n_ensembles=4, nucleus_radius_vox=(3.0, 3.0, 1.0))
    synthesize(SynthConfig(fish=fish, n_frames=120, baseline_stride=4), root / "rec", progress=False)
    prepare_video(root / "rec", VideoPrepConfig(baseline="causal"), progress=False)
    cfg = dataclasses.replace(CFG, data=dataclasses.replace(CFG.data, crop_y=8))
    data = VideoData(root / "rec", cfg.data)
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.model_config()).eval()
    for name, p in model.named_parameters():  # FiLM starts at zero: make the lead time matter
        if "film" in name:
            torch.nn.init.normal_(p, std=0.2)
    path = export_video_engine(model, cfg, root / "engines", data, {}, "sha256:x", str(root / "rec"))
    return Recording.open(root / "rec"), path


def overrides(rec: Recording, path: Path) -> list[str]:
    return [f"rig.shape={list(SHAPE)}", f'pipeline.forecast.engine="{path}"',
            f"pipeline.forecast.lead_times={list(LEADS)}",
            "pipeline.forecast.lead_batch=2", "pipeline.preprocess.voxels.enabled=true",
            "pipeline.preprocess.voxels.dff.warmup=6", "pipeline.preprocess.voxels.dff.window=16",
            "pipeline.preprocess.voxels.dff.decimate=2", "pipeline.preprocess.dff.warmup=4",
            "pipeline.preprocess.spikes.warmup=4", f'paths.recording="{rec.root}"']


def run_loop(rec: Recording, path: Path) -> tuple[list, LoopcastConfig]:
    cfg = load_settings(overrides=overrides(rec, path))
    engine = load_engine(path)
    pub = Publisher("tcp://127.0.0.1:*", sndhwm=1000)
    sub = Subscriber(pub.endpoint, topics=(b"forecast/",), rcvhwm=1000)
    assert pub.wait_for_subscribers(1, 5)
    fc = cfg.pipeline.forecast
    stage = app.forecast_stage(engine, pub, Metrics("run"), rec.segmentation(), fc, path, load_engine)
    assert isinstance(stage, VideoForecastStage)
    pipe = Pipeline(cfg.pipeline, cfg.rig, RecordingSource(rec, cfg.rig.name, stop=FRAMES), rec.segmentation(),
                    stage, stage.metrics)
    report = pipe.run()
    msgs: list = []
    for _ in range(50):
        msgs += sub.recv_all(100, limit=1000)
        if len(msgs) >= report.forecasts:
            break
    pipe.close()
    sub.close()
    return [decode_forecast(m) for m in msgs], cfg


def video_block(manifest: EngineManifest) -> dict[str, Any]:
    assert manifest.video is not None
    return manifest.video


def reference(rec: Recording, path: Path, cfg: LoopcastConfig, seq: int) -> np.ndarray:
    """The forecast at frame `seq` recomputed offline: causal voxel dF/F of frames seq-C+1..seq."""
    engine = load_engine(path)
    vcfg = cfg.pipeline.preprocess.voxels
    vox = VoxelDff((SHAPE[0] // 4, SHAPE[1] // 4, SHAPE[2]), vcfg.dff)
    vols = [vox.process(downsample_xy(rec.read_volume(t), 4))[0].copy() for t in range(seq + 1)]
    y0, y1 = video_block(engine.manifest)["crop_y"]
    window = np.stack([v[:, y0:y1] for v in vols[-C:]])[None]                    # (1, C, X, Y, Z)
    frames = engine.run_video(np.repeat(window, len(LEADS), axis=0), np.asarray(LEADS, np.int64))
    grid = VideoGrid.from_manifest(video_block(engine.manifest))
    reducer = VolumeReducer(rec.segmentation(), grid, rec.n_neurons)
    return reducer.reduce(frames)


def test_the_loop_forecasts_match_the_offline_reference(setup: tuple[Recording, Path]) -> None:
    rec, path = setup
    forecasts, cfg = run_loop(rec, path)
    pre = cfg.pipeline.preprocess
    first = max(pre.dff.warmup, pre.voxels.dff.warmup, C) - 1
    assert [f.header.seq for f in forecasts] == list(range(first, FRAMES))
    head = forecasts[-1].header
    assert head.lead_times == LEADS and head.shape == (len(LEADS), rec.n_neurons)
    assert head.engine_version == load_engine(path).version and head.model == "video_unet"
    for f in (forecasts[0], forecasts[-1]):
        np.testing.assert_allclose(f.data, reference(rec, path, cfg, f.header.seq), atol=1e-5)
    assert np.ptp(forecasts[-1].data, axis=0).max() > 1e-4   # lead times give different forecasts


@pytest.mark.parametrize("runtime", ["onnxruntime", "torch"])
def test_runtime_reduced_traces_equal_reduced_frames(setup: tuple[Recording, Path], runtime: str) -> None:
    """run_video_traces (the torch runtime reduces on the engine's device) == reduce(run_video(...))."""
    rec, path = setup
    engine = load_engine(path, runtime=runtime)
    video = video_block(engine.manifest)
    reducer = VolumeReducer(rec.segmentation(), VideoGrid.from_manifest(video), rec.n_neurons)
    x = np.random.default_rng(3).standard_normal((3, C, *video["input_shape"])).astype(np.float32)
    lead = np.array([1, 2, 4])
    got = engine.run_video_traces(x, lead, reducer)
    assert got.shape == (3, rec.n_neurons) and got.dtype == np.float32
    np.testing.assert_allclose(got, reducer.reduce(engine.run_video(x, lead)), rtol=1e-5, atol=1e-6)
    assert np.ptp(got, axis=0).max() > 1e-4                                   # the lead times differ
    x_full, y_full = SHAPE[0] // 4, SHAPE[1] // 4
    whole = VolumeReducer(rec.segmentation(), VideoGrid(4, (0, y_full), 0, (x_full, y_full, SHAPE[2])),
                          rec.n_neurons)
    assert whole.output_shape != tuple(video["output_shape"])
    with pytest.raises(EngineError, match="reducer's grid"):
        engine.run_video_traces(x, lead, whole)


def test_torch_program_moves_to_another_device(setup: tuple[Recording, Path]) -> None:
    """Export baked the CPU into the lead-time embedding's arange and the input checks; the torch runtime
    rewrites them when it moves the program (the meta device stands in for CUDA)."""
    from loopcast.realtime.engines.torch_runtime import program_on
    _, path = setup
    manifest = load_engine(path).manifest
    module = program_on(torch.export.load(str(path / manifest.files["torch"])), "meta")
    x = torch.zeros((2, C, *video_block(manifest)["input_shape"]), device="meta")
    y = module(x, torch.ones(2, dtype=torch.int64, device="meta"))
    assert y.device.type == "meta" and tuple(y.shape) == (2, *video_block(manifest)["output_shape"])


def torch_pair(setup: tuple[Recording, Path], seed: int, **options: Any) -> tuple[Any, Any, VolumeReducer, np.ndarray]:
    """The engine on the torch runtime (CPU, fp32), the same with other load `options`, a reducer of its
    grid and a random (2, C, X, Y, Z) window."""
    rec, path = setup
    ref, other = load_engine(path, runtime="torch"), load_engine(path, runtime="torch", **options)
    video = video_block(ref.manifest)
    reducer = VolumeReducer(rec.segmentation(), VideoGrid.from_manifest(video), rec.n_neurons)
    x = np.random.default_rng(seed).standard_normal((2, C, *video["input_shape"])).astype(np.float32)
    return ref, other, reducer, x


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (runs on a GPU machine: docs/gpu.md)")
def test_cuda_reduction_matches_the_cpu(setup: tuple[Recording, Path]) -> None:
    """The torch runtime on CUDA reduces frames on the GPU; the traces match the CPU path (TF32 tolerance)."""
    cpu, gpu, reducer, x = torch_pair(setup, 5, device="cuda")
    lead = np.array([1, 4])
    want = reducer.reduce(cpu.run_video(x, lead))
    np.testing.assert_allclose(gpu.run_video_traces(x, lead, reducer), want, rtol=1e-2, atol=1e-3)


def test_bf16_video_traces_are_close_to_fp32(setup: tuple[Recording, Path]) -> None:
    fp32, bf16, reducer, x = torch_pair(setup, 4, precision="bf16")
    lead = np.array([1, 4])
    want, got = fp32.run_video_traces(x, lead, reducer), bf16.run_video_traces(x, lead, reducer)
    assert got.dtype == np.float32 and 0 < np.abs(got - want).max() <= 0.05 * np.abs(want).max()


def test_video_engine_needs_the_voxel_stage(setup: tuple[Recording, Path]) -> None:
    rec, path = setup
    cfg = load_settings(overrides=[*overrides(rec, path), "pipeline.preprocess.voxels.enabled=false"])
    pub = Publisher("tcp://127.0.0.1:*")
    stage = VideoForecastStage(load_engine(path), pub, Metrics("run"), rec.segmentation())
    pipe = Pipeline(cfg.pipeline, cfg.rig, RecordingSource(rec, cfg.rig.name, stop=3), rec.segmentation(),
                    stage, stage.metrics)
    with pytest.raises(EngineError, match="pipeline.preprocess.voxels.enabled = true"):
        pipe.step()
    pipe.close()


def test_stage_refusals(setup: tuple[Recording, Path], tmp_path: Path) -> None:
    rec, path = setup
    engine, pub = load_engine(path), Publisher("tcp://127.0.0.1:*")
    with pytest.raises(EngineError, match=r"lead_times \[5\] are outside"):
        VideoForecastStage(engine, pub, Metrics("run"), rec.segmentation(), lead_times=(1, 5))
    with pytest.raises(EngineError, match="cannot run as the forecaster"):
        ForecastStage(engine, pub, Metrics("run"))
    with pytest.raises(EngineError, match="call run_video"):
        engine.run(np.zeros((C, rec.n_neurons), np.float32))
    x = np.zeros((1, C, *video_block(engine.manifest)["input_shape"]), np.float32)
    with pytest.raises(EngineError, match=r"lead times must lie in \[1, 4\]"):
        engine.run_video(x, np.array([0]))
    with pytest.raises(EngineError, match="volumes shape"):
        engine.run_video(x[:, :, :-1], np.array([1]))
    with pytest.raises(ValueError, match="lead_batch"):
        VideoForecastStage(engine, pub, Metrics("run"), rec.segmentation(), lead_batch=0)
    pub.close()
