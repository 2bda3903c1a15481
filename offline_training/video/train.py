"""Training the volumetric video model (models/video_unet.py) with the paper's recipe.

Every step draws a global batch of (window start, lead time) pairs: the start uniformly from the train
windows of the training conditions (ZAPBench splits, stride 1, window C + H), the lead time h uniformly
from [1, H]. The input is the C dF/F volumes from the start, the target the traces at start + C - 1 + h.
The loss is the trace-based MAE: the predicted frame is reduced to per-neuron means through the
VolumeReducer's index arrays and compared (L1) with the target traces. AdamW with a cosine decay from
lr to lr_min over `steps`; val MAE on a fixed seeded subsample of val (start, lead) pairs every
`val_every` steps keeps best.pt (the paper chooses checkpoints on validation) and writes last.pt, from
which `resume=True` continues to exactly the result of an uninterrupted run.

Under torchrun the same call trains data-parallel (offline_training/ddp.py): batch_size is the global
batch, every rank draws the same pairs and takes its slice of them, only rank 0 writes.
"""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from loopcast.config import dump_toml, from_dict, to_dict
from models.registry import VIDEO_MODELS, build_model, check_model_options
from models.registry import model_config as typed_model_config
from offline_training.ddp import DEVICES, DistEnv, all_reduce_sum, broadcast_object, dist_env, process_group, wrap
from offline_training.device import check_device, resolve_device
from offline_training.splits import ConditionSplit, condition_splits, split_windows
from offline_training.video_data import VideoData, VideoDataConfig
from replay.layout import Recording

# Model config fields that training fills in itself (from [train_video]).
DERIVED_OPTIONS = frozenset({"context", "horizon"})
CONFIG_FILE, BEST_FILE, LAST_FILE = "config.toml", "best.pt", "last.pt"
RUNTIME_KEYS = frozenset({"threads", "device", "ddp_device"})  # may differ when resuming


