"""Scoring causal spike inference against true spikes: predictors over (B, C, N) windows of causal dF/F
(a torch SpikeNet or a 'spikes' engine, as the pipeline calls it), per-neuron Pearson r, and the naive
first-difference baseline every model is compared with."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from loopcast.models.spikenet import causal_windows
from loopcast.offline_training.eval.metrics import column_r
from loopcast.realtime.engines.base import Engine
from loopcast.realtime.engines.loader import load_engine

Predict = Callable[[np.ndarray], np.ndarray]   # windows (B, C, N) -> expected counts (B, N)


def torch_predictor(model: nn.Module) -> Predict:
    """A torch SpikeNet as a batch predictor (B, C, N) -> (B, N)."""
    model.eval()

    def predict(windows: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return model(torch.from_numpy(np.ascontiguousarray(windows, dtype=np.float32)))[:, 0].numpy()
    return predict


def engine_predictor(engine: Engine) -> Predict:
    """A 'spikes' engine as a batch predictor, one `run((C, N))` per window, as the pipeline calls it."""
    if engine.manifest.task != "spikes":
        raise ValueError(f"engine {engine.version} is a {engine.manifest.task!r} engine, not 'spikes'")

    def predict(windows: np.ndarray) -> np.ndarray:
        return np.stack([engine.run(np.ascontiguousarray(w, dtype=np.float32))[0] for w in windows])
    return predict


def as_predictor(obj: nn.Module | Engine | str | Path) -> tuple[Predict, int]:
    """(predictor, context C) of a torch model, a loaded engine, or an engine directory."""
    if isinstance(obj, (str, Path)):
        obj = load_engine(obj)
    if isinstance(obj, nn.Module):
        config: Any = obj.config   # the model's typed config (a plain attribute; torch types it as a Module's)
        return torch_predictor(obj), int(config.context)
    if hasattr(obj, "manifest") and hasattr(obj, "run"):
        return engine_predictor(obj), obj.manifest.context
    raise TypeError(f"expected a torch model, an engine or an engine path, got {type(obj).__name__}")


def predict_frames(predict: Predict, dff: np.ndarray, frames: np.ndarray, context: int,
                   chunk: int = 16) -> np.ndarray:
    """Expected counts (F, N) at target `frames` from their past-only windows of dff (T, N)."""
    windows = causal_windows(dff, context)                  # (T - C + 1, C, N), window i ends at i + C - 1
    out = np.empty((len(frames), dff.shape[1]), dtype=np.float32)
    for i in range(0, len(frames), chunk):
        out[i:i + chunk] = predict(windows[frames[i:i + chunk] - context + 1])   # (b, C, N) -> (b, N)
    return out


def first_difference(dff: np.ndarray) -> np.ndarray:
    """The naive causal baseline: max(dff_t - dff_{t-1}, 0), (T, N); 0 at t = 0."""
    return np.maximum(np.diff(dff, axis=0, prepend=dff[:1]), 0.0).astype(np.float32)


def correlation_summary(pred: np.ndarray, baseline: np.ndarray, truth: np.ndarray) -> dict[str, Any]:
    """Median over neurons of the per-neuron correlation with true spikes: model and baseline."""
    r_model, r_base = column_r(pred, truth), column_r(baseline, truth)
    ok = np.isfinite(r_model) & np.isfinite(r_base)
    if not ok.any():
        raise ValueError("no neuron has both a non-constant prediction and spikes in these frames")
    return {"corr_median": float(np.median(r_model[ok])), "baseline_corr_median": float(np.median(r_base[ok])),
            "neurons": int(ok.sum())}


def evaluate_spikes(predictor: nn.Module | Engine | str | Path, dff: np.ndarray, spikes: np.ndarray,
                    first: int) -> dict[str, Any]:
    """Correlation of a model or engine with true spikes vs the first-difference baseline, frames >= first."""
    predict, context = as_predictor(predictor)
    frames = np.arange(max(first, context - 1), dff.shape[0])
    pred = predict_frames(predict, dff, frames, context)
    return correlation_summary(pred, first_difference(dff)[frames], spikes[frames])
