"""Per-frame forecast latency of every registered model at ZAPBench scale, per runtime, in one run.

For each model configuration (mean, last, nlinear, timemix, tsmixer at C=4 with the ZAPBench short
preset; tsmixer at C=256 with the long preset, timemix and nlinear at C=256; tide at C=4 and C=256 when
`models.zoo.MODELS` has it), with H=32 and N=71,721 neurons (ZAPBench's count): build the model
with seeded random weights (latency does not depend on training), export it to an engine in a temporary
registry (offline_training.export.engine), and time batch-1 inference on a fresh dF/F-like (C, N) float32
window each frame (warm-up frames excluded) with:

  onnxruntime  cpu   realtime.engines.loader.load_engine(runtime="onnxruntime"), `--threads` intra-op threads
  torch-eager  cpu   the nn.Module under torch.inference_mode, numpy in and out as the engine does,
                     torch.set_num_threads(`--threads`)
  torch        cpu   load_engine(runtime="torch") when the manifest lists a "torch" file

and, where torch.cuda is available, ONNX Runtime CUDA, torch eager on CUDA (synchronised), the torch
runtime in fp32 and in bf16 (`[pipeline.forecast] precision`), and TensorRT (runtime "tensorrt") when
importable. A missing piece is recorded as skipped with its reason. ORT vs
torch parity (max abs diff over a few windows) is checked against `--tolerance`.
Writes bench/results/forecast-latency-<date>-<host>.json.

    .venv/bin/python bench/forecast_latency.py [--neurons 71721] [--frames 200] [--warmup 20] [--threads 2]
    .venv/bin/python bench/forecast_latency.py --quick          # N=2000, 30 frames: a smoke run, no file
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from loopcast.models.tsmixer import TSMixerConfig, count_parameters
from loopcast.models.zoo import MODELS, model_config
from loopcast.offline_training.export.engine import export_engine
from loopcast.offline_training.trace.train import TrainConfig
from loopcast.realtime.engines.loader import load_engine

from common import device_skip, parse_devices, quantiles, write_result
from trace_windows import Windows, dff_recording, eager_fn, engine_fn, parity, parity_window, stimulus_recording, timed

ZAPBENCH_NEURONS = 71_721
HORIZON = 32
DESCRIPTION = (
    "Per-frame (batch 1) forecast latency per model and runtime. Models have seeded random weights: "
    "latency does not depend on training (the same graph and shapes run whatever the weight values). "
    "Each frame feeds a fresh dF/F-like (C, N) float32 window (sliding over a synthetic calcium-trace "
    "recording) and, for covariate models, a (C + H, K) stimulus window; warm-up frames are excluded. "
    "onnxruntime = realtime.engines.loader.load_engine(runtime='onnxruntime'); torch-eager = the nn.Module under "
    "torch.inference_mode with numpy in/out; torch = load_engine(runtime='torch') when the engine ships a "
    "torch.export program. ORT and torch use the same intra-op thread count.")


@dataclasses.dataclass
class Spec:
    """One model configuration to time."""

    model: str
    context: int
    preset: str
    config: dict[str, Any]


def specs(n: int, horizon: int, only: set[str]) -> list[Spec]:
    """The configurations of the issue; tide only when the registry has it."""
    short = dataclasses.asdict(TSMixerConfig.short_context(n, horizon))
    long = dataclasses.asdict(TSMixerConfig.long_context(n, horizon))
    out = [Spec(m, 4, "default", {"context": 4, "horizon": horizon}) for m in ("mean", "last", "nlinear")]
    out += [Spec("timemix", 4, "zapbench short (2 blocks)",
                 {"context": 4, "horizon": horizon, "n_blocks": 2, "revin": False}),
            Spec("tsmixer", 4, "zapbench short (2 blocks, mlp 256)", short),
            Spec("tsmixer", 256, "zapbench long (2 blocks, mlp 128, RevIN)", long),
            Spec("timemix", 256, "zapbench long (2 blocks, RevIN)",
                 {"context": 256, "horizon": horizon, "n_blocks": 2, "revin": True}),
            Spec("nlinear", 256, "default", {"context": 256, "horizon": horizon})]
    if "tide" in MODELS:
        out += [Spec("tide", 4, "default", {"context": 4, "horizon": horizon}),
                Spec("tide", 256, "default + RevIN", {"context": 256, "horizon": horizon, "revin": True})]
    return [s for s in out if not only or s.model in only]


def build(spec: Spec, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    cfg = model_config(spec.model, spec.config)
    return MODELS[spec.model][1](cfg).eval()


def bench_spec(spec: Spec, args: argparse.Namespace, dff: np.ndarray) -> dict:
    n, h = args.neurons, args.horizon
    model = build(spec, args.seed)
    uses_cov = bool(getattr(type(model), "uses_covariates", False))
    k = int(getattr(model.config, "n_covariates", 0)) if uses_cov else 0
    stim = stimulus_recording(len(dff) + h, k, args.seed + 2) if uses_cov else None
    windows = Windows(dff, stim, spec.context, h)
    config: Any = model.config                                 # the zoo model's dataclass config
    res: dict[str, Any] = {"model": spec.model, "context": spec.context, "horizon": h, "neurons": n,
                           "preset": spec.preset, "config": dataclasses.asdict(config),
                           "params": count_parameters(model), "n_covariates": k, "runtimes": [],
                           "parity": {}}
    print(f"\n{spec.model} C={spec.context} ({spec.preset}): {res['params']:,} params"
          + (f", {k} covariates" if k else ""))
    cpu_eager = eager_fn(model, "cpu")

    def record(runtime: str, device: str, fn: Callable | None, skip: str = "",
               sync: Callable[[], None] | None = None) -> None:
        row: dict[str, Any] = {"runtime": runtime, "device": device}
        if fn is not None and device_skip(device, args.devices):
            fn, skip = None, device_skip(device, args.devices)
        if fn is None:
            row.update(status="skipped", reason=skip)
        else:
            row["loadavg_1m_before"] = round(os.getloadavg()[0], 2)
            try:
                seconds, cpu = timed(fn, windows, args.warmup, args.frames,
                                     f"{spec.model} c{spec.context} {runtime} {device}", sync, args.budget_s)
                row.update(status="ok", **quantiles(seconds), process_cpu_per_wall=round(cpu, 2))
            except Exception as exc:  # record and keep going
                row.update(status="error", reason=f"{type(exc).__name__}: {exc}")
            row["loadavg_1m_after"] = round(os.getloadavg()[0], 2)
        res["runtimes"].append(row)
        if row["status"] == "ok":
            print(f"  {runtime:<12}{device:<6} p50 {row['p50_ms']:9.3f} ms  p99 {row['p99_ms']:9.3f} ms")
        else:
            print(f"  {runtime:<12}{device:<6} {row['status']}: {row['reason'].splitlines()[0][:160]}")

    def check(name: str, a: Callable, b: Callable, tol: float | None) -> None:
        try:
            d = parity(a, b, windows)
            res["parity"][name] = {"max_abs_diff": d, "tolerance": tol,
                                   "ok": None if tol is None else bool(d <= tol)}
            print(f"  parity {name}: max abs diff {d:.3g}" + ("" if tol is None else
                                                              f" ({'ok' if d <= tol else 'FAILED'} <= {tol:g})"))
        except Exception as exc:
            res["parity"][name] = {"error": f"{type(exc).__name__}: {exc}"}
            print(f"  parity {name}: error {exc}")

    with tempfile.TemporaryDirectory(prefix="forecast-latency-") as registry:
        engine_dir = None
        t0 = time.monotonic()
        try:
            train_cfg = TrainConfig(model=spec.model, context=spec.context, horizon=h, seed=args.seed,
                                    threads=args.threads)
            engine_dir = export_engine(model, train_cfg, registry, n, metrics={},
                                       data_fingerprint=f"random-weights-seed{args.seed}",
                                       data_source="bench/forecast_latency.py (seeded random weights)",
                                       parity_input=parity_window(windows),
                                       tolerance=args.tolerance)
            files = sorted(p.name for p in engine_dir.iterdir())
            res["export"] = {"ok": True, "seconds": round(time.monotonic() - t0, 2), "files": files,
                             "onnx_mb": round((engine_dir / "model.onnx").stat().st_size / 2**20, 2)}
        except Exception as exc:
            res["export"] = {"ok": False, "seconds": round(time.monotonic() - t0, 2),
                             "error": f"{type(exc).__name__}: {exc}"}
            print(f"  export failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
        export_skip = "" if engine_dir else f"export failed: {res['export']['error']}"

        # CPU: ONNX Runtime, torch eager, torch runtime (same thread count).
        ort_cpu = None
        if engine_dir:
            try:
                ort_cpu = load_engine(engine_dir, runtime="onnxruntime", threads=args.threads, device="cpu")
                manifest_files = ort_cpu.manifest.files
                res["export"]["manifest_files"] = dict(manifest_files)
            except Exception as exc:
                export_skip = f"load failed: {type(exc).__name__}: {exc}"
        record("onnxruntime", "cpu", engine_fn(ort_cpu) if ort_cpu else None, export_skip)
        record("torch-eager", "cpu", cpu_eager)
        if ort_cpu:
            check("onnxruntime_cpu_vs_torch_eager_cpu", engine_fn(ort_cpu), cpu_eager, args.tolerance)
        torch_rt = None
        if not ort_cpu:
            record("torch", "cpu", None, export_skip or "no engine")
        elif "torch" not in ort_cpu.manifest.files:
            record("torch", "cpu", None, "engine manifest has no 'torch' file (exporter does not save the "
                                         "torch.export program yet)")
        else:
            assert engine_dir is not None                      # ort_cpu was loaded from it
            try:
                torch_rt = load_engine(engine_dir, runtime="torch", threads=args.threads, device="cpu")
                record("torch", "cpu", engine_fn(torch_rt))
                check("torch_runtime_cpu_vs_torch_eager_cpu", engine_fn(torch_rt), cpu_eager, args.tolerance)
                torch_rt.close()
            except Exception as exc:
                record("torch", "cpu", None, f"load failed: {type(exc).__name__}: {exc}")
        if ort_cpu:
            ort_cpu.close()

        if torch.cuda.is_available():
            bench_cuda(spec, args, model, engine_dir, export_skip, windows, cpu_eager, record, check)
        else:
            res["cuda"] = "torch.cuda is not available on this machine: CUDA, TensorRT not timed"
    return res


def bench_cuda(spec: Spec, args: argparse.Namespace, model: nn.Module, engine_dir: Path | None,
               export_skip: str, windows: Windows, cpu_eager: Callable, record: Callable,
               check: Callable) -> None:
    """ORT CUDA, torch eager CUDA, torch runtime CUDA and TensorRT, each guarded."""
    sync = torch.cuda.synchronize
    if engine_dir:
        try:
            e = load_engine(engine_dir, runtime="onnxruntime", threads=args.threads, device="cuda")
            record("onnxruntime", "cuda", engine_fn(e), sync=sync)
            check("onnxruntime_cuda_vs_torch_eager_cpu", engine_fn(e), cpu_eager, None)
            e.close()
        except Exception as exc:
            record("onnxruntime", "cuda", None, f"{type(exc).__name__}: {exc}")
    else:
        record("onnxruntime", "cuda", None, export_skip)
    try:
        gpu_model = build(spec, args.seed).to("cuda")
        fn = eager_fn(gpu_model, "cuda")
        record("torch-eager", "cuda", fn, sync=sync)
        check("torch_eager_cuda_vs_torch_eager_cpu", fn, cpu_eager, None)
        del gpu_model
    except Exception as exc:
        record("torch-eager", "cuda", None, f"{type(exc).__name__}: {exc}")
    for runtime in ("torch", "torch-bf16", "tensorrt"):
        if not engine_dir:
            record(runtime, "cuda", None, export_skip)
            continue
        if runtime == "tensorrt" and importlib.util.find_spec("tensorrt") is None:
            record(runtime, "cuda", None, "tensorrt is not importable")
            continue
        try:
            e = load_engine(engine_dir, runtime=runtime.split("-")[0], threads=args.threads, device="cuda",
                            precision="bf16" if runtime == "torch-bf16" else "fp32")
        except Exception as exc:
            record(runtime, "cuda", None, f"load failed: {type(exc).__name__}: {exc}")
            continue
        if runtime.startswith("torch") and "torch" not in e.manifest.files:
            record(runtime, "cuda", None, "engine manifest has no 'torch' file")
        else:
            record(runtime, "cuda", engine_fn(e), sync=sync)
            check(f"{runtime}_cuda_vs_torch_eager_cpu", engine_fn(e), cpu_eager, None)
        e.close()


def print_rows(title: str, results: list[dict]) -> list[dict]:
    """The table (model, C, runtime, device, p50 ms, p99 ms, params); returns its rows."""
    rows = []
    print(f"\n{title}\n{'model':<9}{'C':>5}  {'runtime':<13}{'device':<7}{'p50 ms':>10}{'p99 ms':>10}"
          f"{'params':>13}  note")
    for r in results:
        for rt in r["runtimes"]:
            row = {"model": r["model"], "context": r["context"], "runtime": rt["runtime"], "device": rt["device"],
                   "p50_ms": rt.get("p50_ms"), "p99_ms": rt.get("p99_ms"), "params": r["params"],
                   "status": rt["status"]}
            rows.append(row)
            head = f"{r['model']:<9}{r['context']:>5}  {rt['runtime']:<13}{rt['device']:<7}"
            if rt["status"] == "ok":
                print(f"{head}{rt['p50_ms']:>10.3f}{rt['p99_ms']:>10.3f}{r['params']:>13,}")
            else:
                reason = rt["reason"].splitlines()[0]
                print(f"{head}{'-':>10}{'-':>10}{r['params']:>13,}  {rt['status']}: {reason[:70]}")
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--neurons", type=int, default=ZAPBENCH_NEURONS, help="N (ZAPBench: 71,721)")
    ap.add_argument("--horizon", type=int, default=HORIZON)
    ap.add_argument("--frames", type=int, default=200, help="timed frames per model and runtime")
    ap.add_argument("--warmup", type=int, default=20, help="untimed frames before them")
    ap.add_argument("--threads", type=int, default=2, help="intra-op threads for ONNX Runtime and torch")
    ap.add_argument("--tolerance", type=float, default=1e-4, help="ORT vs torch max abs diff allowed")
    ap.add_argument("--budget-s", type=float, default=0.0,
                    help="stop timing a model/runtime after this many seconds of timed frames (0: all frames; "
                         "the row's n says how many were timed)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--models", default="", help="comma list of model names to run (default: all)")
    ap.add_argument("--devices", type=parse_devices, default="cpu,cuda",
                    help="device kinds whose rows are timed (parity checks still run): cpu, cuda or cpu,cuda")
    ap.add_argument("--quick", action="store_true", help="smoke run: N=2000, 30 frames, 5 warm-up")
    ap.add_argument("--name", default="", help="result name (default forecast-latency; --quick writes "
                                               "no result unless --name is given)")
    args = ap.parse_args()
    if args.quick:
        args.neurons, args.frames, args.warmup = 2000, 30, 5
    name = args.name or ("" if args.quick else "forecast-latency")
    torch.set_num_threads(args.threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass
    todo = specs(args.neurons, args.horizon, set(filter(None, args.models.split(","))))
    t0 = time.monotonic()
    max_c = max(s.context for s in todo)
    n_frames = max_c + args.warmup + args.frames + args.horizon
    dff = dff_recording(n_frames, args.neurons, args.seed + 1)
    print(f"{len(todo)} configurations, N={args.neurons:,}, H={args.horizon}, {args.frames} frames "
          f"(+{args.warmup} warm-up), {args.threads} threads; recording {dff.shape} in "
          f"{time.monotonic() - t0:.1f} s; tide in registry: {'tide' in MODELS}; "
          f"cuda: {torch.cuda.is_available()}")
    results: list[dict] = []

    def save(rows: list[dict], done: bool) -> Path | None:
        if not name:
            return None
        return write_result(name, {"description": DESCRIPTION, "complete": done, "quick": args.quick,
                                   "neurons": args.neurons, "horizon": args.horizon, "frames": args.frames,
                                   "warmup": args.warmup, "budget_s": args.budget_s, "threads": args.threads,
                                   "seed": args.seed, "tolerance": args.tolerance,
                                   "devices": sorted(args.devices),
                                   "cuda_available": torch.cuda.is_available(),
                                   "tide_registered": "tide" in MODELS, "rows": rows, "configs": results,
                                   "wall_s": round(time.monotonic() - t0, 1)})

    for spec in todo:
        try:
            results.append(bench_spec(spec, args, dff))
        except Exception as exc:  # a configuration that cannot even be built: record and go on
            traceback.print_exc()
            results.append({"model": spec.model, "context": spec.context, "preset": spec.preset,
                            "params": 0, "error": f"{type(exc).__name__}: {exc}", "runtimes": []})
        save([], False)                                            # partial results survive a kill
    rows = print_rows(f"per-frame forecast latency, batch 1, N={args.neurons:,}, H={args.horizon}, "
                      f"{args.threads} threads", results)
    bad = [(r["model"], r["context"], k) for r in results for k, p in r.get("parity", {}).items()
           if p.get("ok") is False]
    print(f"\nparity (ORT vs torch, tolerance {args.tolerance:g}): "
          + ("all within tolerance" if not bad else f"FAILED {bad}"))
    path = save(rows, True)
    if path is None:
        print("quick run: no result written (pass --name to keep one)")
        return 0
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
