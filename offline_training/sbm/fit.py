"""The Sparse Brain Model's training on the one loop (offline_training.fit.loop): teacher-forced BCE steps,
AdamW or Muon (the paper's MuonWithAuxAdam: Muon for the >= 2-D weights of the attention body, AdamW for
embeddings, decoder, gains and biases), a per-batch warmup-cosine schedule, gradient clipping, validation
several times per epoch keeping the best weights, early stopping (`patience` validations without
improvement), and resumable checkpoints (offline_training.sbm.train drives it)."""
from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from loopcast.models.sbm import SparseBrainModel
from loopcast.offline_training.data.splits import ConditionSplit
from loopcast.offline_training.fit import loop
from loopcast.offline_training.fit.loop import FitPlan, FitState, FitTask
from loopcast.offline_training.sbm.config import SBMData, SBMTrainConfig
from loopcast.offline_training.sbm.eval import evenly, teacher_logits

EDGE_PARAMS = ("neuron_embed.", "stim_embed.", "decoder.")   # embed/head: AdamW even with Muon (paper)
RESUME_FREE = frozenset({"max_epochs", "max_steps", "patience", "threads", "device", "eval", "export",
                         "parity_tolerance"})


def teacher_loss(model: SparseBrainModel, x: torch.Tensor, cov: torch.Tensor | None) -> torch.Tensor:
    """Mean BCE (fp32) over the C next-step targets of every window."""
    logits = teacher_logits(model, x, cov).float()
    return nn.functional.binary_cross_entropy_with_logits(logits, x[:, 1:].float())


def training_summary(state: FitState) -> dict[str, Any]:
    """JSON-able training summary (metrics.json 'training')."""
    return {"steps": state.step, "best_step": state.best_step, "best_val_bce": state.best_val,
            "stopped": state.stopped, "history": state.history}


def make_optimizers(model: nn.Module, cfg: SBMTrainConfig) -> list[torch.optim.Optimizer]:
    """AdamW for everything, or (optimizer="muon") Muon for the 2-D body weights + AdamW for the rest
    (embeddings, decoder, gains, biases), as in the paper's MuonWithAuxAdam."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    adamw = functools.partial(torch.optim.AdamW, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return [adamw([p for _, p in params])]
    body = [p for n, p in params if p.ndim == 2 and not n.startswith(EDGE_PARAMS)]
    rest = [p for n, p in params if not any(p is q for q in body)]
    return [torch.optim.Muon(body, lr=cfg.muon_lr, weight_decay=cfg.weight_decay), adamw(rest)]


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
def validate(model: SparseBrainModel, data: SBMData, starts: np.ndarray, cfg: SBMTrainConfig,
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


def fit(model: SparseBrainModel, data: SBMData, splits: Sequence[ConditionSplit], cfg: SBMTrainConfig,
        checkpoint: Path, progress: bool) -> FitState:
    """Train on the train windows, validating val_per_epoch times per epoch; resumes `checkpoint`."""
    train, val = _train_val_starts(data, splits, cfg)
    device = cfg.torch_device()
    model.to(device)
    opts = make_optimizers(model, cfg)
    per_epoch, total, every = _plan(cfg, len(train))
    scheds = [torch.optim.lr_scheduler.LambdaLR(o, lambda s: lr_factor(s, total, cfg)) for o in opts]

    def train_step(step: int) -> dict[str, float]:
        x, cov = data.batch(_batch_starts(train, step - 1, per_epoch, cfg), cfg.context, device)
        return {"train_bce": _train_step(model, opts, scheds, x, cov, cfg)}

    stateful: dict[str, loop.Stateful] = {f"optimizer{i}": o for i, o in enumerate(opts)}
    stateful.update({f"scheduler{i}": s for i, s in enumerate(scheds)})
    task = FitTask(model, train_step, lambda: validate(model, data, val, cfg, device), stateful)
    return loop.fit(task, FitPlan(total=total, config=cfg, val_every=every, patience=cfg.patience,
                                  monitor="val_bce", checkpoint=checkpoint, resume_free=RESUME_FREE,
                                  progress=progress, desc="train sbm"))


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


def _train_step(model: SparseBrainModel, opts: list[torch.optim.Optimizer], scheds: list[Any], x: torch.Tensor,
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
