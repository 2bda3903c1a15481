"""Scoring a next-step spike-probability predictor the way the SBM paper does (Sec. 3.1, Fig. 2).

Everything here takes a generic `Predictor` (torch_predictor adapts an SBM): contexts (B, C, N) of spike
probabilities and, for stimulus models, covariates (B, C + 1, K) (the C context steps then the predicted
step) -> next-step probabilities (B, N). Three reports on the ZAPBench-style test windows
(offline_training.data.splits):
  - next-step MAE per condition, the training conditions' mean and the holdout, beside the last-value and
    mean-of-context baselines on the same targets;
  - calibration: per-neuron predicted vs observed mean probability (Pearson r, slope) and a binned
    reliability curve;
  - fixed-window autoregressive rollout for R steps: MAE per step and the growth exponent b of
    MAE(r) ~ r^b (b < 1: sublinear error growth).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from loopcast.models.sbm import SparseBrainModel
from loopcast.offline_training.data.covariates import covariate_windows
from loopcast.offline_training.data.splits import ConditionSplit, gather_windows, split_windows
from loopcast.offline_training.eval.metrics import pearson
from loopcast.offline_training.eval.plot import pyplot, save_figure

Predictor = Callable[[np.ndarray, "np.ndarray | None"], np.ndarray]  # (B, C, N), (B, C+1, K) -> (B, N)
BASELINES = ("last_value", "context_mean")
CALIBRATION_FILE = "sbm_calibration.png"
ROLLOUT_FILE = "sbm_rollout.png"


@dataclass(frozen=True)
class SBMEvalConfig:
    """How the test windows are scored."""

    rollout_steps: int = 16      # R: autoregressive steps from each rollout start
    rollout_starts: int = 64     # at most this many evenly spaced rollout starts per condition
    batch_size: int = 64
    bins: int = 10               # reliability-curve bins (quantiles of the predictions)

    def __post_init__(self) -> None:
        for name in ("rollout_steps", "rollout_starts", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.bins < 2:
            raise ValueError(f"bins must be >= 2, got {self.bins}")


@dataclass(frozen=True)
class NextStep:
    """One condition's next-step test predictions, targets and baselines, all (B, N) float32."""

    name: str
    holdout: bool
    pred: np.ndarray
    target: np.ndarray
    last_value: np.ndarray
    context_mean: np.ndarray


# --------------------------------------------------------------------------------------- predictions


def predict_next(predict: Predictor, probs: np.ndarray, cov: np.ndarray | None, starts: np.ndarray,
                 context: int, batch_size: int = 64, future: str = "recorded") -> np.ndarray:
    """Next-step predictions (B, N) for the windows (C context + 1 target) at `starts`; `future`: the
    target frame's stimulus as recorded or held (offline_training.data.covariates)."""
    out = np.empty((len(starts), probs.shape[1]), dtype=np.float32)
    for i in range(0, len(starts), batch_size):
        s = starts[i:i + batch_size]
        x, _ = gather_windows(probs, s, context, 1)                                  # (b, C, N)
        c = None if cov is None else covariate_windows(cov, s, context, 1, future)     # (b, C + 1, K)
        out[i:i + len(s)] = _checked(predict(np.ascontiguousarray(x), c), (len(s), probs.shape[1]))
    return out


