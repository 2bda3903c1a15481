"""Training on (T, N) float32 traces with ZAPBench splits, MAE loss and early stopping.

Models whose class sets `uses_covariates = True` also get the stimulus covariates (T, K) of every window:
forward(x (B, C, N), cov (B, C + H, K)), cov being the C context steps followed by the H target steps.
Under torchrun the same call trains data-parallel (offline_training/fit/ddp.py); [train] batch_size is the
global batch, so any number of ranks reproduces one process.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from loopcast.config import from_dict
from loopcast.models.baselines import MeanBaseline, MeanBaselineConfig
from loopcast.models.zoo import MODELS, build_model, check_model_options, config_fields
from loopcast.models.zoo import model_config as typed_model_config
from loopcast.offline_training.data.covariates import check_future_covariates, covariate_windows
from loopcast.offline_training.data.splits import ConditionSplit, condition_splits, gather_windows, split_windows
from loopcast.offline_training.fit.ddp import DistEnv, all_reduce_sum, dist_env, process_group, wrap
from loopcast.offline_training.fit.device import check_device, train_env
from loopcast.offline_training.fit.loop import FitPlan, FitState, FitTask, cpu_state, fit

# Model config fields that training fills in itself (from [train] and from the data).
DERIVED_OPTIONS = frozenset({"context", "horizon", "n_neurons", "n_covariates"})
RESUME_FREE = frozenset({"max_epochs", "device"})  # may differ when resuming: training may be extended


@dataclass(frozen=True)
class TrainConfig:
    """Everything that determines a training run (written beside every engine as config.toml)."""

    model: str = "nlinear"
    context: int = 4
    horizon: int = 8
    lr: float = 1e-3
    weight_decay: float = 1e-4
    batch_size: int = 8  # global: split over the ranks under torchrun
    eval_batch_size: int = 64
    max_epochs: int = 30
    patience: int = 3  # validations (one per epoch) without improvement before stopping
    steps_per_epoch: int = 0  # 0 = every train window once per epoch
    seed: int = 0
    threads: int = 2
    device: str = "auto"  # single process: auto, cpu, cuda, cuda:N (torchrun ranks use ddp_device)
    ddp_device: str = "auto"  # under torchrun: auto (one GPU per rank, else CPU), cpu, cuda
    future_covariates: str = "recorded"  # covariate models: "recorded" (ZAPBench) or "held" (as the loop)
    holdout: tuple[int, ...] = (3,)
    val_frac: float = 0.1
    test_frac: float = 0.2
    padding: int = 1
    max_context: int = 256
    model_options: dict[str, Any] = field(default_factory=dict)  # the model's other config fields

    def __post_init__(self) -> None:
        if self.model not in MODELS:
            raise ValueError(f"model must be one of {sorted(MODELS)}, got {self.model!r}")
        for name in ("context", "horizon", "batch_size", "eval_batch_size", "max_epochs", "threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.patience < 1 or self.steps_per_epoch < 0:
            raise ValueError("patience must be >= 1 and steps_per_epoch >= 0")
        check_device(self.device)
        check_future_covariates(self.future_covariates)
        object.__setattr__(self, "model_options", dict(self.model_options))
        self._check_model_options()

    def _check_model_options(self) -> None:
        check_model_options(self.model, self.model_options, DERIVED_OPTIONS, "[train] and the data")
        typed_model_config(self.model, self.model_config(n_neurons=1, n_covariates=1))  # types, values

    @property
    def uses_covariates(self) -> bool:
        """Whether the model takes stimulus covariates (its class sets uses_covariates)."""
        return uses_covariates(MODELS[self.model][1])

    def model_config(self, n_neurons: int | None = None, n_covariates: int | None = None) -> dict[str, Any]:
        """The model's own config mapping (for models.zoo.build_model): context, horizon, the data's
        neuron / covariate counts where the model has such fields, then model_options."""
        out: dict[str, Any] = {"context": self.context, "horizon": self.horizon}
        fields = config_fields(self.model)
        if n_neurons is not None and "n_neurons" in fields:
            out["n_neurons"] = n_neurons
        if n_covariates is not None and "n_covariates" in fields:
            out["n_covariates"] = n_covariates
        return {**out, **self.model_options}

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


@dataclass(frozen=True)
class WindowData:
    """Traces (T, N) and, for covariate models, stimulus covariates (T, K); both float32."""

    traces: np.ndarray
    covariates: np.ndarray | None = None
    future: str = "recorded"   # the covariates' future steps (offline_training.data.covariates)

    @property
    def n_neurons(self) -> int:
        return int(self.traces.shape[1])

    @property
    def n_covariates(self) -> int | None:
        return None if self.covariates is None else int(self.covariates.shape[1])

    def windows(self, starts: np.ndarray, context: int, horizon: int,
                device: torch.device | None = None) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        """Model inputs ((B, C, N)[, (B, C + H, K)]) and targets (B, H, N) for window `starts`."""
        x, y = gather_windows(self.traces, starts, context, horizon)
        inputs = [torch.from_numpy(x)]
        if self.covariates is not None:
            inputs.append(torch.from_numpy(covariate_windows(self.covariates, starts, context, horizon, self.future)))
        return tuple(t.to(device) for t in inputs), torch.from_numpy(y).to(device)


def uses_covariates(model: nn.Module | type) -> bool:
    """Whether a model (instance or class) takes stimulus covariates as a second input."""
    return bool(getattr(model, "uses_covariates", False))


def train_config_from_dict(data: dict[str, Any]) -> TrainConfig:
    """Strict TrainConfig from a mapping (a TOML [train] table)."""
    return from_dict(TrainConfig, data, where="train")


def first_window(traces: np.ndarray, offsets: Sequence[int], cfg: TrainConfig,
                 split: str = "val") -> np.ndarray:
    """The context (C, N) of the first `split` window of the first training condition that has one."""
    x, _ = gather_windows(traces, _first_start(offsets, cfg, split), cfg.context, cfg.horizon)
    return np.ascontiguousarray(x[0], dtype=np.float32)


def first_window_with_covariates(traces: np.ndarray, offsets: Sequence[int], cfg: TrainConfig,
                                 covariates: np.ndarray, split: str = "val") -> tuple[np.ndarray, np.ndarray]:
    """first_window's context (C, N) and the same window's covariates (C + H, K)."""
    start = _first_start(offsets, cfg, split)
    cov = covariate_windows(np.asarray(covariates, dtype=np.float32), start, cfg.context, cfg.horizon,
                            cfg.future_covariates)
    return first_window(traces, offsets, cfg, split), cov[0]


def _first_start(offsets: Sequence[int], cfg: TrainConfig, split: str) -> np.ndarray:
    for starts in split_windows(cfg.splits(offsets), split, cfg.context, cfg.horizon).values():  # type: ignore[arg-type]
        if len(starts):
            return starts[:1]
    raise ValueError(f"no {split} window in any training condition")


def train(traces: np.ndarray, offsets: Sequence[int], cfg: TrainConfig = TrainConfig(),
          progress: bool = True, checkpoint: str | Path | None = None,
          covariates: np.ndarray | None = None) -> TrainResult:
    """Train `cfg.model` on the train ranges of the training conditions; early-stop on val MAE.
    Data-parallel under torchrun; every rank returns the same result (only rank 0 writes `checkpoint`)."""
    traces = _check_traces(traces, offsets)
    data = WindowData(traces, _check_covariates(covariates, traces.shape[0], cfg), cfg.future_covariates)
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    splits = cfg.splits(offsets)
    train_starts = np.concatenate(list(split_windows(splits, "train", cfg.context, cfg.horizon).values()))
    val_starts = split_windows(splits, "val", cfg.context, cfg.horizon)
    if len(train_starts) == 0 or not any(len(v) for v in val_starts.values()):
        raise ValueError("traces too short: no train or no val windows for this context/horizon")
    model = build_model(cfg.model, cfg.model_config(data.n_neurons, data.n_covariates))
    env = train_env(dist_env(device=cfg.ddp_device), cfg.device)
    with process_group(env):
        state = _fit_model(model, data, train_starts, val_starts, cfg, env, progress, checkpoint)
    model.load_state_dict(state.best_state)
    model.eval()
    metrics = {"val": evaluate(model, traces, val_starts, splits, cfg, data.covariates), "device": str(env.device)}
    return TrainResult(model=model, history=tuple(state.history), metrics=metrics, config=cfg,
                       best_epoch=state.best_step)


def _fit_model(model: nn.Module, data: WindowData, train_starts: np.ndarray, val_starts: dict[int, np.ndarray],
               cfg: TrainConfig, env: DistEnv, progress: bool, checkpoint: str | Path | None) -> FitState:
    """Fit on env.device with the one loop (offline_training.fit.loop: an epoch per unit, val MAE after each,
    resuming `checkpoint` if rank 0 has it); the model ends on the CPU."""
    if not any(p.requires_grad for p in model.parameters()):
        return FitState(best_state=cpu_state(model))
    model.to(env.device)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr,
                            weight_decay=cfg.weight_decay)
    ddp_model, show = wrap(model, env), progress and env.is_main
    task = FitTask(model, stateful={"optimizer": opt},
                   train=lambda epoch: {"train_mae": _train_epoch(ddp_model, opt, data, train_starts, cfg, env,
                                                                  epoch, show)},
                   validate=lambda: {"val_mae": _val_mae(model, data, val_starts, cfg, env)})
    plan = FitPlan(total=cfg.max_epochs, config=cfg, unit="epoch", patience=cfg.patience, monitor="val_mae",
                   checkpoint=None if checkpoint is None else Path(checkpoint), resume_free=RESUME_FREE, env=env,
                   progress=progress, desc=f"train {cfg.model}")
    state = fit(task, plan)
    model.to("cpu")
    return state


def _train_epoch(model: nn.Module, opt: torch.optim.Optimizer, data: WindowData, starts: np.ndarray,
                 cfg: TrainConfig, env: DistEnv, epoch: int, progress: bool) -> float:
    """One epoch over seeded global batches (the same on every rank); the mean of the batches' losses."""
    model.train()
    order = np.random.default_rng([cfg.seed, epoch]).permutation(starts)
    batches = [order[i:i + cfg.batch_size] for i in range(0, len(order), cfg.batch_size)]
    if cfg.steps_per_epoch:
        batches = batches[:cfg.steps_per_epoch]
    total = 0.0
    for batch in tqdm(batches, desc=f"epoch {epoch}", leave=False, disable=not progress):
        loss = batch_loss(model, data, batch, cfg, env)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        total += float(loss.detach())
    total = float(all_reduce_sum(torch.tensor(total, dtype=torch.float64), env)) / env.world_size
    return total / max(len(batches), 1)


