"""Test-split evaluation: hand-computed MAE, holdout kept out of the average, equal targets across
context lengths, the stimulus baseline's n/a, the written files, and `loopcast evaluate` end to end."""
from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch

from loopcast.cli import main
from loopcast.models.linear import NLinear, NLinearConfig
from loopcast.offline_training.eval.harness import EvalConfig, baseline_forecasters, evaluate_models, scoring_windows
from loopcast.offline_training.export.engine import export_engine
from loopcast.offline_training.trace.train import TrainConfig

RAMP_OFFSETS = (0, 50, 100, 150)
RAMP_CFG = EvalConfig(holdout=(2,), max_context=4)


def ramp() -> np.ndarray:
    """(150, 2): neuron 0 = t, neuron 1 = 2 t, so |error| of a forecast 0 is 1.5 t on average."""
    t = np.arange(150, dtype=np.float32)[:, None]
    return np.concatenate([t, 2 * t], axis=1)


@dataclass
class Constant:
    """Forecasts `value` everywhere; records the target frames it was asked about."""

    context: int
    horizon: int
    value: float = 0.0
    seen: dict[int, list[int]] = field(default_factory=dict)

    def predict(self, x, cov, condition, starts):
        self.seen.setdefault(condition, []).extend((starts + self.context).tolist())
        return np.full((len(starts), self.horizon, x.shape[2]), self.value, np.float32)


def test_mae_by_hand_on_a_ramp() -> None:
    """Condition 0 = frames [0, 50): usable [1, 49), test targets 40..48; with C=2, H=3 step h targets
    frames 39+h..45+h (mean 42+h). Condition 1 likewise 92+h. The holdout (2) starts scoring at
    101 + max_context = 105: step h targets 104+h..145+h (mean 124.5+h)."""
    res = evaluate_models(ramp(), RAMP_OFFSETS, {"zero": Constant(2, 3)}, config=RAMP_CFG, progress=False)
    h = np.arange(1, 4)
    np.testing.assert_allclose(res.mae["zero"][0], 1.5 * (42 + h))
    np.testing.assert_allclose(res.mae["zero"][1], 1.5 * (92 + h))
    np.testing.assert_allclose(res.mae["zero"][2], 1.5 * (124.5 + h))
    np.testing.assert_allclose(res.average("zero"), 1.5 * (67 + h))       # holdout not in the average
    assert [(c.name, c.holdout, c.windows) for c in res.conditions] == [
        ("condition0", False, 7), ("condition1", False, 7), ("condition2", True, 42)]


def test_last_and_mean_baselines_by_hand() -> None:
    """On a ramp, last value misses step h by h (x1.5 over the two neurons); mean of C=2 by h + 0.5."""
    models = baseline_forecasters(["mean", "last"], [2], 3, ramp(), RAMP_OFFSETS, None, RAMP_CFG)
    res = evaluate_models(ramp(), RAMP_OFFSETS, models, config=RAMP_CFG, progress=False)
    h = np.arange(1, 4)
    for k in (0, 1, 2):
        np.testing.assert_allclose(res.mae["last"][k], 1.5 * h, rtol=1e-6)
        np.testing.assert_allclose(res.mae["mean-c2"][k], 1.5 * (h + 0.5), rtol=1e-6)


def test_contexts_4_and_8_score_identical_targets(traces, offsets) -> None:
    cfg = EvalConfig(max_context=16)
    a, b = Constant(4, 8), Constant(8, 8)
    evaluate_models(traces, offsets, {"c4": a, "c8": b}, config=cfg, progress=False)
    assert a.seen.keys() == b.seen.keys() == {0, 1, 2, 3}
    assert all(a.seen[k] == b.seen[k] for k in a.seen)
    for k in a.seen:   # and every window is there, stride 1
        assert np.array_equal(np.diff(a.seen[k]), np.ones(len(a.seen[k]) - 1))
    _, s4 = scoring_windows(offsets, 4, 8, cfg)
    assert s4[3][0] + 4 == offsets[3] + 1 + 16                  # holdout: first target after max_context


def test_models_must_share_the_horizon(traces, offsets) -> None:
    with pytest.raises(ValueError, match="share the horizon"):
        evaluate_models(traces, offsets, {"a": Constant(4, 8), "b": Constant(4, 4)}, progress=False)


