"""Causal spike-net training on small simulated fish: data windows, export as a 'spikes' engine, ONNX parity,
the engine runtime, broken manifests, the CLI, and a trained net beating the first-difference baseline."""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
import torch

from loopcast.cli import main
from loopcast.config import load_config
from loopcast.models.linear import NLinear, NLinearConfig
from loopcast.models.spikenet import SpikeNet, causal_windows
from loopcast.offline_training.export.engine import ExportError, export_engine
from loopcast.offline_training.spikes.eval import engine_predictor, evaluate_spikes, first_difference
from loopcast.offline_training.spikes.train import (
    SpikeData,
    SpikeTrainConfig,
    SpikeTrainResult,
    build_data,
    causal_dff_traces,
    evaluate_recording,
    export_spike_net,
    fit_spike_net,
    recording_arrays,
    recording_dir,
    sample_batch,
)
from loopcast.offline_training.trace.train import TrainConfig
from loopcast.realtime.engines.loader import load_engine
from loopcast.realtime.engines.manifest import EngineError, EngineManifest
from loopcast.realtime.preprocess.dff import DffConfig, causal_dff_reference
from loopcast.replay.fish import FishConfig

BROKEN = Path(__file__).resolve().parents[1] / "broken" / "manifests"
FISH = FishConfig(shape=(48, 40, 8), n_neurons=200, n_ensembles=4)
TINY = SpikeTrainConfig(context=16, hidden=(16, 8), snrs=(4.0,), seeds=(0,), eval_seeds=(), n_frames=200,
                        fish=FISH, batch_size=512, steps_per_epoch=10, max_epochs=2, val_samples=4096, threads=1)


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("spike-work")


@pytest.fixture(scope="module")
def tiny_data(work: Path) -> SpikeData:
    return build_data(TINY, work, progress=False)


@pytest.fixture(scope="module")
def tiny_result(tiny_data: SpikeData) -> SpikeTrainResult:
    return fit_spike_net(TINY, tiny_data, progress=False)


@pytest.fixture(scope="module")
def spikes_engine(tmp_path_factory: pytest.TempPathFactory, tiny_result: SpikeTrainResult) -> Path:
    return export_spike_net(tiny_result, TINY, tmp_path_factory.mktemp("engines"))


def test_causal_dff_is_the_online_definition() -> None:
    f = np.random.default_rng(0).uniform(100, 200, size=(60, 9)).astype(np.float32)
    cfg = DffConfig(window=20, warmup=5)
    np.testing.assert_allclose(causal_dff_traces(f, cfg), causal_dff_reference(f, cfg), atol=1e-6)


def test_data_is_cached_and_split_by_time(work: Path, tiny_data: SpikeData) -> None:
    assert tiny_data.dff.shape == tiny_data.spikes.shape == (200, 200)
    assert tiny_data.first == TINY.dff.warmup + TINY.context - 1           # windows start past the warm-up
    val = tiny_data.val_frames
    assert val[0] - TINY.context + 1 == tiny_data.split and val[-1] == 199  # val windows hold only val frames
    cached = sorted(recording_dir(TINY, work, 4.0, 0).glob("causal_dff-*.npy"))
    assert len(cached) == 1
    dff, spikes = recording_arrays(TINY, work, 4.0, 0)
    np.testing.assert_array_equal(dff, tiny_data.dff)
    assert spikes.sum() > 0 and (spikes >= 0).all()


def test_training_batches_are_past_only_train_windows(tiny_data: SpikeData) -> None:
    rng = np.random.default_rng(0)
    x, y = sample_batch(tiny_data, rng, 64)
    assert x.shape == (1, TINY.context, 64) and y.shape == (1, 1, 64)
    rng = np.random.default_rng(0)
    frames = rng.integers(tiny_data.first, tiny_data.split, size=64)
    neurons = rng.integers(0, 200, size=64)
    assert frames.max() < tiny_data.split
    want = causal_windows(tiny_data.dff, TINY.context)[frames - TINY.context + 1, :, neurons]   # (B, C)
    np.testing.assert_array_equal(x[0].numpy().T, want)
    np.testing.assert_array_equal(y[0, 0].numpy(), tiny_data.spikes[frames, neurons])


