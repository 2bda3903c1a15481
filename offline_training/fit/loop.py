"""The one training loop of every trainer: epochs or steps, periodic validation, early stopping, the best
weights, atomic checkpoints and resume, a progress bar, and torchrun awareness.

A trainer describes WHAT to train as a FitTask (the model, "train one unit", "validate", and the
optimisers, schedulers and random generators a resumed run needs) and HOW LONG as a FitPlan; `fit` runs it:

    state = fit(FitTask(model, train=..., validate=..., stateful={"optimizer": opt}),
                FitPlan(total=cfg.max_epochs, config=cfg, unit="epoch", patience=cfg.patience,
                        monitor="val_mae", checkpoint=run_dir / "resume.pt"))
    model.load_state_dict(state.best_state)

Units. A plan trains `total` units: optimiser steps or whole epochs (`unit` says which and names the
history rows' first key). Unit i (1-based) is `task.train(i)`; it returns train metrics. After every
`val_every` units, and after the last one, `task.validate()` returns val metrics; a history row is
{unit: i, each train metric averaged over the units since the previous validation, each val metric}.

Patience, one unit for every trainer: VALIDATIONS WITHOUT IMPROVEMENT of the monitored val metric (lower
is better, strictly). After `patience` of them in a row training stops; 0 never stops early. A trainer
that validates once per epoch therefore counts epochs.

Best state. The CPU weights of the best validation so far (the initial weights before the first one).
`fit` leaves the model at its last weights; the trainer loads `state.best_state` if it wants the best.

Checkpoints. With `plan.checkpoint`, after every validation (and when `stop_after` ends the run) rank 0
writes one file atomically (a temp file beside it, then a rename): the training config, the current and
best weights, the loop state, the task's optimisers / schedulers / generators and torch's RNG. With
`plan.resume`, a run whose checkpoint exists continues from it, to exactly the result of an uninterrupted
run; rank 0 reads it and every rank gets it. The checkpoint's config must equal the run's except for the
plan's `resume_free` keys (dotted for nested tables), else ValueError naming the keys that differ.
"""
from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from loopcast.config import to_dict
from loopcast.offline_training.fit.ddp import DistEnv, broadcast_object

FORMAT = "loopcast-fit-1"   # a checkpoint's "format": what this loop writes and reads
Unit = Literal["step", "epoch"]
Metrics = Mapping[str, float]
Rng = np.random.Generator | torch.Generator


class Stateful(Protocol):
    """What the loop checkpoints of a trainer's optimiser or LR scheduler."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state_dict: dict[str, Any]) -> Any: ...


@dataclass
class FitState:
    """Where training stands; everything but the weights is plain data (checkpoint "state")."""

    best_state: dict[str, torch.Tensor]   # CPU weights of the best validation (initially the first weights)
    step: int = 0                         # units done (steps, or epochs for unit = "epoch")
    best_val: float = math.inf
    best_step: int = 0                    # the unit whose validation was best (0: none yet)
    bad_vals: int = 0                     # validations since the best one
    stopped: str = ""                     # why training stopped early ("" = it did not)
    history: list[dict[str, float]] = field(default_factory=list)
    train_sums: dict[str, float] = field(default_factory=dict)   # train metrics since the last validation
    train_units: int = 0

    def progress(self) -> dict[str, Any]:
        """Every field but best_state."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "best_state"}


@dataclass(frozen=True)
class FitTask:
    """What a trainer trains: `train(i)` trains unit i (1-based) and returns its train metrics;
    `validate()` returns val metrics, the plan's monitor among them. `stateful` (optimisers, schedulers)
    and `rngs` (the trainer's own generators) are checkpointed with the model. `on_best(state)` runs on
    rank 0 after each new best validation (e.g. to write a best-model file)."""

    model: nn.Module
    train: Callable[[int], Metrics]
    validate: Callable[[], Metrics]
    stateful: Mapping[str, Stateful] = field(default_factory=dict)
    rngs: Mapping[str, Rng] = field(default_factory=dict)
    on_best: Callable[[FitState], None] | None = None