@dataclass(frozen=True)
class VideoTrainConfig:
    """Everything that determines a video training run (saved as [train_video] in the run directory)."""

    model: str = "video_unet"
    context: int = 4
    horizon: int = 32
    lr: float = 1e-4
    lr_min: float = 1e-7  # cosine decay from lr to lr_min over `steps`
    weight_decay: float = 1e-5
    batch_size: int = 1  # global: split over the ranks under torchrun
    eval_batch_size: int = 4
    steps: int = 2000
    val_every: int = 200
    val_windows: int = 64  # seeded subsample of val (start, lead) pairs; 0 = all of them
    patience: int = 0  # val checks without improvement before stopping; 0 = never stop early
    seed: int = 0
    threads: int = 0  # torch CPU threads; 0 = leave torch's default
    device: str = "auto"  # single process: auto, cpu, cuda, cuda:N (torchrun ranks use ddp_device)
    ddp_device: str = "auto"  # under torchrun: auto (one GPU per rank, else CPU), cpu, cuda
    holdout: tuple[int, ...] = (3,)
    max_context: int = 256
    val_frac: float = 0.1
    test_frac: float = 0.2
    padding: int = 1
    model_options: dict[str, Any] = field(default_factory=dict)  # the model's other config fields
    data: VideoDataConfig = field(default_factory=VideoDataConfig)

    def __post_init__(self) -> None:
        if self.model not in VIDEO_MODELS:
            raise ValueError(f"model must be one of {sorted(VIDEO_MODELS)}, got {self.model!r}")
        for name in ("context", "horizon", "batch_size", "eval_batch_size", "steps", "val_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("val_windows", "patience", "threads"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.lr_min <= self.lr:
            raise ValueError(f"need 0 <= lr_min <= lr, got lr={self.lr}, lr_min={self.lr_min}")
        check_device(self.device)
        if self.ddp_device not in DEVICES:
            raise ValueError(f"ddp_device must be one of {list(DEVICES)}, got {self.ddp_device!r}")
        object.__setattr__(self, "model_options", dict(self.model_options))
        self._check_model_options()

    def _check_model_options(self) -> None:
        check_model_options(self.model, self.model_options, DERIVED_OPTIONS, "[train_video]")
        typed_model_config(self.model, self.model_config())  # types and values

    def model_config(self) -> dict[str, Any]:
        """The model's own config mapping: context, horizon, then model_options."""
        return {"context": self.context, "horizon": self.horizon, **self.model_options}

    def splits(self, offsets: Sequence[int]) -> list[ConditionSplit]:
        """ZAPBench condition splits for this context length."""
        return condition_splits(offsets, self.context, holdout=self.holdout, val_frac=self.val_frac,
                                test_frac=self.test_frac, padding=self.padding, max_context=self.max_context)


@dataclass(frozen=True)
class VideoTrainResult:
    """The model with its best (val MAE) weights, the val-check history and where everything went."""

    model: nn.Module
    best_val_mae: float
    best_step: int
    history: tuple[dict[str, float], ...]
    checkpoints: dict[str, Path]  # "best", "last"
    data_fingerprint: str
    data_source: str
    n_neurons: int
    config: VideoTrainConfig = field(default_factory=VideoTrainConfig)


def video_train_config_from_dict(data: dict[str, Any]) -> VideoTrainConfig:
    """Strict VideoTrainConfig from a mapping (a TOML [train_video] table)."""
    return from_dict(VideoTrainConfig, data, where="train_video")


# ----------------------------------------------------------------------------------------- samples

def train_starts(cfg: VideoTrainConfig, offsets: Sequence[int]) -> np.ndarray:
    """Start frames of every train window (stride 1, C + H frames) over the training conditions."""
    per_cond = split_windows(cfg.splits(offsets), "train", cfg.context, cfg.horizon)
    starts = np.concatenate([np.empty(0, np.int64), *per_cond.values()])
    if not len(starts):
        raise ValueError(f"no train window of C + H = {cfg.context + cfg.horizon} frames in any condition")
    return starts


def val_pairs(cfg: VideoTrainConfig, offsets: Sequence[int]) -> np.ndarray:
    """(P, 2) int64 (start, lead) pairs: a fixed seeded subsample (val_windows; 0 = all) of every val
    window of the training conditions (holdout excluded) crossed with every lead time in [1, H]."""
    per_cond = split_windows(cfg.splits(offsets), "val", cfg.context, cfg.horizon)
    starts = np.concatenate([np.empty(0, np.int64), *per_cond.values()])
    if not len(starts):
        raise ValueError(f"no val window of C + H = {cfg.context + cfg.horizon} frames in any condition")
    leads = np.arange(1, cfg.horizon + 1, dtype=np.int64)
    pairs = np.stack(np.meshgrid(starts, leads, indexing="ij"), axis=-1).reshape(-1, 2)
    if cfg.val_windows and cfg.val_windows < len(pairs):
        keep = np.random.default_rng([cfg.seed, 1]).choice(len(pairs), cfg.val_windows, replace=False)
        pairs = pairs[np.sort(keep)]
    return pairs


def sample_pairs(rng: np.random.Generator, starts: np.ndarray, horizon: int, size: int) -> np.ndarray:
    """(size, 2) int64 (start, lead): starts uniform over `starts`, leads uniform in [1, horizon]."""
    picked = starts[rng.integers(len(starts), size=size)]
    leads = rng.integers(1, horizon + 1, size=size)
    return np.stack([picked, leads], axis=1).astype(np.int64)


def load_batch(data: VideoData, pairs: np.ndarray, context: int,
               device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inputs (B, C, X, Y, Z), lead times (B,) int64 and target traces (B, N) at start + C - 1 + lead."""
    starts, leads = pairs[:, 0], pairs[:, 1]
    x = torch.from_numpy(data.inputs(starts, context))
    y = torch.from_numpy(np.ascontiguousarray(data.targets(starts, context, leads)))
    return x.to(device), torch.from_numpy(np.ascontiguousarray(leads)).to(device), y.to(device)


# ---------------------------------------------------------------------------------------- the loss

class TraceIndex:
    """A VolumeReducer's index arrays as tensors on one device: output frames -> per-neuron means."""

    def __init__(self, reducer: Any, device: torch.device | str = "cpu") -> None:
        self.voxel_index = torch.as_tensor(np.asarray(reducer.voxel_index, np.int64), device=device)
        self.neuron_index = torch.as_tensor(np.asarray(reducer.neuron_index, np.int64), device=device)
        self.counts = torch.as_tensor(np.asarray(reducer.counts, np.float32), device=device)
        self.n_neurons = int(reducer.n_neurons)

    def reduce(self, frames: torch.Tensor) -> torch.Tensor:
        """frames (B, X', Y', Z') -> (B, N) mean over each neuron's voxels."""
        vox = frames.flatten(1)[:, self.voxel_index]  # (B, M)
        sums = frames.new_zeros(frames.shape[0], self.n_neurons).index_add_(1, self.neuron_index, vox)
        return sums / self.counts  # (B, N)


def trace_loss(model: nn.Module, data: VideoData, index: TraceIndex, pairs: np.ndarray, context: int,
               device: torch.device, env: DistEnv = DistEnv()) -> torch.Tensor:
    """This rank's share of the global batch's trace MAE, scaled so that DDP's gradient average is the
    whole batch's gradient (an empty share runs one sample at weight 0: DDP needs every gradient)."""
    local = env.shard(pairs)
    scale = len(local) * env.world_size / len(pairs)
    if not len(local):
        local, scale = pairs[:1], 0.0
    x, lead, y = load_batch(data, local, context, device)
    pred = index.reduce(model(x, lead))  # (b, N)
    return nn.functional.l1_loss(pred, y) * scale


@torch.no_grad()
def val_mae(model: nn.Module, data: VideoData, pairs: np.ndarray, batch_size: int = 4,
            device: torch.device | str = "cpu", env: DistEnv = DistEnv(), index: TraceIndex | None = None) -> float:
    """Mean absolute trace error over (start, lead) `pairs` and all neurons; under DDP each rank scores
    a slice and the sums are all-reduced, so every rank gets the same value."""
    model.eval()
    device = torch.device(device)
    index = index or TraceIndex(data.reducer, device)
    context = model.config.context
    local, total = env.shard(pairs), torch.zeros((), dtype=torch.float64)
    for i in range(0, len(local), batch_size):
        x, lead, y = load_batch(data, local[i:i + batch_size], context, device)
        total += (index.reduce(model(x, lead)) - y).abs().sum().double().cpu()
    return float(all_reduce_sum(total, env)) / (len(pairs) * index.n_neurons)


# ------------------------------------------------------------------------------------- the run

@dataclass
class _State:
    step: int = 0
    best_val: float = math.inf
    best_step: int = 0
    bad_checks: int = 0
    loss_sum: float = 0.0  # global-batch losses since the last val check
    loss_steps: int = 0
    history: list[dict[str, float]] = field(default_factory=list)


@dataclass
class _Run:
    """What the loop works on (one per process)."""

    cfg: VideoTrainConfig
    env: DistEnv
    device: torch.device
    model: nn.Module
    ddp: nn.Module
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    rng: np.random.Generator
    data: VideoData
    index: TraceIndex
    starts: np.ndarray
    pairs: np.ndarray
    run_dir: Path
    state: _State = field(default_factory=_State)
    best_state: dict[str, torch.Tensor] = field(default_factory=dict)


def train_video(rec: Recording, cfg: VideoTrainConfig, run_dir: str | Path, progress: bool = True,
                resume: bool = False, stop_after: int | None = None) -> VideoTrainResult:
    """Train cfg.model on `rec` (its dF/F level-2 volumes and traces); best.pt / last.pt in `run_dir`.
    resume=True continues from run_dir/last.pt if it exists; `stop_after` ends after that many steps
    (last.pt written), as an interrupted or time-limited job would. Data-parallel under torchrun;
    every rank returns the same result, only rank 0 writes."""
    run_dir = Path(run_dir)
    env = dist_env(device=cfg.ddp_device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    with process_group(env):
        run = _setup(rec, cfg, env, run_dir, resume)
        _fit(run, progress and env.is_main, stop_after)
    model = run.model.to("cpu")
    model.load_state_dict(run.best_state)
    model.eval()
    return VideoTrainResult(model=model, best_val_mae=run.state.best_val, best_step=run.state.best_step,
                            history=tuple(run.state.history), config=cfg, n_neurons=run.index.n_neurons,
                            checkpoints={"best": run_dir / BEST_FILE, "last": run_dir / LAST_FILE},
                            data_fingerprint=rec.fingerprint(), data_source=str(rec.root))


def _setup(rec: Recording, cfg: VideoTrainConfig, env: DistEnv, run_dir: Path, resume: bool) -> _Run:
    device = env.device if env.distributed else resolve_device(cfg.device)
    sr = typed_model_config(cfg.model, cfg.model_config()).super_resolution
    data = VideoData(rec, cfg.data, super_resolution=sr)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, cfg.model_config()).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.steps, eta_min=cfg.lr_min)
    run = _Run(cfg=cfg, env=env, device=device, model=model, ddp=wrap(model, env), opt=opt, sched=sched,
               rng=np.random.default_rng(cfg.seed), data=data, index=TraceIndex(data.reducer, device),
               starts=train_starts(cfg, data.offsets), pairs=val_pairs(cfg, data.offsets), run_dir=run_dir,
               best_state=_cpu_state(model))
    if resume:
        _load_checkpoint(run)
    if env.is_main:
        dump_toml({"train_video": to_dict(cfg)}, run_dir / CONFIG_FILE)
    return run


def _fit(run: _Run, progress: bool, stop_after: int | None) -> None:
    cfg, state = run.cfg, run.state
    bar = tqdm(total=cfg.steps, initial=state.step, desc=f"train {cfg.model}", disable=not progress)
    while state.step < cfg.steps and not (stop_after is not None and state.step >= stop_after):
        loss = _train_step(run)
        state.step += 1
        state.loss_sum, state.loss_steps = state.loss_sum + loss, state.loss_steps + 1
        bar.update(1)
        val = state.history[-1]["val_mae"] if state.history else math.nan
        bar.set_postfix(loss=f"{loss:.4f}", val=f"{val:.4f}", best=state.best_step)
        if state.step % cfg.val_every == 0 or state.step == cfg.steps:
            if _val_check(run):
                break
        elif stop_after is not None and state.step >= stop_after:
            _save_last(run)
    bar.close()


def _train_step(run: _Run) -> float:
    """One optimiser and scheduler step on a fresh global batch; the batch's mean loss (all ranks)."""
    run.ddp.train()
    pairs = sample_pairs(run.rng, run.starts, run.cfg.horizon, run.cfg.batch_size)
    loss = trace_loss(run.ddp, run.data, run.index, pairs, run.cfg.context, run.device, run.env)
    run.opt.zero_grad(set_to_none=True)
    loss.backward()
    run.opt.step()
    run.sched.step()
    return float(all_reduce_sum(loss.detach().double().cpu(), run.env)) / run.env.world_size


def _val_check(run: _Run) -> bool:
    """Score val, keep the best weights, write best.pt / last.pt; True when early stopping ends the run."""
    cfg, state = run.cfg, run.state
    mae = val_mae(run.model, run.data, run.pairs, cfg.eval_batch_size, run.device, run.env, run.index)
    state.history.append({"step": state.step, "loss": state.loss_sum / max(state.loss_steps, 1),
                          "val_mae": mae, "lr": float(run.sched.get_last_lr()[0])})
    state.loss_sum, state.loss_steps = 0.0, 0
    if mae < state.best_val:
        state.best_val, state.best_step, state.bad_checks = mae, state.step, 0
        run.best_state = _cpu_state(run.model)
        _save_best(run)
    else:
        state.bad_checks += 1
    _save_last(run)
    return bool(cfg.patience) and state.bad_checks >= cfg.patience


# -------------------------------------------------------------------------------- checkpoints

def _cpu_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def _atomic_save(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _save_best(run: _Run) -> None:
    if run.env.is_main:
        _atomic_save({"config": to_dict(run.cfg), "model_name": run.cfg.model,
                      "model_config": run.cfg.model_config(), "model": run.best_state,
                      "step": run.state.best_step, "val_mae": run.state.best_val,
                      "n_neurons": run.index.n_neurons, "device": str(run.device)}, run.run_dir / BEST_FILE)


def _save_last(run: _Run) -> None:
    if not run.env.is_main:
        return
    rngs = {"numpy": run.rng.bit_generator.state, "torch": torch.get_rng_state()}
    if run.device.type == "cuda":
        rngs["cuda"] = torch.cuda.get_rng_state(run.device)
    _atomic_save({"config": to_dict(run.cfg), "model": _cpu_state(run.model), "optimizer": run.opt.state_dict(),
                  "scheduler": run.sched.state_dict(), "state": dataclasses.asdict(run.state), "rng": rngs},
                 run.run_dir / LAST_FILE)


def _resumable(config: dict[str, Any]) -> dict[str, Any]:
    """The config minus what may change between a run and its resumption (where and how fast it runs)."""
    out = {k: v for k, v in config.items() if k not in RUNTIME_KEYS}
    return {**out, "data": {k: v for k, v in config.get("data", {}).items() if k != "cache_frames"}}


def _load_checkpoint(run: _Run) -> None:
    """Continue from run_dir/last.pt (and best.pt) if rank 0 has it; nothing otherwise."""
    last, best = run.run_dir / LAST_FILE, run.run_dir / BEST_FILE
    load = run.env.is_main and last.is_file()
    ckpt = torch.load(last, map_location="cpu", weights_only=False) if load else None
    if ckpt is not None and best.is_file():
        ckpt["best"] = torch.load(best, map_location="cpu", weights_only=False)["model"]
    ckpt = broadcast_object(ckpt, run.env)
    if ckpt is None:
        return
    if _resumable(ckpt["config"]) != _resumable(to_dict(run.cfg)):
        raise ValueError(f"{last}: checkpoint was written with a different [train_video] config")
    run.model.load_state_dict(ckpt["model"])
    run.opt.load_state_dict(ckpt["optimizer"])
    run.sched.load_state_dict(ckpt["scheduler"])
    run.state = _State(**ckpt["state"])
    run.best_state = ckpt.get("best", _cpu_state(run.model))
    run.rng.bit_generator.state = ckpt["rng"]["numpy"]
    torch.set_rng_state(ckpt["rng"]["torch"])
    if "cuda" in ckpt["rng"] and run.device.type == "cuda":
        torch.cuda.set_rng_state(ckpt["rng"]["cuda"], run.device)