def batch_loss(model: nn.Module, data: WindowData, batch: np.ndarray, cfg: TrainConfig,
               env: DistEnv = DistEnv()) -> torch.Tensor:
    """This rank's share of the global `batch`'s mean L1 loss, scaled by its share of the windows times
    world_size: DDP averages the ranks' gradients, which then equal the whole batch's gradient."""
    local = env.shard(batch)
    inputs, y = data.windows(local, cfg.context, cfg.horizon, env.device)
    out = model(*inputs)
    if len(local) == 0:  # a short last batch: no windows here, but DDP still needs every gradient
        return out.sum() * 0.0
    return nn.functional.l1_loss(out, y) * (len(local) * env.world_size / len(batch))


@torch.no_grad()
def mae_per_step(model: nn.Module, traces: np.ndarray, starts: np.ndarray, context: int, horizon: int,
                 batch_size: int = 64, covariates: np.ndarray | None = None, future: str = "recorded") -> np.ndarray:
    """MAE per step ahead (H,), averaged over the windows at `starts` and all neurons (covariates (T, K)
    are required by, and only passed to, covariate models; `future` fills their future steps)."""
    data = _model_data(model, traces, covariates, future)
    return _err_sums(model, data, starts, context, horizon, batch_size) / (len(starts) * traces.shape[1])


