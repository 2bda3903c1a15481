"""Parameter-free baselines: the mean of the context and the last value, repeated over the horizon."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class MeanBaselineConfig:
    """Context length C and horizon H."""

    context: int = 4
    horizon: int = 8

    def __post_init__(self) -> None:
        if self.context < 1 or self.horizon < 1:
            raise ValueError(f"context and horizon must be >= 1, got {self.context}, {self.horizon}")


@dataclass(frozen=True)
class LastValueConfig(MeanBaselineConfig):
    """Context length C and horizon H."""


class MeanBaseline(nn.Module):
    """Forecast every step ahead as the per-neuron mean of the context."""

    def __init__(self, config: MeanBaselineConfig | None = None) -> None:
        super().__init__()
        self.config = config or MeanBaselineConfig()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, C, N)
        mean = x[:, -self.config.context:, :].mean(dim=1, keepdim=True)   # (B, 1, N)
        return mean.expand(-1, self.config.horizon, -1).contiguous()        # (B, H, N)


class LastValue(nn.Module):
    """Forecast every step ahead as the last context value (persistence)."""

    def __init__(self, config: LastValueConfig | None = None) -> None:
        super().__init__()
        self.config = config or LastValueConfig()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, C, N)
        last = x[:, -1:, :]                                                 # (B, 1, N)
        return last.expand(-1, self.config.horizon, -1).contiguous()        # (B, H, N)
