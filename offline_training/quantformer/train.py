"""Train QuantFormer on a recording: pretrain (masked auto-encoding + VQ), fine-tune, evaluate, export.

Input is the pipeline's causal dF/F (offline_training.data.loop_signals.loop_dff) with ZAPBench-style splits
(offline_training.data.splits; condition 3 held out). Every step draws `batch_size` train windows and a random
subset of `neurons_per_batch` neurons: QuantFormer's sequences are per neuron, so this is exact.

1. Pretraining: `pretrain_epochs` of masked auto-encoding (QuantFormer.pretrain_loss); codes unused for a
   while are restarted on batch latents every `restart_every` steps.
2. Fine-tuning (joint, encoder fine-tuned): BCE on the activation logit (pos_weight = negatives / positives
   of the train labels) + `forecast_weight` * CE of the future-patch code logits against the codes a frozen
   copy of the pretrained model assigns to the true future patches. The codebook, its projection and the
   decoder stay frozen so predicted codes decode as in pretraining. The best epoch by val loss is kept.
3. Activation threshold: `activation_threshold`, or (0) the `activation_quantile` of the train windows'
   future means (so ~15% of train windows are active by default).
4. Metrics on the test split of the training conditions and on the holdout; the activation engine
   (task "activation") and the forecasting engine are exported with the metrics in their manifests.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from loopcast.config import from_dict
from loopcast.models.quantformer import QuantFormer, QuantFormerActivation, QuantFormerConfig, QuantFormerForecaster
from loopcast.offline_training.data.covariates import check_future_covariates, covariate_windows
from loopcast.offline_training.data.fingerprint import data_fingerprint
from loopcast.offline_training.data.loop_signals import loop_dff
from loopcast.offline_training.data.splits import condition_splits, gather_windows, split_windows
from loopcast.offline_training.export.engine import export_engine
from loopcast.offline_training.fit.device import check_device, resolve_device
from loopcast.offline_training.fit.loop import FitPlan, FitTask, fit
from loopcast.offline_training.quantformer import eval as qe
from loopcast.realtime.preprocess.dff import DffConfig
from loopcast.replay.layout import Recording

DERIVED = frozenset({"n_neurons", "n_covariates", "context", "horizon"})   # set by the trainer and the data
OPTIONS = {f.name: f.default for f in dataclasses.fields(QuantFormerConfig) if f.name not in DERIVED}  # + defaults
# Config keys that may differ when a phase resumes its checkpoint (run_dir/resume_<phase>.pt): where it runs,
# what only evaluation and export read, the fine-tuning length, and for pretraining all of fine-tuning.
FINETUNE_FREE = frozenset({"threads", "device", "eval_batch_size", "export_forecaster", "tolerance", "finetune_epochs"})
PRETRAIN_FREE = FINETUNE_FREE | {"finetune_lr", "forecast_weight", "activation_threshold", "activation_quantile"}


@dataclass(frozen=True)
class QuantFormerTrainConfig:
    """Model size, the two training phases, the activation criterion, splits and export (config.toml)."""

    model: str = "quantformer"
    context: int = 16
    horizon: int = 8
    seed: int = 0
    # other QuantFormerConfig fields; [train_quantformer.model_options] keys layer onto these
    model_options: dict[str, Any] = field(default_factory=lambda: {
        "patch": 4, "codebook_size": 512, "d_model": 64, "n_layers": 3})
    covariates: bool = True           # stimulus token from the recording's covariates
    future_covariates: str = "held"   # the stimulus of the H future frames: "recorded" or "held" (the loop)
    normalisation: str = "global"     # input mean / std: "global" (all neurons) or "neuron"
    pretrain_epochs: int = 10
    finetune_epochs: int = 10
    steps_per_epoch: int = 0          # 0 = ceil(train windows / batch_size)
    batch_size: int = 32              # windows per step
    neurons_per_batch: int = 64       # random neurons per step (0 = all)
    lr: float = 1e-3
    finetune_lr: float = 5e-4
    weight_decay: float = 1e-4
    restart_every: int = 20           # dead-code restarts during pretraining (0 = never)
    forecast_weight: float = 1.0
    max_train_windows: int = 0        # 0 = all
    max_eval_windows: int = 2000      # per split (evenly strided; 0 = all)
    eval_batch_size: int = 16
    activation_threshold: float = 0.0  # mean dF/F over the next H frames; 0 = auto (activation_quantile)
    activation_quantile: float = 0.85
    holdout: tuple[int, ...] = (3,)
    val_frac: float = 0.1
    test_frac: float = 0.2
    padding: int = 1
    max_context: int = 256
    threads: int = 2
    device: str = "auto"              # training device: auto, cpu, cuda, cuda:N (evaluation / export: CPU)
    export_forecaster: bool = True
    tolerance: float = 1e-4

    def __post_init__(self) -> None:
        if self.model != "quantformer":
            raise ValueError(f"model must be 'quantformer', got {self.model!r}")
        for name in ("pretrain_epochs", "finetune_epochs", "batch_size", "eval_batch_size", "threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("steps_per_epoch", "neurons_per_batch", "restart_every", "max_train_windows", "max_eval_windows"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 < self.activation_quantile < 1.0:
            raise ValueError(f"activation_quantile must be in (0, 1), got {self.activation_quantile}")
        if self.normalisation not in ("global", "neuron"):
            raise ValueError(f"normalisation must be 'global' or 'neuron', got {self.normalisation!r}")
        check_device(self.device)
        check_future_covariates(self.future_covariates)
        object.__setattr__(self, "holdout", tuple(self.holdout))
        object.__setattr__(self, "model_options", dict(self.model_options))
        clash = sorted(set(self.model_options) & DERIVED)
        if clash:
            raise ValueError(f"model_options {clash} are set by [train_quantformer] and the data, not by model_options")
        unknown = sorted(set(self.model_options) - set(OPTIONS))
        if unknown:
            raise ValueError(f"model_options {unknown} are not options of model 'quantformer'; "
                             f"its options: {sorted(OPTIONS)}")
        self.build_model_config(1, 0)  # the model's own types and validation

    def model_config(self, n_neurons: int | None = None, n_covariates: int | None = None) -> dict[str, Any]:
        """QuantFormerConfig fields: context, horizon, its defaults under model_options, N / K when given."""
        given = {"n_neurons": n_neurons, "n_covariates": n_covariates}
        return {"context": self.context, "horizon": self.horizon, **OPTIONS, **self.model_options,
                **{k: v for k, v in given.items() if v is not None}}

    def build_model_config(self, n_neurons: int, n_covariates: int) -> QuantFormerConfig:
        return from_dict(QuantFormerConfig, self.model_config(n_neurons, n_covariates), where="model.quantformer")

    @property
    def codebook_size(self) -> int:  # the model's: model_options or QuantFormerConfig's default
        return int(self.model_config()["codebook_size"])


@dataclass(frozen=True)
class QuantFormerResult:
    """Metrics, the activation engine, the forecasting engine (or None), checkpoint and figures."""

    metrics: dict[str, Any]
    engine: Path | None
    forecast_engine: Path | None
    checkpoint: Path
    figures: list[Path] = field(default_factory=list)


@dataclass(frozen=True)
class Data:
    """dF/F (T, N), covariates (T, K) or None, and the window starts of every split."""

    dff: np.ndarray
    cov: np.ndarray | None
    starts: dict[str, np.ndarray]

    @property
    def n_neurons(self) -> int:
        return int(self.dff.shape[1])

    def batch(self, starts: np.ndarray, neurons: np.ndarray | None, cfg: QuantFormerTrainConfig,
              device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Windows (B, C + H, n) of `neurons` (None = all), their ids (n,) and covariates (B, C + H, K)."""
        ids = np.arange(self.n_neurons) if neurons is None else neurons
        x, y = gather_windows(self.dff[:, ids], starts, cfg.context, cfg.horizon)
        cov = None if self.cov is None else torch.from_numpy(covariate_windows(
            self.cov, starts, cfg.context, cfg.horizon, cfg.future_covariates)).to(device)
        return torch.from_numpy(np.concatenate([x, y], axis=1)).to(device), torch.from_numpy(ids).to(device), cov