@torch.no_grad()
def _err_sums(model: nn.Module, data: WindowData, starts: np.ndarray, context: int, horizon: int,
              batch_size: int, device: torch.device | None = None) -> np.ndarray:
    """Absolute errors summed over windows and neurons, per step ahead (H,) float64."""
    model.eval()
    total = np.zeros(horizon, dtype=np.float64)
    for i in range(0, len(starts), batch_size):
        inputs, y = data.windows(starts[i:i + batch_size], context, horizon, device)
        err = (model(*inputs) - y).abs()  # (B, H, N)
        total += err.sum(dim=(0, 2)).double().cpu().numpy()
    return total


def _val_mae(model: nn.Module, data: WindowData, starts: dict[int, np.ndarray], cfg: TrainConfig,
             env: DistEnv) -> float:
    """Mean over conditions and steps of the val MAE; each rank scores a slice of every condition's
    windows and the error sums are all-reduced, so every rank gets the same value."""
    conds = [s for s in starts.values() if len(s)]
    sums = np.stack([_err_sums(model, data, env.shard(s), cfg.context, cfg.horizon, cfg.eval_batch_size,
                               env.device) for s in conds])
    sums = all_reduce_sum(torch.from_numpy(sums), env).numpy()
    counts = np.array([len(s) for s in conds], dtype=np.float64)[:, None]
    return float(np.mean(sums / (counts * data.n_neurons)))


