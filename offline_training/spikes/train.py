"""Train the causal spike-inference network (models/spikenet.py) on the simulator's ground truth; export it.

Data: one synthetic recording per (snr, seed) at the rig's frame period (cached under work_dir), its raw
segment means turned into the pipeline's causal dF/F (realtime.preprocess.dff), and the true spike counts per frame.
Recordings are stacked along the neuron axis (the network is per neuron). Each target frame t gets the
past-only window t-C+1 .. t; targets start once every frame of the window is past the dF/F warm-up.
Train/val split by time: train targets t < split, val targets t >= split + C - 1 (val windows hold only
val frames).

Loss: Poisson NLL of the true count given the predicted expected count (default). The targets are counts
with a heavy tail (bursts of 10-40 spikes per frame); the Poisson likelihood is the proper scoring rule
for an expected count, is well defined at rate -> 0 with the softplus output, and weighs a burst's error
by its own variance, where MSE lets the rare bursts dominate the gradient. `loss = "mse"` is available.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

import loopcast.realtime.preprocess.dff as dff_module
from loopcast.config import to_dict
from loopcast.models.spikenet import gather_windows
from loopcast.models.zoo import SPIKE_MODELS, build_model
from loopcast.offline_training.export.engine import export_engine
from loopcast.offline_training.fit.device import check_device, resolve_device
from loopcast.offline_training.fit.loop import FitPlan, FitState, FitTask, fit
from loopcast.offline_training.spikes.eval import (
    as_predictor,
    correlation_summary,
    evaluate_spikes,
    first_difference,
    predict_frames,
    torch_predictor,
)
from loopcast.realtime.engines.base import Engine
from loopcast.realtime.preprocess.dff import CausalDff, DffConfig
from loopcast.replay.fish import FishConfig
from loopcast.replay.layout import Recording, RecordingError
from loopcast.replay.synth import SynthConfig, synthesize

# may differ when resuming: training may be extended; where it runs; what only evaluation and export read
RESUME_FREE = frozenset({"max_epochs", "threads", "device", "eval_seeds", "engine_neurons"})
RESUME_FILE = "resume.pt"   # in the run directory


@dataclass(frozen=True)
class SpikeTrainConfig:
    """Everything that determines a spike-net training run (saved beside the engine as config.toml).
    `fish` is the simulated fish; its `snr` and `seed` are replaced by each (snr, seed) pair."""

    model: str = "spikenet"
    context: int = 32
    hidden: tuple[int, ...] = (64, 32)
    noise_input: bool = True
    activation: Literal["relu", "gelu", "silu"] = "relu"
    snrs: tuple[float, ...] = (2.0, 4.0, 8.0)
    seeds: tuple[int, ...] = (0, 1)
    eval_seeds: tuple[int, ...] = (1000,)     # held-out fish per SNR, evaluated after training
    n_frames: int = 1200
    fish: FishConfig = field(default_factory=FishConfig)
    dff: DffConfig = field(default_factory=DffConfig)
    loss: Literal["poisson", "mse"] = "poisson"
    lr: float = 1e-3
    weight_decay: float = 1e-4
    batch_size: int = 4096                    # (neuron, frame) windows per step
    steps_per_epoch: int = 500
    max_epochs: int = 40
    patience: int = 5                         # validations (one per epoch) without improvement before stopping
    val_frac: float = 0.15
    val_samples: int = 262144                 # random val windows for the per-epoch val loss (early stopping)
    seed: int = 0
    threads: int = 1                          # 2 is no faster for this small MLP and much slower on a busy host
    device: str = "auto"                      # training device: auto, cpu, cuda, cuda:N (evaluation: CPU)
    engine_neurons: int = 0                   # N the engine declares (the pipeline's); 0 = fish.n_neurons

    def __post_init__(self) -> None:
        if self.model not in SPIKE_MODELS:
            raise ValueError(f"model must be one of {sorted(SPIKE_MODELS)}, got {self.model!r}")
        if not self.snrs or min(self.snrs) <= 0 or not self.seeds:
            raise ValueError(f"need one or more snrs > 0 and seeds, got {self.snrs}, {self.seeds}")
        if set(self.seeds) & set(self.eval_seeds):
            raise ValueError(f"eval_seeds {self.eval_seeds} must differ from the training seeds {self.seeds}")
        for name in ("batch_size", "steps_per_epoch", "max_epochs", "patience", "val_samples", "threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 < self.val_frac < 1.0 or self.lr <= 0 or self.weight_decay < 0 or self.engine_neurons < 0:
            raise ValueError("need 0 < val_frac < 1, lr > 0, weight_decay >= 0 and engine_neurons >= 0")
        check_device(self.device)
        need = self.first_frame + 2 * self.context + 2   # some train targets, then val windows of val frames
        if self.n_frames < need:
            raise ValueError(f"n_frames={self.n_frames} is too short for context {self.context} after the "
                             f"dF/F warm-up ({self.dff.warmup} frames): need >= {need}")
        build_model(self.model, self.model_config())  # the model's own validation

    @property
    def horizon(self) -> int:
        """Always 1: the net estimates the current frame (the exporter reads this)."""
        return 1

    @property
    def first_frame(self) -> int:
        """The first target frame whose whole window lies past the dF/F warm-up."""
        return self.dff.warmup + self.context - 1

    def model_config(self) -> dict[str, Any]:
        """The SpikeNetConfig mapping for models.zoo.build_model."""
        return {"context": self.context, "hidden": list(self.hidden), "noise_input": self.noise_input,
                "activation": self.activation}


# ----------------------------------------------------------------------------------------------- data


@dataclass(frozen=True)
class SpikeData:
    """Causal dF/F and true spike counts, recordings stacked along neurons: both (T, M) float32."""

    dff: np.ndarray
    spikes: np.ndarray
    first: int          # first target frame
    split: int          # train targets [first, split), val targets [split + C - 1, T)
    context: int

    @property
    def val_frames(self) -> np.ndarray:
        return np.arange(self.split + self.context - 1, self.dff.shape[0])

    def fingerprint(self) -> str:
        """sha256 over shapes and bytes of both arrays."""
        h = hashlib.sha256(f"{self.dff.shape}|{self.first}|{self.split}".encode())
        for a in (self.dff, self.spikes):
            h.update(np.ascontiguousarray(a).data)
        return "sha256:" + h.hexdigest()


def recording_dir(cfg: SpikeTrainConfig, work_dir: str | Path, snr: float, seed: int) -> Path:
    """Cache directory of the (snr, seed) recording, named by a hash of everything that shapes it."""
    fish = replace(cfg.fish, snr=float(snr), seed=int(seed))
    key = json.dumps({"fish": to_dict(fish), "n_frames": cfg.n_frames}, sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:10]
    return Path(work_dir) / "recordings" / f"snr{snr:g}-seed{seed}-{digest}"


def open_or_synthesize(cfg: SpikeTrainConfig, work_dir: str | Path, snr: float, seed: int,
                       progress: bool = False) -> Recording:
    """The cached (snr, seed) recording, synthesized (without raw volumes) if absent or unreadable."""
    path = recording_dir(cfg, work_dir, snr, seed)
    if path.exists():
        try:
            return Recording.open(str(path))
        except RecordingError:
            pass  # a half-written cache entry: make it again
    synth = SynthConfig(fish=replace(cfg.fish, snr=float(snr), seed=int(seed)), n_frames=cfg.n_frames,
                        write_raw=False)
    return synthesize(synth, path, progress=progress, overwrite=True)


def causal_dff_traces(f: np.ndarray, cfg: DffConfig, progress: bool = False) -> np.ndarray:
    """The pipeline's online causal dF/F of raw segment means f (T, N) -> (T, N) float32."""
    fast = getattr(dff_module, "causal_dff", None)
    if fast is not None:
        return np.asarray(fast(f, cfg), dtype=np.float32)
    online = CausalDff(f.shape[1], cfg)
    out = np.empty(f.shape, dtype=np.float32)
    for t in tqdm(range(f.shape[0]), desc="causal dF/F", unit="frame", leave=False, disable=not progress):
        out[t] = online.process(f[t])[0]
    return out