def load_data(rec: Recording, cfg: QuantFormerTrainConfig, dff_config: DffConfig = DffConfig(),
              progress: bool = False) -> Data:
    """The causal dF/F (the pipeline's `dff_config`), covariates and the window starts: train, val, test
    (training conditions), holdout."""
    dff = np.ascontiguousarray(loop_dff(rec, dff_config, progress=progress), dtype=np.float32)
    if not np.isfinite(dff).all():
        raise ValueError(f"{rec.root}: the dF/F has non-finite values")
    cov = np.ascontiguousarray(rec.stimuli(), dtype=np.float32) if cfg.covariates else None
    splits = condition_splits(rec.condition_offsets, cfg.context, holdout=cfg.holdout, val_frac=cfg.val_frac,
                              test_frac=cfg.test_frac, padding=cfg.padding, max_context=cfg.max_context)
    c, h = cfg.context, cfg.horizon
    held = split_windows(splits, "test", c, h, include_holdout=True)
    starts = {"train": _cat(split_windows(splits, "train", c, h).values()),
              "val": _cat(split_windows(splits, "val", c, h).values()),
              "test": _cat(split_windows(splits, "test", c, h).values()),
              "holdout": _cat(v for k, v in held.items() if k in cfg.holdout)}
    rng = np.random.default_rng(cfg.seed)
    if cfg.max_train_windows and len(starts["train"]) > cfg.max_train_windows:
        starts["train"] = np.sort(rng.choice(starts["train"], cfg.max_train_windows, replace=False))
    for split in ("val", "test", "holdout"):
        starts[split] = _thin(starts[split], cfg.max_eval_windows)
    for split in ("train", "val", "test"):
        if not len(starts[split]):
            raise ValueError(f"{rec.root}: no {split} windows for C={c}, H={h} (recording too short?)")
    return Data(dff, cov, starts)


