"""Several engines in one pipeline at ZAPBench scale (71,721 neurons): does the main forecaster keep its
latency when the SBM and QuantFormer are served beside it?

The real `Pipeline` (ingest, preprocessing: traces, causal dF/F, streaming OASIS; the stages, hot swap
off) runs in this process on its own thread, fed at the rig's frame period (0.9141 s) by a paced source:
each frame's `t_src_ns` is the time it was due, so a pipeline that falls behind shows it in its latency;
when more than `rcvhwm` frames are due, the oldest are lost (counted), as with the live subscriber.
Frames are synthetic: a small volume (--shape, default 256 x 256 x 8 = 524,288 voxels) whose
segmentation has 71,721 labels (~5 voxels per neuron; every voxel of the volume belongs to one), each
label's voxels at its neuron's fluorescence (dF/F-like traces with calcium transients), plus the 26
stimulus covariates. Preprocessing therefore costs what it costs per neuron (dF/F, OASIS, context
rows), not the full 2048 x 1328 x 72 volume's trace pass (docs/preprocessing.md times that).

Engines (seeded random weights; latency does not depend on them), exported to a temporary registry:
nlinear C=4 H=8 (the main forecaster), the SBM next step and the QuantFormer activation engine in the
small CPU configs of bench/sbm_quantformer_latency.py. Phases, in one run, each a fresh pipeline:

  alone      nlinear only
  parallel   nlinear + SBM + QuantFormer, `also_schedule = "newest"`, `also_nice` (--nice)
  nice0      the same with also_nice = 0 (does the lower priority help?)
  serial     the same with `also_schedule = "serial"` (the previous behaviour: one after the other)

A phase takes options after its name: nice, numba (threads), switch (the GIL's switch interval, s),
schedule, idle (1: SCHED_IDLE) and workers ("processes": the `also` engines each in a child process,
pipeline.forecast.also_workers), e.g. `--phases alone,parallel:workers=processes`. Process CPU counts
those children too.

Each phase: `--warmup` untimed frames (OASIS warm-up shortened to 20 frames so the SBM, which reads
spike probabilities, starts early; QuantFormer needs 16 frames of context), then `--frames` timed ones
(default 200: enough for a p99). Per stage: p50/p99/max latency from the frame's t_src to the message on
the wire, frames published and skipped. Prints the table, the load average (other users of the CPU
change the numbers: rerun when `uptime` is low) and writes bench/results/parallel-stages-<date>-<host>.json.

    .venv/bin/python bench/parallel_stages.py [--frames 200] [--phases alone,parallel,nice0,serial]
    .venv/bin/python bench/parallel_stages.py --quick     # N = 5000, 20 frames, period 0.2 s, no file
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from procstat import cpu_seconds
from sbm_quantformer_latency import K, export, quantformer_case, sbm_case

from loopcast import app, cpu
from loopcast.models.zoo import MODELS, model_config
from loopcast.offline_training.export.engine import export_engine
from loopcast.offline_training.trace.train import TrainConfig
from loopcast.realtime.engines.base import Engine
from loopcast.realtime.forecast.stage import also_loader, engine_loader
from loopcast.realtime.metrics import Metrics, MetricsConfig
from loopcast.realtime.pipeline import Pipeline
from loopcast.realtime.wire.codec import FrameHeader, encode_frame
from loopcast.realtime.wire.transport import Publisher
from loopcast.settings import LoopcastConfig, load_settings

from common import quantiles, write_result
from trace_windows import Windows, dff_recording, parity_window, stimulus_recording

ZAPBENCH_NEURONS = 71_721
PERIOD_S = 0.9141
PHASES = ("alone", "parallel", "nice0", "serial")


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return f"load average: {load()}"


# ---------------------------------------------------------------- engines

ENTRIES = {"nlinear": "nlinear-c4-h8", "sbm": "sbm-c6-h1", "quantformer": "quantformer-c16-h8"}


def build_engines(n: int, seed: int, registry: str, dff: np.ndarray, probs: np.ndarray,
                  stim: np.ndarray) -> dict[str, Path]:
    """Export nlinear C=4 H=8, the SBM next step and QuantFormer's activation engine at N neurons (or reuse
    those of an earlier run in `registry`, when all three are there for this N)."""
    import torch
    out: dict[str, Path] = {}
    found = {k: sorted((Path(registry) / e).glob("v0*")) for k, e in ENTRIES.items()}
    if all(found.values()):
        out = {k: v[-1] for k, v in found.items()}
        if all(f'"n_neurons": {n},' in (p / "manifest.json").read_text() for p in out.values()):
            print(f"engines reused from {registry}")
            return out
        out = {}
    t0 = time.monotonic()
    torch.manual_seed(seed)
    train = TrainConfig(model="nlinear", context=4, horizon=8, seed=seed)
    model = MODELS["nlinear"][1](model_config("nlinear", {"context": 4, "horizon": 8})).eval()
    out["nlinear"] = export_engine(model, train, registry, n, metrics={}, data_fingerprint=f"random-weights-seed{seed}",
                                   data_source="bench/parallel_stages.py (seeded random weights)",
                                   parity_input=parity_window(Windows(dff, None, 4, 8)))
    for name, case, signal in (("sbm", sbm_case(n, 1, False, seed), probs),
                               ("quantformer", quantformer_case(n, False, seed), dff)):
        windows = Windows(signal, stim, case.export.context, case.export.horizon)
        out[name] = export(case.build(seed), case, n, windows, registry)
    print(f"engines exported in {time.monotonic() - t0:.0f} s: {', '.join(p.parent.name for p in out.values())}")
    return out


# ---------------------------------------------------------------- frames

def segmentation(shape: tuple[int, ...], n: int, seed: int) -> np.ndarray:
    """Every voxel belongs to one of n labels (1..n), ~size/n voxels each, scattered like somata are not,
    but with the same neuron count and voxel count per frame."""
    size = int(np.prod(shape))
    if size < n:
        raise SystemExit(f"--shape {shape} has {size} voxels, fewer than the {n} neurons")
    labels = (np.arange(size) % n + 1).astype(np.uint32)
    np.random.default_rng(seed).shuffle(labels)
    return labels.reshape(shape, order="F")


class PacedSource:
    """Frames due every `period` s from the phase's start; `t_src_ns` = when each was due. Hands over what
    is due (at most `rcvhwm`, the newest; older ones are lost, like a full subscriber queue)."""

    def __init__(self, volumes: list[np.ndarray], stim: np.ndarray, rig: str, period: float, rcvhwm: int) -> None:
        self.volumes, self.stim, self.rig, self.period, self.rcvhwm = volumes, stim, rig, period, rcvhwm
        self.seq, self.lost = 0, 0
        self.t0, self.wall0_ns = 0.0, 0          # the first call starts the clock

    def _start(self) -> None:
        self.t0, self.wall0_ns = time.monotonic(), time.time_ns()

    @property
    def finished(self) -> bool:
        return self.seq >= len(self.volumes)

    def recv_all(self, timeout_ms: int, limit: int = 64) -> list[Sequence[Any]]:
        if not self.t0:
            self._start()
        wait = self.t0 + self.seq * self.period - time.monotonic()
        if wait > 0:
            time.sleep(min(wait, timeout_ms / 1000))
        now = time.monotonic()
        due = min(len(self.volumes), int((now - self.t0) / self.period) + 1)
        if self.finished or due <= self.seq:
            return []
        first = max(self.seq, due - min(self.rcvhwm, limit))
        self.lost += first - self.seq
        out: list[Sequence[Any]] = [self.message(s) for s in range(first, due)]
        self.seq = due
        return out

    def message(self, seq: int) -> list[Any]:
        vol = self.volumes[seq]
        header = FrameHeader(seq, self.wall0_ns + int(seq * self.period * 1e9), tuple(vol.shape), str(vol.dtype),
                             order="F", rig=self.rig, stimulus=tuple(float(v) for v in self.stim[seq]))
        return encode_frame(header, vol)

    def close(self) -> None:
        pass


def volumes(seg: np.ndarray, dff: np.ndarray) -> list[np.ndarray]:
    """One uint16 F-order volume per frame: each voxel at its neuron's fluorescence 200 * (1 + dF/F)."""
    flat = seg.reshape(-1, order="F") - 1
    out = []
    for row in dff:
        f = np.clip(200.0 * (1.0 + row), 0, 65535).astype(np.uint16)
        out.append(np.asfortranarray(f[flat].reshape(seg.shape, order="F")))
    return out


