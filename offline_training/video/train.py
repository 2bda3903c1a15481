"""Training the volumetric video model (models/video_unet.py) with the paper's recipe.

Every step draws a global batch of (window start, lead time) pairs: the start uniformly from the train
windows of the training conditions (ZAPBench splits, stride 1, window C + H), the lead time h uniformly
from [1, H]. The input is the C dF/F volumes from the start, the target the traces at start + C - 1 + h.
The loss is the trace-based MAE: the predicted frame is reduced to per-neuron means through the
VolumeReducer's index arrays and compared (L1) with the target traces. AdamW with a cosine decay from
lr to lr_min over `steps`; val MAE on a fixed seeded subsample of val (start, lead) pairs every
`val_every` steps keeps best.pt (the paper chooses checkpoints on validation) and writes last.pt, from
which `resume=True` continues to exactly the result of an uninterrupted run.

Under torchrun the same call trains data-parallel (offline_training/fit/ddp.py): batch_size is the global
batch, every rank draws the same pairs and takes its slice of them, only rank 0 writes.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from loopcast.config import dump_toml, from_dict, to_dict
from loopcast.models.zoo import VIDEO_MODELS, build_model, check_model_options
from loopcast.models.zoo import model_config as typed_model_config
from loopcast.offline_training.data.splits import ConditionSplit, condition_splits, split_windows
from loopcast.offline_training.fit.ddp import DEVICES, DistEnv, all_reduce_sum, dist_env, process_group, wrap
from loopcast.offline_training.fit.device import check_device, resolve_device
from loopcast.offline_training.fit.loop import FitPlan, FitState, FitTask, atomic_save, fit, start
from loopcast.offline_training.video.data import VideoData, VideoDataConfig
from loopcast.replay.layout import Recording

# Model config fields that training fills in itself (from [train_video]).
DERIVED_OPTIONS = frozenset({"context", "horizon"})
CONFIG_FILE, BEST_FILE, LAST_FILE = "config.toml", "best.pt", "last.pt"
RESUME_FREE = frozenset({"threads", "device", "ddp_device", "data.cache_frames"})  # may differ when resuming


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
    patience: int = 0  # validations without improvement before stopping; 0 = never stop early
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
    config: Any = model.config   # the VideoUNet's config (a plain attribute; torch types it as a Module's)
    context = int(config.context)
    local, total = env.shard(pairs), torch.zeros((), dtype=torch.float64)
    for i in range(0, len(local), batch_size):
        x, lead, y = load_batch(data, local[i:i + batch_size], context, device)
        total += (index.reduce(model(x, lead)) - y).abs().sum().double().cpu()
    return float(all_reduce_sum(total, env)) / (len(pairs) * index.n_neurons)


# ------------------------------------------------------------------------------------- the run

@dataclass
class _Run:
    """What one process trains with."""

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
        run = _setup(rec, cfg, env, run_dir)
        task, plan = _task(run), _plan(run, progress, resume, stop_after)
        state = start(task, plan)   # a checkpoint of another config raises before config.toml is written
        if env.is_main:
            dump_toml({"train_video": to_dict(cfg)}, run_dir / CONFIG_FILE)
        state = fit(task, plan, state)
    model = run.model.to("cpu")
    model.load_state_dict(state.best_state)
    model.eval()
    return VideoTrainResult(model=model, best_val_mae=state.best_val, best_step=state.best_step,
                            history=tuple(state.history), config=cfg, n_neurons=run.index.n_neurons,
                            checkpoints={"best": run_dir / BEST_FILE, "last": run_dir / LAST_FILE},
                            data_fingerprint=rec.fingerprint(), data_source=str(rec.root))


def _setup(rec: Recording, cfg: VideoTrainConfig, env: DistEnv, run_dir: Path) -> _Run:
    device = env.device if env.distributed else resolve_device(cfg.device)
    sr = typed_model_config(cfg.model, cfg.model_config()).super_resolution
    data = VideoData(rec, cfg.data, super_resolution=sr)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, cfg.model_config()).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.steps, eta_min=cfg.lr_min)
    return _Run(cfg=cfg, env=env, device=device, model=model, ddp=wrap(model, env), opt=opt, sched=sched,
                rng=np.random.default_rng(cfg.seed), data=data, index=TraceIndex(data.reducer, device),
                starts=train_starts(cfg, data.offsets), pairs=val_pairs(cfg, data.offsets), run_dir=run_dir)


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


# ---------------------------------------------------------------- the one loop (offline_training.fit.loop)

def _task(run: _Run) -> FitTask:
    """A step per unit; val MAE (and the lr) at every check; best.pt written at each new best."""
    def validate() -> dict[str, float]:
        mae = val_mae(run.model, run.data, run.pairs, run.cfg.eval_batch_size, run.device, run.env, run.index)
        return {"val_mae": mae, "lr": float(run.sched.get_last_lr()[0])}
    return FitTask(run.model, lambda step: {"loss": _train_step(run)}, validate,
                   stateful={"optimizer": run.opt, "scheduler": run.sched}, rngs={"pairs": run.rng},
                   on_best=lambda state: _save_best(run, state))


def _plan(run: _Run, progress: bool, resume: bool, stop_after: int | None) -> FitPlan:
    cfg = run.cfg
    return FitPlan(total=cfg.steps, config=cfg, val_every=cfg.val_every, patience=cfg.patience, monitor="val_mae",
                   checkpoint=run.run_dir / LAST_FILE, resume=resume, resume_free=RESUME_FREE,
                   section="[train_video]", stop_after=stop_after, env=run.env, progress=progress,
                   desc=f"train {cfg.model}")


def _save_best(run: _Run, state: FitState) -> None:
    atomic_save({"config": to_dict(run.cfg), "model_name": run.cfg.model, "model_config": run.cfg.model_config(),
                 "model": state.best_state, "step": state.best_step, "val_mae": state.best_val,
                 "n_neurons": run.index.n_neurons, "device": str(run.device)}, run.run_dir / BEST_FILE)