def _cat(parts: Any) -> np.ndarray:
    parts = [np.asarray(p, np.int64) for p in parts]
    return np.concatenate(parts) if parts else np.empty(0, np.int64)


def _thin(starts: np.ndarray, limit: int) -> np.ndarray:
    if not limit or len(starts) <= limit:
        return starts
    return starts[np.linspace(0, len(starts) - 1, limit).round().astype(np.int64)]


def activation_threshold(data: Data, cfg: QuantFormerTrainConfig) -> float:
    """The configured threshold, or the `activation_quantile` of the train windows' future means."""
    if cfg.activation_threshold:
        return float(cfg.activation_threshold)
    _, future = gather_windows(data.dff, data.starts["train"], cfg.context, cfg.horizon)
    return float(np.quantile(future.mean(axis=1), cfg.activation_quantile))


def normalise(model: QuantFormer, data: Data, cfg: QuantFormerTrainConfig) -> None:
    """Input statistics of the frames the train windows cover: one mean / std for all neurons ("global":
    keeps levels comparable across neurons, as the global activation threshold needs) or per neuron."""
    idx = np.unique(data.starts["train"][:, None] + np.arange(cfg.context + cfg.horizon))
    frames = data.dff[idx]
    if cfg.normalisation == "global":
        mean, std = np.full(data.n_neurons, frames.mean()), np.full(data.n_neurons, frames.std())
    else:
        mean, std = frames.mean(0), frames.std(0)
    model.set_normalisation(torch.from_numpy(mean).float(), torch.from_numpy(std).float())