def test_interrupted_training_resumes_to_the_uninterrupted_result(tiny_data: SpikeData, tmp_path: Path) -> None:
    cfg = dataclasses.replace(TINY, max_epochs=3, patience=5)
    full = fit_spike_net(cfg, tiny_data, progress=False)
    ckpt = tmp_path / "resume.pt"
    cut = fit_spike_net(cfg, tiny_data, progress=False, checkpoint=ckpt, stop_after=1)
    assert [h["epoch"] for h in cut.history] == [1]
    resumed = fit_spike_net(cfg, tiny_data, progress=False, checkpoint=ckpt)
    assert resumed.history == full.history and resumed.best_epoch == full.best_epoch
    assert resumed.metrics == full.metrics
    for k, v in full.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[k], v), k
    with pytest.raises(ValueError, match="different training config .lr: checkpoint 0.001, now 0.01"):
        fit_spike_net(dataclasses.replace(cfg, lr=1e-2), tiny_data, progress=False, checkpoint=ckpt)


def test_manifest_and_config_of_a_spikes_engine(spikes_engine: Path, tiny_result: SpikeTrainResult) -> None:
    raw: dict[str, Any] = json.loads((spikes_engine / "manifest.json").read_text())
    assert spikes_engine.parts[-2:] == ("spikenet-c16-h1", "v0001")
    assert raw["task"] == "spikes" and raw["horizon"] == 1 and raw["lead_times"] == [0]
    assert raw["outputs"] == [{"name": "spikes", "shape": ["batch", 1, "neurons"], "dtype": "float32"}]
    assert raw["model_config"]["context"] == 16 and raw["n_neurons"] == 200
    assert raw["parity"]["max_abs_diff"] <= 1e-5
    assert set(raw["metrics"]["val"]) >= {"loss", "corr_median", "baseline_corr_median"}
    assert load_config(SpikeTrainConfig, spikes_engine / "config.toml") == TINY
    assert EngineManifest.load(spikes_engine).task == "spikes"
    assert len(tiny_result.history) == 2


