"""NLinear (LTSF-Linear / ZAPBench): one dense layer over time, shared by all neurons.

The last context value of each neuron is subtracted before the layer and added back after it, so
the model forecasts the change from "now"; this makes it robust to each neuron's level.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class NLinearConfig:
    """Context length C (input steps) and horizon H (forecast steps)."""

    context: int = 4
    horizon: int = 8

    def __post_init__(self) -> None:
        if self.context < 1 or self.horizon < 1:
            raise ValueError(f"context and horizon must be >= 1, got {self.context}, {self.horizon}")


class NLinear(nn.Module):
    """Forecast (B, H, N) from (B, C, N): last value + Linear(C -> H) over the normalised context."""

    def __init__(self, config: NLinearConfig | None = None) -> None:
        super().__init__()
        self.config = config or NLinearConfig()
        self.linear = nn.Linear(self.config.context, self.config.horizon)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, C, N)
        last = x[:, -1:, :]                       # (B, 1, N)
        z = (x - last).transpose(1, 2)            # (B, N, C)
        y = self.linear(z).transpose(1, 2)        # (B, H, N)
        return y + last                           # (B, H, N)