class Steps:
    """Seeded (window batch, neuron subset) draws for one training phase."""

    def __init__(self, data: Data, cfg: QuantFormerTrainConfig, phase: int) -> None:
        self.data, self.cfg = data, cfg
        self.rng = np.random.default_rng([cfg.seed, phase])
        n_train = len(data.starts["train"])
        self.per_epoch = cfg.steps_per_epoch or max(1, math.ceil(n_train / cfg.batch_size))

    def epoch(self) -> list[tuple[np.ndarray, np.ndarray | None]]:
        order = self.rng.permutation(self.data.starts["train"])
        out = []
        for i in range(self.per_epoch):
            j = (i * self.cfg.batch_size) % len(order)
            npb = self.cfg.neurons_per_batch
            neurons = None if not npb or npb >= self.data.n_neurons else np.sort(
                self.rng.choice(self.data.n_neurons, npb, replace=False))
            out.append((order[j:j + self.cfg.batch_size], neurons))
        return out


def pretrain(model: QuantFormer, data: Data, cfg: QuantFormerTrainConfig, progress: bool,
             checkpoint: Path | None = None, stop_after: int | None = None) -> list[dict[str, float]]:
    """Masked auto-encoding epochs on the one loop (offline_training.fit.loop); returns per-epoch mean train
    parts and the val loss. The model keeps its last epoch's weights. With `checkpoint`, a rerun resumes it;
    `stop_after` ends after that many epochs."""
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps, dev = Steps(data, cfg, 1), model.mean.device  # the model's device (a buffer's)
    gen = torch.Generator(dev).manual_seed(cfg.seed)

    def epoch(e: int) -> dict[str, float]:
        model.train()
        parts = []
        for i, (starts, neurons) in enumerate(steps.epoch()):
            x, ids, cov = data.batch(starts, neurons, cfg, dev)
            loss, p = model.pretrain_loss(x, ids, cov, generator=gen)
            _step(opt, loss)
            parts.append(p)
            step = (e - 1) * steps.per_epoch + i + 1
            if cfg.restart_every and step % cfg.restart_every == 0 and e < cfg.pretrain_epochs:
                with torch.no_grad():
                    model.vq.restart_dead(model.code_latents(x, ids, cov), generator=gen)
        return {k: float(np.mean([p[k] for p in parts])) for k in parts[0]}

    task = FitTask(model, epoch, lambda: {f"val_{k}": v for k, v in _val_pretrain(model, data, cfg).items()},
                   stateful={"optimizer": opt}, rngs={"batches": steps.rng, "masks": gen})
    return fit(task, _plan(cfg, cfg.pretrain_epochs, PRETRAIN_FREE, checkpoint, stop_after, progress,
                           "quantformer pretrain")).history


def _plan(cfg: QuantFormerTrainConfig, epochs: int, free: frozenset[str], checkpoint: Path | None,
          stop_after: int | None, progress: bool, desc: str) -> FitPlan:
    """An epoch per unit, validated after each; no early stopping (the best val loss is still tracked)."""
    return FitPlan(total=epochs, config=cfg, unit="epoch", monitor="val_loss", checkpoint=checkpoint,
                   resume_free=free, stop_after=stop_after, progress=progress, desc=desc)


@torch.no_grad()
def _val_pretrain(model: QuantFormer, data: Data, cfg: QuantFormerTrainConfig) -> dict[str, float]:
    model.eval()
    gen = torch.Generator(model.mean.device).manual_seed(cfg.seed + 1)
    starts = _thin(data.starts["val"], 4 * cfg.batch_size)
    x, ids, cov = data.batch(starts, _thin(np.arange(data.n_neurons), 256), cfg, model.mean.device)
    return model.pretrain_loss(x, ids, cov, generator=gen)[1]


def _step(opt: torch.optim.Optimizer, loss: torch.Tensor) -> None:
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