# ---------------------------------------------------------------- phases

@dataclasses.dataclass
class Phase:
    name: str
    engines: tuple[str, ...]
    schedule: str = "newest"
    nice: int = 10
    numba: int = -1            # numba threads of the loop's thread (-1: --numba-threads)
    switch: float = 0.0        # sys.setswitchinterval for the phase (0: Python's 0.005 s)
    idle: int = 0              # 1: the `also` threads under SCHED_IDLE (pipeline.forecast.also_idle)
    workers: str = "threads"   # "processes": the `also` engines in child processes (pipeline.forecast.also_workers)


def cpu_s(pids: list[int]) -> float:
    """CPU seconds (user + system) of these processes so far (the engines' children)."""
    return sum(cpu_seconds(pid) for pid in pids)


def make_phase(token: str, args: argparse.Namespace) -> Phase:
    """'parallel' or a variant 'parallel:nice=19:numba=1:switch=0.05' (the token names the phase)."""
    base, *opts = token.split(":")
    all3 = ("nlinear", "sbm", "quantformer")
    presets = {"alone": Phase(token, ("nlinear",)), "parallel": Phase(token, all3, nice=args.nice),
               "nice0": Phase(token, all3, nice=0), "serial": Phase(token, all3, schedule="serial")}
    if base not in presets:
        raise SystemExit(f"--phases: unknown {base!r} (known: {list(PHASES)})")
    phase = presets[base]
    for opt in opts:
        key, _, value = opt.partition("=")
        if key not in ("nice", "numba", "switch", "schedule", "idle", "workers"):
            raise SystemExit(f"--phases {token}: unknown option {key!r}")
        kind = type(getattr(phase, key))
        phase = dataclasses.replace(phase, **{key: kind(value)})
    return phase