def _checked(pred: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    pred = np.asarray(pred, dtype=np.float32)
    if pred.shape != shape:
        raise ValueError(f"predictor returned shape {pred.shape}, expected {shape} (B, N)")
    return pred


def next_step_predictions(predict: Predictor, probs: np.ndarray, cov: np.ndarray | None,
                          splits: Sequence[ConditionSplit], context: int, batch_size: int = 64,
                          progress: bool = False, future: str = "recorded") -> list[NextStep]:
    """NextStep rows for the test windows of every condition (holdout included) that has any."""
    starts = split_windows(splits, "test", context, 1, include_holdout=True)
    rows = []
    for cs in tqdm(splits, desc="next-step test", leave=False, disable=not progress):
        s = starts.get(cs.index, np.empty(0, np.int64))
        if not len(s):
            continue
        x, y = gather_windows(probs, s, context, 1)                                   # (B, C, N), (B, 1, N)
        rows.append(NextStep(cs.name, cs.holdout, predict_next(predict, probs, cov, s, context, batch_size, future),
                             y[:, 0], x[:, -1], x.mean(axis=1)))
    if not rows:
        raise ValueError("no test windows in any condition: the recording is too short for this context")
    return rows


def next_step_frames(predict: Predictor, probs: np.ndarray, cov: np.ndarray | None, frames: np.ndarray,
                     context: int, batch_size: int = 64, future: str = "recorded") -> np.ndarray:
    """(T, N) float32: next-step predictions of `frames` (each from its own C true preceding frames),
    NaN at every other frame and at frames with fewer than C frames before them."""
    out = np.full(probs.shape, np.nan, dtype=np.float32)
    frames = np.unique(np.asarray(frames, dtype=np.int64))
    frames = frames[(frames >= context) & (frames < probs.shape[0])]
    out[frames] = predict_next(predict, probs, cov, frames - context, context, batch_size, future)
    return out


def teacher_logits(model: SparseBrainModel, x: torch.Tensor, cov: torch.Tensor | None) -> torch.Tensor:
    """Logits (B, C, N) of window x (B, C + 1, N) with covariates (B, C + 1, K) | None: step t sees
    x[:, :t + 1] and predicts x[:, t + 1] (covariates aligned as the model's logits() expects)."""
    return model.logits(x[:, :-1], cov[:, 1:] if model.uses_covariates and cov is not None else None)


def torch_predictor(model: SparseBrainModel, device: torch.device | str = "cpu") -> Predictor:
    """The SBM as an sbm_eval.Predictor: contexts (B, C, N) [+ covariates (B, C + 1, K)] -> (B, N)."""
    model.eval()

    def predict(x: np.ndarray, cov: np.ndarray | None) -> np.ndarray:
        b, _, n = x.shape
        window = torch.from_numpy(np.concatenate([x, np.zeros((b, 1, n), np.float32)], axis=1)).to(device)
        c = None if cov is None else torch.from_numpy(np.ascontiguousarray(cov, np.float32)).to(device)
        with torch.no_grad():
            return torch.sigmoid(teacher_logits(model, window, c)[:, -1].float()).cpu().numpy()

    return predict


def evenly(starts: np.ndarray, most: int) -> np.ndarray:
    """At most `most` evenly spaced entries of `starts` (all of them if most <= 0)."""
    if most <= 0 or len(starts) <= most:
        return starts
    return starts[np.unique(np.linspace(0, len(starts) - 1, most).astype(np.int64))]


# ---------------------------------------------------------------------------------------------- metrics


def _mae(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean(np.abs(a - b)))


def next_step_mae(rows: Sequence[NextStep]) -> dict[str, Any]:
    """MAE (mean over windows and neurons) of the model and the baselines per condition, then the mean
    over the training conditions ("train_conditions") and over the holdout conditions ("holdout")."""
    labels = ("model", *BASELINES)
    per = {r.name: {lab: _mae(_series(r, lab), r.target) for lab in labels} for r in rows}
    out: dict[str, Any] = {"per_condition": per, "windows": {r.name: int(len(r.target)) for r in rows}}
    for group, members in (("train_conditions", [r for r in rows if not r.holdout]),
                           ("holdout", [r for r in rows if r.holdout])):
        if members:
            out[group] = {lab: float(np.mean([per[r.name][lab] for r in members])) for lab in labels}
    return out


def _series(row: NextStep, label: str) -> np.ndarray:
    return row.pred if label == "model" else getattr(row, label)


def calibration(pred: np.ndarray, target: np.ndarray, bins: int = 10) -> dict[str, Any]:
    """Per-neuron mean predicted vs observed probability over the windows of pred/target (M, N): Pearson
    r, slope and intercept of predicted = slope * observed + intercept; and the reliability curve (mean
    prediction vs mean observation in `bins` quantile bins of the predictions) with its expected
    calibration error (count-weighted mean |gap|)."""
    if pred.shape != target.shape or pred.ndim != 2:
        raise ValueError(f"pred and target must be equal (M, N) arrays, got {pred.shape}, {target.shape}")
    p_mean, o_mean = pred.mean(axis=0), target.mean(axis=0)                        # (N,)
    slope, intercept = (np.polyfit(o_mean, p_mean, 1) if np.ptp(o_mean) > 0 else (float("nan"),) * 2)
    edges = np.unique(np.quantile(pred, np.linspace(0.0, 1.0, bins + 1)))
    which = np.clip(np.searchsorted(edges, pred.ravel(), side="right") - 1, 0, max(len(edges) - 2, 0))
    count = np.bincount(which, minlength=max(len(edges) - 1, 1)).astype(np.float64)
    keep = count > 0
    mean_p = np.bincount(which, pred.ravel(), minlength=len(count))[keep] / count[keep]
    mean_o = np.bincount(which, target.ravel(), minlength=len(count))[keep] / count[keep]
    ece = float(np.sum(count[keep] * np.abs(mean_p - mean_o)) / count.sum())
    return {"neuron_r": pearson(p_mean, o_mean), "slope": float(slope), "intercept": float(intercept),
            "neurons": int(pred.shape[1]), "windows": int(pred.shape[0]), "ece": ece,
            "reliability": {"predicted": mean_p.tolist(), "observed": mean_o.tolist(),
                            "count": count[keep].astype(int).tolist()},
            "neuron_means": {"predicted": p_mean.tolist(), "observed": o_mean.tolist()}}


def calibration_report(rows: Sequence[NextStep], bins: int = 10) -> dict[str, Any]:
    """Calibration over the test windows of the training conditions (pooled), and of the holdout."""
    out: dict[str, Any] = {}
    for group, members in (("train_conditions", [r for r in rows if not r.holdout]),
                           ("holdout", [r for r in rows if r.holdout])):
        if members:
            out[group] = calibration(np.concatenate([r.pred for r in members]),
                                     np.concatenate([r.target for r in members]), bins)
    return out


# ---------------------------------------------------------------------------------------------- rollout


def rollout(predict: Predictor, x: np.ndarray, cov: np.ndarray | None, steps: int) -> np.ndarray:
    """Fixed-window autoregression: contexts x (B, C, N), covariates (B, C + steps, K) | None ->
    predictions (B, steps, N); step j sees the last C values (its own predictions included) and
    covariates j .. j + C."""
    c = x.shape[1]
    window, out = np.array(x, dtype=np.float32), []
    for j in range(steps):
        step_cov = None if cov is None else np.ascontiguousarray(cov[:, j:j + c + 1])
        p = _checked(predict(np.ascontiguousarray(window), step_cov), (x.shape[0], x.shape[2]))
        out.append(p)
        window = np.concatenate([window[:, 1:], p[:, None]], axis=1)
    return np.stack(out, axis=1)


def rollout_errors(predict: Predictor, probs: np.ndarray, cov: np.ndarray | None,
                   splits: Sequence[ConditionSplit], context: int, cfg: SBMEvalConfig = SBMEvalConfig(),
                   progress: bool = False, future: str = "recorded") -> dict[str, Any]:
    """MAE per rollout step (R,) of the model and of the held baselines (last value, context mean) from
    evenly spaced test starts, averaged per condition, then over training conditions and the holdout."""
    r = cfg.rollout_steps
    starts = split_windows(splits, "test", context, r, include_holdout=True)
    per: dict[str, dict[str, np.ndarray]] = {}
    for cs in tqdm(splits, desc="rollout test", leave=False, disable=not progress):
        s = starts.get(cs.index, np.empty(0, np.int64))
        if len(s):
            s = evenly(s, cfg.rollout_starts)
            per[cs.name] = _rollout_curves(predict, probs, cov, s, context, r, cfg.batch_size, future)
    out: dict[str, Any] = {"steps": r, "per_condition": _lists(per)}
    holdout = {cs.name for cs in splits if cs.holdout}
    for group, names in (("train_conditions", [n for n in per if n not in holdout]),
                         ("holdout", [n for n in per if n in holdout])):
        if names:
            curves = {lab: np.mean([per[n][lab] for n in names], axis=0) for lab in per[names[0]]}
            out[group] = {**_lists({"_": curves})["_"], "growth": growth(curves["model"])}
    return out


def _rollout_curves(predict: Predictor, probs: np.ndarray, cov: np.ndarray | None, starts: np.ndarray,
                    context: int, steps: int, batch_size: int, future: str) -> dict[str, np.ndarray]:
    sums = {lab: np.zeros(steps) for lab in ("model", *BASELINES)}
    for i in range(0, len(starts), batch_size):
        s = starts[i:i + batch_size]
        x, y = gather_windows(probs, s, context, steps)                              # (b, C, N), (b, R, N)
        c = None if cov is None else covariate_windows(cov, s, context, steps, future)  # (b, C + R, K)
        preds = {"model": rollout(predict, x, c, steps), "last_value": x[:, -1:], "context_mean":
                 x.mean(axis=1, keepdims=True)}
        for lab, p in preds.items():
            sums[lab] += np.abs(p - y).mean(axis=2).sum(axis=0)
    return {lab: v / len(starts) for lab, v in sums.items()}


def growth(mae: np.ndarray) -> dict[str, Any]:
    """Growth of the rollout error: exponent b of the least-squares fit log MAE(r) = a + b log r, and
    the ratio MAE(R) / MAE(1); b < 1 is sublinear growth."""
    mae = np.asarray(mae, dtype=np.float64)
    steps = np.arange(1, len(mae) + 1)
    ok = mae > 0
    b = float(np.polyfit(np.log(steps[ok]), np.log(mae[ok]), 1)[0]) if ok.sum() >= 2 else float("nan")
    ratio = float(mae[-1] / mae[0]) if mae[0] > 0 else float("nan")
    return {"exponent": b, "ratio_last_first": ratio, "sublinear": bool(b < 1.0)}


def _lists(curves: dict[str, dict[str, np.ndarray]]) -> dict[str, dict[str, list[float]]]:
    return {k: {lab: [float(v) for v in c] for lab, c in d.items()} for k, d in curves.items()}


# ---------------------------------------------------------------------------------------------- figures


def plot_calibration(cal: dict[str, Any], path: Path, title: str = "SBM calibration (test)") -> Path:
    """Two panels: per-neuron mean predicted vs observed probability, and the reliability curve."""
    plt = pyplot()
    fig, (a, b) = plt.subplots(1, 2, figsize=(8.4, 3.8))
    obs, pred = cal["neuron_means"]["observed"], cal["neuron_means"]["predicted"]
    top = max(max(obs), max(pred), 1e-6) * 1.05
    a.scatter(obs, pred, s=4, alpha=0.5)
    a.plot([0, top], [0, top], "k--", lw=1)
    a.set(xlabel="observed mean p", ylabel="predicted mean p", xlim=(0, top), ylim=(0, top),
          title=f"per neuron: r={cal['neuron_r']:.3f}, slope={cal['slope']:.2f}")
    rel = cal["reliability"]
    top = max(max(rel["predicted"]), max(rel["observed"]), 1e-6) * 1.05
    b.plot(rel["predicted"], rel["observed"], "o-", ms=4)
    b.plot([0, top], [0, top], "k--", lw=1)
    b.set(xlabel="mean predicted p (bin)", ylabel="mean observed p", xlim=(0, top), ylim=(0, top),
          title=f"reliability: ECE={cal['ece']:.4f}")
    for ax in (a, b):
        ax.grid(alpha=0.3)
    return save_figure(fig, path, title)


def plot_rollout(roll: dict[str, Any], path: Path, title: str = "SBM autoregressive rollout (test)") -> Path:
    """MAE per rollout step of the model and the held baselines (training conditions, holdout), and
    MAE(r) / MAE(1) against r beside the linear-growth line."""
    plt = pyplot()
    from matplotlib.ticker import NullFormatter, ScalarFormatter
    groups = [g for g in ("train_conditions", "holdout") if g in roll]
    fig, axes = plt.subplots(1, 2, figsize=(8.4, 3.8))
    steps = np.arange(1, roll["steps"] + 1)
    for g, ls in zip(groups, ("-", ":")):
        for lab, colour in (("model", "C0"), ("last_value", "C1"), ("context_mean", "C2")):
            axes[0].plot(steps, roll[g][lab], ls, color=colour, label=f"{lab} ({g})")
        m = np.asarray(roll[g]["model"])
        axes[1].plot(steps, m / m[0], ls, color="C0", label=f"{g}: b={roll[g]['growth']['exponent']:.2f}")
    axes[1].plot(steps, steps, "k--", lw=1, label="linear")
    axes[0].set(xlabel="rollout step", ylabel="MAE", title="MAE per step")
    axes[1].set(xlabel="rollout step r", ylabel="MAE(r) / MAE(1)", title="error growth (log-log)", xscale="log",
                yscale="log")
    for axis in (axes[1].xaxis, axes[1].yaxis):
        axis.set_major_formatter(ScalarFormatter())
        axis.set_minor_formatter(NullFormatter())
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return save_figure(fig, path, title)


def evaluate_predictor(predict: Predictor, probs: np.ndarray, cov: np.ndarray | None,
                       splits: Sequence[ConditionSplit], context: int, cfg: SBMEvalConfig = SBMEvalConfig(),
                       fig_dir: Path | None = None, progress: bool = False,
                       future: str = "recorded") -> tuple[dict[str, Any], list[Path]]:
    """Next-step MAE, calibration and rollout of `predict` on the test windows; figures in `fig_dir`;
    `future`: the covariates' future steps as recorded or held (offline_training.data.covariates)."""
    rows = next_step_predictions(predict, probs, cov, splits, context, cfg.batch_size, progress, future)
    cal = calibration_report(rows, cfg.bins)
    roll = rollout_errors(predict, probs, cov, splits, context, cfg, progress, future)
    figures = []
    if fig_dir is not None:
        group = "train_conditions" if "train_conditions" in cal else "holdout"
        figures = [plot_calibration(cal[group], Path(fig_dir) / CALIBRATION_FILE,
                                    f"SBM calibration (test, {group})"),
                   plot_rollout(roll, Path(fig_dir) / ROLLOUT_FILE)]
    summary = {g: {k: v for k, v in c.items() if k != "neuron_means"} for g, c in cal.items()}
    return {"next_step": next_step_mae(rows), "calibration": summary, "rollout": roll}, figures
