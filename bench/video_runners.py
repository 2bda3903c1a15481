"""Runners of the video UNet for bench/video_latency.py: torch fp32 / bf16 eager, bf16 captured in CUDA
graphs (optionally channels-last 3-D), the per-frame lead-time batching of realtime.forecast.video, an
exact FLOP count, the GPU's measured bf16 matrix-product rate (the floor a forward can approach), and the
inputs and timing loop (sliding dF/F-like windows, a synthetic segmentation to reduce predictions with)."""
from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode
from tqdm import tqdm

from loopcast.models.video_unet import VideoUNet

Runner = Callable[[np.ndarray, np.ndarray], np.ndarray]  # (b, C, X, Y, Z), (b,) int64 -> (b, X', Y', Z')


def frame_fn(runner: Runner, leads: int, lead_batch: int) -> Callable[[np.ndarray], None]:
    """One frame's forecast as VideoForecastStage._predict batches it: lead times 1..leads."""
    def run(vols: np.ndarray) -> None:
        for i in range(1, leads + 1, lead_batch):
            chunk = np.arange(i, min(i + lead_batch, leads + 1), dtype=np.int64)
            b = len(chunk)
            runner(vols if b == 1 else np.ascontiguousarray(np.broadcast_to(vols, (b, *vols.shape[1:]))), chunk)
    return run


def torch_runner(model: torch.nn.Module, device: str, bf16: bool = False) -> Runner:
    dev = torch.device(device)

    def run(v: np.ndarray, lead: np.ndarray) -> np.ndarray:
        with torch.inference_mode(), torch.autocast(dev.type, torch.bfloat16, enabled=bf16):
            y = model(torch.from_numpy(v).to(dev), torch.from_numpy(lead).to(dev))
        return y.float().cpu().numpy()
    return run


class GraphRunner:
    """bf16-autocast forward captured in one CUDA graph per batch size (static input/output buffers).
    channels_last: weights and input in channels-last 3-D layout (NDHWC), the layout cuDNN's tensor-core
    3-D convolutions work in, so no transposes run inside the graph."""

    def __init__(self, model: torch.nn.Module, shape: tuple[int, ...], channels_last: bool = False) -> None:
        self.fmt = torch.channels_last_3d if channels_last else torch.contiguous_format
        self.model = model
        if channels_last:  # Module.to(memory_format=) is documented, but torch's stubs lack that overload
            self.model = copy.deepcopy(model).to(memory_format=self.fmt)  # type: ignore[call-overload]
        self.shape = shape
        self.graphs: dict[int, tuple[Any, ...]] = {}

    def _capture(self, b: int) -> tuple:
        x = torch.zeros((b, *self.shape), device="cuda").to(memory_format=self.fmt)
        lead = torch.ones(b, dtype=torch.int64, device="cuda")
        amp: dict[str, Any] = dict(device_type="cuda", dtype=torch.bfloat16, cache_enabled=False)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), torch.inference_mode(), torch.autocast(**amp):
            for _ in range(3):                                               # warm up off the capture stream
                self.model(x, lead)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.inference_mode(), torch.cuda.graph(graph), torch.autocast(**amp):
            out = self.model(x, lead).float()                                # (b, X', Y', Z')
        return graph, x, lead, out

    def __call__(self, v: np.ndarray, lead: np.ndarray) -> np.ndarray:
        if len(lead) not in self.graphs:
            self.graphs[len(lead)] = self._capture(len(lead))
        graph, x, lead_t, out = self.graphs[len(lead)]
        x.copy_(torch.from_numpy(v))
        lead_t.copy_(torch.from_numpy(lead))
        graph.replay()
        return out.cpu().numpy()


def count_gflop(model: VideoUNet, shape: tuple[int, int, int], device: str = "cpu") -> tuple[float, float]:
    """GFLOP of one batch-1 forward on `shape` (FlopCounterMode) and its wall seconds. On device "meta"
    nothing is computed, so the count is exact and takes about a second even at ZAPBench's grid."""
    net = copy.deepcopy(model).to(device) if device != "cpu" else model
    x = torch.zeros(1, model.config.context, *shape, device=device)
    lead = torch.ones(1, dtype=torch.int64, device=device)
    t = time.perf_counter()
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        net(x, lead)
    return counter.get_total_flops() / 1e9, time.perf_counter() - t


def bf16_matmul_tflops(n: int = 8192, repeats: int = 10) -> float:
    """This GPU's bf16 matrix-product rate (TFLOP/s, n x n x n, after warm-up): the ceiling a
    convolution-bound forward can approach, so GFLOP / rate is a floor on its latency."""
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(repeats):
        a @ b
    torch.cuda.synchronize()
    return 2 * n**3 * repeats / (time.perf_counter() - t) / 1e12


class Volumes:
    """Fresh (1, C, X, Y, Z) windows sliding over a small bank of dF/F-like volumes."""

    def __init__(self, shape: tuple[int, int, int], seed: int, context: int = 4) -> None:
        self.c = context
        self.bank = 0.3 * np.random.default_rng(seed).standard_normal((context + 2, *shape), np.float32)

    def __call__(self, i: int) -> np.ndarray:
        s = i % 3
        return self.bank[None, s:s + self.c]                              # (1, C, X, Y, Z), contiguous


def timed(fn: Callable[[np.ndarray], Any], volumes: Volumes, warmup: int, frames: int, desc: str,
          sync: Callable[[], None], budget_s: float) -> tuple[np.ndarray, float]:
    """Seconds per fn(window) over up to `frames` windows after `warmup` untimed ones (each phase stops
    once it has spent `budget_s`), and the warm-up's wall seconds."""
    t0 = time.perf_counter()
    for i in range(warmup):
        fn(volumes(i))
        if budget_s and time.perf_counter() - t0 > budget_s:
            break
    sync()
    warm, out, wall0 = time.perf_counter() - t0, np.empty(frames), time.perf_counter()
    for j in tqdm(range(frames), desc=desc, unit="frame", leave=False):
        t = time.perf_counter()
        fn(volumes(warmup + j))
        sync()
        out[j] = time.perf_counter() - t
        if budget_s and time.perf_counter() - wall0 > budget_s:
            return out[:j + 1], warm
    return out, warm


def segmentation(out_shape: tuple[int, int, int], neurons: int, cell: tuple[int, int, int], stride: int,
                 seed: int) -> np.ndarray:
    """Full-resolution labels (X' s, Y' s, Z') uint32: `neurons` random cells of `cell` output voxels
    (at most half the cells), each output voxel's label filling its s x s block so striding keeps it."""
    n_cells = [-(-o // c) for o, c in zip(out_shape, cell)]
    total = math.prod(n_cells)
    n = min(neurons, total // 2)
    lut = np.zeros(total, np.uint32)
    lut[np.random.default_rng(seed).choice(total, n, replace=False)] = np.arange(1, n + 1, dtype=np.uint32)
    ix, iy, iz = (np.arange(o) // c for o, c in zip(out_shape, cell))
    small = lut[(ix[:, None, None] * n_cells[1] + iy[None, :, None]) * n_cells[2] + iz[None, None, :]]
    seg = np.empty((out_shape[0] * stride, out_shape[1] * stride, out_shape[2]), np.uint32)
    for a in range(stride):
        for b in range(stride):
            seg[a::stride, b::stride] = small                               # (X', Y', Z') per offset
    return seg