def phase_config(args: argparse.Namespace, phase: Phase, shape: tuple[int, ...]) -> LoopcastConfig:
    return load_settings(overrides=[
        f"rig.shape={list(shape)}", f"rig.n_covariates={K}", f"rig.frame_period_s={args.period}",
        f"pipeline.preprocess.spikes.oasis.warmup={args.oasis_warmup}",
        f'pipeline.forecast.also_schedule="{phase.schedule}"', f"pipeline.forecast.also_nice={phase.nice}",
        f"pipeline.forecast.also_idle={'true' if phase.idle else 'false'}",
        f'pipeline.forecast.also_workers="{phase.workers}"',
        f"runtime.onnxruntime_threads={args.onnx_threads}", f"runtime.numba_threads={args.numba_threads}",
        "pipeline.forecast.watch=false"])


def run_phase(args: argparse.Namespace, phase: Phase, engines: dict[str, Engine], seg: np.ndarray,
              vols: list[np.ndarray], stim: np.ndarray) -> dict[str, Any]:
    cfg = phase_config(args, phase, tuple(seg.shape))
    numba_threads = cpu.numba_threads(args.numba_threads if phase.numba < 0 else phase.numba)
    switch = sys.getswitchinterval()
    sys.setswitchinterval(phase.switch or 0.005)
    metrics = Metrics("run", MetricsConfig(enabled=False))
    publisher = Publisher("tcp://127.0.0.1:*", sndhwm=cfg.pipeline.forecast.sndhwm)
    fc = cfg.pipeline.forecast
    served = [also_loader(fc)(engines[e].manifest.engine_dir) if i and phase.workers == "processes"
              else engines[e] for i, e in enumerate(phase.engines)]
    stages = [app.forecast_stage(engine, publisher, metrics, seg, fc, Path(e), engine_loader(fc))
              for engine, e in zip(served, phase.engines)]
    children = [pid for engine in served if (pid := getattr(engine, "pid", None))]
    for stage in stages:
        stage.warm_up(args.neurons)
    source = PacedSource(vols, stim, cfg.rig.name, args.period, cfg.pipeline.source.rcvhwm)
    pipe = Pipeline(cfg.pipeline, cfg.rig, source, seg, stages, metrics)
    labels = dict(pipe.report.latency)
    marks: dict[str, Any] = {}

    def mark() -> None:      # counts at the first timed frame: what came before is warm-up
        marks.update(samples={lab: metrics.latency(lab).samples().size for lab in (*labels.values(), "preprocess",
                                                                                  "ingest")},
                     skipped=dict(pipe.report.skipped), seq=source.seq, cpu=time.process_time() + cpu_s(children),
                     wall=time.perf_counter(), lost=source.lost)

    print(f"\n{phase.name}: {' + '.join(phase.engines)} (also_schedule {phase.schedule}, nice {phase.nice}, "
          f"also_workers {phase.workers}); "
          f"load {load()}", flush=True)
    load_before = os.getloadavg()
    orig_recv = source.recv_all

    def recv_all(timeout_ms: int, limit: int = 64) -> list[Sequence[Any]]:
        if not marks and source.seq >= args.warmup:
            mark()
        return orig_recv(timeout_ms, limit)
    source.recv_all = recv_all  # type: ignore[method-assign]
    try:
        report = pipe.run()
        cpu_end = time.process_time() + cpu_s(children)         # before close ends the children
    finally:
        pipe.close()
        sys.setswitchinterval(switch)
    cores = (cpu_end - marks["cpu"]) / max(time.perf_counter() - marks["wall"], 1e-9)
    timed = len(vols) - marks["seq"]
    rows: dict[str, Any] = {}
    for lab in ("ingest", "preprocess"):
        rows[lab] = quantiles(metrics.latency(lab).samples()[marks["samples"][lab]:])
    for name, lab in labels.items():
        q = quantiles(metrics.latency(lab).samples()[marks["samples"][lab]:])
        skipped = report.skipped.get(name, 0) - marks["skipped"].get(name, 0)
        rows[name] = {**q, "published": q["n"], "skipped": skipped, "failures": report.failures.get(name, 0)}
    return {"phase": dataclasses.asdict(phase), "numba_threads": numba_threads, "timed_frames": timed,
            "warmup_frames": marks["seq"],
            "frames": report.frames, "lost_at_source": source.lost,
            "forecast_skipped_backlog": metrics.count("loopcast_frames_dropped_total", reason="forecast_skipped"),
            "process_cpu_per_wall": round(cores, 2), "loadavg_before": [round(x, 2) for x in load_before],
            "loadavg_after": [round(x, 2) for x in os.getloadavg()], "stages": rows, "latency_labels": labels}