def recording_arrays(cfg: SpikeTrainConfig, work_dir: str | Path, snr: float, seed: int,
                     progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(causal dF/F, true spike counts), both (T, N) float32; the dF/F is cached beside the recording."""
    rec = open_or_synthesize(cfg, work_dir, snr, seed, progress)
    if abs(rec.frame_period_s - cfg.fish.frame_period_s) > 1e-9:
        raise ValueError(f"{rec.root}: frame period {rec.frame_period_s} s != {cfg.fish.frame_period_s} s")
    digest = hashlib.sha256(json.dumps(to_dict(cfg.dff), sort_keys=True).encode()).hexdigest()[:10]
    cache = recording_dir(cfg, work_dir, snr, seed) / f"causal_dff-{digest}.npy"
    if cache.is_file():
        dff = np.load(cache)
    else:
        dff = causal_dff_traces(rec.raw_traces(), cfg.dff, progress)
        tmp = cache.with_suffix(".tmp.npy")
        np.save(tmp, dff)
        os.replace(tmp, cache)
    return dff, np.asarray(rec.ground_truth("spikes"), dtype=np.float32)


def build_data(cfg: SpikeTrainConfig, work_dir: str | Path, progress: bool = True) -> SpikeData:
    """Every training (snr, seed) recording, stacked along neurons and split by time."""
    pairs = [(snr, seed) for snr in cfg.snrs for seed in cfg.seeds]
    arrays = [recording_arrays(cfg, work_dir, snr, seed, progress)
              for snr, seed in tqdm(pairs, desc="spike data", unit="rec", disable=not progress)]
    n_t = min(d.shape[0] for d, _ in arrays)
    dff = np.ascontiguousarray(np.concatenate([d[:n_t] for d, _ in arrays], axis=1))
    spikes = np.ascontiguousarray(np.concatenate([s[:n_t] for _, s in arrays], axis=1))
    first = cfg.first_frame
    split = first + int(round((1.0 - cfg.val_frac) * (n_t - first)))
    if split <= first or split + cfg.context - 1 >= n_t:
        raise ValueError(f"{n_t} frames leave no train or no val targets (first {first}, split {split})")
    return SpikeData(dff, spikes, first, split, cfg.context)


# ------------------------------------------------------------------------------------------- training


@dataclass(frozen=True)
class SpikeTrainResult:
    """The best model (by val loss), per-epoch history, val metrics and the training data's fingerprint."""

    model: nn.Module
    history: tuple[dict[str, float], ...]
    metrics: dict[str, Any]
    data_fingerprint: str
    parity_window: np.ndarray        # a real val window (C, N_fish) for the export's parity check
    best_epoch: int = 0


def spike_loss(rate: torch.Tensor, target: torch.Tensor, kind: str) -> torch.Tensor:
    """Mean Poisson NLL (without the log y! term) or MSE of expected counts vs true counts."""
    if kind == "poisson":
        return nn.functional.poisson_nll_loss(rate, target, log_input=False, full=False, eps=1e-6)
    return nn.functional.mse_loss(rate, target)


def sample_batch(data: SpikeData, rng: np.random.Generator, batch: int, split: Literal["train", "val"] = "train",
                 device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Random (frame, neuron) targets of `split`: windows (1, C, B) and true counts (1, 1, B)."""
    lo, hi = (data.first, data.split) if split == "train" else (int(data.val_frames[0]), data.dff.shape[0])
    frames = rng.integers(lo, hi, size=batch)
    neurons = rng.integers(0, data.dff.shape[1], size=batch)
    x = gather_windows(data.dff, frames, neurons, data.context)          # (1, C, B)
    y = data.spikes[frames, neurons][None, None]                         # (1, 1, B)
    return torch.from_numpy(x).to(device), torch.from_numpy(np.ascontiguousarray(y)).to(device)


def fit_spike_net(cfg: SpikeTrainConfig, data: SpikeData, progress: bool = True, checkpoint: str | Path | None = None,
                  stop_after: int | None = None) -> SpikeTrainResult:
    """Train with AdamW on random windows; early-stop on the val loss; keep the best epoch's weights.
    With `checkpoint`, a rerun resumes it; `stop_after` ends after that many epochs (as an interrupted job)."""
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    model, device = build_model(cfg.model, cfg.model_config()), resolve_device(cfg.device)
    state = _fit(model.to(device), data, cfg, progress, checkpoint, stop_after)
    model.to("cpu")
    t = int(data.val_frames[0])
    window = np.ascontiguousarray(data.dff[t - cfg.context + 1:t + 1, :cfg.fish.n_neurons])   # (C, N_fish)
    metrics = {"val": validate(model, data, cfg), "device": str(device)}
    return SpikeTrainResult(model.eval(), tuple(state.history), metrics, data.fingerprint(), window,
                            state.best_step)


def _fit(model: nn.Module, data: SpikeData, cfg: SpikeTrainConfig, progress: bool, checkpoint: str | Path | None,
         stop_after: int | None) -> FitState:
    """The one loop (offline_training.fit.loop), an epoch per unit; leaves the best weights in `model`."""
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    device = next(model.parameters()).device
    val_x, val_y = sample_batch(data, np.random.default_rng([cfg.seed, 2]), cfg.val_samples, "val", device)

    @torch.no_grad()
    def val_loss() -> dict[str, float]:
        return {"val_loss": float(spike_loss(model.eval()(val_x), val_y, cfg.loss))}

    task = FitTask(model, lambda epoch: {"train_loss": _train_epoch(model, opt, data, cfg, epoch)}, val_loss,
                   stateful={"optimizer": opt})
    state = fit(task, FitPlan(total=cfg.max_epochs, config=cfg, unit="epoch", patience=cfg.patience,
                              monitor="val_loss", checkpoint=None if checkpoint is None else Path(checkpoint),
                              resume_free=RESUME_FREE, stop_after=stop_after, progress=progress,
                              desc=f"train {cfg.model}"))
    model.load_state_dict(state.best_state)
    return state


def _train_epoch(model: nn.Module, opt: torch.optim.Optimizer, data: SpikeData, cfg: SpikeTrainConfig,
                 epoch: int) -> float:
    model.train()
    rng = np.random.default_rng([cfg.seed, 1, epoch])          # ([seed, 2] drew the val sample)
    total = 0.0
    for _ in range(cfg.steps_per_epoch):
        x, y = sample_batch(data, rng, cfg.batch_size, device=next(model.parameters()).device)
        loss = spike_loss(model(x), y, cfg.loss)                          # model(x): (1, 1, B)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        total += float(loss.detach())
    return total / cfg.steps_per_epoch


def validate(model: nn.Module, data: SpikeData, cfg: SpikeTrainConfig) -> dict[str, Any]:
    """Loss over every val (frame, neuron) and the median per-neuron correlations with the true spikes
    of the model and of the first-difference baseline."""
    frames = data.val_frames
    pred = predict_frames(torch_predictor(model), data.dff, frames, cfg.context)    # (F, M)
    truth = data.spikes[frames]
    loss = float(spike_loss(torch.from_numpy(pred), torch.from_numpy(truth), cfg.loss))
    corr = correlation_summary(pred, first_difference(data.dff)[frames], truth)
    return {"loss": loss, "loss_kind": cfg.loss, "frames": int(len(frames)), **corr}


# ----------------------------------------------------------------------------------------- evaluation


def evaluate_recording(predictor: nn.Module | Engine | str | Path, recording: Recording | str | Path,
                       dff_cfg: DffConfig = DffConfig(), progress: bool = False) -> dict[str, Any]:
    """evaluate_spikes on a recording with ground truth: causal dF/F of its raw traces, as the pipeline."""
    rec = recording if isinstance(recording, Recording) else Recording.open(str(recording))
    dff = causal_dff_traces(rec.raw_traces(), dff_cfg, progress)
    _, context = as_predictor(predictor)
    return evaluate_spikes(predictor, dff, rec.ground_truth("spikes"), dff_cfg.warmup + context - 1)


def evaluate_heldout(model: nn.Module, cfg: SpikeTrainConfig, work_dir: str | Path,
                     seeds: Sequence[int] | None = None, progress: bool = True) -> dict[str, Any]:
    """Per SNR: correlations on the held-out fish (`eval_seeds`), neurons of all seeds pooled."""
    out = {}
    for snr in tqdm(cfg.snrs, desc="held-out eval", unit="snr", disable=not progress):
        preds, bases, truths = [], [], []
        for seed in cfg.eval_seeds if seeds is None else seeds:
            dff, spikes = recording_arrays(cfg, work_dir, snr, seed, progress)
            frames = np.arange(cfg.first_frame, dff.shape[0])
            preds.append(predict_frames(torch_predictor(model), dff, frames, cfg.context))
            bases.append(first_difference(dff)[frames])
            truths.append(spikes[frames])
        out[f"snr{snr:g}"] = correlation_summary(*(np.concatenate(a, axis=1) for a in (preds, bases, truths)))
    return out


# --------------------------------------------------------------------------------------------- export


def export_spike_net(result: SpikeTrainResult, cfg: SpikeTrainConfig, registry_dir: str | Path) -> Path:
    """Export as a 'spikes' engine (H = 1, lead time 0), parity-checked on a real val window."""
    n = cfg.engine_neurons or cfg.fish.n_neurons
    window = result.parity_window
    reps = -(-n // window.shape[1])
    window = np.ascontiguousarray(np.tile(window, (1, reps))[:, :n])     # (C, n): tiled if n > N_fish
    source = f"synthetic: snrs={list(cfg.snrs)} seeds={list(cfg.seeds)} n_frames={cfg.n_frames}"
    return export_engine(result.model, cfg, registry_dir, n, result.metrics, result.data_fingerprint, source,
                         parity_input=window, task="spikes")


def train_spike_net(cfg: SpikeTrainConfig, registry_dir: str | Path, work_dir: str | Path,
                    progress: bool = True, run_dir: str | Path | None = None) -> Path:
    """Build the data, train, evaluate on held-out fish, export; returns the engine version directory.
    With `run_dir`, training checkpoints to run_dir/resume.pt after every epoch and a rerun resumes it."""
    t0 = time.monotonic()
    data = build_data(cfg, work_dir, progress)
    t_data = time.monotonic()
    result = fit_spike_net(cfg, data, progress, None if run_dir is None else Path(run_dir) / RESUME_FILE)
    metrics = dict(result.metrics)
    metrics["train"] = {"best_epoch": result.best_epoch, "epochs": len(result.history),
                        "data_s": round(t_data - t0, 1), "fit_s": round(time.monotonic() - t_data, 1),
                        "targets": int((data.split - data.first) * data.dff.shape[1]),
                        "history": list(result.history)}
    if cfg.eval_seeds:
        metrics["heldout"] = evaluate_heldout(result.model, cfg, work_dir, progress=progress)
    return export_spike_net(replace(result, metrics=metrics), cfg, registry_dir)
