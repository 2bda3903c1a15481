"""Per-frame forecast latency of the video UNet (issue 6) per input grid, model width and runtime.

C = 4, H = 32, super_resolution 0 (output grid = input grid), seeded random weights. Grids: synth 32x32x8
(configs/synth-video.toml / 4 in xy), demo 32x24x16 (the demo fish 128x96x16 / 4), zapbench-ds4 512x288x72
(ZAPBench / 4 in xy, the paper's y crop). Models: small (F = F' = 16, 4 groups, 4 stages: the CPU config of
bench/video_science.py) and paper (VideoUNetConfig.paper(4), super_resolution 0: F = 128 at the output).
Per runtime two rows, each frame a fresh (1, C, X, Y, Z) float32 window, numpy in and out: one lead time
(batch 1), and all H lead times in chunks of `--lead-batch` as realtime.forecast.video batches them.
  onnxruntime cpu|cuda  load_engine(runtime="onnxruntime") on an export_video_onnx graph + video manifest
  torch       cpu|cuda  the nn.Module in float32 under torch.inference_mode
  torch-bf16 / torch-bf16-graph  cuda: autocast bfloat16, eager / captured in one CUDA graph per batch size
  torch-bf16-graph-cl  cuda: the graph with weights and input channels-last 3-D (NDHWC)
  tensorrt    cuda      skipped: the TensorRT runtime serves trace engines only
  reduce      cpu|cuda  the predicted frames reduced to traces (synthetic blocky segmentation, 71,721
                        neurons at zapbench-ds4, ~800 on the small grids): VolumeReducer.reduce on the
                        CPU; on CUDA the torch runtime's on-device reduction of frames already there,
                        (B, N) copied back
CUDA rows need torch.cuda (else skipped). A row stops after `--budget-s` of timed frames (see its n); CPU
rows whose one frame is estimated (GFLOP / CPU GFLOP/s measured on a smaller grid) past it are skipped.
GFLOP per lead are counted exactly on the meta device; on a GPU, GFLOP / the measured bf16 matrix-product
rate is recorded as the floor no runtime can beat (cuda_floor_ms_per_lead).
Writes bench/results/video-latency-<date>-<host>.json.

    .venv/bin/python bench/video_latency.py [--grids synth,demo,zapbench-ds4] [--models small,paper]
        [--runtimes onnxruntime,torch,...] [--frames 20] [--warmup 2] [--lead-batch 8] [--budget-s 60]
    .venv/bin/python bench/video_latency.py --quick     # 16x12x8, small model, 3 frames, no file
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch

from loopcast.models.video_unet import VideoUNet, VideoUNetConfig, count_parameters
from loopcast.offline_training.export.engine import MANIFEST_FILE, ONNX_FILE, TORCH_FILE, export_program
from loopcast.offline_training.video.export import VIDEO_PARITY_TOLERANCE, build_video_manifest, export_video_onnx
from loopcast.offline_training.video.train import VideoTrainConfig
from loopcast.realtime.engines.loader import load_engine
from loopcast.realtime.engines.torch_runtime import reduce_frames, reduction_index
from loopcast.realtime.forecast.video_reduce import VideoGrid, VolumeReducer

from common import device_skip, parse_devices, quantiles, write_result
from video_runners import (
    GraphRunner,
    Runner,
    Volumes,
    bf16_matmul_tflops,
    count_gflop,
    frame_fn,
    segmentation,
    timed,
    torch_runner,
)

C, H, FACTOR = 4, 32, 4
FRAME_PERIOD_MS, ONE_LEAD_TARGET_MS = 914.0, 100.0
REF_SHAPE = (64, 64, 16)  # where FLOPs and CPU GFLOP/s are first measured (big enough not to be overhead-bound)
RUNTIMES = ("onnxruntime", "torch", "torch-bf16", "torch-bf16-graph", "torch-bf16-graph-cl", "tensorrt", "reduce",
            "engine-torch", "engine-torch-bf16")
ENGINE_ROWS = (("engine-torch", "cpu"), ("engine-torch", "cuda"), ("engine-torch-bf16", "cuda"))
DESCRIPTION = (
    "Per-frame latency of the video UNet forecaster (C=4, H=32, super_resolution 0), seeded random weights. "
    "Each frame feeds a fresh (1, C, X, Y, Z) float32 window; 'leads' = '1' is one lead time (batch 1), "
    "'32/b' all 32 lead times in chunks of b per call as realtime.forecast.video does; numpy in and out "
    "(frames copied back to the host). Warm-up frames excluded; a row stops after budget_s of timed frames. "
    "onnxruntime = realtime.engines.loader.load_engine on an export_video_onnx graph; torch = nn.Module fp32 under "
    "inference_mode; torch-bf16 = autocast bfloat16; torch-bf16-graph = the same captured in CUDA graphs "
    "(one per batch size); reduce = VolumeReducer.reduce of the predicted frames to per-neuron traces on a "
    "synthetic blocky segmentation; engine-torch(-bf16) = the loop's own path: the exported torch program "
    "through load_engine(runtime='torch', precision fp32 / bf16) and run_video_traces, frames reduced to "
    "traces on the engine's device. Targets: one lead < 100 ms, all 32 leads < the 914 ms frame period.")


@dataclasses.dataclass(frozen=True)
class Grid:
    """An input grid (X, Y, Z), its synthetic neuron count and each neuron's block in output voxels."""

    shape: tuple[int, int, int]
    neurons: int
    cell: tuple[int, int, int]