@dataclass(frozen=True)
class FitPlan:
    """How long and how: `total` units of `unit`, validating every `val_every` units and after the last;
    early stopping after `patience` validations without improvement of `monitor` (0 = never);
    `config` (the trainer's config dataclass) is saved in and checked against `checkpoint`."""

    total: int
    config: Any
    unit: Unit = "step"
    val_every: int = 1
    patience: int = 0
    monitor: str = "val_loss"
    checkpoint: Path | None = None
    resume: bool = True                        # continue from `checkpoint` when it exists
    resume_free: frozenset[str] = frozenset()  # config keys that may differ from the checkpoint's
    section: str = "training"                  # how errors name the config, e.g. "[train_video]"
    stop_after: int | None = None              # end after this many units (checkpoint written)
    env: DistEnv = DistEnv()
    progress: bool = True
    desc: str = "train"

    def __post_init__(self) -> None:
        if self.total < 0 or self.val_every < 1 or self.patience < 0:
            raise ValueError(f"need total >= 0, val_every >= 1 and patience >= 0, got {self.total}, "
                             f"{self.val_every}, {self.patience}")
        if self.stop_after is not None and self.stop_after < 0:
            raise ValueError(f"stop_after must be >= 0, got {self.stop_after}")
        if self.checkpoint is not None:
            object.__setattr__(self, "checkpoint", Path(self.checkpoint))

    def finished(self, state: FitState) -> bool:
        """Whether no unit is left: all trained, stopped early, or stop_after reached."""
        cut = self.stop_after is not None and state.step >= self.stop_after
        return bool(state.stopped) or state.step >= self.total or cut

    def validates_after(self, step: int) -> bool:
        """Whether unit `step` is followed by a validation."""
        return step % self.val_every == 0 or step == self.total


def fit(task: FitTask, plan: FitPlan, state: FitState | None = None) -> FitState:
    """Train `task` by `plan` from `state` (default: start(task, plan), resuming the checkpoint);
    returns the final state. The model keeps its last weights; state.best_state holds the best."""
    state = start(task, plan) if state is None else state
    bar = tqdm(total=plan.total, initial=min(state.step, plan.total), desc=plan.desc, unit=plan.unit,
               disable=not (plan.progress and plan.env.is_main))
    while not plan.finished(state):
        train = _train_unit(task, state)
        bar.update(1)
        if plan.validates_after(state.step):
            _validate(task, plan, state)
            save_checkpoint(task, plan, state)
        elif plan.finished(state):
            save_checkpoint(task, plan, state)
        bar.set_postfix({**{k: f"{v:.4f}" for k, v in train.items()}, **_val_postfix(plan, state)})
    bar.close()
    return state


def start(task: FitTask, plan: FitPlan) -> FitState:
    """The state to train from: the checkpoint's (model, optimisers, schedulers and generators restored)
    when plan.resume and it exists, else a fresh one."""
    ckpt = _read(plan) if plan.resume else None
    if ckpt is None:
        return FitState(best_state=cpu_state(task.model))
    task.model.load_state_dict(ckpt["model"])
    for name, obj in task.stateful.items():
        obj.load_state_dict(ckpt["stateful"][name])
    _set_rng_states(task, ckpt["rngs"])
    return FitState(best_state=ckpt["best"], **ckpt["state"])


def _train_unit(task: FitTask, state: FitState) -> Metrics:
    metrics = task.train(state.step + 1)
    state.step += 1
    for k, v in metrics.items():
        state.train_sums[k] = state.train_sums.get(k, 0.0) + float(v)
    state.train_units += 1
    return metrics


def _validate(task: FitTask, plan: FitPlan, state: FitState) -> None:
    """Validate, log a history row, keep the best weights, count validations without improvement."""
    val = {k: float(v) for k, v in task.validate().items()}
    n = max(state.train_units, 1)
    state.history.append({plan.unit: state.step, **{k: v / n for k, v in state.train_sums.items()}, **val})
    state.train_sums, state.train_units = {}, 0
    if val[plan.monitor] < state.best_val:
        state.best_val, state.best_step, state.bad_vals = val[plan.monitor], state.step, 0
        state.best_state = cpu_state(task.model)
        if task.on_best is not None and plan.env.is_main:
            task.on_best(state)
        return
    state.bad_vals += 1
    if plan.patience and state.bad_vals >= plan.patience:
        state.stopped = f"early stop: no val improvement in {plan.patience} validations"


