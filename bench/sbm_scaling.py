"""Cost of the Sparse Brain Model vs the number of neurons N: the two routed attentions ("sorted",
linear-time; "topk", the paper as written, whose scoring grows as N^2 / w) against the dense reference
(quadratic), in torch and in ONNX Runtime.

Each row builds a small SBM (seeded random weights: cost does not depend on training) at one N and
times batch-1 forward() of one next-step prediction (horizon 1, context 12, K = 26 stimulus
covariates), in a FRESH subprocess so memory figures are per row:
  torch CPU:  eval + no_grad wall time per call (median, p99) with `--threads` intra-op threads; peak
              memory = growth of ru_maxrss over its value after the model and inputs were built;
  ORT CPU:    the model exported with offline_training.export.engine.export_onnx (static N) in a separate
              process, then an InferenceSession with `--threads` intra-op threads (sequential); peak
              memory = ru_maxrss growth over its value after the session was created;
  torch CUDA: (when torch.cuda.is_available()) synchronised wall time; peak memory =
              max_memory_allocated over the allocation after the build.
Dense and topk run only at the smaller N (`--dense`, `--topk`): at N = 71,721 one dense head's score
matrix alone would be ~20 GB. The log-log slopes of time and memory vs N are fitted per (runtime,
routing) over its rows. Writes bench/results/sbm-scaling-<date>-<host>.json (bench.common.write_result)
and docs/figures/sbm_scaling.png; `--quick` (small N, a few repeats, < 1 min) writes both to a
temporary directory instead.

    .venv/bin/python bench/sbm_scaling.py [--neurons 5000,20000,71721] [--topk 5000,20000] [--dense 5000,20000]
    .venv/bin/python bench/sbm_scaling.py --quick
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from common import machine, parse_devices, write_result

ROOT = Path(__file__).resolve().parents[1]
FIGURE = ROOT / "docs" / "figures" / "sbm_scaling.png"
NAME = "sbm-scaling"
N_COVARIATES = 26
MODEL = dict(context=12, horizon=1, d_model=64, n_heads=4, n_layers=2, cluster_size=256)
MODES = ("sorted", "topk", "dense")        # routing "sorted" / "topk" (attention "routed"), or attention "dense"
DESCRIPTION = ("Batch-1 SBM forward (one next-step prediction, context 12, 26 covariates) vs N, seeded random "
               "weights; torch eval/no_grad and ONNX Runtime (static-N export, sequential, --threads intra-op "
               "threads); each row in a fresh subprocess. Modes: routed 'sorted' (linear-time balanced blocks), "
               "routed 'topk' (each of ceil(N / w) centroids takes its top-w tokens: O(N^2 / w) scoring), dense. "
               "Memory: CPU = ru_maxrss growth over the value after build (torch) or session creation (ORT), "
               "CUDA = max_memory_allocated over the allocation after build. torch's SDPA kernels never "
               "materialise the (N, N) score matrix, so torch dense memory grows ~linearly; ORT's decomposed "
               "attention needs 4 N^2 bytes per head and time slice.")


def fish_positions(n: int, seed: int) -> np.ndarray:
    """(N, 3) soma positions uniform in a fish-brain-like ellipsoid (semi-axes 400, 200, 100 um)."""
    rng = np.random.default_rng(seed)
    p = rng.normal(size=(n, 3))
    p *= (rng.random(n) ** (1 / 3) / np.linalg.norm(p, axis=1))[:, None]
    return (p * np.array([400.0, 200.0, 100.0])).astype(np.float32)


def build(spec: dict[str, Any]) -> tuple[Any, np.ndarray, np.ndarray]:
    """The row's model (eval, CPU) and its seeded inputs x (1, C, N), cov (1, C + 1, K)."""
    import torch

    from loopcast.models.sbm import SBMConfig, SparseBrainModel
    torch.manual_seed(spec["seed"])
    mode, n = spec["mode"], spec["n"]
    cfg = SBMConfig(n_neurons=n, n_covariates=N_COVARIATES, attention="dense" if mode == "dense" else "routed",
                    routing="topk" if mode == "topk" else "sorted", **MODEL)
    model = SparseBrainModel(cfg, fish_positions(n, spec["seed"])).eval()
    rng = np.random.default_rng(spec["seed"])
    x = (rng.random((1, cfg.context, n)) ** 4).astype(np.float32)
    return model, x, rng.random((1, cfg.context + 1, N_COVARIATES)).astype(np.float32)


