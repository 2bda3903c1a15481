"""Peripheral Neural Model (PNM; Fatehmanesh Vegas et al. 2025, section 2.2): behaviour from a short
history of brain states, permutation invariant over neurons.

For each of the last `n_times` brain states X_t in [0, 1]^N with soma positions P (N, 3):
  - positions are centred (mean of the valid neurons) and scaled to radius 1, and described by
    Fourier features psi(p) = [p, sin(pi f_j p_a), cos(pi f_j p_a)], f_j log-spaced in [1, max_freq];
  - spikes are z-scored per time over the valid neurons (removes global gain and offset);
  - a per-neuron MLP encodes [z_{t,n}; psi(p_n)] to h_{t,n};
  - masked mean pooling over neurons gives one vector per time step;
  - a temporal MLP over the n_times pooled vectors predicts d_beh behaviour values (sigmoid output for
    targets in [0, 1], or linear).
Nothing depends on N or on neuron order, so one head serves any fish.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    import numpy as np

OUTPUTS = ("sigmoid", "linear")


@dataclass(frozen=True)
class PNMConfig:
    """Time points, per-neuron MLP width, Fourier frequencies per axis and the largest one, temporal
    MLP width, behaviour dimensions, output ("sigmoid" | "linear"), dropout, z-score epsilon."""

    n_times: int = 4             # paper: four brain-state time points
    hidden: int = 64
    n_fourier: int = 8
    fourier_max_freq: float = 32.0
    temporal_hidden: int = 128
    d_beh: int = 1
    output: str = "sigmoid"
    dropout: float = 0.0
    eps: float = 1e-5

    def __post_init__(self) -> None:
        for name in ("n_times", "hidden", "temporal_hidden", "d_beh"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.n_fourier < 0:
            raise ValueError(f"n_fourier must be >= 0, got {self.n_fourier}")
        if not self.fourier_max_freq >= 1.0:
            raise ValueError(f"fourier_max_freq must be >= 1, got {self.fourier_max_freq}")
        if self.output not in OUTPUTS:
            raise ValueError(f"output must be one of {OUTPUTS}, got {self.output!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if not self.eps > 0:
            raise ValueError(f"eps must be > 0, got {self.eps}")

    @property
    def n_position_features(self) -> int:
        """Size of psi(p): 3 coordinates plus a sine and a cosine per axis and frequency."""
        return 3 + 6 * self.n_fourier


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int) -> torch.Tensor:
    """Mean of x over `dim` where mask (broadcastable to x) is 1."""
    return (x * mask).sum(dim, keepdim=True) / mask.sum(dim, keepdim=True).clamp(min=1.0)


class PNM(nn.Module):
    """Behaviour head: (B, n_times, N) spike probabilities, (N, 3) positions [, mask] -> (B, d_beh)."""

    freqs: torch.Tensor                      # buffer (register_buffer)

    def __init__(self, config: PNMConfig | None = None) -> None:
        super().__init__()
        self.config = cfg = config or PNMConfig()
        freqs = torch.logspace(0.0, math.log10(cfg.fourier_max_freq), cfg.n_fourier) * math.pi
        self.register_buffer("freqs", freqs, persistent=False)                       # (F,)
        self.spike_in = nn.Linear(1, cfg.hidden, bias=False)
        self.position_in = nn.Linear(cfg.n_position_features, cfg.hidden)
        self.neuron_mlp = nn.Sequential(nn.GELU(), nn.Linear(cfg.hidden, cfg.hidden), nn.GELU())
        self.temporal_mlp = nn.Sequential(
            nn.Linear(cfg.n_times * cfg.hidden, cfg.temporal_hidden), nn.GELU(), nn.Dropout(cfg.dropout),
            nn.Linear(cfg.temporal_hidden, cfg.d_beh))

    def forward(self, x: torch.Tensor, positions: torch.Tensor | np.ndarray,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        # x: (B, T, N) spike probabilities; positions: (N, 3); mask: (N,) | (B, N) | None
        m = self._mask(x, mask)                                                       # (B, N)
        psi = self.position_features(torch.as_tensor(positions, dtype=x.dtype, device=x.device), m)
        mt = m[:, None, :]                                                            # (B, 1, N)
        mean = masked_mean(x, mt, dim=2)                                              # (B, T, 1)
        var = masked_mean((x - mean) ** 2, mt, dim=2)
        z = (x - mean) / torch.sqrt(var + self.config.eps) * mt                       # (B, T, N)
        h = self.spike_in(z[..., None]) + self.position_in(psi)[:, None]              # (B, T, N, hidden)
        h = self.neuron_mlp(h)
        pooled = masked_mean(h, mt[..., None], dim=2).squeeze(2)                      # (B, T, hidden)
        y = self.temporal_mlp(pooled.flatten(1))                                      # (B, d_beh)
        return torch.sigmoid(y) if self.config.output == "sigmoid" else y

    def position_features(self, positions: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """psi of the positions (N, 3) centred/scaled over the valid neurons of each sample -> (B, N, F)."""
        if positions.dim() != 2 or positions.shape != (mask.shape[1], 3):
            raise ValueError(f"positions must be (N={mask.shape[1]}, 3), got {tuple(positions.shape)}")
        m = mask[..., None]                                                           # (B, N, 1)
        p = positions[None] - masked_mean(positions[None], m, dim=1)                  # (B, N, 3)
        radius = (p.norm(dim=-1, keepdim=True) * m).amax(dim=1, keepdim=True)         # (B, 1, 1)
        p = p / torch.where(radius > 0, radius, torch.ones_like(radius))
        ang = (p[..., None] * self.freqs).flatten(2)                                  # (B, N, 3F)
        return torch.cat([p, ang.sin(), ang.cos()], dim=-1)                           # (B, N, 3 + 6F)

    def _mask(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        if x.dim() != 3 or x.shape[1] != self.config.n_times:
            raise ValueError(f"expected spike probabilities (B, n_times={self.config.n_times}, N), "
                             f"got {tuple(x.shape)}")
        b, _, n = x.shape
        if mask is None:
            return x.new_ones(b, n)
        if mask.shape not in ((n,), (b, n)):
            raise ValueError(f"mask must be (N={n},) or (B={b}, N={n}), got {tuple(mask.shape)}")
        return mask.to(x.dtype).expand(b, n)


BehaviourHead = PNM

__all__ = ["PNMConfig", "PNM", "BehaviourHead", "masked_mean"]