def _val_postfix(plan: FitPlan, state: FitState) -> dict[str, str]:
    if not state.history:
        return {}
    return {"val": f"{state.history[-1][plan.monitor]:.4f}", "best": str(state.best_step)}


# ------------------------------------------------------------------------------------- checkpoints

def cpu_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """A CPU copy of the model's state_dict."""
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def atomic_save(obj: Any, path: Path) -> None:
    """torch.save to a temp file beside `path`, then rename it over `path`: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def save_checkpoint(task: FitTask, plan: FitPlan, state: FitState) -> None:
    """Write plan.checkpoint (rank 0 only; nothing without a checkpoint path)."""
    if plan.checkpoint is None or not plan.env.is_main:
        return
    atomic_save({"format": FORMAT, "config": to_dict(plan.config), "model": cpu_state(task.model),
                 "best": state.best_state, "state": state.progress(), "rngs": _rng_states(task),
                 "stateful": {k: o.state_dict() for k, o in task.stateful.items()}}, plan.checkpoint)


def _read(plan: FitPlan) -> dict[str, Any] | None:
    """Rank 0's checkpoint (None: there is none), on every rank, checked against plan.config."""
    path = plan.checkpoint
    found = path is not None and plan.env.is_main and path.is_file()
    ckpt = torch.load(path, map_location="cpu", weights_only=False) if found and path is not None else None
    ckpt = broadcast_object(ckpt, plan.env)
    if ckpt is not None:
        _check(ckpt, plan)
    return ckpt


def _check(ckpt: Mapping[str, Any], plan: FitPlan) -> None:
    """ValueError unless `ckpt` is this loop's and was written with plan.config (up to resume_free)."""
    if ckpt.get("format") != FORMAT:
        raise ValueError(f"{plan.checkpoint}: not a checkpoint of this training loop (format "
                         f"{ckpt.get('format')!r}, expected {FORMAT!r}); use a new run directory")
    differ = config_differences(ckpt.get("config", {}), plan.config, plan.resume_free)
    if differ:
        detail = "; ".join(f"{k}: checkpoint {a!r}, now {b!r}" for k, (a, b) in differ.items())
        raise ValueError(f"{plan.checkpoint}: checkpoint was written with a different {plan.section} config "
                         f"({detail}); use a new run directory, or the checkpoint's config")


def config_differences(saved: Mapping[str, Any], config: Any,
                       free: Collection[str] = ()) -> dict[str, tuple[Any, Any]]:
    """{dotted key: (saved value, config's value)} where a saved config (to_dict form; absent fields mean
    the defaults) differs from `config`, keys in `free` (and below them) left out."""
    now = _flat(to_dict(config))
    then = _flat({**to_dict(type(config)()), **saved})
    keys = sorted(k for k in set(now) | set(then)
                  if not any(k == f or k.startswith(f + ".") for f in free))
    return {k: (then.get(k), now.get(k)) for k in keys if then.get(k) != now.get(k)}


def _flat(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested tables as dotted keys (an empty table: no key)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, Mapping) else {f"{prefix}{k}": v})
    return out


def _device(model: nn.Module) -> torch.device:
    first = next(chain(model.parameters(), model.buffers()), None)
    return torch.device("cpu") if first is None else first.device


def _rng_states(task: FitTask) -> dict[str, Any]:
    """torch's global generators (CPU, and the model's GPU) and the task's own."""
    out: dict[str, Any] = {"torch": torch.get_rng_state()}
    device = _device(task.model)
    if device.type == "cuda":
        out["cuda"] = torch.cuda.get_rng_state(device)
    for name, rng in task.rngs.items():
        out[name] = rng.get_state() if isinstance(rng, torch.Generator) else rng.bit_generator.state
    return out


def _set_rng_states(task: FitTask, states: Mapping[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    device = _device(task.model)
    if "cuda" in states and device.type == "cuda":
        torch.cuda.set_rng_state(states["cuda"], device)
    for name, rng in task.rngs.items():
        if isinstance(rng, torch.Generator):
            rng.set_state(states[name])
        else:
            rng.bit_generator.state = states[name]