def print_phase(res: dict[str, Any]) -> None:
    print(f"  {'stage':<26}{'p50 ms':>9}{'p99 ms':>9}{'max ms':>9}{'published':>11}{'skipped':>9}")
    for name, q in res["stages"].items():
        if not q.get("n"):
            print(f"  {name:<26}{'-':>9}{'-':>9}{'-':>9}{q.get('published', 0):>11}{q.get('skipped', ''):>9}")
            continue
        extra = f"{q['published']:>11}{q['skipped']:>9}" if "published" in q else ""
        print(f"  {name:<26}{q['p50_ms']:9.1f}{q['p99_ms']:9.1f}{q['max_ms']:9.1f}{extra}")
    print(f"  timed frames {res['timed_frames']}, lost at the source {res['lost_at_source']}, process CPU "
          f"{res['process_cpu_per_wall']} cores, load {res['loadavg_before']} -> {res['loadavg_after']}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--neurons", type=int, default=ZAPBENCH_NEURONS)
    ap.add_argument("--shape", default="256,256,8", help="volume x,y,z (voxels >= neurons)")
    ap.add_argument("--frames", type=int, default=200, help="timed frames per phase (200: enough for a p99)")
    ap.add_argument("--warmup", type=int, default=30, help="untimed frames first (OASIS 20 + SBM context 6)")
    ap.add_argument("--oasis-warmup", type=int, default=20)
    ap.add_argument("--period", type=float, default=PERIOD_S)
    ap.add_argument("--phases", default="alone,parallel", help=f"comma list of {list(PHASES)}, each optionally "
                    "with options, e.g. parallel:nice=19:numba=1:switch=0.05")
    ap.add_argument("--nice", type=int, default=10, help="also_nice of the parallel phase")
    ap.add_argument("--onnx-threads", type=int, default=1, help="[runtime] onnxruntime_threads")
    ap.add_argument("--numba-threads", type=int, default=0, help="[runtime] numba_threads (0 = one per CPU)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="N = 5000, 20 frames, period 0.2 s, no result file")
    ap.add_argument("--name", default="parallel-stages")
    ap.add_argument("--registry", default="", help="export the engines here and reuse them on later runs "
                    "(default: a temporary directory)")
    args = ap.parse_args()
    if args.quick:
        args.neurons, args.frames, args.period, args.shape = 5000, 20, 0.2, "64,64,4"
    phases = [p for p in args.phases.split(",") if p]
    shape = tuple(int(s) for s in args.shape.split(","))
    n, t0 = args.neurons, time.monotonic()
    total = args.warmup + args.frames
    print(f"{uptime()}\n{n} neurons, volume {shape}, {total} frames per phase ({args.warmup} warm-up) every "
          f"{args.period} s, phases {phases}", flush=True)
    dff = dff_recording(total + 24, n, args.seed + 1)
    probs = (-np.expm1(-np.clip(dff, 0.0, None) / 0.1)).astype(np.float32)
    stim = stimulus_recording(total + 24, K, args.seed + 2)
    seg = segmentation(shape, n, args.seed)
    vols = volumes(seg, dff[:total])
    cfg = phase_config(args, Phase("setup", ()), shape)
    applied = app.configure_process(cfg, "run")
    make = {token: make_phase(token, args) for token in phases}
    results = []
    with tempfile.TemporaryDirectory(prefix="parallel-stages-") as tmp:
        registry = args.registry or tmp
        paths = build_engines(n, args.seed, registry, dff, probs, stim)
        loader = engine_loader(cfg.pipeline.forecast)
        engines = {name: loader(p) for name, p in paths.items()}
        for name in phases:
            res = run_phase(args, make[name], engines, seg, vols, stim)
            print_phase(res)
            results.append(res)
    summary = compare(results)
    for line in summary["lines"]:
        print(line)
    print(uptime())
    if not args.quick:
        path = write_result(args.name, {
            "description": __doc__, "neurons": n, "shape": list(shape), "frames": args.frames,
            "warmup": args.warmup, "period_s": args.period, "oasis_warmup": args.oasis_warmup,
            "onnxruntime_threads": args.onnx_threads, "numba_threads": args.numba_threads, "cpu": applied,
            "uptime_end": uptime(), "phases": results, "summary": summary,
            "wall_s": round(time.monotonic() - t0, 1)})
        print(f"wrote {path}")
    return 0


def compare(results: list[dict[str, Any]]) -> dict[str, Any]:
    """nlinear's p99 in each phase against alone, and whether it published every timed frame."""
    main_stage = "forecast/nlinear"
    alone = None
    out: dict[str, Any] = {"lines": []}
    def solo(r: dict[str, Any]) -> bool:
        return list(r["phase"]["engines"]) == ["nlinear"]
    for r in results:          # each against the nearest "alone" phase before it (the first one for those before)
        if solo(r) or alone is None:
            alone = r if solo(r) else next((a for a in results if solo(a)), None)
        q = r["stages"].get(main_stage, {})
        every = q.get("published") == r["timed_frames"] and r["lost_at_source"] == 0
        row = {"p99_ms": q.get("p99_ms"), "every_frame": bool(every)}
        if alone is not None and q.get("p99_ms"):
            row["p99_vs_alone"] = round(q["p99_ms"] / alone["stages"][main_stage]["p99_ms"], 3)
        out[r["phase"]["name"]] = row
        out["lines"].append(f"{r['phase']['name']:<10} nlinear p99 {q.get('p99_ms', float('nan')):8.1f} ms"
                            + (f" ({row['p99_vs_alone']:.2f}x alone)" if "p99_vs_alone" in row else "")
                            + f", every frame published: {'yes' if every else 'NO'}")
    return out


if __name__ == "__main__":
    sys.exit(main())
