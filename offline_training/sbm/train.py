"""Train the Sparse Brain Model (models/sbm.py) on the loop's causal spike probabilities; score and export it.

Data: the pipeline's spike probabilities (T, N) (offline_training.data.loop_signals.loop_spike_probs: causal
dF/F -> streaming OASIS, exactly what the rig feeds the engine), the stimulus covariates (T, K) and the
neuron positions (N, 3). ZAPBench-style condition splits (offline_training.data.splits, condition 3 held out);
windows of C + 1 frames that start past the signal's warm-up (its leading all-zero frames).

Objective (paper Sec. 2.1): teacher-forced BCE with logits over all C next-step targets of each window, in
fp32. Optimiser (Sec. 2.3): AdamW (lr 5e-4, betas 0.9/0.95, weight decay 1e-4) or, with optimizer="muon",
torch.optim.Muon (lr 2e-2) for the >= 2-D weights of the attention body and AdamW for the rest; a per-batch
warmup-cosine schedule, gradient clipping at 1.0, validation several times per epoch keeping the best
weights, early stopping (the loop itself: offline_training.sbm.fit). The exported engine runs the
fixed-window rollout of H steps inside its graph.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from loopcast.config import dump_toml
from loopcast.models.sbm import SBMConfig, SparseBrainModel
from loopcast.offline_training.data.covariates import covariate_windows
from loopcast.offline_training.data.fingerprint import data_fingerprint
from loopcast.offline_training.data.loop_signals import loop_spike_probs
from loopcast.offline_training.data.splits import ConditionSplit
from loopcast.offline_training.export.engine import export_engine
from loopcast.offline_training.sbm.config import SBMData, SBMTrainConfig
from loopcast.offline_training.sbm.eval import evaluate_predictor, torch_predictor
from loopcast.offline_training.sbm.fit import fit, training_summary
from loopcast.realtime.preprocess.stage import PreprocessConfig
from loopcast.replay.layout import Recording

CHECKPOINT_FILE = "checkpoint.pt"
METRICS_FILE = "metrics.json"
CONFIG_FILE = "config.toml"


def warmup_end(probs: np.ndarray) -> int:
    """The first frame with any non-zero probability (the spike estimator outputs zeros in warm-up)."""
    active = np.flatnonzero(probs.any(axis=1))
    return int(active[0]) if len(active) else 0


def load_data(rec: Recording, cfg: SBMTrainConfig, pre: PreprocessConfig = PreprocessConfig(),
              progress: bool = False) -> SBMData:
    """The loop's spike probabilities, the stimuli (if cfg.covariates) and positions of `rec`."""
    probs = np.ascontiguousarray(loop_spike_probs(rec, pre, progress=progress), dtype=np.float32)
    cov = np.ascontiguousarray(rec.stimuli(), dtype=np.float32) if cfg.covariates else None
    return SBMData(probs, cov, np.asarray(rec.positions(), np.float32), tuple(rec.condition_offsets),
                   warmup_end(probs), cfg.future_covariates)


# ------------------------------------------------------------------------------------- model plumbing


def build_sbm(cfg: SBMTrainConfig, data: SBMData) -> SparseBrainModel:
    """A fresh SBM for the data's neurons, covariates and positions (seeded by cfg.seed)."""
    torch.manual_seed(cfg.seed)
    mcfg = SBMConfig(**cfg.model_config(data.probs.shape[1], data.n_covariates))
    return SparseBrainModel(mcfg, data.positions)


# ------------------------------------------------------------------------------------------- training


@dataclass(frozen=True)
class SBMResult:
    """Test metrics, the published engine (None when cfg.export is off), the checkpoint and figures."""

    metrics: dict[str, Any]
    engine: Path | None
    checkpoint: Path
    figures: list[Path]
    model: SparseBrainModel | None = None


def train_sbm(rec: Recording, cfg: SBMTrainConfig, registry_dir: str | Path, run_dir: str | Path,
              progress: bool = True, pre: PreprocessConfig = PreprocessConfig()) -> SBMResult:
    """Train on `rec`'s loop spike probabilities (resuming run_dir's checkpoint if any), evaluate on the
    test windows, write metrics.json, config.toml and figures into run_dir, export `sbm-c{C}-h{H}`."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(cfg.threads)
    data = load_data(rec, cfg, pre, progress)
    return train_on_data(data, cfg, registry_dir, run_dir, progress, source=str(rec.root))


def train_on_data(data: SBMData, cfg: SBMTrainConfig, registry_dir: str | Path, run_dir: Path,
                  progress: bool = True, source: str = "arrays") -> SBMResult:
    """train_sbm on arrays already loaded."""
    splits = cfg.splits(data.offsets)
    model = build_sbm(cfg, data)
    checkpoint = run_dir / CHECKPOINT_FILE
    state = fit(model, data, splits, cfg, checkpoint, progress)
    dump_toml(cfg, run_dir / CONFIG_FILE)
    model.load_state_dict(state.best_state)
    metrics, figures = evaluate_predictor(torch_predictor(model, cfg.torch_device()), data.probs,
                                          data.covariates, splits, cfg.context, cfg.eval, run_dir / "figures",
                                          progress, cfg.future_covariates)
    model.to("cpu").eval()
    metrics = {**metrics, "training": {"optimizer": cfg.optimizer, "device": str(cfg.torch_device()),
                                       **training_summary(state)}, "data": {
        "frames": int(data.probs.shape[0]), "neurons": int(data.probs.shape[1]),
        "covariates": data.n_covariates, "first_frame": data.first, "source": source}}
    (run_dir / METRICS_FILE).write_text(json.dumps(metrics, indent=2) + "\n")
    engine = export_sbm(model, cfg, data, splits, registry_dir, metrics, source) if cfg.export else None
    return SBMResult(metrics, engine, checkpoint, figures, model)


def export_sbm(model: nn.Module, cfg: SBMTrainConfig, data: SBMData, splits: Sequence[ConditionSplit],
               registry_dir: str | Path, metrics: dict[str, Any], source: str) -> Path:
    """Publish the SBM as forecast engine `sbm-c{C}-h{H}` on signal "spike_prob", parity-checked on a
    real test window (and its covariates)."""
    parity = parity_window(data, splits, cfg)
    summary = {"next_step": metrics["next_step"],
               "training": {k: v for k, v in metrics["training"].items() if k != "history"}}
    return export_engine(model, cfg, registry_dir, int(data.probs.shape[1]), summary,
                         data_fingerprint(data.probs, data.offsets), source, parity_input=parity,
                         name=f"sbm-c{cfg.context}-h{cfg.horizon}", task="forecast", signal="spike_prob",
                         tolerance=cfg.parity_tolerance)


def parity_window(data: SBMData, splits: Sequence[ConditionSplit],
                  cfg: SBMTrainConfig) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """The first test window's context (C, N) [and covariates (C + H, K)] of any condition."""
    for starts in data.starts(splits, "test", cfg.context, cfg.horizon, include_holdout=True).values():
        if len(starts):
            s = starts[:1]
            x = np.ascontiguousarray(data.probs[s[0]:s[0] + cfg.context])
            if data.covariates is None:
                return x
            return x, covariate_windows(data.covariates, s, cfg.context, cfg.horizon, cfg.future_covariates)[0]
    raise ValueError(f"no test window of C + H = {cfg.context + cfg.horizon} frames for the parity check")
