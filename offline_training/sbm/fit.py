"""The Sparse Brain Model's fit loop: teacher-forced BCE steps, AdamW or Muon (the paper's MuonWithAuxAdam:
Muon for the >= 2-D weights of the attention body, AdamW for embeddings, decoder, gains and biases), a
per-batch warmup-cosine schedule, gradient clipping, validation several times per epoch keeping the best
weights, early stopping, and resumable checkpoints (offline_training.sbm_train drives it)."""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from loopcast.config import to_dict
from offline_training.sbm_eval import evenly, teacher_logits
from offline_training.splits import ConditionSplit

if TYPE_CHECKING:
    from offline_training.sbm_train import SBMData, SBMTrainConfig

EDGE_PARAMS = ("neuron_embed.", "stim_embed.", "decoder.")   # embed/head: AdamW even with Muon (paper)
RESUME_FREE = frozenset({"max_epochs", "max_steps", "patience", "threads", "device", "eval", "export",
                         "parity_tolerance"})


def teacher_loss(model: nn.Module, x: torch.Tensor, cov: torch.Tensor | None) -> torch.Tensor:
    """Mean BCE (fp32) over the C next-step targets of every window."""
    logits = teacher_logits(model, x, cov).float()
    return nn.functional.binary_cross_entropy_with_logits(logits, x[:, 1:].float())


@dataclass
class FitState:
    """Where training stands (saved in the checkpoint, so a run resumes where it stopped)."""

    best_state: dict[str, torch.Tensor]
    best_val: float = math.inf
    best_step: int = 0
    step: int = 0
    bad_vals: int = 0
    stopped: str = ""
    history: list[dict[str, float]] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        """JSON-able training summary (metrics.json 'training')."""
        return {"steps": self.step, "best_step": self.best_step, "best_val_bce": self.best_val,
                "stopped": self.stopped, "history": self.history}


