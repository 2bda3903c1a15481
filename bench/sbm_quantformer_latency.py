"""Per-frame latency of the Sparse Brain Model and QuantFormer engines at ZAPBench scale (71,721 neurons).

Each configuration is built with seeded random weights (latency does not depend on the weight values),
exported to an engine in a temporary registry with offline_training.export.engine (ONNX + manifest, parity-
checked), and timed at batch 1 on a fresh window per frame, warm-up frames excluded:

  sbm next-step      the engine the loop runs for H = 1 (spike probabilities in, next frame out); CPU: the
                     [train_sbm] config of configs/loopcast.toml (tau 6, d 32, 1 layer, w 128, sorted
                     routing with 2 soft cuts)
  sbm rollout        the same model rolled out H = 4 steps inside the graph (fixed window, as the paper)
  quantformer        the activation engine (dF/F in, P(activation in the next H = 8 frames) out)

CPU: the "small" configurations (--threads intra-op threads), ONNX Runtime (realtime.engines.loader.load_engine)
beside torch eager in the same run. CUDA (where torch.cuda is available): the seed's sizes
(SBMConfig.paper: d 128, 4 layers, w 256, tau 12; QuantFormer with the paper's 512-code book) with
ONNX Runtime CUDA, torch eager fp32 and torch eager under bf16 autocast; skipped with the reason here.
Both are compared with the 914 ms frame period of ZAPBench.

    .venv/bin/python bench/sbm_quantformer_latency.py [--frames 50] [--warmup 5] [--threads 2]
    .venv/bin/python bench/sbm_quantformer_latency.py --quick     # N = 5000, 10 frames, no result file
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from loopcast.models.quantformer import QuantFormer, QuantFormerActivation, QuantFormerConfig
from loopcast.models.sbm import SBMConfig, SparseBrainModel
from loopcast.offline_training.export.engine import export_engine
from loopcast.realtime.engines.loader import load_engine

from common import parse_devices, quantiles, write_result
from trace_windows import Windows, dff_recording, eager_fn, engine_fn, parity, stimulus_recording, timed

ZAPBENCH_NEURONS = 71_721
ZAPBENCH_SHAPE = (2048.0, 1328.0, 72.0)
FRAME_PERIOD_MS = 914.1
K = 26


@dataclasses.dataclass(frozen=True)
class BenchExport:
    """What export_engine needs to know besides the model (saved as the engine's config.toml)."""

    model: str
    context: int
    horizon: int
    seed: int = 0
    signal: str = "dff"
    task: str = "forecast"

    def model_config(self) -> dict[str, Any]:
        return {}


@dataclasses.dataclass
class Case:
    """One model configuration to time."""

    name: str
    export: BenchExport
    build: Callable[[int], nn.Module]


def positions(n: int, seed: int) -> np.ndarray:
    """(N, 3) soma positions uniform in ZAPBench's volume (voxels)."""
    return (np.random.default_rng(seed).uniform(0.0, 1.0, (n, 3)) * ZAPBENCH_SHAPE).astype(np.float32)


def sbm_case(n: int, horizon: int, paper: bool, seed: int) -> Case:
    make = SBMConfig.paper if paper else SBMConfig.small
    extra = {} if paper else dict(context=6, d_model=32, n_heads=2, n_layers=1, cluster_size=128,
                                  membership=2, routing_margin=3e-3)   # configs/loopcast.toml [train_sbm]
    cfg = make(n, K, horizon=horizon, **extra)

    def build(s: int) -> nn.Module:
        torch.manual_seed(s)
        return SparseBrainModel(cfg, positions(n, s)).eval()
    label = "next-step" if horizon == 1 else f"rollout {horizon}"
    return Case(f"sbm {label}", BenchExport("sbm", cfg.context, horizon, seed, "spike_prob"), build)


def quantformer_case(n: int, paper: bool, seed: int) -> Case:
    size: dict[str, Any] = dict(d_model=64, n_heads=4, n_layers=3, codebook_size=512, code_dim=32) if paper else \
        dict(d_model=32, n_heads=2, n_layers=2, codebook_size=512, code_dim=16)
    cfg = QuantFormerConfig(n_neurons=n, n_covariates=K, context=16, horizon=8, patch=4, **size)

    def build(s: int) -> nn.Module:
        torch.manual_seed(s)
        return QuantFormerActivation(QuantFormer(cfg)).eval()
    return Case("quantformer activation", BenchExport("quantformer", 16, 8, seed, "dff", "activation"), build)


def export(model: nn.Module, case: Case, n: int, windows: Windows, registry: str) -> Path:
    e = case.export
    x, cov = windows(0)
    extra = {"activation": {"criterion": "mean_dff_above", "threshold": 0.1, "window": e.horizon}} \
        if e.task == "activation" else None
    return export_engine(model, e, registry, n, metrics={}, data_fingerprint=f"random-weights-seed{e.seed}",
                         data_source="bench/sbm_quantformer_latency.py (seeded random weights)",
                         parity_input=(np.ascontiguousarray(x), np.ascontiguousarray(cov)), task=e.task,
                         signal=e.signal, extra=extra, tolerance=1e-4)


def bf16_fn(model: nn.Module) -> Callable[[np.ndarray, np.ndarray | None], np.ndarray]:
    """torch eager on CUDA under bf16 autocast, float32 numpy out."""
    run = eager_fn(model, "cuda")

    def call(x: np.ndarray, cov: np.ndarray | None) -> np.ndarray:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return run(x, cov)
    return call


def bench_case(case: Case, device: str, n: int, signal: np.ndarray, stim: np.ndarray,
               args: argparse.Namespace) -> dict[str, Any]:
    model = case.build(args.seed)
    windows = Windows(signal, stim, case.export.context, case.export.horizon)
    params = sum(p.numel() for p in model.parameters())
    config: Any = model.config                                 # SBMConfig or QuantFormerConfig
    res: dict[str, Any] = {"case": case.name, "device": device, "neurons": n, "params": params,
                           "config": dataclasses.asdict(config), "rows": []}
    print(f"\n{case.name} on {device}: {params:,} parameters")
    with tempfile.TemporaryDirectory(prefix="sbm-qf-latency-") as registry:
        path, why = export_for(model, case, device, n, windows, registry, res)
        runners = runners_for(model, path, device, args.threads)
        if "onnxruntime" not in runners:
            res["rows"].append({"runtime": "onnxruntime", "status": "skipped", "reason": why})
            print(f"  {'onnxruntime':<12} skipped: {why[:200]}")
        for name, fn in runners.items():
            res["rows"].append(time_row(name, fn, windows, device, args))
        if "onnxruntime" in runners and "torch-eager" in runners:
            res["parity_ort_vs_torch"] = parity(runners["onnxruntime"], runners["torch-eager"], windows)
            print(f"  parity ORT vs torch: {res['parity_ort_vs_torch']:.2g}")
    return res


def export_for(model: nn.Module, case: Case, device: str, n: int, windows: Windows, registry: str,
               res: dict[str, Any]) -> tuple[Path | None, str]:
    """Export the engine for the ONNX Runtime row on `device`, or (None, why not)."""
    if device == "cuda" and "CUDAExecutionProvider" not in ort.get_available_providers():
        why = ("onnxruntime has no CUDAExecutionProvider here (onnxruntime-gpu is not installed): "
               f"providers {ort.get_available_providers()}")
        res["export"] = {"ok": False, "skipped": why}
        return None, why
    t0 = time.monotonic()
    try:
        path = export(model, case, n, windows, registry)
        res["export"] = {"ok": True, "seconds": round(time.monotonic() - t0, 1)}
        return path, ""
    except Exception as exc:  # record and go on with torch
        res["export"] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:500]}
        print(f"  export failed: {res['export']['error'][:200]}")
        return None, f"export failed: {res['export']['error']}"