GRIDS = {"synth": Grid((32, 32, 8), 800, (2, 2, 1)), "demo": Grid((32, 24, 16), 800, (2, 2, 1)),
         "zapbench-ds4": Grid((512, 288, 72), 71_721, (3, 3, 1))}
QUICK_GRID = {"quick": Grid((16, 12, 8), 800, (2, 2, 1))}


def model_config(name: str) -> VideoUNetConfig:
    if name == "small":
        return VideoUNetConfig.spatial_context(4, context=C, horizon=H, features=16, features_sr=16, groups=4)
    if name == "paper":
        return VideoUNetConfig.paper(C, horizon=H, super_resolution=0)
    raise ValueError(f"unknown model {name!r}; expected small or paper")


def gflop_for(model: VideoUNet, name: str, shape: tuple[int, int, int], cal: dict[str, dict[str, float]]) -> dict:
    """GFLOP per lead on this grid, counted on the meta device; the model's CPU GFLOP/s calibration
    `cal[name]` is measured once on REF_SHAPE (a real CPU forward)."""
    if name not in cal:
        g, s = count_gflop(model, REF_SHAPE)
        cal[name] = {"ref_gflop": g, "cpu_gflops": g / s}
    g, _ = count_gflop(model, shape, "meta")
    return {"gflop_per_lead": g, "source": "FlopCounterMode on this grid (meta device)"}