def timed(call: Callable[[], Any], spec: dict[str, Any]) -> list[float]:
    """Wall seconds of `repeats` calls after `warmup` untimed ones (stops past budget_s, >= 1 call)."""
    seconds: list[float] = []
    t_end = time.perf_counter() + spec["budget_s"]
    for i in range(spec["warmup"] + spec["repeats"]):
        t = time.perf_counter()
        call()
        if i >= spec["warmup"]:
            seconds.append(time.perf_counter() - t)
            if time.perf_counter() > t_end:
                break
    return seconds


def rss() -> int:
    """This process's peak resident memory so far, bytes."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def child_torch(spec: dict[str, Any]) -> dict[str, Any]:
    """Time torch forward() on spec's device (runs inside its own subprocess)."""
    import torch
    torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    model, x_np, cov_np = build(spec)
    model, x, cov = model.to(device), torch.from_numpy(x_np).to(device), torch.from_numpy(cov_np).to(device)
    cuda = device.type == "cuda"
    base = rss()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()

    def call() -> None:
        model(x, cov)
        if cuda:
            torch.cuda.synchronize()
    with torch.no_grad():
        seconds = timed(call, spec)
    peak = torch.cuda.max_memory_allocated() - base if cuda else rss() - base
    return summary(model, seconds, peak)


def child_export(spec: dict[str, Any]) -> dict[str, Any]:
    """Export the row's model to spec["onnx"] (its own subprocess, so its memory is not the ORT row's)."""
    from loopcast.offline_training.export.engine import export_onnx
    model, _, _ = build(spec)
    t = time.perf_counter()
    export_onnx(model, Path(spec["onnx"]), model.config.context, spec["n"], horizon=1, covariates=N_COVARIATES)
    return {"export_s": time.perf_counter() - t}


def child_ort(spec: dict[str, Any]) -> dict[str, Any]:
    """Export (in a subprocess), then time an ORT CPU session (runs inside its own subprocess)."""
    import onnxruntime as ort

    from loopcast.offline_training.export.engine import COVARIATES_NAME, INPUT_NAME, OUTPUT_NAME
    with tempfile.TemporaryDirectory(prefix="sbm-scaling-") as tmp:
        sub = {**spec, "onnx": str(Path(tmp) / "sbm.onnx"), "runtime": "export"}
        done = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(sub)],
                              capture_output=True, text=True, cwd=ROOT, check=True)
        exported = json.loads(done.stdout.strip().splitlines()[-1])
        opts = ort.SessionOptions()
        opts.intra_op_num_threads, opts.inter_op_num_threads = spec["threads"], 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.enable_cpu_mem_arena = spec["ort_arena"]                 # on: realtime/engines/base.py's default
        session = ort.InferenceSession(sub["onnx"], opts, providers=["CPUExecutionProvider"])
    model, x, cov = build(spec)
    base = rss()
    seconds = timed(lambda: session.run([OUTPUT_NAME], {INPUT_NAME: x, COVARIATES_NAME: cov}), spec)
    return {**summary(model, seconds, rss() - base), **exported}


def summary(model: Any, seconds: list[float], peak: float) -> dict[str, Any]:
    s, cfg = np.asarray(seconds), model.config
    return {"n_clusters": cfg.n_clusters if cfg.attention == "routed" else None, "repeats": len(seconds),
            "median_ms": float(np.median(s) * 1e3), "p99_ms": float(np.percentile(s, 99) * 1e3),
            "peak_mb": peak / 2**20, "params": sum(p.numel() for p in model.parameters()),
            "config": dataclasses.asdict(cfg)}


