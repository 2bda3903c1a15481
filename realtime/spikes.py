"""Causal spike inference, first method: thresholded AR(1) inversion of dF/F.

Calcium follows c_t = g * c_{t-1} + s_t, and dF/F ~ a * c. Inverting one step gives
s_t ~ (dff_t - g * dff_{t-1}) / a, which sees only the current and the previous frame. The per-neuron
decay g and noise level sigma are estimated on the first `warmup` frames (g from the ratio of
lag-2 to lag-1 autocovariance unless `tau_decay_s` fixes it; sigma from the median absolute first difference);
residuals below `threshold_sigma * sigma` count as no spike. Outputs an expected spike count per frame,
the rate (count / dt) and the probability of at least one spike, 1 - exp(-rate * dt).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SpikeConfig:
    """Parameters of the causal AR(1) spike estimator."""

    method: str = "ar1_threshold"
    warmup: int = 30
    tau_decay_s: float = 0.0          # 0 = estimate the decay per neuron on warm-up data
    dff_per_spike: float = 0.2        # a: dF/F jump of one spike, converts residuals to counts
    threshold_sigma: float = 2.0
    min_decay: float = 0.05
    max_decay: float = 0.98

    def __post_init__(self) -> None:
        if self.method != "ar1_threshold":
            raise ValueError(f"unknown spike inference method {self.method!r} (available: ar1_threshold)")
        if self.warmup < 3 or self.dff_per_spike <= 0 or self.threshold_sigma < 0:
            raise ValueError("warmup must be >= 3, dff_per_spike > 0, threshold_sigma >= 0")


@dataclass(frozen=True)
class SpikeEstimate:
    """Per-neuron outputs for one frame (all (N,) float32)."""

    count: np.ndarray
    rate_hz: np.ndarray
    prob: np.ndarray


class CausalSpikes:
    """Streaming spike estimates from dF/F; zeros (and `ready` False) during warm-up."""

    def __init__(self, n_neurons: int, config: SpikeConfig, frame_period_s: float) -> None:
        self.cfg = config
        self.dt = frame_period_s
        self.n = n_neurons
        self._warm = np.zeros((config.warmup, n_neurons), dtype=np.float32)
        self._prev = np.zeros(n_neurons, dtype=np.float32)
        self.frames = 0
        self.decay = np.zeros(n_neurons, dtype=np.float32)
        self.sigma = np.ones(n_neurons, dtype=np.float32)

    @property
    def ready(self) -> bool:
        return self.frames >= self.cfg.warmup

    def process(self, dff: np.ndarray) -> SpikeEstimate:
        """dff (N,) -> spike estimate for this frame."""
        if not self.ready:
            self._warm[self.frames] = dff
            self.frames += 1
            if self.ready:
                self._estimate(self._warm)
            self._prev = dff.astype(np.float32, copy=True)
            zero = np.zeros(self.n, dtype=np.float32)
            return SpikeEstimate(zero, zero, zero)
        self.frames += 1
        resid = dff - self.decay * self._prev
        self._prev = dff.astype(np.float32, copy=True)
        count = np.where(resid > self.cfg.threshold_sigma * self.sigma, resid / self.cfg.dff_per_spike, 0.0)
        count = count.astype(np.float32)
        return SpikeEstimate(count, count / np.float32(self.dt), (1.0 - np.exp(-count)).astype(np.float32))

    def _estimate(self, x: np.ndarray) -> None:
        """Per-neuron decay and noise from warm-up data x (W, N)."""
        if self.cfg.tau_decay_s > 0:
            g = np.full(self.n, math.exp(-self.dt / self.cfg.tau_decay_s), dtype=np.float32)
        else:
            # AR(1) + white noise: autocovariance(k) ~ g**k for k >= 1, so g = acov(2) / acov(1)
            # is not biased by the noise variance (which only enters acov(0)).
            xc = x - x.mean(axis=0)
            acov1 = (xc[1:] * xc[:-1]).mean(axis=0)
            acov2 = (xc[2:] * xc[:-2]).mean(axis=0)
            g = np.divide(acov2, acov1, out=np.zeros(self.n), where=acov1 > 0)
        self.decay = np.clip(g, self.cfg.min_decay, self.cfg.max_decay).astype(np.float32)
        mad = np.median(np.abs(np.diff(x, axis=0)), axis=0)
        self.sigma = np.maximum(mad / 0.6745 / math.sqrt(2.0), 1e-4).astype(np.float32)