def test_onnx_matches_torch_and_runs_in_the_engine_runtime(spikes_engine: Path,
                                                           tiny_result: SpikeTrainResult) -> None:
    session = ort.InferenceSession(str(spikes_engine / "model.onnx"), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(3).normal(0, 0.2, size=(3, 16, 57)).astype(np.float32)   # other B and N
    got = session.run(["spikes"], {"context": x})[0]
    with torch.no_grad():
        want = tiny_result.model(torch.from_numpy(x)).numpy()
    assert got.shape == (3, 1, 57) and np.max(np.abs(got - want)) <= 1e-5
    engine = load_engine(spikes_engine)
    y = engine.run(x[0, :, :1].repeat(200, axis=1))
    assert y.shape == (1, 200) and y.dtype == np.float32 and (y >= 0).all()
    np.testing.assert_allclose(y[0], want[0, 0, 0], rtol=1e-5)        # same window -> same count


def test_engine_and_torch_evaluate_alike(spikes_engine: Path, tiny_result: SpikeTrainResult, work: Path) -> None:
    rec = recording_dir(TINY, work, 4.0, 0)
    by_engine, by_torch = evaluate_recording(spikes_engine, rec), evaluate_recording(tiny_result.model, rec)
    assert by_engine["corr_median"] == pytest.approx(by_torch["corr_median"], abs=1e-4)
    assert by_engine["neurons"] > 100
    forecaster = export_engine(NLinear(NLinearConfig(4, 2)), TrainConfig(context=4, horizon=2), work / "eng",
                               200, {}, "sha256:x", "t")
    assert load_engine(forecaster).manifest.task == "forecast"
    with pytest.raises(ValueError, match="not 'spikes'"):
        engine_predictor(load_engine(forecaster))


def test_export_checks_task_and_horizon(tmp_path: Path, tiny_result: SpikeTrainResult) -> None:
    with pytest.raises(ExportError, match="task must be one of"):
        export_engine(tiny_result.model, TINY, tmp_path, 10, {}, "sha256:x", "t", task="spike")
    with pytest.raises(ExportError, match="horizon must be 1"):
        export_engine(NLinear(NLinearConfig(4, 2)), TrainConfig(context=4, horizon=2), tmp_path, 10, {},
                      "sha256:x", "t", task="spikes")


@pytest.mark.parametrize("path", sorted(BROKEN.glob("*.json")), ids=lambda p: p.stem)
def test_broken_manifest_gives_its_error(path: Path, spikes_engine: Path, tmp_path: Path) -> None:
    case = json.loads(path.read_text())
    if case["base"] == "spikes":
        vdir = shutil.copytree(spikes_engine, tmp_path / "e" / "v0001")
    else:
        vdir = export_engine(NLinear(NLinearConfig(4, 8)), TrainConfig(), tmp_path / "reg", 5, {}, "sha256:x", "t")
    raw = json.loads((vdir / "manifest.json").read_text())
    for key, value in case["manifest"].items():
        raw.pop(key) if value is None else raw.__setitem__(key, value)
    (vdir / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(EngineError) as err:
        EngineManifest.load(vdir)
    assert case["expect"] in str(err.value) and "manifest.json" in str(err.value)


def test_manifest_without_task_is_a_forecaster(spikes_engine: Path, tmp_path: Path) -> None:
    vdir = shutil.copytree(spikes_engine, tmp_path / "e" / "v0001")
    raw = json.loads((vdir / "manifest.json").read_text())
    del raw["task"]
    (vdir / "manifest.json").write_text(json.dumps(raw))
    assert EngineManifest.load(vdir).task == "forecast"


def test_cli_train_spikes(work: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sets = [f'paths.engines="{tmp_path}/engines"', f'paths.runs="{tmp_path}/runs"', "train_spikes.context=16",
            "train_spikes.hidden=[16, 8]", "train_spikes.snrs=[4.0]", "train_spikes.seeds=[0]",
            "train_spikes.eval_seeds=[]", "train_spikes.n_frames=200", "train_spikes.fish.shape=[48, 40, 8]",
            "train_spikes.fish.n_neurons=200", "train_spikes.fish.n_ensembles=4", "train_spikes.max_epochs=1",
            "train_spikes.steps_per_epoch=5", "train_spikes.batch_size=256", "train_spikes.val_samples=1024"]
    argv = ["train-spikes", "--work-dir", str(work), *(a for s in sets for a in ("-s", s))]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "val: spike correlation" in out and "first-difference baseline" in out
    assert load_engine(tmp_path / "engines" / "spikenet-c16-h1").manifest.task == "spikes"
    assert main(["train-spikes", "-s", "train_spikes.dff.window=10"]) == 2          # derived from the pipeline
    assert main(["train-spikes", "-s", 'train_spikes.loss="l1"']) == 2


def test_trained_net_beats_first_difference_on_a_held_out_fish(work: Path) -> None:
    cfg = dataclasses.replace(TINY, context=24, hidden=(32, 16), seeds=(1, 2), n_frames=400,
                              fish=dataclasses.replace(FISH, n_neurons=300), batch_size=2048,
                              steps_per_epoch=40, max_epochs=8, patience=3, lr=3e-3)
    result = fit_spike_net(cfg, build_data(cfg, work, progress=False), progress=False)
    dff, spikes = recording_arrays(cfg, work, 4.0, 7)                    # a fish it never saw
    held_out = evaluate_spikes(result.model, dff, spikes, cfg.first_frame)
    assert isinstance(result.model, SpikeNet)
    assert held_out["corr_median"] > held_out["baseline_corr_median"] + 0.02, held_out
    assert (first_difference(dff) >= 0).all()


def test_pipeline_stages_take_only_their_own_task(spikes_engine: Path) -> None:
    """A spikes engine is refused as the forecaster, and the spike stage runs it per frame."""
    from loopcast.realtime.forecast.stage import ForecastStage
    from loopcast.realtime.metrics import Metrics, MetricsConfig
    from loopcast.realtime.spikes.stage import SpikeConfig, make_spike_estimator
    engine = load_engine(spikes_engine)
    with pytest.raises(EngineError, match="'spikes' engine cannot run as the forecaster"):
        ForecastStage(engine, None, Metrics("t", MetricsConfig(enabled=False)))  # type: ignore[arg-type]
    m = engine.manifest
    est = make_spike_estimator(m.n_neurons, SpikeConfig(method="engine", engine=str(spikes_engine)), 0.9141)
    rng = np.random.default_rng(0)
    frames = rng.normal(0.0, 0.05, (m.context + 3, m.n_neurons)).astype(np.float32)
    outs = [est.process(f) for f in frames]
    assert not outs[m.context - 2].count.any() and est.ready
    window = np.ascontiguousarray(frames[-m.context:])
    np.testing.assert_allclose(outs[-1].count, np.maximum(engine.run(window)[0], 0), rtol=1e-6)


def test_a_spikes_engine_serves_any_neuron_count(spikes_engine: Path) -> None:
    """Per-neuron weights: the engine declared for the training fish runs at another N (e.g. a rig's)."""
    engine = load_engine(spikes_engine)
    m = engine.manifest
    n = m.n_neurons + 17
    engine.check_neurons(n)
    ctx = np.random.default_rng(1).normal(0.0, 0.05, (m.context, n)).astype(np.float32)
    out = engine.run(ctx)
    assert out.shape == (1, n)
    declared = load_engine(spikes_engine)                    # still at the manifest's N
    np.testing.assert_allclose(out[0, :m.n_neurons], declared.run(ctx[:, :m.n_neurons].copy())[0],
                               rtol=1e-5, atol=1e-7)   # each neuron sees only its own window
    with pytest.raises(EngineError, match="context shape"):
        engine.run(ctx[:, :m.n_neurons].copy())
