"""Streaming OASIS on a torch device (CUDA on GPU machines): the math of realtime.spikes.oasis, vectorised
over neurons. Only GPU deployments need it; on a CPU the numba kernels are ~100x faster."""
from __future__ import annotations

import numpy as np
import torch

from loopcast.realtime.spikes.oasis import _Warmup
from loopcast.realtime.spikes.oasis_params import OasisConfig, OasisParams


class TorchStreamingOasis(_Warmup):
    """`StreamingOasis` in torch, vectorised over neurons on `device` (same math and outputs).

    All pools live in (N, max_pools) tensors; a frame is one vectorised push/merge step followed by
    merge passes over the neurons that still violate s_min, until none does. Warm-up runs on the CPU.
    """

    def __init__(self, n_neurons: int, params: OasisParams | None = None, cfg: OasisConfig = OasisConfig(),
                 frame_period_s: float = 0.9141, device: str | torch.device = "cpu",
                 dtype: torch.dtype | None = None, background: bool = False) -> None:
        self._torch = torch
        self._init_warmup(n_neurons, params, cfg, frame_period_s, background)
        self.device, self.dtype = torch.device(device), dtype or torch.float64
        self._v, self._w, self._h, self._start = (
            torch.zeros(n_neurons, cfg.max_pools, device=self.device, dtype=self.dtype) for _ in range(4))
        self._top = torch.zeros(n_neurons, dtype=torch.long, device=self.device)
        self._cnt = torch.zeros_like(self._top)
        self._frozen = torch.zeros(n_neurons, dtype=torch.bool, device=self.device)
        self._prev = torch.zeros(n_neurons, device=self.device, dtype=self.dtype)
        self._ar = torch.arange(n_neurons, device=self.device)
        if params is not None:
            self._set_params(params)

    def _set_params(self, p: OasisParams) -> None:
        self._b, self._g, self._smin = (self._torch.as_tensor(np.asarray(a, dtype=np.float64)).to(
            self.device, self.dtype) for a in (p.baseline, p.g, p.smin))

    def process(self, dff: np.ndarray | torch.Tensor) -> torch.Tensor:
        """dff (N,) -> (N,) float32 tensor on `device`: s at frame t - lag (zeros in warm-up, while t < lag)."""
        self._check(tuple(dff.shape))
        zeros = self._torch.zeros(self.n, dtype=self._torch.float32, device=self.device)
        if self.params is None:
            cpu = dff.detach().cpu().numpy() if isinstance(dff, self._torch.Tensor) else np.asarray(dff)
            replay = self._warm_frame(cpu.astype(np.float32))
            if replay is None:
                return zeros
            assert self.params is not None
            self._set_params(self.params)
            for t, row in enumerate(replay.frames, start=replay.start):    # never `prepared` here
                self._add(self._torch.as_tensor(row).to(self.device, self.dtype), t)
            if not replay.live:
                return zeros
        y = self._torch.as_tensor(dff).to(self.device, self._torch.float32).to(self.dtype)
        self._add(y, self.frames)
        self.frames += 1
        f = self.frames - 1 - self.cfg.lag
        return self._spike_at(f).to(self._torch.float32) if f >= 0 else zeros

    def _value(self, m: torch.Tensor, free: torch.Tensor, smin: torch.Tensor) -> torch.Tensor:
        zero = self._torch.zeros_like(m)
        return self._torch.where(free, self._torch.where(m >= 0, m, zero), self._torch.where(m >= smin, m, zero))

    def _add(self, y: torch.Tensor, t: int) -> None:
        """One frame for every neuron: merge into the newest pool or start a new one, then merge down."""
        torch, ar, top = self._torch, self._ar, self._top
        x = y - self._b
        if t == 0:
            self._v[:, 0], self._w[:, 0], self._h[:, 0], self._start[:, 0] = x, 1.0, self._g, 0.0
            self._cnt.fill_(1)
            return
        vt, wt, ht = self._v[ar, top], self._w[ar, top], self._h[ar, top]
        push = vt / wt * ht + self._smin <= x
        self._v[ar, top] = torch.where(push, vt, vt + x * ht)
        self._w[ar, top] = torch.where(push, wt, wt + ht * ht)
        self._h[ar, top] = torch.where(push, ht, ht * self._g)
        self._push(push.nonzero().squeeze(1), x, t)
        self._merge_down((~push).nonzero().squeeze(1))

    def _push(self, idx: torch.Tensor, x: torch.Tensor, t: int) -> None:
        slot = (self._top[idx] + 1) % self.cfg.max_pools
        full = self._cnt[idx] == self.cfg.max_pools
        if bool(full.any()):                       # the oldest pool (the next slot) becomes final
            i, k = idx[full], slot[full]
            m = self._v[i, k] / self._w[i, k]
            self._prev[i] = self._value(m, ~self._frozen[i], self._smin[i]) * self._h[i, k]
            self._frozen[i] = True
            self._cnt[i] -= 1
        self._v[idx, slot], self._w[idx, slot], self._h[idx, slot] = x[idx], 1.0, self._g[idx]
        self._start[idx, slot] = float(t)
        self._top[idx] = slot
        self._cnt[idx] += 1

    def _merge_down(self, idx: torch.Tensor) -> None:
        """Merge newest pools into the ones below while any neuron in idx still violates s_min."""
        while idx.numel():
            tp = self._top[idx]
            bl = (tp - 1) % self.cfg.max_pools
            hb = self._h[idx, bl]
            viol = (self._cnt[idx] > 1) & (self._v[idx, bl] / self._w[idx, bl] * hb + self._smin[idx]
                                            > self._v[idx, tp] / self._w[idx, tp])
            idx, tp, bl, hb = idx[viol], tp[viol], bl[viol], hb[viol]
            self._v[idx, bl] = self._v[idx, bl] + self._v[idx, tp] * hb
            self._w[idx, bl] = self._w[idx, bl] + self._w[idx, tp] * hb * hb
            self._h[idx, bl] = hb * self._h[idx, tp]
            self._top[idx] = bl
            self._cnt[idx] -= 1

    def _spike_at(self, f: int) -> torch.Tensor:
        """s at frame f (within the newest lag + 1 pools) for every neuron."""
        p, ar = self.cfg.max_pools, self._ar
        js = torch.arange(self.cfg.lag + 1, device=self.device)
        slots = (self._top[:, None] - js) % p                                   # (N, lag + 1)
        starts = self._start.gather(1, slots)
        j = ((js < self._cnt[:, None]) & (starts <= f)).to(torch.int8).argmax(1)  # the pool holding f
        k, cnt = slots[ar, j], self._cnt
        m = self._value(self._v[ar, k] / self._w[ar, k], torch.zeros_like(self._frozen), self._smin)
        kb = (k - 1) % p
        mb = self._value(self._v[ar, kb] / self._w[ar, kb], (j + 1 == cnt - 1) & ~self._frozen, self._smin)
        s = m - mb * self._h[ar, kb]
        s_frozen = m - self._prev
        s_frozen = torch.where(s_frozen >= self._smin, s_frozen, torch.zeros_like(s_frozen))
        bottom = j == cnt - 1
        s = torch.where(bottom, torch.where(self._frozen, s_frozen, torch.zeros_like(s)), s)
        return torch.where(starts[ar, j] == f, s, torch.zeros_like(s))
