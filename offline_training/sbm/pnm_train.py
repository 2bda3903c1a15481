"""Train the behaviour head (PNM, models/pnm.py; SBM paper Sec. 2.2 and 3.3) on spike probabilities.

Input: the n_times = 4 frames of spike probability up to and including frame t ("four brain-state time
points taken backward in time"), (B, 4, N), and the neuron positions (N, 3). Target: the behaviour
readout at t (the simulator's swim vigor, rec.ground_truth("behaviour")), scaled to [0, 1] by a quantile
(default the max) of the train split's targets. L1 loss, AdamW with a linear warm-up over the first 10%
of the steps, gradient clipping at 1.0, and balanced mini-batches: each batch pairs rare high-magnitude
frames (above a train quantile) with typical ones. Splits: the same ZAPBench-style condition splits as
the forecasters (condition 3 held out). Scored by Pearson r on test and holdout, for ground-truth inputs
and, when given, for the SBM's next-step predictions of the same frames.
"""
from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from loopcast.models.pnm import PNM, PNMConfig
from loopcast.offline_training.data.splits import ConditionSplit, condition_splits, split_windows
from loopcast.offline_training.eval.metrics import pearson
from loopcast.offline_training.fit.device import check_device, resolve_device
from loopcast.offline_training.fit.loop import FitPlan, FitTask, fit

DERIVED = frozenset({"n_times", "d_beh"})   # one head per behaviour dimension (the paper)
METRICS_FILE = "pnm_metrics.json"
MODEL_FILE = "pnm.pt"
RESUME_FILE = "pnm_resume.pt"
RESUME_FREE = frozenset({"threads", "device"})   # may differ when resuming


