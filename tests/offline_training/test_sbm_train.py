"""SBM training and evaluation: window bounds past the warm-up, the metrics on hand-made arrays, the
rollout, the covariate alignment of the predictor, and a short train_sbm on a tiny simulated fish whose
engine (signal "spike_prob") loads and rolls out like the torch model."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from loopcast.config import load_config
from loopcast.models.sbm import SBMConfig, SparseBrainModel
from loopcast.offline_training.data.splits import condition_splits
from loopcast.offline_training.sbm.config import SBMData, SBMTrainConfig
from loopcast.offline_training.sbm.eval import (
    SBMEvalConfig,
    calibration,
    evaluate_predictor,
    growth,
    next_step_frames,
    next_step_mae,
    next_step_predictions,
    rollout,
    torch_predictor,
)
from loopcast.offline_training.sbm.fit import make_optimizers, teacher_loss
from loopcast.offline_training.sbm.train import SBMResult, load_data, train_sbm, warmup_end
from loopcast.realtime.engines.loader import load_engine
from loopcast.realtime.preprocess.dff import DffConfig
from loopcast.realtime.preprocess.stage import PreprocessConfig
from loopcast.realtime.spikes.oasis_params import OasisConfig
from loopcast.realtime.spikes.stage import SpikeConfig
from loopcast.replay.fish import FishConfig
from loopcast.replay.layout import Recording
from loopcast.replay.synth import SynthConfig, synthesize

PRE = PreprocessConfig(dff=DffConfig(warmup=5),
                       spikes=SpikeConfig(oasis=OasisConfig(warmup=20), fit_in_background=False))
SMALL = dict(d_model=16, n_heads=2, n_layers=1, cluster_size=32)
TINY = SBMTrainConfig(context=4, horizon=2, model_options=SMALL, batch_size=8, max_steps=30, val_per_epoch=2,
                      threads=1, device="cpu", eval=SBMEvalConfig(rollout_steps=4, rollout_starts=8))
OFFSETS = (0, 40, 100, 140, 200)


@pytest.fixture(scope="session")
def tiny_rec(tmp_path_factory: pytest.TempPathFactory) -> Recording:
    fish = FishConfig(shape=(48, 32, 8), n_neurons=200, n_ensembles=4)
    return synthesize(SynthConfig(fish=fish, n_frames=400, write_raw=False),
                      tmp_path_factory.mktemp("sbm") / "rec", progress=False)


@pytest.fixture(scope="session")
def trained(tiny_rec: Recording, tmp_path_factory: pytest.TempPathFactory) -> tuple[SBMResult, Path]:
    root = tmp_path_factory.mktemp("sbm-run")
    return train_sbm(tiny_rec, TINY, root / "engines", root / "run", progress=False, pre=PRE), root


def cyclic(t: int = 200, n: int = 7) -> np.ndarray:
    """probs[t, n] = ((t + n) % 10) / 10: the next frame is a known function of the last one."""
    return (((np.arange(t)[:, None] + np.arange(n)[None]) % 10) / 10).astype(np.float32)


def oracle(x: np.ndarray, cov: np.ndarray | None) -> np.ndarray:
    return (np.round(x[:, -1] * 10 + 1) % 10 / 10).astype(np.float32)


def test_windows_start_past_the_warmup_and_stay_in_their_ranges() -> None:
    probs = cyclic()
    probs[:30] = 0.0
    data = SBMData(probs, None, np.zeros((7, 3), np.float32), OFFSETS, warmup_end(probs))
    assert data.first == 30
    splits = condition_splits(OFFSETS, 4, max_context=4)
    for split in ("train", "val", "test"):
        for k, starts in data.starts(splits, split, 4, include_holdout=True).items():
            lo, hi = splits[k].span(split)  # type: ignore[misc]
            assert (starts >= max(lo, 30)).all() and (starts + 5 <= hi).all()
    assert set(data.starts(splits, "train", 4)) == {0, 1, 2}            # condition 3 is held out
    x, cov = data.batch(np.array([30, 31]), 4)
    assert x.shape == (2, 5, 7) and cov is None and torch.equal(x[1, 0], torch.from_numpy(probs[31]))


def test_a_perfect_predictor_scores_zero_and_is_calibrated() -> None:
    probs = cyclic()
    splits = condition_splits(OFFSETS, 4, holdout=(3,), max_context=4)
    rows = next_step_predictions(oracle, probs, None, splits, 4)
    mae = next_step_mae(rows)
    assert mae["train_conditions"]["model"] == pytest.approx(0.0, abs=1e-6)
    assert mae["holdout"]["model"] == pytest.approx(0.0, abs=1e-6)
    assert mae["train_conditions"]["last_value"] > 0.1                 # |+0.1| or |-0.9| per step
    metrics, _ = evaluate_predictor(oracle, probs, None, splits, 4, SBMEvalConfig(rollout_steps=5))
    cal = metrics["calibration"]["train_conditions"]
    assert cal["neuron_r"] == pytest.approx(1.0) and cal["slope"] == pytest.approx(1.0) and cal["ece"] < 1e-6
    assert max(metrics["rollout"]["train_conditions"]["model"]) < 1e-6


def test_calibration_of_a_scaled_predictor_and_a_noisy_one() -> None:
    rng = np.random.default_rng(0)
    target = rng.uniform(0, 1, size=(50, 30)) * rng.uniform(0.1, 1, size=30)
    cal = calibration(0.5 * target + 0.1, target, bins=5)
    assert cal["neuron_r"] == pytest.approx(1.0) and cal["slope"] == pytest.approx(0.5)
    assert cal["intercept"] == pytest.approx(0.1) and len(cal["reliability"]["predicted"]) == 5
    noisy = calibration(np.clip(target + rng.normal(0, 0.5, target.shape), 0, 1), target)
    assert noisy["neuron_r"] < 0.99
    with pytest.raises(ValueError, match="equal"):
        calibration(target[:, :3], target)


def test_growth_exponent() -> None:
    r = np.arange(1, 17, dtype=float)
    assert growth(0.1 * r ** 0.5)["exponent"] == pytest.approx(0.5)
    assert growth(0.1 * r ** 0.5)["sublinear"] and not growth(0.1 * r ** 1.5)["sublinear"]
    assert growth(0.1 * r)["ratio_last_first"] == pytest.approx(16.0)


def test_rollout_feeds_back_its_own_predictions() -> None:
    x = np.random.default_rng(1).uniform(0, 1, (3, 4, 5)).astype(np.float32)
    seen: list[np.ndarray | None] = []

    def mean_of_context(ctx: np.ndarray, cov: np.ndarray | None) -> np.ndarray:
        seen.append(None if cov is None else cov[0, :, 0].copy())
        return ctx.mean(axis=1)

    out = rollout(mean_of_context, x, None, 3)
    window = list(x.transpose(1, 0, 2))
    for j in range(3):
        np.testing.assert_allclose(out[:, j], np.mean(window[-4:], axis=0), rtol=1e-6)
        window.append(out[:, j])
    cov = np.arange(7, dtype=np.float32)[None, :, None].repeat(3, 0)   # (B, C + 3, 1)
    seen.clear()
    rollout(mean_of_context, x, cov, 3)
    assert [list(s) for s in seen if s is not None] == [[0, 1, 2, 3, 4], [1, 2, 3, 4, 5], [2, 3, 4, 5, 6]]
    with pytest.raises(ValueError, match="predictor returned shape"):
        rollout(lambda c, v: c[:, 0, :2], x, None, 1)


def test_next_step_frames_fill_only_the_asked_frames() -> None:
    probs = cyclic(30, 4)
    out = next_step_frames(oracle, probs, None, np.array([2, 10, 11, 29]), context=4)
    assert np.isnan(out[[0, 2, 9, 12]]).all()
    np.testing.assert_allclose(out[[10, 11, 29]], probs[[10, 11, 29]], atol=1e-6)


def test_the_predictor_is_step_one_of_the_models_rollout() -> None:
    """Covariate alignment: predict(x, cov[:, :C + 1]) == forward(x, cov)[:, 0], and the loss is finite."""
    torch.manual_seed(0)
    cfg = SBMConfig.small(9, n_covariates=3, context=4, horizon=2)
    model = SparseBrainModel(cfg, np.random.default_rng(0).normal(size=(9, 3))).eval()
    x = torch.rand(2, 4, 9)
    cov = torch.rand(2, 6, 3)
    want = model(x, cov)[:, 0].detach().numpy()
    got = torch_predictor(model)(x.numpy(), cov[:, :5].numpy())
    np.testing.assert_allclose(got, want, atol=1e-6)
    assert torch.isfinite(teacher_loss(model, torch.rand(2, 5, 9), cov[:, :5]))


def test_config_errors() -> None:
    with pytest.raises(ValueError, match="model_options"):
        SBMTrainConfig(model_options={"n_neurons": 3})
    with pytest.raises(ValueError, match="model_options"):
        SBMTrainConfig(model_options={"width": 3})
    with pytest.raises(ValueError, match="optimizer"):
        SBMTrainConfig(optimizer="sgd")
    with pytest.raises(ValueError, match="n_heads"):
        SBMTrainConfig(model_options={"d_model": 30, "n_heads": 4})
    assert TINY.model_config(10, 26)["n_covariates"] == 26
    assert dataclasses.replace(TINY, covariates=False).model_config(10, 26)["n_covariates"] == 0


def test_muon_takes_the_2d_body_weights() -> None:
    cfg = dataclasses.replace(TINY, optimizer="muon")
    model = SparseBrainModel(SBMConfig(**cfg.model_config(9, 3)), np.random.default_rng(0).normal(size=(9, 3)))
    muon, adamw = make_optimizers(model, cfg)
    names = {id(p): n for n, p in model.named_parameters()}
    body = {names[id(p)] for g in muon.param_groups for p in g["params"]}
    assert "blocks.0.spatial.qkv.weight" in body and "blocks.0.spatial.stim_kv.weight" in body
    assert not any(n.startswith(("neuron_embed", "stim_embed", "decoder")) for n in body)
    assert sum(len(g["params"]) for g in (*muon.param_groups, *adamw.param_groups)) == len(names)
    qkv = model.get_parameter("blocks.0.spatial.qkv.weight")
    before = qkv.detach().clone()
    teacher_loss(model, torch.rand(2, 5, 9), torch.rand(2, 5, 3)).backward()
    muon.step()
    adamw.step()
    assert not torch.equal(before, qkv)


def test_train_sbm_exports_a_spike_prob_engine(trained: tuple[SBMResult, Path], tiny_rec: Recording) -> None:
    result, root = trained
    assert result.engine is not None and result.engine.parts[-2:] == ("sbm-c4-h2", "v0001")
    raw = json.loads((result.engine / "manifest.json").read_text())
    assert raw["signal"] == "spike_prob" and raw["task"] == "forecast" and raw["model"] == "sbm"
    assert load_config(SBMTrainConfig, root / "run" / "config.toml") == TINY
    metrics = json.loads((root / "run" / "metrics.json").read_text())
    assert set(metrics["next_step"]["train_conditions"]) == {"model", "last_value", "context_mean"}
    assert "holdout" in metrics["next_step"] and metrics["training"]["steps"] == 30
    assert all(p.is_file() for p in result.figures) and result.checkpoint.is_file()
    engine = load_engine(result.engine)
    assert engine.manifest.signal == "spike_prob"
    data = load_data(tiny_rec, TINY, PRE)
    s = data.first + 10
    ctx, cov = data.probs[s:s + 4], data.covariates[s:s + 6]  # type: ignore[index]
    out = engine.run(np.ascontiguousarray(ctx), np.ascontiguousarray(cov))
    assert out.shape == (2, 200) and out.dtype == np.float32 and ((out >= 0) & (out <= 1)).all()
    assert result.model is not None
    with torch.no_grad():
        want = result.model(torch.from_numpy(ctx)[None], torch.from_numpy(cov)[None])[0].numpy()
    np.testing.assert_allclose(out, want, atol=1e-5)


def test_training_resumes_from_its_checkpoint(trained: tuple[SBMResult, Path], tiny_rec: Recording) -> None:
    result, root = trained
    more = dataclasses.replace(TINY, max_steps=36, export=False)
    again = train_sbm(tiny_rec, more, root / "engines", root / "run", progress=False, pre=PRE)
    history = again.metrics["training"]["history"]
    assert again.metrics["training"]["steps"] == 36 and again.engine is None
    assert history[:len(result.metrics["training"]["history"])] == result.metrics["training"]["history"]
    with pytest.raises(ValueError, match="different training config"):
        train_sbm(tiny_rec, dataclasses.replace(more, lr=1e-3), root / "engines", root / "run", progress=False,
                  pre=PRE)