def runners_for(model: nn.Module, path: Path | None, device: str,
                threads: int) -> dict[str, Callable[[np.ndarray, np.ndarray | None], np.ndarray]]:
    out: dict[str, Callable[[np.ndarray, np.ndarray | None], np.ndarray]] = {}
    if path is not None:
        out["onnxruntime"] = engine_fn(load_engine(path, runtime="onnxruntime", threads=threads, device=device))
    if device == "cuda":
        model = model.to("cuda")
        out["torch-eager"] = eager_fn(model, "cuda")
        out["torch-bf16"] = bf16_fn(model)
    else:
        out["torch-eager"] = eager_fn(model, "cpu")
    return out


def time_row(name: str, fn: Callable, windows: Windows, device: str, args: argparse.Namespace) -> dict[str, Any]:
    sync = torch.cuda.synchronize if device == "cuda" else None
    try:
        seconds, cpu = timed(fn, windows, args.warmup, args.frames, f"{name} {device}", sync, args.budget_s)
    except Exception as exc:
        print(f"  {name:<12} error: {exc}")
        return {"runtime": name, "status": "error", "reason": f"{type(exc).__name__}: {exc}"[:500]}
    q = quantiles(seconds)
    fits = q["p99_ms"] < FRAME_PERIOD_MS
    print(f"  {name:<12} p50 {q['p50_ms']:9.1f} ms  p99 {q['p99_ms']:9.1f} ms  "
          f"{'inside' if fits else 'OVER'} the {FRAME_PERIOD_MS:.0f} ms frame")
    return {"runtime": name, "status": "ok", **q, "process_cpu_per_wall": round(cpu, 2),
            "p99_inside_frame": bool(fits)}


