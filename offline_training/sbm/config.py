"""The SBM trainer's config and data types, shared by its driver (offline_training.sbm.train) and its fit
loop (offline_training.sbm.fit), which therefore need not import each other's modules."""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from loopcast.models.sbm import SBMConfig
from loopcast.offline_training.data.covariates import check_future_covariates, covariate_windows
from loopcast.offline_training.data.splits import ConditionSplit, condition_splits, split_windows
from loopcast.offline_training.fit.device import check_device, resolve_device
from loopcast.offline_training.sbm.eval import SBMEvalConfig

DERIVED = frozenset({"n_neurons", "n_covariates", "context", "horizon"})
OPTIMIZERS = ("adamw", "muon")


@dataclass(frozen=True)
class SBMTrainConfig:
    """Everything that determines an SBM training run (saved as config.toml in the run and the engine)."""

    model: str = "sbm"
    context: int = 6                  # tau (the paper: 12 frames ~ 4 s; 6 fits the 914 ms frame on 2 CPU cores)
    horizon: int = 1                  # rollout steps of the exported engine (1 = next step)
    seed: int = 0
    model_options: dict[str, Any] = field(default_factory=lambda: {   # other SBMConfig fields; CPU-sized
        "d_model": 32, "n_heads": 2, "n_layers": 1, "cluster_size": 128, "routing": "sorted", "membership": 2,
        "routing_margin": 3e-3})   # (SBMConfig.paper for a GPU); [train_sbm.model_options] keys layer onto these
    covariates: bool = True           # give the model the stimulus covariates (n_covariates = K)
    future_covariates: str = "held"   # the next frame's stimulus: "recorded" or "held" (as the loop serves it)
    optimizer: str = "muon"           # "muon": torch.optim.Muon for >= 2-D body weights, AdamW for the rest
    lr: float = 5e-4
    muon_lr: float = 2e-2
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 1e-4
    warmup_frac: float = 0.05         # linear warm-up over this share of the steps, then cosine
    min_lr_frac: float = 0.1          # the cosine ends at this share of the peak lr
    grad_clip: float = 1.0
    batch_size: int = 16
    max_epochs: int = 20
    max_steps: int = 0                # 0 = max_epochs * steps_per_epoch
    steps_per_epoch: int = 0          # 0 = every train window once per epoch
    val_per_epoch: int = 4
    val_windows: int = 256            # evenly spaced val windows per validation (0 = all)
    patience: int = 8                 # validations without improvement before stopping
    threads: int = 2
    device: str = "auto"              # "auto" (cuda if available), "cpu", "cuda", "cuda:N"
    holdout: tuple[int, ...] = (3,)
    val_frac: float = 0.1
    test_frac: float = 0.2
    padding: int = 1
    max_context: int = 0              # holdout scoring starts max_context - C steps in (0 = C)
    eval: SBMEvalConfig = field(default_factory=SBMEvalConfig)
    export: bool = True
    parity_tolerance: float = 1e-4    # ORT vs torch at export; hard routing (routing_margin 0) flips
                                      # cluster edges at whole-brain N (docs/sbm-quantformer.md)

    def __post_init__(self) -> None:
        if self.model != "sbm":
            raise ValueError(f"model must be 'sbm', got {self.model!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {list(OPTIMIZERS)}, got {self.optimizer!r}")
        if self.optimizer == "muon" and not hasattr(torch.optim, "Muon"):
            raise ValueError(f"optimizer 'muon' needs torch.optim.Muon (torch >= 2.9), torch is {torch.__version__}")
        for name in ("context", "horizon", "batch_size", "max_epochs", "val_per_epoch", "patience", "threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if min(self.max_steps, self.steps_per_epoch, self.val_windows, self.max_context) < 0:
            raise ValueError("max_steps, steps_per_epoch, val_windows and max_context must be >= 0")
        if not (self.lr > 0 and self.muon_lr > 0 and 0 <= self.warmup_frac < 1 and 0 <= self.min_lr_frac <= 1
                and self.grad_clip > 0 and self.weight_decay >= 0):
            raise ValueError("need lr, muon_lr, grad_clip > 0, weight_decay >= 0, 0 <= warmup_frac < 1 and "
                             "0 <= min_lr_frac <= 1")
        check_device(self.device)
        check_future_covariates(self.future_covariates)
        object.__setattr__(self, "model_options", dict(self.model_options))
        self._check_model_options()

    def _check_model_options(self) -> None:
        names = {f.name for f in dataclasses.fields(SBMConfig)}
        bad = sorted(set(self.model_options) - (names - DERIVED))
        if bad:
            raise ValueError(f"unknown or derived SBMConfig fields in model_options: {bad} "
                             f"(context/horizon come from [train_sbm], n_neurons/n_covariates from the data)")
        SBMConfig(**self.model_config(n_neurons=8, n_covariates=1))   # the model's own validation

    def model_config(self, n_neurons: int | None = None, n_covariates: int | None = None) -> dict[str, Any]:
        """The SBMConfig mapping: context, horizon, the data's N and K (when given), then model_options."""
        out: dict[str, Any] = {"context": self.context, "horizon": self.horizon}
        if n_neurons is not None:
            out["n_neurons"] = n_neurons
        if n_covariates is not None:
            out["n_covariates"] = n_covariates if self.covariates else 0
        return {**out, **self.model_options}

    def splits(self, offsets: Sequence[int]) -> list[ConditionSplit]:
        """ZAPBench condition splits for this context."""
        return condition_splits(offsets, self.context, holdout=self.holdout, val_frac=self.val_frac,
                                test_frac=self.test_frac, padding=self.padding,
                                max_context=self.max_context or self.context)

    def torch_device(self) -> torch.device:
        """The training device (offline_training.fit.device.resolve_device)."""
        return resolve_device(self.device)


@dataclass(frozen=True)
class SBMData:
    """Spike probabilities (T, N), covariates (T, K) or None, positions (N, 3), all float32; condition
    offsets; `first`: the first frame past the signal's warm-up."""

    probs: np.ndarray
    covariates: np.ndarray | None
    positions: np.ndarray
    offsets: tuple[int, ...]
    first: int = 0
    future: str = "recorded"   # the target frame's stimulus in batches (offline_training.data.covariates)

    def __post_init__(self) -> None:
        t, n = self.probs.shape
        if self.positions.shape != (n, 3):
            raise ValueError(f"positions must be (N={n}, 3), got {self.positions.shape}")
        if self.covariates is not None and (self.covariates.ndim != 2 or self.covariates.shape[0] != t):
            raise ValueError(f"covariates must be (T={t}, K), got {self.covariates.shape}")
        if self.offsets[-1] > t:
            raise ValueError(f"last condition offset {self.offsets[-1]} > T={t}")

    @property
    def n_covariates(self) -> int:
        return 0 if self.covariates is None else int(self.covariates.shape[1])

    def starts(self, splits: Sequence[ConditionSplit], split: str, context: int, horizon: int = 1,
               include_holdout: bool = False) -> dict[int, np.ndarray]:
        """split_windows() per condition, without the windows that start in the warm-up."""
        per = split_windows(splits, split, context, horizon, include_holdout)  # type: ignore[arg-type]
        return {k: s[s >= self.first] for k, s in per.items()}

    def batch(self, starts: np.ndarray, context: int,
              device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Windows x (B, C + 1, N) and their covariates (B, C + 1, K) | None, as tensors."""
        idx = np.asarray(starts, np.int64)[:, None] + np.arange(context + 1)[None]
        x = torch.from_numpy(np.ascontiguousarray(self.probs[idx])).to(device)
        cov = None if self.covariates is None else torch.from_numpy(
            covariate_windows(self.covariates, np.asarray(starts, np.int64), context, 1, self.future)).to(device)
        return x, cov
