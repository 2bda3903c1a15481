"""Sparse Brain Model (SBM; Fatehmanesh Vegas et al. 2025, section 2.1): next-step spike-probability
forecasting at single-neuron resolution with attention factorised over neurons and time.

Tokens: neuron n at time t is RMSNorm(W [x_{t,n}; p_n] + b) (spike probability and normalised soma
position); with covariates, a stimulus token RMSNorm(W_s s_t + b_s) per time step.
Each of the L blocks applies, with pre-RMSNorm and residuals:
  (i)  spatial attention across the neurons of each time step (models.sbm_attention.SpatialAttention:
       directional spatial RoPE, routed into balanced clusters of w tokens or dense; routing "sorted"
       (default, linear in N) or "topk" (the paper as written, O(N^2 / w) scoring)), the stimulus
       token an extra key/value; the stimulus token is never updated (it is "dropped after the
       spatial layer"), and its embedding is offered again to every block's spatial layer;
  (ii) causal temporal attention along each neuron's history (RoPE over time indices);
  (iii) optionally a feed-forward layer (ffn_mult > 0; the paper uses attention only).
Decoder: z_{t,n} = w^T RMSNorm(h_{t,n}) + b, a logit for x_{t+1,n}.

Covariate alignment: in `logits(x, cov)`, cov[:, t] is the stimulus of the frame being predicted
from time t (s_{t+1}); `forward` therefore feeds cov[:, j + 1 : j + 1 + C] to rollout step j.
`forward(context, covariates)` is the engine graph: a fixed-window autoregressive rollout of
`horizon` steps (an unrolled python loop, so it exports), returning sigmoid probabilities.
Positions are fixed per fish: N is static in an exported graph. Routed attention with hard
membership can disagree between runtimes at a few neurons whose routing score sits within float
error of a cluster boundary; see models.sbm_attention.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.nn import functional as F

from loopcast.models.sbm_attention import (
    ROUTINGS,
    RMSNorm,
    RoutingConfig,
    SpatialAttention,
    TemporalAttention,
    spatial_rope_angles,
)

if TYPE_CHECKING:
    import numpy as np

ATTENTION = ("routed", "dense")


@dataclass(frozen=True)
class SBMConfig:
    """Neurons N, covariates K (0: no stimulus token), context tau, rollout horizon, width, heads,
    layers, cluster size w, membership, attention path, spatial RoPE frequency range (radians per unit
    of the normalised positions) and seed, temporal RoPE base, ffn_mult (0 = attention only, the
    paper), dropout, routing EMA decay and margin, routing and routing_centroids.

    routing "sorted" (default): every token joins its best of `routing_centroids` fixed centroids, the
    tokens are sorted by (centroid, score) and the order is cut into ceil(N / w) blocks of w; an integer
    membership m >= 2 adds m - 1 cuts shifted by j * w / m (each token in m clusters). Linear in N.
    routing "topk" (the paper as written): k = ceil(membership * N / w) centroids each take their top-w
    tokens; its scoring grows as N^2 / w. routing_margin: 0 = hard membership (the paper); > 0 = soft
    cluster boundary, continuous across runtimes (topk: in score units; sorted: in sort-key units,
    i.e. score distance to the nearest token outside the block; use membership 2 with it)."""

    n_neurons: int = 0           # required >= 1
    n_covariates: int = 0
    context: int = 12            # tau (paper: 12 steps ~ 4 s)
    horizon: int = 1             # rollout steps of forward()
    d_model: int = 128
    n_heads: int = 4
    n_layers: int = 4
    cluster_size: int = 256      # w (paper: "a few hundred")
    membership: float = 1.0
    attention: str = "routed"
    rope_min_freq: float = 1.0
    rope_max_freq: float = 64.0
    rope_seed: int = 0
    time_rope_base: float = 10000.0
    ffn_mult: int = 0
    dropout: float = 0.0
    routing_decay: float = 0.999
    routing_margin: float = 0.0  # 0: hard membership (paper); > 0: soft cluster boundary (see above)
    routing: str = "sorted"      # "sorted": linear-time balanced blocks; "topk": the paper's top-w per centroid
    routing_centroids: int = 16  # sorted only: the fixed number of EMA k-means centroids

    def __post_init__(self) -> None:
        for name in ("n_neurons", "context", "horizon", "d_model", "n_heads", "n_layers", "cluster_size",
                     "routing_centroids"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.n_covariates < 0 or self.ffn_mult < 0:
            raise ValueError(f"n_covariates and ffn_mult must be >= 0, got {self.n_covariates}, {self.ffn_mult}")
        if self.d_model % self.n_heads or (self.d_model // self.n_heads) % 2:
            raise ValueError(f"d_model={self.d_model} must split into n_heads={self.n_heads} heads of even "
                             f"size (rotary pairs)")
        if self.attention not in ATTENTION:
            raise ValueError(f"attention must be one of {ATTENTION}, got {self.attention!r}")
        if not self.membership > 0:
            raise ValueError(f"membership must be > 0, got {self.membership}")
        if not 0 < self.rope_min_freq <= self.rope_max_freq:
            raise ValueError(f"need 0 < rope_min_freq <= rope_max_freq, got {self.rope_min_freq}, "
                             f"{self.rope_max_freq}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if not 0.0 <= self.routing_decay < 1.0:
            raise ValueError(f"routing_decay must be in [0, 1), got {self.routing_decay}")
        if not self.routing_margin >= 0.0:
            raise ValueError(f"routing_margin must be >= 0, got {self.routing_margin}")
        self._check_routing()

    def _check_routing(self) -> None:
        if self.routing not in ROUTINGS:
            raise ValueError(f"routing must be one of {ROUTINGS}, got {self.routing!r}")
        if self.routing == "sorted" and self.membership != int(self.membership):
            raise ValueError(f"routing 'sorted' needs an integer membership (cuts), got {self.membership}")

    @property
    def cluster_width(self) -> int:
        """Tokens per cluster: w, or N when w > N."""
        return min(self.cluster_size, self.n_neurons)

    @property
    def n_clusters(self) -> int:
        """Clusters k: sorted: membership * ceil(N / w); topk: ceil(membership * N / w)."""
        if self.routing == "sorted":
            return int(self.membership) * math.ceil(self.n_neurons / self.cluster_width)
        return math.ceil(self.membership * self.n_neurons / self.cluster_width)

    @property
    def routing_config(self) -> RoutingConfig:
        """What SpatialAttention needs: path, routing, centroid count, width, cuts, EMA decay, margin."""
        sorted_ = self.routing == "sorted"
        return RoutingConfig(self.attention, self.routing, self.routing_centroids if sorted_ else self.n_clusters,
                             self.cluster_width, int(self.membership) if sorted_ else 1, self.routing_decay,
                             self.routing_margin)

    @classmethod
    def small(cls, n_neurons: int, n_covariates: int = 0, **kw: Any) -> SBMConfig:
        """A tiny CPU configuration for tests and smoke runs."""
        base: dict[str, Any] = dict(context=6, d_model=32, n_heads=2, n_layers=2, cluster_size=16)
        return cls(n_neurons=n_neurons, n_covariates=n_covariates, **{**base, **kw})

    @classmethod
    def paper(cls, n_neurons: int, n_covariates: int = 0, **kw: Any) -> SBMConfig:
        """Paper-ish settings: tau = 12, w = 256, attention only (width/depth are not in the paper)."""
        base: dict[str, Any] = dict(context=12, d_model=128, n_heads=4, n_layers=4, cluster_size=256)
        return cls(n_neurons=n_neurons, n_covariates=n_covariates, **{**base, **kw})


def normalise_positions(positions: torch.Tensor | np.ndarray, n_neurons: int) -> torch.Tensor:
    """(N, 3) soma positions, centred on their mean and scaled so the farthest one is at radius 1."""
    p = torch.as_tensor(positions, dtype=torch.float64)
    if p.shape != (n_neurons, 3):
        raise ValueError(f"positions must have shape (n_neurons, 3) = ({n_neurons}, 3), got {tuple(p.shape)}")
    if not torch.isfinite(p).all():
        raise ValueError("positions must be finite")
    p = p - p.mean(dim=0)
    radius = p.norm(dim=1).max()
    return (p / radius if radius > 0 else p).float()


class SBMBlock(nn.Module):
    """Spatial attention, then causal temporal attention (then an optional FFN), pre-norm residuals."""

    def __init__(self, cfg: SBMConfig, angles: torch.Tensor) -> None:
        super().__init__()
        d = cfg.d_model
        self.norm_s, self.norm_t = RMSNorm(d), RMSNorm(d)
        self.spatial = SpatialAttention(d, cfg.n_heads, angles, cfg.routing_config)
        self.temporal = TemporalAttention(d, cfg.n_heads, cfg.time_rope_base)
        self.ffn = None if not cfg.ffn_mult else nn.Sequential(
            RMSNorm(d), nn.Linear(d, cfg.ffn_mult * d), nn.GELU(), nn.Linear(cfg.ffn_mult * d, d))
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, h: torch.Tensor, stim: torch.Tensor | None) -> torch.Tensor:
        # h: (B, T, N, d); stim: (B, T, d) | None
        b, t, n, d = h.shape
        s = None if stim is None else self.norm_s(stim).reshape(b * t, d)              # (B*T, d)
        a = self.spatial(self.norm_s(h).reshape(b * t, n, d), s)                      # (B*T, N, d)
        h = h + self.dropout(a.view(b, t, n, d))                                      # (B, T, N, d)
        h = h + self.dropout(self.temporal(self.norm_t(h)))                           # (B, T, N, d)
        if self.ffn is not None:
            h = h + self.dropout(self.ffn(h))
        return h                                                                      # (B, T, N, d)


class SparseBrainModel(nn.Module):
    """SBM: logits (B, T, N) for the next step of spike probabilities (B, T, N); forward() rolls out
    `horizon` steps from a (B, C, N) context into (B, H, N) probabilities."""

    positions: torch.Tensor                  # buffer (register_buffer)

    def __init__(self, config: SBMConfig, positions: torch.Tensor | np.ndarray) -> None:
        super().__init__()
        self.config = cfg = config
        self.register_buffer("positions", normalise_positions(positions, cfg.n_neurons))  # (N, 3)
        angles = spatial_rope_angles(self.positions, cfg.d_model // cfg.n_heads // 2, cfg.rope_min_freq,
                                     cfg.rope_max_freq, cfg.rope_seed)                   # (N, dh / 2)
        self.neuron_embed = nn.Linear(4, cfg.d_model)
        self.neuron_norm = RMSNorm(cfg.d_model)
        if cfg.n_covariates:
            self.stim_embed = nn.Linear(cfg.n_covariates, cfg.d_model)
            self.stim_norm = RMSNorm(cfg.d_model)
        self.blocks = nn.ModuleList(SBMBlock(cfg, angles) for _ in range(cfg.n_layers))
        self.out_norm = RMSNorm(cfg.d_model)
        self.decoder = nn.Linear(cfg.d_model, 1)

    @property
    def uses_covariates(self) -> bool:
        """True iff the model has a stimulus token (config.n_covariates >= 1)."""
        return self.config.n_covariates >= 1

    def logits(self, x: torch.Tensor, cov: torch.Tensor | None = None) -> torch.Tensor:
        """Teacher-forced logits (B, T, N); logits[:, t] predicts x[:, t + 1]. cov: (B, T, K) with
        cov[:, t] the stimulus of frame t + 1 (required iff uses_covariates)."""
        # x: (B, T, N) spike probabilities
        self._check_x(x)
        self._check_cov(cov, x.shape[0], x.shape[1])
        w = self.neuron_embed.weight                                                   # (d, 4)
        pos = F.linear(self.positions, w[:, 1:], self.neuron_embed.bias)               # (N, d)
        h = self.neuron_norm(x[..., None] * w[:, 0] + pos)                             # (B, T, N, d)
        stim = None if cov is None else self.stim_norm(self.stim_embed(cov))           # (B, T, d)
        for block in self.blocks:
            h = block(h, stim)                                                         # (B, T, N, d)
        return self.decoder(self.out_norm(h)).squeeze(-1)                              # (B, T, N)

    def forward(self, context: torch.Tensor, covariates: torch.Tensor | None = None) -> torch.Tensor:
        """Fixed-window autoregressive rollout: (B, C, N) [, (B, C + H, K)] -> (B, H, N) probabilities."""
        # context: (B, C, N); covariates: (B, C + H, K) | None
        self._check_x(context)
        b, c, _ = context.shape
        h = self.config.horizon
        self._check_cov(covariates, b, c + h)
        window, steps = context, []
        for j in range(h):
            cov = None if covariates is None else covariates[:, j + 1:j + 1 + c]      # (B, C, K)
            p = torch.sigmoid(self.logits(window, cov)[:, -1:])                      # (B, 1, N)
            steps.append(p)
            window = torch.cat([window[:, 1:], p], dim=1)                            # (B, C, N)
        return torch.cat(steps, dim=1)                                                # (B, H, N)

    def _check_x(self, x: torch.Tensor) -> None:
        if x.dim() != 3 or x.shape[2] != self.config.n_neurons:
            raise ValueError(f"expected spike probabilities (B, T, N={self.config.n_neurons}), "
                             f"got {tuple(x.shape)}")

    def _check_cov(self, cov: torch.Tensor | None, batch: int, length: int) -> None:
        k = self.config.n_covariates
        if cov is None:
            if k:
                raise ValueError(f"this model takes covariates (B, {length}, {k}); got None")
            return
        if not k:
            raise ValueError("this model has n_covariates = 0 but was given covariates")
        if cov.dim() != 3 or cov.shape[0] != batch or cov.shape[1] != length or cov.shape[2] != k:
            raise ValueError(f"covariates must be (B={batch}, {length}, K={k}) (C + H steps for forward, "
                             f"T for logits), got {tuple(cov.shape)}")


def bce_loss(logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Teacher-forced next-step BCE (paper eq. L_BCE): logits (B, T, N) vs targets x[:, 1:] (B, T-1, N)."""
    return F.binary_cross_entropy_with_logits(logits[:, :-1].float(), x[:, 1:].float())


__all__ = ["SBMConfig", "SBMBlock", "SparseBrainModel", "bce_loss", "normalise_positions"]
