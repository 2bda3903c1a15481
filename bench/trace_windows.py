"""Inputs, timing and comparison for the per-frame latency benches of trace-shaped engines
(bench/forecast_latency.py, bench/sbm_quantformer_latency.py): synthetic dF/F and stimulus recordings,
fresh sliding windows per frame, a timing loop, and numpy-in / numpy-out runners for torch eager and
engines, as the loop calls them."""
from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

PARITY_WINDOWS = 3


def dff_recording(n_frames: int, n: int, seed: int) -> np.ndarray:
    """(T, N) float32 dF/F-like traces: log-normal spike rates (~0.2 Hz at ~1 Hz frames), Poisson spikes
    through a rise/decay calcium kernel (tau 0.5 s / 2 s), 0.05-0.2 dF/F per spike, slow baseline drift
    and Gaussian noise."""
    rng = np.random.default_rng(seed)
    lam = np.exp(np.log(0.2) + 0.5 * rng.standard_normal(n)).astype(np.float32)
    amp = rng.uniform(0.05, 0.2, n).astype(np.float32)
    sigma = rng.uniform(0.02, 0.08, n).astype(np.float32)
    phase = rng.uniform(0, 2 * np.pi, n).astype(np.float32)
    g_decay, g_rise = np.float32(np.exp(-1 / 2.0)), np.float32(np.exp(-1 / 0.5))
    cd = np.zeros(n, np.float32)
    cr = np.zeros(n, np.float32)
    out = np.empty((n_frames, n), np.float32)
    for t in range(n_frames):
        s = rng.poisson(lam).astype(np.float32)
        cd = g_decay * cd + s
        cr = g_rise * cr + s
        out[t] = amp * (cd - cr) + 0.02 * np.sin(t / 200.0 + phase) + sigma * rng.standard_normal(n, np.float32)
    return out


def stimulus_recording(n_frames: int, k: int, seed: int) -> np.ndarray:
    """(T, K) float32 stimulus-protocol-like covariates: one active channel at a time, blocks of 5-40
    frames, a random intensity in [0.5, 1] per block."""
    rng = np.random.default_rng(seed)
    out = np.zeros((n_frames, k), np.float32)
    t = 0
    while t < n_frames:
        d = int(rng.integers(5, 41))
        out[t:t + d, rng.integers(k)] = rng.uniform(0.5, 1.0)
        t += d
    return out


class Windows:
    """Fresh windows per frame, sliding over the shared recordings."""

    def __init__(self, dff: np.ndarray, stim: np.ndarray | None, context: int, horizon: int) -> None:
        self.dff, self.stim, self.c, self.h = dff, stim, context, horizon
        self.count = len(dff) - context + 1

    def __call__(self, i: int) -> tuple[np.ndarray, np.ndarray | None]:
        i %= self.count
        x = self.dff[i:i + self.c]                                # (C, N), C-contiguous view
        cov = None if self.stim is None else self.stim[i:i + self.c + self.h]   # (C + H, K)
        return x, cov


def timed(fn: Callable[[np.ndarray, np.ndarray | None], Any], windows: Windows, warmup: int, frames: int,
          desc: str, sync: Callable[[], None] | None = None, budget_s: float = 0.0) -> tuple[np.ndarray, float]:
    """Seconds per call of fn(window) over `frames` windows after `warmup` untimed ones (fewer if
    `budget_s` > 0 and the timed frames' wall time passes it), and this process's CPU time per wall
    second over them (about `threads` on an idle machine; less when other processes take the cores)."""
    for i in range(warmup):
        fn(*windows(i))
    if sync:
        sync()
    out = np.empty(frames)
    cpu0, wall0 = time.process_time(), time.perf_counter()
    for j in tqdm(range(frames), desc=desc, unit="frame", leave=False):
        x, cov = windows(warmup + j)
        t = time.perf_counter()
        fn(x, cov)
        if sync:
            sync()
        out[j] = time.perf_counter() - t
        if budget_s and time.perf_counter() - wall0 > budget_s:
            out = out[:j + 1]
            break
    return out, (time.process_time() - cpu0) / max(time.perf_counter() - wall0, 1e-9)


def eager_fn(model: nn.Module, device: str) -> Callable[[np.ndarray, np.ndarray | None], np.ndarray]:
    """Batch-1 torch eager call with numpy in and out, as an engine does."""
    dev = torch.device(device)

    def run(x: np.ndarray, cov: np.ndarray | None) -> np.ndarray:
        with torch.inference_mode():
            xt = torch.from_numpy(x)[None].to(dev)
            if cov is None:
                y = model(xt)
            else:
                y = model(xt, torch.from_numpy(cov)[None].to(dev))
            return y[0].float().cpu().numpy()                    # bf16 under autocast -> float32

    return run


def engine_fn(engine: Any) -> Callable[[np.ndarray, np.ndarray | None], np.ndarray]:
    return lambda x, cov: engine.run(x, cov)


def parity(a: Callable, b: Callable, windows: Windows) -> float:
    """Max abs difference of two runners' outputs over a few windows."""
    diff = 0.0
    for i in range(PARITY_WINDOWS):
        x, cov = windows(i * max(windows.count // PARITY_WINDOWS, 1))
        diff = max(diff, float(np.max(np.abs(np.asarray(a(x, cov), np.float64) - np.asarray(b(x, cov))))))
    return diff


def parity_window(windows: Windows) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """A real window for the exporter's own parity check: (C, N) [or ((C, N), (C + H, K))]."""
    x, cov = windows(0)
    return np.ascontiguousarray(x) if cov is None else (np.ascontiguousarray(x), np.ascontiguousarray(cov))