class FinetuneLoss:
    """BCE on the activation logits + forecast_weight * CE on the code logits vs a frozen teacher's codes."""

    def __init__(self, model: QuantFormer, threshold: float, pos_weight: float, cfg: QuantFormerTrainConfig) -> None:
        self.teacher = copy.deepcopy(model).eval()
        self.threshold, self.cfg = threshold, cfg
        self.bce = nn.BCEWithLogitsLoss(pos_weight=torch.tensor(pos_weight, device=model.mean.device))

    def __call__(self, model: QuantFormer, x: torch.Tensor, ids: torch.Tensor,
                 cov: torch.Tensor | None) -> tuple[torch.Tensor, dict[str, float]]:
        c = self.cfg.context
        labels = (x[:, c:].mean(1) > self.threshold).float()                # (B, n)
        codes = self.teacher.target_codes(x, ids, cov)                      # (B, n, Hp)
        act, logits = model.heads(x[:, :c], ids, cov)                       # (B, n), (B, n, Hp, K)
        bce = self.bce(act, labels)
        ce = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), codes.reshape(-1))
        loss = bce + self.cfg.forecast_weight * ce
        return loss, {"loss": float(loss.detach()), "bce": float(bce.detach()), "ce": float(ce.detach())}


def finetune(model: QuantFormer, data: Data, threshold: float, cfg: QuantFormerTrainConfig, progress: bool,
             checkpoint: Path | None = None, stop_after: int | None = None) -> list[dict[str, float]]:
    """Joint fine-tuning of encoder and heads (codebook, projection, decoder frozen) on the one loop; keeps
    the best val epoch. The teacher is the model as handed in: resume pretraining before fine-tuning."""
    _, future = gather_windows(data.dff, data.starts["train"], cfg.context, cfg.horizon)
    base = float(qe.activation_labels(future, threshold).mean())
    criterion = FinetuneLoss(model, threshold, (1 - base) / max(base, 1e-3), cfg)
    for module in (model.vq, model.to_code, model.decoder):
        module.requires_grad_(False)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.finetune_lr,
                            weight_decay=cfg.weight_decay)
    steps = Steps(data, cfg, 2)

    def epoch(_: int) -> dict[str, float]:
        model.train()
        parts = []
        for starts, neurons in steps.epoch():
            loss, p = criterion(model, *data.batch(starts, neurons, cfg, model.mean.device))
            _step(opt, loss)
            parts.append(p)
        return {k: float(np.mean([p[k] for p in parts])) for k in parts[0]}

    def validate() -> dict[str, float]:
        return {f"val_{k}": v for k, v in _val_finetune(model, data, criterion, cfg).items()}

    task = FitTask(model, epoch, validate, stateful={"optimizer": opt}, rngs={"batches": steps.rng})
    state = fit(task, _plan(cfg, cfg.finetune_epochs, FINETUNE_FREE, checkpoint, stop_after, progress,
                            "quantformer finetune"))
    model.load_state_dict(state.best_state)
    return state.history


@torch.no_grad()
def _val_finetune(model: QuantFormer, data: Data, criterion: FinetuneLoss,
                  cfg: QuantFormerTrainConfig) -> dict[str, float]:
    model.eval()
    starts = _thin(data.starts["val"], 4 * cfg.batch_size)
    neurons = _thin(np.arange(data.n_neurons), 256)
    return criterion(model, *data.batch(starts, neurons, cfg, model.mean.device))[1]


def evaluate(model: QuantFormer, data: Data, threshold: float, cfg: QuantFormerTrainConfig,
             run_dir: Path) -> tuple[dict[str, Any], list[Path]]:
    """Metrics for test and holdout (F1 threshold chosen on val) and the ROC / MAE figure."""
    scores = {s: qe.score_windows(model, data.dff, data.cov, data.starts[s], threshold, cfg.eval_batch_size,
                                  cfg.future_covariates)
              for s in ("val", "test", "holdout") if len(data.starts[s])}
    f1_thr = qe.best_f1_threshold(*scores["val"].probs())
    _, future = gather_windows(data.dff, data.starts["train"], cfg.context, cfg.horizon)
    metrics: dict[str, Any] = {"activation_threshold": threshold, "activation_criterion": "mean_dff_above",
                               "train_base_rate": float(qe.activation_labels(future, threshold).mean()),
                               "decode": model.config.decode}
    metrics.update({s: qe.split_metrics(sc, f1_thr) for s, sc in scores.items()})
    curves: dict[str, tuple[np.ndarray, np.ndarray]] = {s: qe.roc_curve(*scores[s].probs())
                                                        for s in ("test", "holdout") if s in scores}
    return metrics, [qe.plot(curves, metrics, run_dir / "quantformer.png")]


