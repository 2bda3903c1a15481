"""TSMixer (Chen et al. 2023) as used in ZAPBench, and its Time-Mix variant (time mixing only).

Each block mixes along time per neuron (a residual MLP Linear(C -> C), weights shared by all
neurons), then across neurons per time step (a residual MLP N -> mlp_dim -> N). A final
Linear(C -> H) over time gives the forecast. Optional RevIN normalises each neuron's context
window (per sample) and inverts that on the output.

ZAPBench settings (presets below):
  - short context: C=4  -> n_blocks=2, mlp_dim=256, no RevIN   (`TSMixerConfig.short_context`)
  - long context:  C=256 -> n_blocks=2, mlp_dim=128, RevIN     (`TSMixerConfig.long_context`)

Time-Mix (`time_only=True`, or the `TimeMix`/`TimeMixConfig` alias) skips feature mixing, so every
neuron is forecast independently with shared weights: it has no N-sized parameter and serves any N
(exports with a dynamic neuron axis). TSMixer's feature MLP fixes N at construction time.

Normalisation: LayerNorm over the time axis of each neuron (size C). It uses no batch statistics
(so train and eval behave alike and a batch of 1 works in real time), its parameter count does not
depend on N, and it never couples neurons, so Time-Mix stays strictly per-neuron.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class TSMixerConfig:
    """Context C, horizon H, neurons N (unused if time_only), blocks, feature-MLP width, RevIN."""

    context: int = 4
    horizon: int = 8
    n_neurons: int = 0  # required (>= 1) unless time_only
    n_blocks: int = 2
    mlp_dim: int = 256
    dropout: float = 0.0
    revin: bool = False
    time_only: bool = False

    def __post_init__(self) -> None:
        for name in ("context", "horizon", "n_blocks", "mlp_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.time_only and self.n_neurons < 1:
            raise ValueError(f"n_neurons must be >= 1 for feature mixing (or set time_only=True), "
                             f"got {self.n_neurons}")
        if self.n_neurons < 0:
            raise ValueError(f"n_neurons must be >= 0, got {self.n_neurons}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    @classmethod
    def short_context(cls, n_neurons: int, horizon: int = 32) -> TSMixerConfig:
        """ZAPBench C=4 setting: 2 blocks, mlp_dim 256, no RevIN."""
        return cls(context=4, horizon=horizon, n_neurons=n_neurons, n_blocks=2, mlp_dim=256)

    @classmethod
    def long_context(cls, n_neurons: int, horizon: int = 32) -> TSMixerConfig:
        """ZAPBench C=256 setting: 2 blocks, mlp_dim 128, RevIN."""
        return cls(context=256, horizon=horizon, n_neurons=n_neurons, n_blocks=2, mlp_dim=128,
                   revin=True)


class RevIN(nn.Module):
    """Reversible instance norm over time, per sample and neuron, with a learnable affine.

    The affine has `n_features` entries broadcast over the neuron axis: N for TSMixer, 1 (shared by
    all neurons) for Time-Mix so that it stays N-independent.
    """

    def __init__(self, n_features: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(n_features))
        self.bias = nn.Parameter(torch.zeros(n_features))

    def normalise(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return the normalised x and the (mean, std) needed to invert it."""
        # x: (B, T, N)
        mean = x.mean(dim=1, keepdim=True)                                        # (B, 1, N)
        std = torch.sqrt(x.var(dim=1, keepdim=True, unbiased=False) + self.eps)   # (B, 1, N)
        return (x - mean) / std * self.weight + self.bias, mean, std

    def denormalise(self, y: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
        """Invert `normalise` on y: (B, T', N) with the statistics of the input window."""
        return (y - self.bias) / (self.weight + self.eps * self.eps) * std + mean


class TimeMixing(nn.Module):
    """Residual MLP along time, shared by all neurons: norm, Linear(C -> C), ReLU, dropout."""

    def __init__(self, context: int, dropout: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(context)
        self.linear = nn.Linear(context, context)
        self.dropout = nn.Dropout(dropout)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        # z: (B, N, C)
        return z + self.dropout(torch.relu(self.linear(self.norm(z))))   # (B, N, C)


class FeatureMixing(nn.Module):
    """Residual MLP across neurons per time step: norm, N -> mlp_dim -> N, ReLU, dropouts."""

    def __init__(self, context: int, n_neurons: int, mlp_dim: int, dropout: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(context)
        self.fc1 = nn.Linear(n_neurons, mlp_dim)
        self.fc2 = nn.Linear(mlp_dim, n_neurons)
        self.dropout = nn.Dropout(dropout)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        # z: (B, N, C)
        h = self.norm(z).transpose(1, 2)                          # (B, C, N)
        h = self.dropout(torch.relu(self.fc1(h)))                 # (B, C, mlp_dim)
        h = self.dropout(self.fc2(h))                             # (B, C, N)
        return z + h.transpose(1, 2)                              # (B, N, C)


class TSMixer(nn.Module):
    """Forecast (B, H, N) from (B, C, N) with TSMixer blocks and a temporal projection C -> H."""

    config: TSMixerConfig | TimeMixConfig         # TimeMix keeps its own config

    def __init__(self, config: TSMixerConfig) -> None:
        super().__init__()
        self.config = config
        self._build(self.config)

    def _build(self, cfg: TSMixerConfig) -> None:
        """Create the layers of `cfg` (shared by TSMixer and TimeMix)."""
        self.revin = RevIN(1 if cfg.time_only else cfg.n_neurons) if cfg.revin else None
        self.time_mix = nn.ModuleList(TimeMixing(cfg.context, cfg.dropout) for _ in range(cfg.n_blocks))
        self.feature_mix = nn.ModuleList() if cfg.time_only else nn.ModuleList(
            FeatureMixing(cfg.context, cfg.n_neurons, cfg.mlp_dim, cfg.dropout)
            for _ in range(cfg.n_blocks))
        self.projection = nn.Linear(cfg.context, cfg.horizon)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, C, N)
        if self.revin is not None:
            x, mean, std = self.revin.normalise(x)                # (B, C, N), (B, 1, N) x2
        z = x.transpose(1, 2)                                     # (B, N, C)
        for i, time_mix in enumerate(self.time_mix):
            z = time_mix(z)                                       # (B, N, C)
            if len(self.feature_mix):
                z = self.feature_mix[i](z)                        # (B, N, C)
        y = self.projection(z).transpose(1, 2)                    # (B, H, N)
        if self.revin is not None:
            y = self.revin.denormalise(y, mean, std)              # (B, H, N)
        return y


@dataclass(frozen=True)
class TimeMixConfig:
    """Time-Mix: TSMixer without feature mixing (no N, no mlp_dim); serves any number of neurons."""

    context: int = 4
    horizon: int = 8
    n_blocks: int = 2
    dropout: float = 0.0
    revin: bool = False

    def __post_init__(self) -> None:
        self.to_tsmixer()  # same validation as TSMixerConfig

    def to_tsmixer(self) -> TSMixerConfig:
        """The equivalent TSMixerConfig (time_only=True)."""
        return TSMixerConfig(context=self.context, horizon=self.horizon, n_blocks=self.n_blocks,
                             dropout=self.dropout, revin=self.revin, time_only=True)


class TimeMix(TSMixer):
    """TSMixer with time mixing only: each neuron forecast independently with shared weights."""

    def __init__(self, config: TimeMixConfig | None = None) -> None:
        nn.Module.__init__(self)
        cfg = config or TimeMixConfig()
        self.config = cfg
        self._build(cfg.to_tsmixer())


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


__all__ = ["TSMixerConfig", "TSMixer", "TimeMixConfig", "TimeMix", "RevIN", "count_parameters"]
