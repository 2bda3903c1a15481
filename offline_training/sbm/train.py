"""Train the Sparse Brain Model (models/sbm.py) on the loop's causal spike probabilities; score and export it.

Data: the pipeline's spike probabilities (T, N) (offline_training.loop_signals.loop_spike_probs: causal
dF/F -> streaming OASIS, exactly what the rig feeds the engine), the stimulus covariates (T, K) and the
neuron positions (N, 3). ZAPBench-style condition splits (offline_training.splits, condition 3 held out);
windows of C + 1 frames that start past the signal's warm-up (its leading all-zero frames).

Objective (paper Sec. 2.1): teacher-forced BCE with logits over all C next-step targets of each window, in
fp32. Optimiser (Sec. 2.3): AdamW (lr 5e-4, betas 0.9/0.95, weight decay 1e-4) or, with optimizer="muon",
torch.optim.Muon (lr 2e-2) for the >= 2-D weights of the attention body and AdamW for the rest; a per-batch
warmup-cosine schedule, gradient clipping at 1.0, validation several times per epoch keeping the best
weights, early stopping (the loop itself: offline_training.sbm_fit). The exported engine runs the
fixed-window rollout of H steps inside its graph.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from loopcast.config import dump_toml
from models.sbm import SBMConfig, SparseBrainModel
from offline_training.covariates import check_future_covariates, covariate_windows
from offline_training.device import check_device, resolve_device
from offline_training.export import export_engine
from offline_training.loop_signals import loop_spike_probs
from offline_training.sbm_eval import SBMEvalConfig, evaluate_predictor, torch_predictor
from offline_training.sbm_fit import fit
from offline_training.splits import ConditionSplit, condition_splits, split_windows
from offline_training.train import data_fingerprint
from realtime.preprocess import PreprocessConfig
from replay.layout import Recording

DERIVED = frozenset({"n_neurons", "n_covariates", "context", "horizon"})
OPTIMIZERS = ("adamw", "muon")
CHECKPOINT_FILE = "checkpoint.pt"
METRICS_FILE = "metrics.json"
CONFIG_FILE = "config.toml"


@dataclass(frozen=True)
class SBMTrainConfig:
    """Everything that determines an SBM training run (saved as config.toml in the run and the engine)."""

    model: str = "sbm"
    context: int = 12                 # tau: 12 frames ~ the paper's 4 s
    horizon: int = 4                  # rollout steps of the exported engine
    seed: int = 0
    model_options: dict[str, Any] = field(default_factory=dict)   # other SBMConfig fields (d_model, ...)
    covariates: bool = True           # give the model the stimulus covariates (n_covariates = K)
    future_covariates: str = "recorded"  # the next frame's stimulus: "recorded" or "held" (as the loop serves it)
    optimizer: str = "adamw"          # "muon": torch.optim.Muon for >= 2-D body weights, AdamW for the rest
    lr: float = 5e-4
    muon_lr: float = 2e-2
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 1e-4
    warmup_frac: float = 0.05         # linear warm-up over this share of the steps, then cosine
    min_lr_frac: float = 0.1          # the cosine ends at this share of the peak lr
    grad_clip: float = 1.0
    batch_size: int = 16
    max_epochs: int = 20
    max_steps: int = 0                # 0 = max_epochs * steps_per_epoch
    steps_per_epoch: int = 0          # 0 = every train window once per epoch
    val_per_epoch: int = 4
    val_windows: int = 256            # evenly spaced val windows per validation (0 = all)
    patience: int = 8                 # validations without improvement before stopping
    threads: int = 2
    device: str = "auto"              # "auto" (cuda if available), "cpu", "cuda", "cuda:N"
    holdout: tuple[int, ...] = (3,)
    val_frac: float = 0.1
    test_frac: float = 0.2
    padding: int = 1
    max_context: int = 0              # holdout scoring starts max_context - C steps in (0 = C)
    eval: SBMEvalConfig = field(default_factory=SBMEvalConfig)
    export: bool = True
    parity_tolerance: float = 1e-4    # ORT vs torch at export; hard routing (routing_margin 0) flips
                                      # cluster edges at whole-brain N (docs/sbm-quantformer.md)

    def __post_init__(self) -> None:
        if self.model != "sbm":
            raise ValueError(f"model must be 'sbm', got {self.model!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {list(OPTIMIZERS)}, got {self.optimizer!r}")
        if self.optimizer == "muon" and not hasattr(torch.optim, "Muon"):
            raise ValueError(f"optimizer 'muon' needs torch.optim.Muon (torch >= 2.9), torch is {torch.__version__}")
        for name in ("context", "horizon", "batch_size", "max_epochs", "val_per_epoch", "patience", "threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if min(self.max_steps, self.steps_per_epoch, self.val_windows, self.max_context) < 0:
            raise ValueError("max_steps, steps_per_epoch, val_windows and max_context must be >= 0")
        if not (self.lr > 0 and self.muon_lr > 0 and 0 <= self.warmup_frac < 1 and 0 <= self.min_lr_frac <= 1
                and self.grad_clip > 0 and self.weight_decay >= 0):
            raise ValueError("need lr, muon_lr, grad_clip > 0, weight_decay >= 0, 0 <= warmup_frac < 1 and "
                             "0 <= min_lr_frac <= 1")
        check_device(self.device)
        check_future_covariates(self.future_covariates)
        object.__setattr__(self, "model_options", dict(self.model_options))
        self._check_model_options()

    def _check_model_options(self) -> None:
        names = {f.name for f in dataclasses.fields(SBMConfig)}
        bad = sorted(set(self.model_options) - (names - DERIVED))
        if bad:
            raise ValueError(f"unknown or derived SBMConfig fields in model_options: {bad} "
                             f"(context/horizon come from [train_sbm], n_neurons/n_covariates from the data)")
        SBMConfig(**self.model_config(n_neurons=8, n_covariates=1))   # the model's own validation

    def model_config(self, n_neurons: int | None = None, n_covariates: int | None = None) -> dict[str, Any]:
        """The SBMConfig mapping: context, horizon, the data's N and K (when given), then model_options."""
        out: dict[str, Any] = {"context": self.context, "horizon": self.horizon}
        if n_neurons is not None:
            out["n_neurons"] = n_neurons
        if n_covariates is not None:
            out["n_covariates"] = n_covariates if self.covariates else 0
        return {**out, **self.model_options}

    def splits(self, offsets: Sequence[int]) -> list[ConditionSplit]:
        """ZAPBench condition splits for this context."""
        return condition_splits(offsets, self.context, holdout=self.holdout, val_frac=self.val_frac,
                                test_frac=self.test_frac, padding=self.padding,
                                max_context=self.max_context or self.context)

    def torch_device(self) -> torch.device:
        """The training device (offline_training.device.resolve_device)."""
        return resolve_device(self.device)


