"""Causal dF/F on a torch device (CUDA on GPU machines): the semantics of `realtime.preprocess.dff.CausalDff`.

A (W, N) ring of the repaired fluorescence lives on the device; every frame recomputes the two order
statistics the percentile needs with one `torch.topk(..., largest=False)` over the held rows (a
full recomputation, cheap on a GPU) and interpolates them exactly as numpy does (float32 weights,
the two-sided lerp), so results equal the CPU path. Statistics cost one device -> host transfer
per frame. Only this module (and the other *_torch modules) import torch in `realtime/`.
"""
from __future__ import annotations

import numpy as np
import torch

from loopcast.realtime.preprocess.dff import DffConfig, DffStats
from loopcast.realtime.preprocess.percentile import order_statistics


class TorchCausalDff:
    """Online causal dF/F over N neurons on `device` (any torch device string; CPU by default)."""

    def __init__(self, n_neurons: int, cfg: DffConfig, device: str | torch.device = "cpu") -> None:
        self.n = n_neurons
        self.cfg = cfg
        self.device = torch.device(device)
        self.frames = 0
        self._ring = torch.zeros((cfg.window, n_neurons), dtype=torch.float32, device=self.device)
        self._min_baseline = torch.tensor(np.float32(cfg.min_baseline), device=self.device)
        self._weights: dict[int, tuple[int, int, bool, torch.Tensor]] = {}   # n -> lo, hi, lerp

    @property
    def ready(self) -> bool:
        return self.frames >= self.cfg.warmup

    def warm_up(self) -> None:
        """Run `process` on a throwaway estimator of the same N, config and device (the device's lazy
        set-up: a CUDA context, its kernels); this estimator's ring sees nothing."""
        scratch = TorchCausalDff(self.n, self.cfg, self.device)
        f = np.full(self.n, 100.0, np.float32)
        scratch.process(f)
        if self.n:
            f[0] = np.nan
        scratch.process(f)

    def process(self, f: np.ndarray | torch.Tensor) -> tuple[torch.Tensor, DffStats]:
        """f: (N,) fluorescence (numpy or torch) -> ((N,) float32 dF/F on device, repair stats)."""
        if tuple(f.shape) != (self.n,):
            raise ValueError(f"expected fluorescence of shape ({self.n},), got {tuple(f.shape)}")
        if isinstance(f, np.ndarray):                            # writable: no torch warning
            f = torch.from_numpy(np.require(f, np.float32, ["C", "W"]))
        f = f.to(self.device, torch.float32)
        bad = ~torch.isfinite(f)
        last = self._ring[(self.frames - 1) % self.cfg.window]   # zeros before the first frame
        f = torch.where(bad, last, f)
        self._ring[self.frames % self.cfg.window] = f
        self.frames += 1
        f0 = self._baseline(min(self.frames, self.cfg.window))
        floored = f0 < self._min_baseline
        dff = ((f - f0) / torch.maximum(f0, self._min_baseline)).clamp_(self.cfg.clip_min,
                                                                       self.cfg.clip_max)
        nonfinite, n_floored = torch.stack([bad.sum(), floored.sum()]).tolist()
        return dff, DffStats(int(nonfinite), int(n_floored))

    def _baseline(self, n: int) -> torch.Tensor:
        """(N,) the percentile of the n held rows, in numpy's float32 arithmetic."""
        if n not in self._weights:                               # at most W entries, one in use
            lo, hi, gamma = order_statistics(n, self.cfg.percentile)
            upper = gamma >= 0.5
            weight = torch.tensor(np.float32(1.0 - gamma if upper else gamma), device=self.device)
            self._weights[n] = (lo, hi, upper, weight)
        lo, hi, upper, weight = self._weights[n]
        smallest = torch.topk(self._ring[:n], hi + 1, dim=0, largest=False, sorted=True).values
        a, b = smallest[lo], smallest[hi]                        # (N,) each
        d = b - a
        return b - d * weight if upper else a + d * weight