def planted_recording(n: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Four conditions of 200 frames; responses locked to trials of 12 frames, none in condition 2."""
    rng = np.random.default_rng(1)
    traces = rng.normal(size=(800, n)).astype(np.float32)
    cov = np.zeros((800, 26), np.float32)
    for k in (0, 1, 3):
        tl = np.arange(200)
        cov[200 * k:200 * (k + 1), 25] = tl % 12 == 0
        traces[200 * k:200 * (k + 1)] = rng.normal(size=(12, n)).astype(np.float32)[tl % 12]
    return traces, cov


def test_stimulus_baseline_is_exact_with_repeats_and_na_without(tmp_path: Path) -> None:
    traces, cov = planted_recording()
    offsets = (0, 200, 400, 600, 800)
    cfg = EvalConfig(max_context=8)
    models = baseline_forecasters(["stimulus", "last"], [4], 8, traces, offsets, cov, cfg)
    res = evaluate_models(traces, offsets, models, covariates=cov, config=cfg, progress=False)
    assert np.all(res.mae["stimulus"][0] == 0) and np.all(res.mae["stimulus"][1] == 0)
    assert np.isnan(res.mae["stimulus"][2]).all()              # no repeats in condition 2
    assert np.isnan(res.mae["stimulus"][3]).all()              # held out: no train frames
    assert np.isnan(res.average("stimulus")).all() and not np.isnan(res.average("last")).any()
    assert "| condition2 | stimulus | n/a |" in res.markdown()


def test_written_files_parse(tmp_path: Path, traces, offsets) -> None:
    models = {"zero": Constant(4, 8), **baseline_forecasters(["mean", "last"], [4], 8, traces, offsets, None,
                                                             EvalConfig(max_context=8))}
    res = evaluate_models(traces, offsets, models, config=EvalConfig(max_context=8), progress=False)
    paths = res.write(tmp_path / "out")
    rows = list(csv.DictReader(paths["csv"].open()))
    assert len(rows) == 3 * 5                                    # models x (average, holdout, 3 conditions)
    assert list(rows[0]) == ["condition", "model", "step 1", "step 8", "mean", "windows"]
    assert [r["condition"] for r in rows[::3]] == ["average", "condition3 (holdout)", "condition0",
                                                   "condition1", "condition2"]
    avg = {r["model"]: float(r["mean"]) for r in rows if r["condition"] == "average"}
    assert avg["zero"] == pytest.approx(float(res.average("zero").mean()))
    long = list(csv.DictReader(paths["long"].open()))
    assert len(long) == 3 * 5 * 8 and {int(r["step"]) for r in long} == set(range(1, 9))
    assert json.loads(paths["json"].read_text())["mae_per_step"]["average"]["last"][0] > 0
    assert paths["figure"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert paths["markdown"].read_text().startswith("| condition | model | step 1 | step 8 | mean |")


def random_engine(registry: Path, context: int, horizon: int, n: int, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    cfg = TrainConfig(context=context, horizon=horizon, max_context=8)
    return export_engine(NLinear(NLinearConfig(context, horizon)), cfg, registry, n, {}, "sha256:test",
                         "synthetic:test")


@pytest.mark.timeout(120)
def test_cli_evaluate_end_to_end(loop_setup, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root, overrides = loop_setup
    random_engine(tmp_path / "engines", 8, 4, 300)
    sets = [a for s in [*overrides, f'paths.runs="{tmp_path}/runs"', "train.max_context=8"] for a in ("-s", s)]
    engines = [str(root / "engines" / "nlinear-c4-h4"), str(tmp_path / "engines" / "nlinear-c8-h4" / "v0001")]
    assert main(["evaluate", *sets, "--engines", *engines, "--out", str(tmp_path / "eval")]) == 0
    out = capsys.readouterr().out
    assert "| average | nlinear-c4-h4/v0001 |" in out and "| taxis (holdout) | stimulus |" in out
    for name in ("table.md", "table.csv", "mae_per_step.csv", "results.json", "figure.png"):
        assert (tmp_path / "eval" / name).stat().st_size > 0
    rows = list(csv.DictReader((tmp_path / "eval" / "table.csv").open()))
    models = ["nlinear-c4-h4/v0001", "nlinear-c8-h4/v0001", "mean-c4", "mean-c8", "last", "stimulus"]
    assert [r["model"] for r in rows[:6]] == models and len(rows) == 6 * (1 + 9)
    engines_ok = [r for r in rows if r["model"].startswith("nlinear")]   # C=4 and C=8 both scored everywhere
    assert all(float(r["mean"]) > 0 and int(r["windows"]) > 0 for r in engines_ok)
    assert main(["evaluate", *sets, "--engines", str(tmp_path / "nowhere")]) == 2
    assert "no engine at" in capsys.readouterr().err


@pytest.mark.parametrize("kind, what", [("act", "activation probabilities"), ("spk", "'spike_prob' forecasts")])
def test_engines_that_do_not_forecast_dff_are_refused(toy_engines: dict[str, Path], kind: str, what: str) -> None:
    from loopcast.offline_training.eval.harness import evaluate_engines
    traces = np.zeros((200, 10), np.float32)
    with pytest.raises(ValueError, match=f"gives {what}, not dF/F"):
        evaluate_engines([toy_engines[kind]], traces, (0, 100, 200), progress=False)


@pytest.mark.parametrize("change, key", [({"test_frac": 0.3}, "test_frac"), ({"holdout": (1,)}, "holdout"),
                                         ({"padding": 2}, "padding")])
def test_engine_trained_on_other_splits_is_refused(tmp_path: Path, traces, offsets, change: dict, key: str) -> None:
    """An engine whose training windows could overlap the scored test windows is not scored."""
    from loopcast.offline_training.eval.harness import evaluate_engines
    path = random_engine(tmp_path / "engines", 4, 4, traces.shape[1])
    config = EvalConfig(max_context=8, **change)
    with pytest.raises(ValueError, match=f"was trained with {key} .*this evaluation"):
        evaluate_engines([path], traces, offsets, config=config, baselines=(), progress=False)
    same = EvalConfig(max_context=4)          # max_context does not move training windows: accepted
    result = evaluate_engines([path], traces, offsets, config=same, baselines=(), progress=False)
    assert result.models == ("nlinear-c4-h4/v0001",)