def cases(n: int, paper: bool, seed: int) -> list[Case]:
    return [sbm_case(n, 1, paper, seed), sbm_case(n, 4, paper, seed), quantformer_case(n, paper, seed)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--neurons", type=int, default=ZAPBENCH_NEURONS)
    ap.add_argument("--frames", type=int, default=50, help="timed frames per case and runtime")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--budget-s", type=float, default=120.0, help="stop timing a row after this many seconds")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--devices", type=parse_devices, default="cpu,cuda",
                    help="device kinds to time: cpu (the small config), cuda (the seed's sizes)")
    ap.add_argument("--quick", action="store_true", help="N = 5000, 10 frames, no result file")
    ap.add_argument("--name", default="sbm-quantformer-latency", help="result name (a GPU session: "
                    "sbm-quantformer-latency-cuda)")
    args = ap.parse_args()
    if args.quick:
        args.neurons, args.frames, args.warmup = 5000, 10, 2
    torch.set_num_threads(args.threads)
    n, t0 = args.neurons, time.monotonic()
    length = 16 + args.warmup + args.frames + 8
    dff = dff_recording(length, n, args.seed + 1)
    probs = (-np.expm1(-np.clip(dff, 0.0, None) / 0.1)).astype(np.float32)      # spike-probability-like
    stim = stimulus_recording(length + 8, K, args.seed + 2)
    results = []
    devices = [d for d in ("cpu", "cuda") if d in args.devices and (d == "cpu" or torch.cuda.is_available())]
    for device in devices:
        for case in cases(n, device == "cuda", args.seed):
            signal = probs if case.export.signal == "spike_prob" else dff
            results.append(bench_case(case, device, n, signal, stim, args))
    cuda_note = None if torch.cuda.is_available() else "torch.cuda is not available: the seed-size CUDA rows " \
                                                       "were not run on this machine"
    if cuda_note:
        print(f"\n{cuda_note}")
    if not args.quick:
        path = write_result(args.name, {
            "description": __doc__, "neurons": n, "frames": args.frames, "warmup": args.warmup,
            "threads": args.threads, "frame_period_ms": FRAME_PERIOD_MS, "cuda": cuda_note or "run",
            "devices": devices,
            "results": results, "wall_s": round(time.monotonic() - t0, 1)})
        print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