def evaluate(model: nn.Module, traces: np.ndarray, starts: dict[int, np.ndarray],
             splits: Sequence[ConditionSplit], cfg: TrainConfig,
             covariates: np.ndarray | None = None) -> dict[str, Any]:
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
            per_step = mae_per_step(m, traces, s, cfg.context, cfg.horizon, cfg.eval_batch_size, covariates,
                                    cfg.future_covariates)
            steps[label].append(per_step)
            row[label] = float(per_step.mean())
        out["per_condition"][names[k]] = row
    for label, rows in steps.items():
        per_step = np.mean(rows, axis=0)
        out[label] = {"mae": float(per_step.mean()), "mae_per_step": [float(v) for v in per_step]}
    out["conditions"] = list(out["per_condition"])
    return out


def _model_data(model: nn.Module, traces: np.ndarray, covariates: np.ndarray | None, future: str) -> WindowData:
    if not uses_covariates(model):
        return WindowData(traces)
    if covariates is None:
        raise ValueError(f"{type(model).__name__} uses stimulus covariates: pass covariates (T, K)")
    return WindowData(traces, covariates, future)


def _check_traces(traces: np.ndarray, offsets: Sequence[int]) -> np.ndarray:
    if not isinstance(traces, np.ndarray) or traces.ndim != 2:
        raise ValueError(f"traces must be a (T, N) array, got {getattr(traces, 'shape', type(traces))}")
    if offsets[-1] > traces.shape[0]:
        raise ValueError(f"last condition offset {offsets[-1]} > T={traces.shape[0]}")
    return np.ascontiguousarray(traces, dtype=np.float32)


def _check_covariates(covariates: np.ndarray | None, n_frames: int, cfg: TrainConfig) -> np.ndarray | None:
    """Covariates as float32 (T, K) for a covariate model, None for any other model."""
    if not cfg.uses_covariates:
        return None
    if covariates is None:
        raise ValueError(f"model {cfg.model!r} uses stimulus covariates: pass covariates (T, K) to train()")
    if not isinstance(covariates, np.ndarray) or covariates.ndim != 2 or covariates.shape[0] != n_frames:
        raise ValueError(f"covariates must be a (T={n_frames}, K) array, "
                         f"got {getattr(covariates, 'shape', type(covariates))}")
    return np.ascontiguousarray(covariates, dtype=np.float32)
