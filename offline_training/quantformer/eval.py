"""QuantFormer evaluation: activation AUROC / F1 and forecasting MAE per step ahead, on stride-1 windows.

Activation: a window's label per neuron is `mean(dF/F over the next H frames) > threshold`; AUROC is the
Mann-Whitney statistic over all (window, neuron) pairs (ties count one half); F1 uses a probability
threshold chosen on val (`best_f1_threshold`). Forecasting: MAE per step ahead over the windows and all
neurons, for the argmax-code and the probability-weighted-code decodes, beside the mean-of-context and
last-value baselines on the same windows. Windows of several conditions are pooled.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from loopcast.models.quantformer import DECODES, QuantFormer
from loopcast.offline_training.data.covariates import covariate_windows
from loopcast.offline_training.data.splits import gather_windows
from loopcast.offline_training.eval.plot import pyplot, save_figure


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve of `scores` for boolean `labels` (NaN if a class is missing)."""
    s, y = np.asarray(scores, np.float64).ravel(), np.asarray(labels, bool).ravel()
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s), np.float64)
    ranks[order] = np.arange(1, len(s) + 1)
    uniq, inv = np.unique(s, return_inverse=True)
    if len(uniq) < len(s):  # average ranks of ties
        ranks = (np.bincount(inv, ranks) / np.bincount(inv))[inv]
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def roc_curve(scores: np.ndarray, labels: np.ndarray, points: int = 200) -> tuple[np.ndarray, np.ndarray]:
    """(false positive rate, true positive rate) at `points` score quantiles, from (1, 1) to (0, 0)."""
    s, y = np.asarray(scores, np.float64).ravel(), np.asarray(labels, bool).ravel()
    thr = np.unique(np.quantile(s, np.linspace(0, 1, points)))
    pred = s[None, :] >= thr[:, None]                                    # (points, M)
    tpr = (pred & y).sum(1) / max(y.sum(), 1)
    fpr = (pred & ~y).sum(1) / max((~y).sum(), 1)
    return np.concatenate([fpr, [0.0]]), np.concatenate([tpr, [0.0]])


def f1_at(scores: np.ndarray, labels: np.ndarray, threshold: float) -> float:
    """F1 of predicting `scores > threshold`."""
    pred, y = np.asarray(scores).ravel() > threshold, np.asarray(labels, bool).ravel()
    tp = float((pred & y).sum())
    denom = float(pred.sum() + y.sum())
    return 2 * tp / denom if denom else 0.0


def best_f1_threshold(scores: np.ndarray, labels: np.ndarray, candidates: int = 99) -> float:
    """The score quantile (of `candidates` evenly spaced ones) with the best F1."""
    thr = np.unique(np.quantile(np.asarray(scores).ravel(), np.linspace(0.01, 0.99, candidates)))
    return float(thr[int(np.argmax([f1_at(scores, labels, t) for t in thr]))])


def activation_labels(future: np.ndarray, threshold: float) -> np.ndarray:
    """(W, N) bool: mean dF/F of future (W, H, N) above `threshold`."""
    return future.mean(axis=1) > threshold


@dataclass
class Scores:
    """Activation probabilities/labels (W, N) and absolute error sums per step ahead (H,) per decode."""

    prob: list[np.ndarray] = field(default_factory=list)
    label: list[np.ndarray] = field(default_factory=list)
    err: dict[str, np.ndarray] = field(default_factory=dict)
    count: int = 0

    def add(self, name: str, forecast: np.ndarray, target: np.ndarray) -> None:
        err = np.abs(forecast - target).sum(axis=(0, 2))                 # (H,)
        self.err[name] = self.err.get(name, 0.0) + err

    def probs(self) -> tuple[np.ndarray, np.ndarray]:
        return np.concatenate(self.prob), np.concatenate(self.label)


@torch.no_grad()
def score_windows(model: QuantFormer, dff: np.ndarray, cov: np.ndarray | None, starts: np.ndarray,
                  threshold: float, batch_size: int = 16, future: str = "recorded") -> Scores:
    """Run `model` over all neurons of the windows at `starts`; collect what the metrics need (`future`:
    the covariates' future steps, offline_training.data.covariates)."""
    cfg, model = model.config, model.eval()
    ids = torch.arange(cfg.n_neurons)
    out = Scores()
    for i in range(0, len(starts), batch_size):
        s = starts[i:i + batch_size]
        x, y = gather_windows(dff, s, cfg.context, cfg.horizon)          # (B, C, N), (B, H, N)
        c = None if cov is None else torch.from_numpy(covariate_windows(cov, s, cfg.context, cfg.horizon, future))
        act, logits = model.heads(torch.from_numpy(x), ids, c)
        out.prob.append(torch.sigmoid(act).numpy())
        out.label.append(activation_labels(y, threshold))
        for decode in DECODES:
            out.add(f"model_{decode}", model.decode_logits(logits, ids, decode).numpy(), y)
        out.add("mean_baseline", np.repeat(x.mean(axis=1, keepdims=True), cfg.horizon, axis=1), y)
        out.add("last_baseline", np.repeat(x[:, -1:], cfg.horizon, axis=1), y)
        out.count += len(s) * cfg.n_neurons
    return out


def split_metrics(scores: Scores, f1_threshold: float) -> dict[str, Any]:
    """Activation AUROC, F1 (at the val-chosen threshold) and base rate; MAE per step per forecaster."""
    prob, label = scores.probs()
    out: dict[str, Any] = {"windows": int(len(prob)), "activation": {
        "auroc": auroc(prob, label), "f1": f1_at(prob, label, f1_threshold),
        "f1_threshold": f1_threshold, "base_rate": float(label.mean())}}
    out["forecast"] = {name: {"mae": float(err.mean() / scores.count),
                              "mae_per_step": [float(v) for v in err / scores.count]}
                       for name, err in scores.err.items()}
    return out


def plot(curves: dict[str, tuple[np.ndarray, np.ndarray]], metrics: dict[str, Any], path: Path) -> Path:
    """ROC curves (per split) and MAE vs step ahead (test split) side by side."""
    fig, (ax_roc, ax_mae) = pyplot().subplots(1, 2, figsize=(10, 4))
    for split, (fpr, tpr) in curves.items():
        auc = metrics[split]["activation"]["auroc"]
        ax_roc.plot(fpr, tpr, label=f"{split} (AUROC {auc:.3f})")
    ax_roc.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax_roc.set(xlabel="false positive rate", ylabel="true positive rate", title="activation prediction")
    ax_roc.legend()
    for name, row in metrics["test"]["forecast"].items():
        steps = np.arange(1, len(row["mae_per_step"]) + 1)
        ax_mae.plot(steps, row["mae_per_step"], marker="o", ms=3, label=f"{name} ({row['mae']:.4f})")
    ax_mae.set(xlabel="step ahead", ylabel="MAE (dF/F)", title="forecasting, test split")
    ax_mae.legend(fontsize=8)
    return save_figure(fig, path)


__all__ = ["auroc", "roc_curve", "f1_at", "best_f1_threshold", "activation_labels", "Scores", "score_windows",
           "split_metrics", "plot"]
