"""The one training loop (offline_training.fit.loop) on a toy regression: an interrupted and resumed run
equals an uninterrupted one, patience counts validations without improvement, the best weights are kept,
resume refuses another config naming the keys that differ, and checkpoints are atomic and rank 0's only."""
from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from loopcast.offline_training.fit.ddp import DistEnv
from loopcast.offline_training.fit.loop import FitPlan, FitState, FitTask, config_differences, fit


@dataclasses.dataclass(frozen=True)
class ToyConfig:
    lr: float = 0.05
    steps: int = 10
    threads: int = 1
    options: dict[str, int] = dataclasses.field(default_factory=dict)


def toy_task(cfg: ToyConfig) -> FitTask:
    """y = x @ w on seeded batches; dropout and a numpy batch generator make the RNG restore matter."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Dropout(0.2), nn.Linear(3, 1))
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
    rng = np.random.default_rng(1)
    w = torch.tensor([[1.0], [-2.0], [0.5]])
    val_x = torch.from_numpy(np.random.default_rng(2).normal(size=(32, 3)).astype(np.float32))

    def train(step: int) -> dict[str, float]:
        model.train()
        x = torch.from_numpy(rng.normal(size=(8, 3)).astype(np.float32))
        loss = nn.functional.mse_loss(model(x), x @ w)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        return {"loss": float(loss.detach()), "step_seen": float(step)}

    @torch.no_grad()
    def validate() -> dict[str, float]:
        return {"val_loss": float(nn.functional.mse_loss(model.eval()(val_x), val_x @ w))}
    return FitTask(model, train, validate, stateful={"optimizer": opt, "scheduler": sched}, rngs={"batches": rng})


def scripted(values: list[float]) -> FitTask:
    """A task whose validations return `values` in turn (and whose weight is the validation count)."""
    model = nn.Linear(1, 1, bias=False)
    nn.init.zeros_(model.weight)
    it: Iterator[float] = iter(values)

    def validate() -> dict[str, float]:
        with torch.no_grad():
            model.weight += 1.0
        return {"val_loss": next(it)}
    return FitTask(model, lambda step: {}, validate)


def test_interrupted_and_resumed_run_equals_the_uninterrupted_one(tmp_path: Path) -> None:
    cfg = ToyConfig()
    plan = FitPlan(total=cfg.steps, config=cfg, val_every=4, patience=5, checkpoint=tmp_path / "full.pt",
                   progress=False)
    full_task = toy_task(cfg)
    full = fit(full_task, plan)
    cut_plan = dataclasses.replace(plan, checkpoint=tmp_path / "cut.pt", stop_after=6)
    cut = fit(toy_task(cfg), cut_plan)
    assert cut.step == 6 and [h["step"] for h in cut.history] == [4] and cut.train_units == 2
    resumed_task = toy_task(cfg)   # a fresh process: new model, optimiser, scheduler and generators
    resumed = fit(resumed_task, dataclasses.replace(cut_plan, stop_after=None))
    assert [h["step"] for h in full.history] == [4, 8, 10]
    assert resumed.progress() == full.progress()       # history incl. train means across the cut, best, ...
    assert full.history[1]["step_seen"] == pytest.approx(6.5)   # mean over units 5..8
    for a, b in ((full_task.model.state_dict(), resumed_task.model.state_dict()),
                 (full.best_state, resumed.best_state)):
        assert all(torch.equal(a[k], b[k]) for k in a)
    saved = torch.load(tmp_path / "cut.pt", weights_only=False)
    assert saved["state"] == full.progress() and not list(tmp_path.glob("*.tmp"))


def test_patience_counts_validations_without_improvement() -> None:
    plan = FitPlan(total=20, config=ToyConfig(), val_every=3, patience=2, progress=False)
    state = fit(scripted([3.0, 2.0, 2.5, 2.0, 1.0]), plan)   # 2.0 again is no improvement
    assert [h["step"] for h in state.history] == [3, 6, 9, 12]
    assert (state.step, state.best_step, state.best_val, state.bad_vals) == (12, 6, 2.0, 2)
    assert state.stopped == "early stop: no val improvement in 2 validations"
    assert float(state.best_state["weight"]) == 2.0             # the weights of the second validation


def test_patience_zero_never_stops_and_the_last_unit_is_validated() -> None:
    state = fit(scripted([1.0, 2.0, 3.0, 4.0]), FitPlan(total=10, config=ToyConfig(), val_every=3, progress=False))
    assert [h["step"] for h in state.history] == [3, 6, 9, 10] and not state.stopped and state.best_step == 3


def test_resume_refuses_another_config_and_names_the_keys(tmp_path: Path) -> None:
    cfg = ToyConfig(options={"a": 1})
    plan = FitPlan(total=4, config=cfg, checkpoint=tmp_path / "c.pt", progress=False)
    fit(toy_task(cfg), dataclasses.replace(plan, stop_after=2))
    other = ToyConfig(lr=0.1, steps=8, options={"a": 2})
    with pytest.raises(ValueError, match=r"different \[toy\] config \(lr: checkpoint 0.05, now 0.1; "
                                         r"options.a: checkpoint 1, now 2; steps: checkpoint 10, now 8\)"):
        fit(toy_task(other), dataclasses.replace(plan, config=other, section="[toy]"))
    free = dataclasses.replace(plan, config=dataclasses.replace(cfg, threads=4), resume_free=frozenset({"threads"}))
    assert fit(toy_task(cfg), free).step == 4                      # a free key may differ
    assert config_differences({"lr": 0.05}, ToyConfig()) == {}   # absent fields are the defaults


def test_only_rank_0_writes(tmp_path: Path) -> None:
    rank1 = DistEnv(rank=1, world_size=2)
    plan = FitPlan(total=3, config=ToyConfig(), checkpoint=tmp_path / "c.pt", resume=False, env=rank1,
                   progress=False)
    seen: list[FitState] = []
    task = dataclasses.replace(toy_task(ToyConfig()), on_best=seen.append)
    assert fit(task, plan).step == 3
    assert not (tmp_path / "c.pt").exists() and not seen


def test_a_checkpoint_of_another_format_is_refused(tmp_path: Path) -> None:
    torch.save({"config": {}, "model": {}, "optimizer": {}, "state": {}}, tmp_path / "old.pt")   # the old layout
    plan = FitPlan(total=2, config=ToyConfig(), checkpoint=tmp_path / "old.pt", progress=False)
    with pytest.raises(ValueError, match="not a checkpoint of this training loop"):
        fit(toy_task(ToyConfig()), plan)