def export_dir(model: VideoUNet, shape: tuple[int, int, int], n_neurons: int, root: Path,
               program: bool = False) -> Path:
    """An engine version directory: export_video_onnx's graph (and with `program` the torch.export
    program the torch runtime serves, where torch.export can capture it) and build_video_manifest's
    manifest."""
    d = root / "video_unet-bench" / "v0001"
    d.mkdir(parents=True)
    export_video_onnx(model, d / ONNX_FILE, C, H, shape)
    files = {"onnx": ONNX_FILE}
    example = (np.zeros((1, C, *shape), np.float32), np.array([1], np.int64))
    if program and export_program(model, d / TORCH_FILE, example, dynamic_n=False):   # else it warns
        files["torch"] = TORCH_FILE
    video = {"level": 2, "factor": FACTOR, "crop_y": [0, shape[1]], "super_resolution": 0,
             "input_shape": list(shape), "output_shape": list(shape),
             "volume_shape": [shape[0] * FACTOR, shape[1] * FACTOR, shape[2]],
             "dff": {"source": "bench/video_latency.py: random volumes"}}
    manifest = build_video_manifest(
        name="video_unet-bench", version="v0001", model=model, cfg=VideoTrainConfig(context=C, horizon=H),
        n_neurons=n_neurons, video=video, metrics={}, max_diff=float("nan"), tolerance=VIDEO_PARITY_TOLERANCE,
        data={"fingerprint": "random-weights", "source": "bench/video_latency.py"}, files=files)
    (d / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
    return d


def make_reducer(grid: Grid, seed: int) -> VolumeReducer:
    """A VolumeReducer of the grid's synthetic segmentation (output grid = input grid, no super-resolution)."""
    vgrid = VideoGrid(FACTOR, (0, grid.shape[1]), 0, grid.shape)
    return VolumeReducer(segmentation(grid.shape, grid.neurons, grid.cell, vgrid.stride, seed), vgrid)


class Bench:
    """Rows and parity checks of one run; `record` times one runtime's two workloads."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.rows: list[dict[str, Any]] = []
        self.configs: list[dict[str, Any]] = []
        self.cal: dict[str, dict[str, float]] = {}
        self.peak_tflops = 0.0                                             # measured once on the GPU
        self.on_row: Callable[[], Any] = lambda: None                      # save partial results per row

    def record(self, base: dict, runtime: str, device: str, make: Callable[[], Runner] | None,
               volumes: Volumes | None, skip: str = "", sec_per_lead: float = 0.0) -> None:
        """Time one lead (batch 1) and all H leads in chunks (or record why not) for one runtime."""
        a = self.args
        if runtime not in a.runtimes:
            return
        skip = skip or device_skip(device, a.devices)
        for leads, target in ((1, ONE_LEAD_TARGET_MS), (H, FRAME_PERIOD_MS)):
            row = {**base, "runtime": runtime, "device": device, "target_ms": target,
                   "leads": "1" if leads == 1 else f"{H}/{a.lead_batch}"}
            est = sec_per_lead * leads
            reason = skip or (f"over budget: ~{est:.0f} s per frame estimated (> {a.budget_s:g} s)"
                              if a.budget_s and est > a.budget_s else "")
            row.update(self._time(row, make, volumes, leads) if not reason and make and volumes
                       else {"status": "skipped", "reason": reason or "not run"})
            self.rows.append(row)
            print_row(row)
            self.on_row()

    def _time(self, row: dict, make: Callable[[], Runner], volumes: Volumes, leads: int) -> dict:
        a, cuda = self.args, row["device"] == "cuda"
        sync = torch.cuda.synchronize if cuda else (lambda: None)
        desc = f"{row['grid']} {row['model']} {row['runtime']} {row['device']} {row['leads']}"
        try:
            fn = frame_fn(make(), leads, a.lead_batch)
            seconds, warm = timed(fn, volumes, a.warmup, a.frames, desc, sync, a.budget_s)
            q = quantiles(seconds)
            return {"status": "ok", "warmup_s": round(warm, 3), **q, "meets_target": q["p50_ms"] < row["target_ms"]}
        except Exception as exc:  # record (CUDA out of memory, export/runtime failures) and go on
            return {"status": "error", "reason": f"{type(exc).__name__}: {exc}"}
        finally:
            if cuda:
                torch.cuda.empty_cache()

    def parity(self, info: dict, name: str, a: Runner, b: Runner, volumes: Volumes, tol: float | None) -> None:
        """Max abs difference of two runners on one batch-1 window at lead time H."""
        try:
            v, lead = np.ascontiguousarray(volumes(0)), np.array([H], np.int64)
            d = float(np.max(np.abs(a(v, lead).astype(np.float64) - b(v, lead))))
            info["parity"][name] = {"max_abs_diff": d, "tolerance": tol, "ok": None if tol is None else d <= tol}
        except Exception as exc:
            info["parity"][name] = {"error": f"{type(exc).__name__}: {exc}"}
        print(f"  parity {name}: {info['parity'][name]}")

    def reduce_rows(self, gname: str, grid: Grid) -> None:
        """VolumeReducer.reduce of 1 and of H predicted frames (in lead-batch chunks) to traces."""
        if "reduce" not in self.args.runtimes:
            return
        t = time.perf_counter()
        reducer = make_reducer(grid, self.args.seed)
        base = {"grid": gname, "model": "-", "input_shape": list(grid.shape), "output_shape": list(grid.shape),
                "neurons": reducer.n_neurons, "reducer_stats": reducer.stats,
                "voxels_per_neuron": round(len(reducer.voxel_index) / reducer.n_neurons, 2),
                "reducer_build_s": round(time.perf_counter() - t, 2)}
        frames = np.random.default_rng(0).standard_normal((self.args.lead_batch, *grid.shape), np.float32)
        self.record(base, "reduce", "cpu", lambda: lambda v, lead: reducer.reduce(frames[:len(lead)]),
                    Volumes((1, 1, 1), 0))
        if not torch.cuda.is_available():
            self.record(base, "reduce", "cuda", None, None, "torch.cuda is not available on this machine")
            return
        gpu_frames, index = torch.from_numpy(frames).cuda(), reduction_index(reducer, "cuda")
        self.record(base, "reduce", "cuda", lambda: lambda v, lead: reduce_frames(
            gpu_frames[:len(lead)], index, reducer.n_neurons).cpu().numpy(), Volumes((1, 1, 1), 0))


def bench_pair(bench: Bench, gname: str, grid: Grid, mname: str, root: Path) -> None:
    """All runtimes for one model on one grid."""
    a = bench.args
    torch.manual_seed(a.seed)
    model = VideoUNet(model_config(mname)).eval()
    flops = gflop_for(model, mname, grid.shape, bench.cal)
    base = {"grid": gname, "model": mname, "params": count_parameters(model),
            "input_shape": [C, *grid.shape], "output_shape": list(grid.shape),
            "gflop_per_lead": round(flops["gflop_per_lead"], 3)}
    info = {**base, "gflop_source": flops["source"], "cpu_gflops_calibration": bench.cal[mname],
            "parity": {}, "export": {}}
    bench.configs.append(info)
    per_lead = flops["gflop_per_lead"] / bench.cal[mname]["cpu_gflops"]
    volumes = Volumes(grid.shape, a.seed, C)
    cuda_ort = torch.cuda.is_available() and "CUDAExecutionProvider" in ort.get_available_providers()
    engine_dir, skip = None, ""
    want_program = any(rt in a.runtimes for rt, _ in ENGINE_ROWS)       # one export serves both kinds of row
    if want_program or "onnxruntime" in a.runtimes and (cuda_ort or not a.budget_s or per_lead <= a.budget_s):
        engine_dir, skip = _export(model, grid, root / f"{gname}-{mname}", info, want_program)
    export_skip = skip
    cpu_eager = torch_runner(model, "cpu")
    bench.record(base, "torch", "cpu", lambda: cpu_eager, volumes, "", per_lead)  # before ORT's threads exist
    ort_cpu, skip = _load(engine_dir, "cpu", a.threads, skip)
    ort_run: Runner | None = (lambda v, lead: ort_cpu.run_video(v, lead)) if ort_cpu else None
    bench.record(base, "onnxruntime", "cpu", (lambda: ort_run) if ort_run else None, volumes, skip, per_lead)
    if ort_run and (not a.budget_s or 2 * per_lead <= a.budget_s):
        bench.parity(info, "onnxruntime_cpu_vs_torch_cpu", ort_run, cpu_eager, volumes, VIDEO_PARITY_TOLERANCE)
    if ort_cpu:
        ort_cpu.close()
    engine_rows(bench, base, grid, volumes, engine_dir, export_skip, per_lead)
    if torch.cuda.is_available():
        bench_cuda(bench, base, info, model, volumes, engine_dir, skip, cuda_ort)
    else:
        for rt in ("torch", "torch-bf16", "torch-bf16-graph", "torch-bf16-graph-cl", "onnxruntime", "tensorrt"):
            bench.record(base, rt, "cuda", None, None, "torch.cuda is not available on this machine")


def engine_rows(bench: Bench, base: dict, grid: Grid, volumes: Volumes, engine_dir: Path | None, skip: str,
                per_lead: float) -> None:
    """The loop's path: the exported torch program served by load_engine(runtime="torch") on the CPU
    and on CUDA (fp32, and bf16 autocast), predicted frames reduced to traces where they run."""
    rows = [(rt, dev) for rt, dev in ENGINE_ROWS if rt in bench.args.runtimes]
    if not rows:
        return
    if not skip and (engine_dir is None or not (engine_dir / TORCH_FILE).is_file()):
        skip = "torch.export could not capture the model (no torch program in the engine)"
    reducer = None if skip else make_reducer(grid, bench.args.seed)
    for rt, dev in rows:
        why = skip or ("" if dev == "cpu" or torch.cuda.is_available() else "torch.cuda is not available")
        make = None if why or engine_dir is None or reducer is None else \
            _engine_runner(engine_dir, dev, rt.endswith("bf16"), reducer, bench.args.threads)
        bench.record(base, rt, dev, make, volumes, why, per_lead if dev == "cpu" else 0.0)


def _engine_runner(d: Path, device: str, bf16: bool, reducer: VolumeReducer,
                   threads: int) -> Callable[[], Runner]:
    """A maker of the runner; the engine is loaded once, on first use."""
    cache: dict[str, Any] = {}

    def make() -> Runner:
        if "engine" not in cache:
            cache["engine"] = load_engine(d, "torch", threads, device, precision="bf16" if bf16 else "fp32")
        eng = cache["engine"]
        return lambda v, lead: eng.run_video_traces(v, lead, reducer)           # (b, N) traces
    return make


def _export(model: VideoUNet, grid: Grid, root: Path, info: dict, program: bool) -> tuple[Path | None, str]:
    t = time.perf_counter()
    try:
        d = export_dir(model, grid.shape, grid.neurons, root, program)
        info["export"] = {"ok": True, "seconds": round(time.perf_counter() - t, 2),
                          "onnx_mb": round((d / ONNX_FILE).stat().st_size / 2**20, 2)}
        return d, ""
    except Exception as exc:
        info["export"] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        return None, f"export failed: {type(exc).__name__}: {str(exc)[:300]}"


def _load(engine_dir: Path | None, device: str, threads: int, skip: str) -> tuple[Any, str]:
    """load_engine(runtime="onnxruntime") on `device`, or None and why not."""
    if engine_dir is None:
        return None, skip or "not exported (no onnxruntime row needs it, or over budget)"
    try:
        return load_engine(engine_dir, "onnxruntime", threads, device), ""
    except Exception as exc:
        return None, f"load failed: {type(exc).__name__}: {exc}"


def bench_cuda(bench: Bench, base: dict, info: dict, model: VideoUNet, volumes: Volumes,
               engine_dir: Path | None, skip: str, cuda_ort: bool) -> None:
    """torch fp32 / bf16 / bf16 + CUDA graphs and ONNX Runtime CUDA; parity against torch fp32 CUDA."""
    _cuda_rows(bench, base, info, model, volumes, engine_dir, skip, cuda_ort)
    torch.cuda.empty_cache()   # the GPU copy of the model went with _cuda_rows' locals


def _cuda_rows(bench: Bench, base: dict, info: dict, model: VideoUNet, volumes: Volumes,
               engine_dir: Path | None, skip: str, cuda_ort: bool) -> None:
    torch.backends.cudnn.benchmark = True                                   # static shapes: pick the best algos
    gpu = copy.deepcopy(model).to("cuda")
    ref = torch_runner(gpu, "cuda")
    makers: dict[str, Callable[[], Runner]] = {
        "torch": lambda: ref, "torch-bf16": lambda: torch_runner(gpu, "cuda", bf16=True),
        "torch-bf16-graph": lambda: GraphRunner(gpu, tuple(base["input_shape"])),
        "torch-bf16-graph-cl": lambda: GraphRunner(gpu, tuple(base["input_shape"]), channels_last=True)}
    bench.peak_tflops = bench.peak_tflops or round(bf16_matmul_tflops(), 1)
    info["cuda_floor_ms_per_lead"] = {"bf16_matmul_tflops": bench.peak_tflops,
                                      "ms": round(base["gflop_per_lead"] / bench.peak_tflops, 2)}
    print(f"  GPU floor: {base['gflop_per_lead']:,.0f} GFLOP per lead at {bench.peak_tflops} TFLOP/s "
          f"(bf16 matmul) = {info['cuda_floor_ms_per_lead']['ms']} ms")
    for rt, make in makers.items():
        bench.record(base, rt, "cuda", make, volumes)
        if rt != "torch" and rt in bench.args.runtimes:
            bench.parity(info, f"{rt}_cuda_vs_torch_cuda", make(), ref, volumes, None)
            torch.cuda.empty_cache()
    eng, skip = _load(engine_dir, "cuda", bench.args.threads, skip) if cuda_ort else \
        (None, "onnxruntime has no CUDAExecutionProvider (install onnxruntime-gpu)")
    if eng:
        run: Runner = eng.run_video
        bench.record(base, "onnxruntime", "cuda", lambda: run, volumes)
        if "onnxruntime" in bench.args.runtimes:
            bench.parity(info, "onnxruntime_cuda_vs_torch_cuda", run, ref, volumes, None)
        eng.close()
    else:
        bench.record(base, "onnxruntime", "cuda", None, None, skip)
    bench.record(base, "tensorrt", "cuda", None, None, "the TensorRT runtime serves trace engines only "
                 "(realtime/engines/tensorrt.py); video engines run on ONNX Runtime or torch")


def print_row(r: dict) -> None:
    head = f"{r['grid']:<13}{r['model']:<7}{r['runtime']:<21}{r['device']:<6}{r['leads']:>6}"
    if r["status"] == "ok":
        verdict = f"{'yes' if r['meets_target'] else 'no'} (< {r['target_ms']:g})"
        print(f"{head}{r['p50_ms']:>11.2f}{r['p99_ms']:>11.2f}{r['n']:>5}  {verdict}")
    else:
        print(f"{head}{'-':>11}{'-':>11}{'-':>5}  {r['status']}: {r['reason'].splitlines()[0][:90]}")


def print_table(rows: list[dict]) -> None:
    print(f"\n{'grid':<13}{'model':<7}{'runtime':<21}{'dev':<6}{'leads':>6}{'p50 ms':>11}{'p99 ms':>11}{'n':>5}"
          f"  target met (ms)")
    for r in rows:
        print_row(r)


def parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--grids", default=",".join(GRIDS), help=f"comma list of {list(GRIDS)}")
    ap.add_argument("--models", default="", help="comma list of small, paper (default both; --quick: small)")
    ap.add_argument("--runtimes", default=",".join(RUNTIMES), help=f"comma list of {list(RUNTIMES)}")
    ap.add_argument("--frames", type=int, default=20, help="timed frames per row")
    ap.add_argument("--warmup", type=int, default=2, help="untimed frames before them")
    ap.add_argument("--lead-batch", type=int, default=8, help="lead times per call for the all-leads row")
    ap.add_argument("--budget-s", type=float, default=60.0, help="seconds of timed frames per row (0: no limit)")
    ap.add_argument("--threads", type=int, default=2, help="intra-op threads for ONNX Runtime and torch (CPU)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--devices", type=parse_devices, default="cpu,cuda",
                    help="device kinds whose rows are timed: cpu, cuda or cpu,cuda")
    ap.add_argument("--quick", action="store_true", help="smoke run: 16x12x8 grid, 3 frames, no file")
    ap.add_argument("--name", default="", help="result name (default video-latency; --quick writes none)")
    args = ap.parse_args()
    args.models = [m for m in (args.models or ("small" if args.quick else "small,paper")).split(",") if m]
    args.runtimes = set(filter(None, args.runtimes.split(",")))
    if args.quick:
        args.grids, args.frames, args.warmup = QUICK_GRID, 3, 1
    else:
        args.grids = {g: GRIDS[g] for g in filter(None, args.grids.split(","))}
    return args


def main() -> int:
    args = parse()
    name = args.name or ("" if args.quick else "video-latency")
    torch.set_num_threads(args.threads)
    bench, t0 = Bench(args), time.monotonic()
    print(f"grids {list(args.grids)}, models {args.models}, C={C}, H={H}, lead batch {args.lead_batch}, "
          f"{args.frames} frames (+{args.warmup} warm-up), budget {args.budget_s:g} s/row, {args.threads} threads, "
          f"cuda: {torch.cuda.is_available()}")

    def save(done: bool) -> Path | None:
        if not name:
            return None
        payload = {k: v for k, v in vars(args).items() if k not in ("grids", "runtimes", "quick", "name", "devices")}
        return write_result(name, {"description": DESCRIPTION, "complete": done, "context": C, "horizon": H,
                                   "grids": {g: dataclasses.asdict(v) for g, v in args.grids.items()},
                                   "runtimes": sorted(args.runtimes), "devices": sorted(args.devices), **payload,
                                   "cuda_available": torch.cuda.is_available(), "rows": bench.rows,
                                   "configs": bench.configs, "wall_s": round(time.monotonic() - t0, 1)})

    bench.on_row = lambda: save(False)                                    # a killed run keeps its rows
    with tempfile.TemporaryDirectory(prefix="video-latency-") as root:
        for gname, grid in args.grids.items():
            for mname in args.models:
                print(f"\n{gname} {grid.shape} {mname}")
                try:
                    bench_pair(bench, gname, grid, mname, Path(root))
                except Exception as exc:  # a configuration that cannot even be built: record and go on
                    traceback.print_exc()
                    bench.configs.append({"grid": gname, "model": mname, "error": f"{type(exc).__name__}: {exc}",
                                          "parity": {}})
                save(False)                                               # partial results survive a kill
            bench.reduce_rows(gname, grid)
    print_table(bench.rows)
    bad = [(c["grid"], c["model"], k) for c in bench.configs for k, p in c["parity"].items() if p.get("ok") is False]
    print(f"\nparity (ORT vs torch CPU, tolerance {VIDEO_PARITY_TOLERANCE:g}): {'FAILED ' + str(bad) if bad else 'ok'}")
    path = save(True)
    print("quick run: no result written (pass --name to keep one)" if path is None else f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