def export(model: QuantFormer, data: Data, rec: Recording, cfg: QuantFormerTrainConfig, metrics: dict[str, Any],
           threshold: float, registry_dir: str | Path) -> tuple[Path, Path | None]:
    """Export the activation engine (and the forecasting engine if cfg.export_forecaster), parity-checked on
    the first val window; the manifests carry the metrics without the training history."""
    model.eval()
    start = data.starts["val"][:1]
    x, y = gather_windows(data.dff, start, cfg.context, cfg.horizon)
    window: Any = x[0] if data.cov is None else (x[0], covariate_windows(
        data.cov, start, cfg.context, cfg.horizon, cfg.future_covariates)[0])
    lean = {k: v for k, v in metrics.items() if k != "history"}
    common = dict(registry_dir=registry_dir, n_neurons=data.n_neurons, metrics=lean,
                  data_fingerprint=data_fingerprint(data.dff, rec.condition_offsets),
                  data_source=str(rec.root), parity_input=window, tolerance=cfg.tolerance, signal="dff")
    act = export_engine(QuantFormerActivation(model), cfg, name=f"quantformer-act-c{cfg.context}-h{cfg.horizon}",
                        task="activation", extra={"activation": {"criterion": "mean_dff_above",
                                                                 "threshold": threshold, "window": cfg.horizon}},
                        **common)
    fc = None
    if cfg.export_forecaster:
        fc = export_engine(QuantFormerForecaster(model), cfg, name=f"quantformer-c{cfg.context}-h{cfg.horizon}",
                           **common)
    return act, fc


def train_quantformer(rec: Recording, cfg: QuantFormerTrainConfig, registry_dir: str | Path | None,
                      run_dir: str | Path, progress: bool = True, dff: DffConfig = DffConfig()) -> QuantFormerResult:
    """Pretrain, fine-tune, evaluate and export QuantFormer on `rec`'s causal dF/F (computed as the pipeline
    does with `dff`); no export if registry_dir is None. Each phase checkpoints after every epoch
    (run_dir/resume_pretrain.pt, resume_finetune.pt) and a rerun with the same run_dir resumes them."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    data = load_data(rec, cfg, dff, progress)
    device = resolve_device(cfg.device)
    model = QuantFormer(cfg.build_model_config(data.n_neurons, 0 if data.cov is None else data.cov.shape[1]))
    normalise(model.to(device), data, cfg)
    threshold = activation_threshold(data, cfg)
    history = {"pretrain": pretrain(model, data, cfg, progress, run_dir / "resume_pretrain.pt")}
    history["finetune"] = finetune(model, data, threshold, cfg, progress, run_dir / "resume_finetune.pt")
    metrics, figures = evaluate(model.to("cpu"), data, threshold, cfg, run_dir)  # evaluation, export: CPU
    metrics["device"] = str(device)
    last = history["pretrain"][-1]
    metrics["codebook"] = {"size": model.config.codebook_size, "val_usage": last["val_usage"],
                           "val_perplexity": last["val_perplexity"]}
    metrics["history"] = history
    ckpt = run_dir / "quantformer.pt"
    torch.save({"train": dataclasses.asdict(cfg), "model_config": dataclasses.asdict(model.config),
                "state_dict": model.state_dict(), "activation_threshold": threshold, "metrics": metrics}, ckpt)
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    engine, fc = (None, None) if registry_dir is None else export(model, data, rec, cfg, metrics, threshold,
                                                                   registry_dir)
    return QuantFormerResult(metrics=metrics, engine=engine, forecast_engine=fc, checkpoint=ckpt, figures=figures)


__all__ = ["QuantFormerTrainConfig", "QuantFormerResult", "train_quantformer", "load_data", "pretrain",
           "finetune", "activation_threshold"]