@dataclass(frozen=True)
class PNMTrainConfig:
    """Everything that determines a PNM training run."""

    n_times: int = 4                   # frames up to and including t
    model_options: dict[str, Any] = field(default_factory=dict)   # other PNMConfig fields
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup_frac: float = 0.1
    grad_clip: float = 1.0
    batch_size: int = 64
    steps: int = 600
    val_every: int = 50
    patience: int = 6                  # validations without improvement before stopping
    scale_quantile: float = 1.0        # target scale: this quantile of the train targets (1.0 = max)
    high_quantile: float = 0.9         # train targets above this quantile are the rare high-magnitude frames
    high_frac: float = 0.5             # share of each batch drawn from them
    seed: int = 0
    threads: int = 2
    device: str = "auto"               # training device: auto, cpu, cuda, cuda:N (scoring: CPU)
    holdout: tuple[int, ...] = (3,)
    val_frac: float = 0.1
    test_frac: float = 0.2
    padding: int = 1

    def __post_init__(self) -> None:
        for name in ("n_times", "batch_size", "steps", "val_every", "patience", "threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not (0 < self.scale_quantile <= 1 and 0 <= self.high_quantile < 1 and 0 <= self.high_frac <= 1):
            raise ValueError("need 0 < scale_quantile <= 1, 0 <= high_quantile < 1 and 0 <= high_frac <= 1")
        if not (self.lr > 0 and self.grad_clip > 0 and 0 <= self.warmup_frac < 1 and self.weight_decay >= 0):
            raise ValueError("need lr > 0, grad_clip > 0, 0 <= warmup_frac < 1 and weight_decay >= 0")
        check_device(self.device)
        object.__setattr__(self, "model_options", dict(self.model_options))
        bad = sorted(set(self.model_options) - ({f.name for f in dataclasses.fields(PNMConfig)} - DERIVED))
        if bad:
            raise ValueError(f"unknown or derived PNMConfig fields in model_options: {bad}")
        self.model_config()

    def model_config(self) -> PNMConfig:
        """The PNM's config: n_times from here, one behaviour dimension, the rest from model_options."""
        return PNMConfig(**{"n_times": self.n_times, "d_beh": 1, **self.model_options})

    def splits(self, offsets: Sequence[int]) -> list[ConditionSplit]:
        """Condition splits whose windows are the n_times - 1 frames before a target frame t, then t."""
        c = self.n_times - 1
        return condition_splits(offsets, max(c, 1), holdout=self.holdout, val_frac=self.val_frac,
                                test_frac=self.test_frac, padding=self.padding, max_context=max(c, 1))


@dataclass(frozen=True)
class PNMResult:
    """Metrics (Pearson r and MAE per split) and the trained PNM (best val L1)."""

    metrics: dict[str, Any]
    model: nn.Module


@dataclass(frozen=True)
class BehaviourData:
    """Probabilities (T, N), behaviour (T,) scaled to [0, 1], positions (N, 3), the window length, the
    target frames t of each split per condition, and the scale the behaviour was divided by."""

    probs: np.ndarray
    target: np.ndarray
    positions: torch.Tensor
    n_times: int
    frames: dict[str, dict[int, np.ndarray]]
    scale: float

    def inputs(self, frames: np.ndarray, probs: np.ndarray | None = None) -> torch.Tensor:
        """(B, n_times, N): frames t - n_times + 1 .. t of `probs` (default the ground truth)."""
        idx = np.asarray(frames, np.int64)[:, None] + np.arange(1 - self.n_times, 1)[None]
        return torch.from_numpy(np.ascontiguousarray((self.probs if probs is None else probs)[idx]))


def target_frames(splits: Sequence[ConditionSplit], split: str, n_times: int,
                  include_holdout: bool = False) -> dict[int, np.ndarray]:
    """Target frames t of `split` per condition whose window t - n_times + 1 .. t lies in the range."""
    c = max(n_times - 1, 1)
    return {k: s + c for k, s in split_windows(splits, split, c, 1, include_holdout).items()}  # type: ignore[arg-type]


def build_data(probs: np.ndarray, behaviour: np.ndarray, positions: np.ndarray, offsets: Sequence[int],
               cfg: PNMTrainConfig) -> BehaviourData:
    """Frames per split and the behaviour scaled by the train targets' `scale_quantile`."""
    probs = _check(probs, behaviour, positions, offsets)
    active = np.flatnonzero(probs.any(axis=1))
    first = int(active[0]) if len(active) else 0
    splits = cfg.splits(offsets)
    frames = {split: {k: t[t - cfg.n_times + 1 >= first] for k, t in
                      target_frames(splits, split, cfg.n_times, include_holdout=split == "test").items()}
              for split in ("train", "val", "test")}
    train = np.concatenate(list(frames["train"].values()))
    if not len(train) or not any(len(v) for v in frames["val"].values()):
        raise ValueError("no train or no val frames: the recording is too short")
    scale = float(np.quantile(behaviour[train], cfg.scale_quantile))
    if not scale > 0:
        raise ValueError("the behaviour is zero on every train frame: nothing to learn")
    target = np.clip(np.asarray(behaviour, np.float32) / scale, 0.0, 1.0).astype(np.float32)
    return BehaviourData(probs, target, torch.as_tensor(positions, dtype=torch.float32), cfg.n_times, frames,
                         scale)


def _check(probs: np.ndarray, behaviour: np.ndarray, positions: np.ndarray, offsets: Sequence[int]) -> np.ndarray:
    if probs.ndim != 2:
        raise ValueError(f"probs must be (T, N), got {probs.shape}")
    t, n = probs.shape
    if np.shape(behaviour) != (t,):
        raise ValueError(f"behaviour must be (T={t},), got {np.shape(behaviour)}")
    if np.shape(positions) != (n, 3):
        raise ValueError(f"positions must be (N={n}, 3), got {np.shape(positions)}")
    if offsets[-1] > t:
        raise ValueError(f"last condition offset {offsets[-1]} > T={t}")
    return np.ascontiguousarray(probs, dtype=np.float32)


def balanced_batch(train: np.ndarray, high: np.ndarray, cfg: PNMTrainConfig, rng: np.random.Generator) -> np.ndarray:
    """high_frac of the batch from the rare high-magnitude frames `high`, the rest from the others."""
    typical = train if not len(high) else np.setdiff1d(train, high)
    n_high = int(round(cfg.high_frac * cfg.batch_size)) if len(high) and len(typical) else 0
    return np.concatenate([rng.choice(high, n_high) if n_high else np.empty(0, np.int64),
                           rng.choice(typical, cfg.batch_size - n_high)])


def predict(model: nn.Module, data: BehaviourData, frames: np.ndarray, probs: np.ndarray | None = None,
            batch_size: int = 256) -> np.ndarray:
    """Scaled behaviour predictions (B,) at target frames `frames` (computed on the model's device)."""
    model.eval()
    out = []
    device = _device(model)
    with torch.no_grad():
        for i in range(0, len(frames), batch_size):
            x = data.inputs(frames[i:i + batch_size], probs).to(device)
            out.append(model(x, data.positions.to(device))[:, 0].cpu().numpy())
    return np.concatenate(out) if out else np.empty(0, np.float32)


def train_pnm(probs: np.ndarray, behaviour: np.ndarray, positions: np.ndarray, offsets: Sequence[int],
              cfg: PNMTrainConfig = PNMTrainConfig(), run_dir: str | Path | None = None, progress: bool = True,
              predicted: np.ndarray | None = None, stop_after: int | None = None) -> PNMResult:
    """Train a PNM on spike probabilities (T, N) -> behaviour (T,); score it on test and holdout frames.
    `predicted` (T, N): the SBM's next-step predictions (NaN where absent) to score the PNM on as input.
    With `run_dir`, training checkpoints to run_dir/pnm_resume.pt at every validation and a rerun resumes
    it; `stop_after` ends training after that many steps, as an interrupted job would."""
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    data = build_data(probs, behaviour, positions, offsets, cfg)
    model, device = PNM(cfg.model_config()), resolve_device(cfg.device)
    checkpoint = None if run_dir is None else Path(run_dir) / RESUME_FILE
    history = _fit(model.to(device), data, cfg, progress, checkpoint, stop_after)
    model.to("cpu")
    names = {cs.index: cs.name for cs in cfg.splits(offsets)}
    holdout = set(cfg.holdout)
    metrics: dict[str, Any] = {"scale": data.scale, "device": str(device), "history": history,
                               "ground_truth": score(model, data, names, holdout)}
    if predicted is not None:
        if predicted.shape != probs.shape:
            raise ValueError(f"predicted must have the shape of probs {probs.shape}, got {predicted.shape}")
        metrics["sbm_predicted"] = score(model, data, names, holdout, np.asarray(predicted, np.float32))
    if run_dir is not None:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        torch.save({"config": dataclasses.asdict(cfg), "model": model.state_dict()}, Path(run_dir) / MODEL_FILE)
        (Path(run_dir) / METRICS_FILE).write_text(json.dumps(metrics, indent=2) + "\n")
    return PNMResult(metrics, model)


def _fit(model: nn.Module, data: BehaviourData, cfg: PNMTrainConfig, progress: bool, checkpoint: Path | None,
         stop_after: int | None) -> list[dict[str, float]]:
    """The one loop (offline_training.fit.loop): AdamW with linear warm-up, clipped L1 steps on balanced
    batches, val L1 every val_every steps; leaves the best val weights in `model`."""
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    warm = max(1, int(cfg.warmup_frac * cfg.steps))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm))
    rng = np.random.default_rng([cfg.seed, 7])
    val = np.concatenate(list(data.frames["val"].values()))
    task = FitTask(model, _train_step(model, data, cfg, opt, sched, rng),
                   lambda: {"val_l1": float(np.mean(np.abs(predict(model, data, val) - data.target[val])))},
                   stateful={"optimizer": opt, "scheduler": sched}, rngs={"batches": rng})
    state = fit(task, FitPlan(total=cfg.steps, config=cfg, val_every=cfg.val_every, patience=cfg.patience,
                              monitor="val_l1", checkpoint=checkpoint, resume_free=RESUME_FREE,
                              stop_after=stop_after, progress=progress, desc="train pnm"))
    model.load_state_dict(state.best_state)
    model.eval()
    return state.history