def run_row(spec: dict[str, Any], timeout_s: float) -> dict[str, Any]:
    """One row in a fresh interpreter; errors and timeouts are recorded, not raised."""
    row = {k: spec[k] for k in ("device", "runtime", "mode", "n")}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {**row, "status": "timeout", "reason": f"over {timeout_s:.0f} s"}
    if out.returncode != 0:
        return {**row, "status": "error", "reason": (out.stderr.strip().splitlines() or ["?"])[-1]}
    return {**row, "status": "ok", **json.loads(out.stdout.strip().splitlines()[-1])}


def loglog_slope(rows: list[dict[str, Any]], key: str) -> float | None:
    """Least-squares slope of log(key) vs log(N) over rows with a positive value (None if < 2)."""
    pts = [(r["n"], r[key]) for r in rows if r.get("status") == "ok" and r.get(key, 0) > 0]
    if len(pts) < 2:
        return None
    n, y = np.log(np.array(pts, dtype=float)).T
    return float(np.polyfit(n, y, 1)[0])


def series(rows: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Rows grouped by '<runtime>-<device> <mode>' (e.g. 'ort-cpu sorted')."""
    out: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        out.setdefault(f"{r['runtime']}-{r['device']} {r['mode']}", []).append(r)
    return out


def print_table(rows: list[dict[str, Any]]) -> None:
    print(f"\n{'runtime':<11}{'mode':<8}{'N':>8}{'clusters':>10}{'median ms':>12}{'p99 ms':>11}"
          f"{'peak MB':>10}{'n':>4}  note")
    for r in rows:
        head = f"{r['runtime'] + '-' + r['device']:<11}{r['mode']:<8}{r['n']:>8}"
        if r["status"] == "ok":
            print(f"{head}{r['n_clusters'] or '-':>10}{r['median_ms']:>12.1f}{r['p99_ms']:>11.1f}"
                  f"{r['peak_mb']:>10.1f}{r['repeats']:>4}")
        else:
            print(f"{head}{'':>47}  {r['status']}: {r.get('reason', '')[:80]}")


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """Log-log time and memory vs N, one line per (runtime, device, mode), with N and N^2 guides."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    styles = {"sorted": "o-", "topk": "^-", "dense": "s--"}
    for ax, key, label in ((axes[0], "median_ms", "median forward time (ms)"),
                           (axes[1], "peak_mb", "peak memory growth (MB)")):
        for name, group in series(rows).items():
            pts = sorted((r["n"], r[key]) for r in group if r["status"] == "ok" and r[key] > 0)
            if pts:
                ax.plot(*zip(*pts), styles[group[0]["mode"]], label=name)
        ref = sorted((r["n"], r[key]) for r in rows if r["status"] == "ok" and r["mode"] == "sorted"
                     and r["runtime"] == "torch" and r[key] > 0)
        if ref:
            n = np.array([ref[0][0], ref[-1][0]], dtype=float)
            for power, ls in ((1, ":"), (2, "-.")):
                ax.plot(n, ref[0][1] * (n / n[0]) ** power, "k" + ls, lw=0.8, label=f"N^{power}")
        ax.set(xscale="log", yscale="log", xlabel="neurons N", ylabel=label)
        ax.legend(fontsize=7)
    fig.suptitle("Sparse Brain Model cost vs N (d 64, 2 layers, 4 heads, w 256, context 12)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--neurons", default="5000,20000,71721", help="routing 'sorted' rows (comma list)")
    ap.add_argument("--topk", default="5000,20000", help="routing 'topk' rows (comma list; O(N^2 / w))")
    ap.add_argument("--dense", default="5000,20000", help="dense rows (comma list; keep them small)")
    ap.add_argument("--runtimes", default="torch,ort", help="comma list of torch, ort")
    ap.add_argument("--ort-max-n", type=int, default=10**9, help="skip ORT rows above this N")
    ap.add_argument("--ort-modes", default=",".join(MODES), help="modes with ORT rows (comma list)")
    ap.add_argument("--ort-no-arena", action="store_true", help="ORT sessions without the CPU memory arena "
                                                                 "(the arena's growth dominates ORT peak memory)")
    ap.add_argument("--devices", type=parse_devices, default="cpu,cuda",
                    help="device kinds: cpu (the --runtimes rows), cuda (torch rows where torch.cuda is available)")
    ap.add_argument("--repeats", type=int, default=10, help="timed calls per row")
    ap.add_argument("--warmup", type=int, default=1, help="untimed calls first")
    ap.add_argument("--budget-s", type=float, default=120.0, help="stop a row's repeats past this (>= 1 call)")
    ap.add_argument("--timeout-s", type=float, default=900.0, help="kill a row's subprocess past this")
    ap.add_argument("--threads", type=int, default=2, help="intra-op threads (torch CPU and ORT rows)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--name", default=NAME, help="result name; another name writes its own figure "
                    "(sbm-scaling-cuda, a GPU session's: docs/figures/sbm_scaling_cuda.png)")
    ap.add_argument("--quick", action="store_true", help="sorted/topk N = 500, 1000, dense 500, ORT sorted only, "
                                                         "1 thread, 2 repeats; writes to a temporary directory")
    ap.add_argument("--child", default="", help=argparse.SUPPRESS)
    return ap.parse_args()


def main() -> int:
    args = parse_args()
    if args.child:
        spec = json.loads(args.child)
        fn = {"torch": child_torch, "ort": child_ort, "export": child_export}[spec["runtime"]]
        print(json.dumps(fn(spec)))
        return 0
    if args.quick:   # a smoke test: 1 thread (2 spinning threads on a busy machine time nothing useful)
        args.neurons, args.topk, args.dense, args.repeats = "500,1000", "500,1000", "500", 2
        args.ort_max_n, args.ort_modes, args.threads = 1000, "sorted", 1
    return run(args)


def plan(args: argparse.Namespace, cuda: bool) -> list[dict[str, Any]]:
    """Row specs: every (runtime, device) x (mode, N); ORT on CPU only, N <= --ort-max-n."""
    sizes = {"sorted": args.neurons, "topk": args.topk, "dense": args.dense}
    targets = [(rt, "cpu") for rt in filter(None, args.runtimes.split(",")) if "cpu" in args.devices]
    targets += [("torch", "cuda")] if cuda and "cuda" in args.devices else []
    common = dict(threads=args.threads, seed=args.seed, warmup=args.warmup, repeats=args.repeats,
                  budget_s=args.budget_s, ort_arena=not args.ort_no_arena)
    return [dict(runtime=rt, device=dev, mode=mode, n=int(n), **common) for rt, dev in targets
            for mode in MODES for n in filter(None, sizes[mode].split(","))
            if rt != "ort" or (int(n) <= args.ort_max_n and mode in args.ort_modes.split(","))]


def run(args: argparse.Namespace) -> int:
    import torch
    cuda = torch.cuda.is_available()
    rows = []
    for spec in plan(args, cuda):
        print(f"{spec['runtime']}-{spec['device']} {spec['mode']} N={spec['n']} ...", flush=True)
        rows.append(run_row(spec, args.timeout_s))
    print_table(rows)
    slopes = {name: {key: loglog_slope(group, key) for key in ("median_ms", "peak_mb")}
              for name, group in series(rows).items()}
    for name, s in slopes.items():
        print(f"{name:<20} log-log slope: time {s['median_ms']}, memory {s['peak_mb']}")
    payload = {"description": DESCRIPTION, "quick": args.quick, "threads": args.threads,
               "ort_cpu_mem_arena": not args.ort_no_arena,
               "model": {**MODEL, "n_covariates": N_COVARIATES, "batch": 1}, "rows": rows, "loglog_slope": slopes,
               "cuda": "timed" if cuda else "skipped: torch.cuda is not available on this machine",
               "loadavg_1m": round(os.getloadavg()[0], 2)}
    if args.quick:
        out = Path(tempfile.mkdtemp(prefix="sbm-scaling-quick-"))
        path, figure = out / f"{NAME}-quick.json", out / "sbm_scaling.png"
        body = {"benchmark": NAME, "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "machine": machine(), **payload}
        path.write_text(json.dumps(body, indent=2) + "\n")
    else:
        figure = FIGURE if args.name == NAME else FIGURE.with_name(f"{args.name.replace('-', '_')}.png")
        path = write_result(args.name, payload)
    plot(rows, figure)
    print(f"\nwrote {path}\nwrote {figure}")
    return 0 if all(r["status"] == "ok" for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