@dataclass(frozen=True)
class SBMData:
    """Spike probabilities (T, N), covariates (T, K) or None, positions (N, 3), all float32; condition
    offsets; `first`: the first frame past the signal's warm-up."""

    probs: np.ndarray
    covariates: np.ndarray | None
    positions: np.ndarray
    offsets: tuple[int, ...]
    first: int = 0
    future: str = "recorded"   # the target frame's stimulus in batches (offline_training.covariates)

    def __post_init__(self) -> None:
        t, n = self.probs.shape
        if self.positions.shape != (n, 3):
            raise ValueError(f"positions must be (N={n}, 3), got {self.positions.shape}")
        if self.covariates is not None and (self.covariates.ndim != 2 or self.covariates.shape[0] != t):
            raise ValueError(f"covariates must be (T={t}, K), got {self.covariates.shape}")
        if self.offsets[-1] > t:
            raise ValueError(f"last condition offset {self.offsets[-1]} > T={t}")

    @property
    def n_covariates(self) -> int:
        return 0 if self.covariates is None else int(self.covariates.shape[1])

    def starts(self, splits: Sequence[ConditionSplit], split: str, context: int, horizon: int = 1,
               include_holdout: bool = False) -> dict[int, np.ndarray]:
        """split_windows() per condition, without the windows that start in the warm-up."""
        per = split_windows(splits, split, context, horizon, include_holdout)  # type: ignore[arg-type]
        return {k: s[s >= self.first] for k, s in per.items()}

    def batch(self, starts: np.ndarray, context: int,
              device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Windows x (B, C + 1, N) and their covariates (B, C + 1, K) | None, as tensors."""
        idx = np.asarray(starts, np.int64)[:, None] + np.arange(context + 1)[None]
        x = torch.from_numpy(np.ascontiguousarray(self.probs[idx])).to(device)
        cov = None if self.covariates is None else torch.from_numpy(
            covariate_windows(self.covariates, np.asarray(starts, np.int64), context, 1, self.future)).to(device)
        return x, cov


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
    model: nn.Module | None = None


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
                                       **state.summary()}, "data": {
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