def make_optimizers(model: nn.Module, cfg: SBMTrainConfig) -> list[torch.optim.Optimizer]:
    """AdamW for everything, or (optimizer="muon") Muon for the 2-D body weights + AdamW for the rest
    (embeddings, decoder, gains, biases), as in the paper's MuonWithAuxAdam."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    adamw = dict(lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return [torch.optim.AdamW([p for _, p in params], **adamw)]  # type: ignore[arg-type]
    body = [p for n, p in params if p.ndim == 2 and not n.startswith(EDGE_PARAMS)]
    rest = [p for n, p in params if not any(p is q for q in body)]
    return [torch.optim.Muon(body, lr=cfg.muon_lr, weight_decay=cfg.weight_decay),  # type: ignore[attr-defined]
            torch.optim.AdamW(rest, **adamw)]  # type: ignore[arg-type]


def lr_factor(step: int, total: int, cfg: SBMTrainConfig) -> float:
    """Linear warm-up over warmup_frac of the steps, then cosine from 1 down to min_lr_frac."""
    warm = max(1, int(cfg.warmup_frac * total))
    if step < warm:
        return (step + 1) / warm
    done = min(1.0, (step - warm) / max(1, total - warm))
    return cfg.min_lr_frac + (1 - cfg.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * done))


def _plan(cfg: SBMTrainConfig, n_train: int) -> tuple[int, int, int]:
    """(steps per epoch, total steps, steps between validations)."""
    per_epoch = cfg.steps_per_epoch or math.ceil(n_train / cfg.batch_size)
    total = cfg.max_epochs * per_epoch
    total = min(total, cfg.max_steps) if cfg.max_steps else total
    return per_epoch, total, max(1, per_epoch // cfg.val_per_epoch)


def _batch_starts(train: np.ndarray, step: int, per_epoch: int, cfg: SBMTrainConfig) -> np.ndarray:
    """The step's batch: a slice of the epoch's seeded permutation (wrapping around)."""
    epoch, i = divmod(step, per_epoch)
    order = np.random.default_rng([cfg.seed, epoch]).permutation(train)
    return order[(i * cfg.batch_size + np.arange(cfg.batch_size)) % len(order)]


@torch.no_grad()
def validate(model: nn.Module, data: SBMData, starts: np.ndarray, cfg: SBMTrainConfig,
             device: torch.device) -> dict[str, float]:
    """Teacher-forced BCE over all C targets and the MAE of the last (C-th) next-step prediction."""
    model.eval()
    bce = mae = 0.0
    for i in range(0, len(starts), cfg.eval.batch_size):
        x, cov = data.batch(starts[i:i + cfg.eval.batch_size], cfg.context, device)
        logits = teacher_logits(model, x, cov).float()
        bce += float(nn.functional.binary_cross_entropy_with_logits(logits, x[:, 1:], reduction="sum"))
        mae += float((torch.sigmoid(logits[:, -1]) - x[:, -1]).abs().sum())
    n = len(starts) * data.probs.shape[1]
    return {"val_bce": bce / (n * cfg.context), "val_mae": mae / n}


def fit(model: nn.Module, data: SBMData, splits: Sequence[ConditionSplit], cfg: SBMTrainConfig,
        checkpoint: Path, progress: bool) -> FitState:
    """Train on the train windows, validating val_per_epoch times per epoch; resumes `checkpoint`."""
    train, val = _train_val_starts(data, splits, cfg)
    device = cfg.torch_device()
    model.to(device)
    opts = make_optimizers(model, cfg)
    per_epoch, total, every = _plan(cfg, len(train))
    scheds = [torch.optim.lr_scheduler.LambdaLR(o, lambda s: lr_factor(s, total, cfg)) for o in opts]
    state = _resume(checkpoint, model, opts, scheds, cfg) or FitState(best_state=_cpu_state(model))
    bar = tqdm(total=total, initial=state.step, desc="train sbm", unit="step", disable=not progress)
    while state.step < total and not state.stopped:
        x, cov = data.batch(_batch_starts(train, state.step, per_epoch, cfg), cfg.context, device)
        loss = _train_step(model, opts, scheds, x, cov, cfg)
        state.step += 1
        bar.update(1)
        if state.step % every == 0 or state.step == total:
            _after_validation(state, model, validate(model, data, val, cfg, device), loss, cfg)
            bar.set_postfix(loss=f"{loss:.4f}", val=f"{state.history[-1]['val_bce']:.4f}", best=state.best_step)
            _save(checkpoint, model, opts, scheds, cfg, state)
    bar.close()
    return state


def _train_val_starts(data: SBMData, splits: Sequence[ConditionSplit],
                      cfg: SBMTrainConfig) -> tuple[np.ndarray, np.ndarray]:
    """All train window starts, and at most val_windows evenly spaced val starts."""
    empty = [np.empty(0, np.int64)]
    train = np.concatenate(list(data.starts(splits, "train", cfg.context).values()) or empty)
    val = np.concatenate(list(data.starts(splits, "val", cfg.context).values()) or empty)
    if not len(train) or not len(val):
        raise ValueError(f"no train or no val windows of C + 1 = {cfg.context + 1} frames past the warm-up "
                         f"(frame {data.first}): the recording is too short")
    return train, evenly(val, cfg.val_windows)


def _train_step(model: nn.Module, opts: list[torch.optim.Optimizer], scheds: list[Any], x: torch.Tensor,
                cov: torch.Tensor | None, cfg: SBMTrainConfig) -> float:
    """One clipped optimiser step on a batch of windows; returns its loss."""
    model.train()
    loss = teacher_loss(model, x, cov)
    for o in opts:
        o.zero_grad(set_to_none=True)
    loss.backward()
    nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    for o, s in zip(opts, scheds):
        o.step()
        s.step()
    return float(loss.detach())


def _after_validation(state: FitState, model: nn.Module, val: dict[str, float], loss: float,
                      cfg: SBMTrainConfig) -> None:
    state.history.append({"step": state.step, "train_bce": loss, **val})
    if val["val_bce"] < state.best_val:
        state.best_val, state.best_step, state.bad_vals = val["val_bce"], state.step, 0
        state.best_state = _cpu_state(model)
    else:
        state.bad_vals += 1
        if state.bad_vals >= cfg.patience:
            state.stopped = f"early stop: no val improvement in {cfg.patience} validations"


def _cpu_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def _resumable(cfg: dict[str, Any]) -> dict[str, Any]:
    """The config fields a checkpoint must share with the run that resumes it."""
    return {k: v for k, v in cfg.items() if k not in RESUME_FREE}


def _save(path: Path, model: nn.Module, opts: list[torch.optim.Optimizer], scheds: list[Any],
          cfg: SBMTrainConfig, state: FitState) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"config": to_dict(cfg), "model": _cpu_state(model), "optimizers": [o.state_dict() for o in opts],
                "schedulers": [s.state_dict() for s in scheds], "state": dataclasses.asdict(state)}, tmp)
    os.replace(tmp, path)


def _resume(path: Path, model: nn.Module, opts: list[torch.optim.Optimizer], scheds: list[Any],
            cfg: SBMTrainConfig) -> FitState | None:
    if not path.is_file():
        return None
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    if _resumable(ckpt["config"]) != _resumable(to_dict(cfg)):
        raise ValueError(f"{path}: checkpoint was written with a different training config; "
                         f"use a new run directory")
    model.load_state_dict(ckpt["model"])
    for o, s, od, sd in zip(opts, scheds, ckpt["optimizers"], ckpt["schedulers"]):
        o.load_state_dict(od)
        s.load_state_dict(sd)
    return FitState(**ckpt["state"])
