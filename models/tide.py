"""TiDE (Das et al. 2023, "Long-term Forecasting with TiDE: Time-series Dense Encoder") with future
stimulus covariates.

Inputs: the context x (B, C, N) and the stimulus covariates cov (B, C + H, K) of the C context steps
followed by the H future steps (the stimulus protocol is known in advance). The covariates are
shared by all neurons; every neuron is forecast with the same weights (channel-independent), so
the model has no N-sized parameter, serves any N and exports with a dynamic neuron axis.

Per neuron (the paper's architecture, no static attributes):
  1. feature projection: a residual block per time step, K -> covariate_dim (r~);
  2. dense encoder: residual blocks over [the C context values, the flattened projected
     covariates of all C + H steps] -> hidden (the covariate half of the first block's input layers
     is the same for every neuron, so it is computed once per sample: `ResidualBlock.forward_split`);
  3. dense decoder: residual blocks hidden -> H * decoder_dim, reshaped to (H, p);
  4. temporal decoder: a residual block per future step over [p, that step's projected
     covariate] -> 1;
  5. plus a global linear residual Linear(C -> H) over the context.
A residual block is Linear-ReLU-Linear-dropout plus a linear skip, then LayerNorm (no LayerNorm on
the temporal decoder, whose output width 1 would make it constant). The feature projection and the
temporal decoder use `temporal_hidden` as hidden width (64 in the paper's code).

Normalisation: as NLinear (subtract each neuron's last context value, add it back), or RevIN
(`revin=True`, affine shared by all neurons so the model stays N-independent).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import torch
from torch import nn

from loopcast.models.tsmixer import RevIN


@dataclass(frozen=True)
class TiDEConfig:
    """Context C, horizon H, covariates K, widths of the dense and temporal parts, depth, RevIN."""

    context: int = 4
    horizon: int = 8
    n_covariates: int = 26
    hidden: int = 128
    decoder_dim: int = 8       # p: per-step decoder output width
    covariate_dim: int = 4     # r~: projected covariate width
    n_encoder: int = 1
    n_decoder: int = 1
    temporal_hidden: int = 64  # hidden width of the feature projection and the temporal decoder
    dropout: float = 0.0
    revin: bool = False

    def __post_init__(self) -> None:
        for name in ("context", "horizon", "n_covariates", "hidden", "decoder_dim", "covariate_dim",
                     "n_encoder", "n_decoder", "temporal_hidden"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")


class ResidualBlock(nn.Module):
    """TiDE residual block: Linear-ReLU-Linear-dropout plus a linear skip, then LayerNorm."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int, dropout: float,
                 layer_norm: bool = True) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_dim, hidden)
        self.fc2 = nn.Linear(hidden, out_dim)
        self.skip = nn.Linear(in_dim, out_dim)
        self.dropout = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(out_dim) if layer_norm else nn.Identity()

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        # z: (..., in_dim)
        h = self.dropout(self.fc2(torch.relu(self.fc1(z))))      # (..., out_dim)
        return self.norm(h + self.skip(z))                        # (..., out_dim)

    def forward_split(self, own: torch.Tensor, shared: torch.Tensor) -> torch.Tensor:
        """forward(cat([own, shared], -1)) where `shared` is broadcast over the neuron axis: its part of
        the input layers is computed once, not once per neuron (same weights, same result)."""
        # own: (B, N, ..., k), shared: (B, 1, ..., in_dim - k)
        k = own.shape[-1]
        def split(lin: nn.Linear) -> torch.Tensor:
            return (nn.functional.linear(own, lin.weight[:, :k], lin.bias)
                    + nn.functional.linear(shared, lin.weight[:, k:]))   # (B, N, ..., hidden | out_dim)
        h = self.dropout(self.fc2(torch.relu(split(self.fc1))))  # (B, N, ..., out_dim)
        return self.norm(h + split(self.skip))                    # (B, N, ..., out_dim)


def dense_stack(in_dim: int, hidden: int, out_dim: int, n_blocks: int, dropout: float) -> nn.Sequential:
    """n_blocks residual blocks of width `hidden`: in_dim -> hidden -> ... -> out_dim."""
    dims = [in_dim] + [hidden] * (n_blocks - 1) + [out_dim]
    return nn.Sequential(*(ResidualBlock(dims[i], hidden, dims[i + 1], dropout) for i in range(n_blocks)))


class TiDE(nn.Module):
    """Forecast (B, H, N) from the context (B, C, N) and the covariates (B, C + H, K) with TiDE."""

    uses_covariates: bool = True

    def __init__(self, config: TiDEConfig | None = None) -> None:
        super().__init__()
        self.config = cfg = config or TiDEConfig()
        r, p = cfg.covariate_dim, cfg.decoder_dim
        self.revin = RevIN(1) if cfg.revin else None
        self.feature_proj = ResidualBlock(cfg.n_covariates, cfg.temporal_hidden, r, cfg.dropout)
        self.encoder = dense_stack(cfg.context + (cfg.context + cfg.horizon) * r, cfg.hidden,
                                   cfg.hidden, cfg.n_encoder, cfg.dropout)
        self.decoder = dense_stack(cfg.hidden, cfg.hidden, cfg.horizon * p, cfg.n_decoder, cfg.dropout)
        self.temporal = ResidualBlock(p + r, cfg.temporal_hidden, 1, cfg.dropout, layer_norm=False)
        self.residual = nn.Linear(cfg.context, cfg.horizon)

    def forward(self, x: torch.Tensor, cov: torch.Tensor) -> torch.Tensor:
        # x: (B, C, N), cov: (B, C + H, K)
        if self.revin is not None:
            z, mean, std = self.revin.normalise(x)                # (B, C, N), (B, 1, N) x2
        else:
            last = x[:, -1:, :]                                   # (B, 1, N)
            z = x - last                                          # (B, C, N)
        y = self._forecast(z.transpose(1, 2), self.feature_proj(cov))  # (B, N, H)
        y = y.transpose(1, 2)                                     # (B, H, N)
        if self.revin is not None:
            return self.revin.denormalise(y, mean, std)           # (B, H, N)
        return y + last                                           # (B, H, N)

    def _forecast(self, z: torch.Tensor, proj: torch.Tensor) -> torch.Tensor:
        """Dense encoder/decoder, temporal decoder and linear residual on the normalised context."""
        # z: (B, N, C), proj: (B, C + H, r)
        cfg = self.config
        flat = proj.flatten(1).unsqueeze(1)                       # (B, 1, (C + H) r)
        first, rest = cast(ResidualBlock, self.encoder[0]), cast(nn.Sequential, self.encoder[1:])  # as built
        e = first.forward_split(z, flat)                          # (B, N, hidden)
        for block in rest:
            e = block(e)                                          # (B, N, hidden)
        d = self.decoder(e).unflatten(-1, (cfg.horizon, cfg.decoder_dim))  # (B, N, H, p)
        future = proj[:, cfg.context:].unsqueeze(1)               # (B, 1, H, r)
        y = self.temporal.forward_split(d, future).squeeze(-1)    # (B, N, H)
        return y + self.residual(z)                               # (B, N, H)


__all__ = ["TiDEConfig", "TiDE", "ResidualBlock", "dense_stack"]