def _train_step(model: nn.Module, data: BehaviourData, cfg: PNMTrainConfig, opt: torch.optim.Optimizer,
                sched: torch.optim.lr_scheduler.LRScheduler,
                rng: np.random.Generator) -> Callable[[int], dict[str, float]]:
    """One clipped L1 step on a balanced batch (high_frac of it above the train high_quantile)."""
    train = np.concatenate(list(data.frames["train"].values()))
    high = train[data.target[train] > np.quantile(data.target[train], cfg.high_quantile)]
    device = _device(model)
    positions = data.positions.to(device)

    def step(_: int) -> dict[str, float]:
        model.train()
        frames = balanced_batch(train, high, cfg, rng)
        loss = nn.functional.l1_loss(model(data.inputs(frames).to(device), positions)[:, 0],
                                     torch.from_numpy(data.target[frames]).to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        sched.step()
        return {"train_l1": float(loss.detach())}
    return step


def _device(model: nn.Module) -> torch.device:
    """Where the model's parameters are."""
    return next(model.parameters()).device


def score(model: nn.Module, data: BehaviourData, names: dict[int, str], holdout: set[int],
          probs: np.ndarray | None = None) -> dict[str, Any]:
    """Pearson r and L1 (scaled) of the predictions per test condition, pooled over the training
    conditions ("test") and over the holdout ("holdout"). With `probs` (e.g. SBM predictions, NaN where
    absent) only the frames whose whole input window is known are scored."""
    per: dict[str, dict[str, float]] = {}
    pooled: dict[str, list[np.ndarray]] = {"test": [], "holdout": []}
    for k, frames in data.frames["test"].items():
        if probs is not None and len(frames):
            frames = frames[~np.isnan(data.inputs(frames, probs).numpy()).any(axis=(1, 2))]
        if not len(frames):
            continue
        pred, true = predict(model, data, frames, probs), data.target[frames]
        per[names[k]] = {"r": pearson(pred, true), "l1": float(np.mean(np.abs(pred - true))), "frames": len(frames)}
        pooled["holdout" if k in holdout else "test"].append(np.stack([pred, true]))
    out: dict[str, Any] = {"per_condition": per}
    for group, parts in pooled.items():
        if parts:
            pt = np.concatenate(parts, axis=1)
            out[group] = {"r": pearson(pt[0], pt[1]), "l1": float(np.mean(np.abs(pt[0] - pt[1]))),
                          "frames": int(pt.shape[1])}
    return out


def input_frames(offsets: Sequence[int], cfg: PNMTrainConfig = PNMTrainConfig()) -> np.ndarray:
    """Every frame a test input window reads (t - n_times + 1 .. t over all test targets t): the frames
    to predict with the SBM for score(..., probs=predicted)."""
    per = target_frames(cfg.splits(offsets), "test", cfg.n_times, include_holdout=True)
    t = np.concatenate(list(per.values()) or [np.empty(0, np.int64)])
    return np.unique((t[:, None] + np.arange(1 - cfg.n_times, 1)[None]).ravel())
