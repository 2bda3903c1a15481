"""Single-process training on (T, N) float32 traces with ZAPBench splits, MAE loss and early stopping."""
from __future__ import annotations

import copy
import hashlib
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from loopcast.config import from_dict, to_dict
from models.baselines import MeanBaseline, MeanBaselineConfig
from models.registry import MODELS, build_model, config_fields
from offline_training.splits import ConditionSplit, condition_splits, gather_windows, split_windows


@dataclass(frozen=True)
class TrainConfig:
    """Everything that determines a training run (written beside every engine as config.toml)."""

    model: str = "nlinear"
    context: int = 4
    horizon: int = 8
    lr: float = 1e-3
    weight_decay: float = 1e-4
    batch_size: int = 8
    eval_batch_size: int = 64
    max_epochs: int = 30
    patience: int = 3
    steps_per_epoch: int = 0  # 0 = every train window once per epoch
    seed: int = 0
    threads: int = 2
    holdout: tuple[int, ...] = (3,)
    val_frac: float = 0.1
    test_frac: float = 0.2
    padding: int = 1
    max_context: int = 256

    def __post_init__(self) -> None:
        if self.model not in MODELS:
            raise ValueError(f"model must be one of {sorted(MODELS)}, got {self.model!r}")
        for name in ("context", "horizon", "batch_size", "eval_batch_size", "max_epochs", "threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.patience < 1 or self.steps_per_epoch < 0:
            raise ValueError("patience must be >= 1 and steps_per_epoch >= 0")

    def model_config(self, n_neurons: int | None = None) -> dict[str, Any]:
        """The model's own config mapping (for models.registry.build_model); models that mix neurons
        (e.g. TSMixer) also get the data's neuron count."""
        out: dict[str, Any] = {"context": self.context, "horizon": self.horizon}
        if n_neurons is not None and "n_neurons" in config_fields(self.model):
            out["n_neurons"] = n_neurons
        return out

    def splits(self, offsets: Sequence[int]) -> list[ConditionSplit]:
        """ZAPBench condition splits for this context length."""
        return condition_splits(offsets, self.context, holdout=self.holdout, val_frac=self.val_frac,
                                test_frac=self.test_frac, padding=self.padding,
                                max_context=self.max_context)


@dataclass(frozen=True)
class TrainResult:
    """The best model (by val MAE), per-epoch history, and val metrics vs the mean baseline."""

    model: nn.Module
    history: tuple[dict[str, float], ...]
    metrics: dict[str, Any]
    config: TrainConfig = field(default_factory=TrainConfig)
    best_epoch: int = 0


def train_config_from_dict(data: dict[str, Any]) -> TrainConfig:
    """Strict TrainConfig from a mapping (a TOML [train] table)."""
    return from_dict(TrainConfig, data, where="train")


def data_fingerprint(traces: np.ndarray, offsets: Sequence[int]) -> str:
    """sha256 over shape, dtype, condition offsets and the trace bytes."""
    h = hashlib.sha256()
    h.update(f"{traces.shape}|{traces.dtype}|{list(offsets)}".encode())
    h.update(np.ascontiguousarray(traces).data)
    return "sha256:" + h.hexdigest()


def first_window(traces: np.ndarray, offsets: Sequence[int], cfg: TrainConfig,
                 split: str = "val") -> np.ndarray:
    """The context (C, N) of the first `split` window of the first training condition that has one."""
    for starts in split_windows(cfg.splits(offsets), split, cfg.context, cfg.horizon).values():  # type: ignore[arg-type]
        if len(starts):
            x, _ = gather_windows(traces, starts[:1], cfg.context, cfg.horizon)
            return np.ascontiguousarray(x[0], dtype=np.float32)
    raise ValueError(f"no {split} window in any training condition")


def train(traces: np.ndarray, offsets: Sequence[int], cfg: TrainConfig = TrainConfig(),
          progress: bool = True, checkpoint: str | Path | None = None) -> TrainResult:
    """Train `cfg.model` on the train ranges of the training conditions; early-stop on val MAE."""
    traces = _check_traces(traces, offsets)
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    splits = cfg.splits(offsets)
    train_starts = np.concatenate(list(split_windows(splits, "train", cfg.context, cfg.horizon).values()))
    val_starts = split_windows(splits, "val", cfg.context, cfg.horizon)
    if len(train_starts) == 0 or not any(len(v) for v in val_starts.values()):
        raise ValueError("traces too short: no train or no val windows for this context/horizon")
    model = build_model(cfg.model, cfg.model_config(n_neurons=traces.shape[1]))
    params = [p for p in model.parameters() if p.requires_grad]
    state = _TrainState(best_state=copy.deepcopy(model.state_dict()))
    if params:
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        if checkpoint is not None and Path(checkpoint).is_file():
            state = _load_checkpoint(Path(checkpoint), model, opt, cfg)
        _fit(model, opt, traces, train_starts, val_starts, cfg, state, progress, checkpoint)
    model.load_state_dict(state.best_state)
    model.eval()
    metrics = {"val": evaluate(model, traces, val_starts, splits, cfg)}
    return TrainResult(model=model, history=tuple(state.history), metrics=metrics, config=cfg,
                       best_epoch=state.best_epoch)


@dataclass
class _TrainState:
    best_state: dict[str, torch.Tensor]
    best_val: float = math.inf
    best_epoch: int = 0
    bad_epochs: int = 0
    next_epoch: int = 1
    history: list[dict[str, float]] = field(default_factory=list)


def _fit(model: nn.Module, opt: torch.optim.Optimizer, traces: np.ndarray, train_starts: np.ndarray,
         val_starts: dict[int, np.ndarray], cfg: TrainConfig, state: _TrainState, progress: bool,
         checkpoint: str | Path | None) -> None:
    epochs = tqdm(range(state.next_epoch, cfg.max_epochs + 1), desc=f"train {cfg.model}",
                  disable=not progress, initial=state.next_epoch - 1, total=cfg.max_epochs)
    for epoch in epochs:
        if state.bad_epochs >= cfg.patience:
            break
        train_loss = _train_epoch(model, opt, traces, train_starts, cfg, epoch, progress)
        val_loss = _mae_mean(model, traces, val_starts, cfg)
        state.history.append({"epoch": epoch, "train_mae": train_loss, "val_mae": val_loss})
        if val_loss < state.best_val:
            state.best_val, state.best_epoch, state.bad_epochs = val_loss, epoch, 0
            state.best_state = copy.deepcopy(model.state_dict())
        else:
            state.bad_epochs += 1
        state.next_epoch = epoch + 1
        epochs.set_postfix(train=f"{train_loss:.4f}", val=f"{val_loss:.4f}", best=state.best_epoch)
        if checkpoint is not None:
            _save_checkpoint(Path(checkpoint), model, opt, cfg, state)


def _train_epoch(model: nn.Module, opt: torch.optim.Optimizer, traces: np.ndarray,
                 starts: np.ndarray, cfg: TrainConfig, epoch: int, progress: bool) -> float:
    model.train()
    order = np.random.default_rng([cfg.seed, epoch]).permutation(starts)
    batches = [order[i:i + cfg.batch_size] for i in range(0, len(order), cfg.batch_size)]
    if cfg.steps_per_epoch:
        batches = batches[:cfg.steps_per_epoch]
    total = 0.0
    for batch in tqdm(batches, desc=f"epoch {epoch}", leave=False, disable=not progress):
        x, y = gather_windows(traces, batch, cfg.context, cfg.horizon)
        loss = nn.functional.l1_loss(model(torch.from_numpy(x)), torch.from_numpy(y))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        total += float(loss.detach())
    return total / max(len(batches), 1)


@torch.no_grad()
def mae_per_step(model: nn.Module, traces: np.ndarray, starts: np.ndarray, context: int,
                 horizon: int, batch_size: int = 64) -> np.ndarray:
    """MAE per step ahead (H,), averaged over the windows at `starts` and all neurons."""
    model.eval()
    total = np.zeros(horizon, dtype=np.float64)
    for i in range(0, len(starts), batch_size):
        x, y = gather_windows(traces, starts[i:i + batch_size], context, horizon)
        err = (model(torch.from_numpy(x)) - torch.from_numpy(y)).abs()  # (B, H, N)
        total += err.sum(dim=(0, 2)).double().numpy()
    return total / (len(starts) * traces.shape[1])


def _mae_mean(model: nn.Module, traces: np.ndarray, starts: dict[int, np.ndarray],
              cfg: TrainConfig) -> float:
    per_cond = [mae_per_step(model, traces, s, cfg.context, cfg.horizon, cfg.eval_batch_size)
                for s in starts.values() if len(s)]
    return float(np.mean(per_cond))


def evaluate(model: nn.Module, traces: np.ndarray, starts: dict[int, np.ndarray],
             splits: Sequence[ConditionSplit], cfg: TrainConfig) -> dict[str, Any]:
    """ZAPBench-style MAE of `model` and of MeanBaseline: per condition, per step, then averaged."""
    mean = MeanBaseline(MeanBaselineConfig(context=cfg.context, horizon=cfg.horizon))
    names = {s.index: s.name for s in splits}
    out: dict[str, Any] = {"windows": int(sum(len(s) for s in starts.values())), "per_condition": {}}
    steps: dict[str, list[np.ndarray]] = {"model": [], "mean_baseline": []}
    for k, s in starts.items():
        if not len(s):
            continue
        row = {}
        for label, m in (("model", model), ("mean_baseline", mean)):
            per_step = mae_per_step(m, traces, s, cfg.context, cfg.horizon, cfg.eval_batch_size)
            steps[label].append(per_step)
            row[label] = float(per_step.mean())
        out["per_condition"][names[k]] = row
    for label, rows in steps.items():
        per_step = np.mean(rows, axis=0)
        out[label] = {"mae": float(per_step.mean()), "mae_per_step": [float(v) for v in per_step]}
    out["conditions"] = list(out["per_condition"])
    return out


def _check_traces(traces: np.ndarray, offsets: Sequence[int]) -> np.ndarray:
    if not isinstance(traces, np.ndarray) or traces.ndim != 2:
        raise ValueError(f"traces must be a (T, N) array, got {getattr(traces, 'shape', type(traces))}")
    if offsets[-1] > traces.shape[0]:
        raise ValueError(f"last condition offset {offsets[-1]} > T={traces.shape[0]}")
    return np.ascontiguousarray(traces, dtype=np.float32)


def _save_checkpoint(path: Path, model: nn.Module, opt: torch.optim.Optimizer, cfg: TrainConfig,
                     state: _TrainState) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"config": to_dict(cfg), "model": model.state_dict(), "optimizer": opt.state_dict(),
                "state": {k: getattr(state, k) for k in state.__dataclass_fields__}}, tmp)
    os.replace(tmp, path)


def _load_checkpoint(path: Path, model: nn.Module, opt: torch.optim.Optimizer,
                     cfg: TrainConfig) -> _TrainState:
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    def same(d: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in d.items() if k != "max_epochs"}  # resuming may extend training

    if same(ckpt.get("config", {})) != same(to_dict(cfg)):
        raise ValueError(f"{path}: checkpoint was written with a different training config")
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["optimizer"])
    return _TrainState(**ckpt["state"])
