"""What the experiment record costs the closed loop: forecast and trigger latency with the controller's
audit log and the pipeline's session store each on and off, in interleaved runs of the closed loop with the
policy firing on every forecast (every frame a trigger). By default each run is `loopcast demo` (the fish,
the pipeline and the controller as separate processes, as on a rig, with Mosquitto); `--in-process` runs the
loop bench's setup instead (bench/loop_latency.py: everything in one process, sharing one GIL).

Modes: off (neither), audit (the audit log only: its cost on the trigger latency), record (the session store
only: its cost on the forecast latency), both. Rounds of one run per mode (--rounds), each --frames frames at
--speed x the rig's frame rate; the first --warmup frames of each run are dropped. Reports p50/p99/max per run,
the median of the runs' p99 per mode and its difference from "off", and the record's disk rate per hour at the
rig's frame period.

    .venv/bin/python bench/record_overhead.py [--rounds 3] [--frames 500] [--speed 10] [--in-process]
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from loop_fullscale import FIRE_ON_EVERY_FORECAST

from loopcast.app import setup_logging
from loopcast.broker import free_port, start_broker
from loopcast.config import to_dict
from loopcast.inprocess import run_loop
from loopcast.settings import load_settings, new_run_dir
from loopcast.workflows import ensure_engine, ensure_recording

from common import quantiles, write_result

STAGES = {"forecast": "run", "trigger": "controller"}
MODES = {"off": (False, False), "audit": (True, False), "record": (False, True), "both": (True, True)}  # audit, store


def loop_overrides(broker_port: int, frames: int, speed: float) -> list[str]:
    return [f"mqtt.port={broker_port}", f'endpoints.frames="tcp://127.0.0.1:{free_port()}"',
            f'endpoints.forecasts="tcp://127.0.0.1:{free_port()}"', f"sim.n_frames={frames}", f"sim.speed={speed}",
            "pipeline.forecast.wait_subscribers=2", f"pipeline.max_frames={frames}", *FIRE_ON_EVERY_FORECAST]


def one_run(base: list[str], mode: str, work: Path, args: argparse.Namespace, port: int) -> dict[str, Any]:
    audit, store = (str(x).lower() for x in MODES[mode])
    flags = [f"pipeline.record.enabled={store}", f"controller.audit.enabled={audit}"]
    cfg = load_settings(overrides=[*base, *loop_overrides(port, args.frames, args.speed), *flags])
    run_dir = work / f"run-{time.time_ns()}"
    run_dir.mkdir()
    t0 = time.monotonic()
    if args.in_process:
        res = run_loop(cfg, timeout_s=args.frames * cfg.rig.frame_period_s / args.speed + 120, run_dir=run_dir)
        samples = {stage: res.metrics[proc].latency(stage).samples() for stage, proc in STAGES.items()}
    else:
        samples = demo_run(base, flags, run_dir, args)
    out: dict[str, Any] = {"mode": mode, "wall_s": time.monotonic() - t0}
    for stage in STAGES:
        out[stage] = quantiles(samples[stage][args.warmup:])
    files = [f for f in run_dir.rglob("*") if f.is_file()]
    out["record_bytes"] = {"session": sum(f.stat().st_size for f in files if "session.zarr" in f.parts),
                           "audit": sum(f.stat().st_size for f in files if f.name.endswith(".audit.jsonl"))}
    out["record_mb_per_hour"] = {k: v / args.frames * 3600 / cfg.rig.frame_period_s / 1e6
                                 for k, v in out["record_bytes"].items()}
    return out


def demo_run(base: list[str], flags: list[str], run_dir: Path, args: argparse.Namespace) -> dict[str, np.ndarray]:
    """`loopcast demo` (separate processes, Mosquitto) on the bench's recording and engine; latency samples (s)."""
    sets = [*base, *flags, 'mqtt.broker="mosquitto"', "metrics.samples=true", f"demo.frames={args.frames}",
            f"demo.speed={args.speed}", "demo.fault_every=0", *FIRE_ON_EVERY_FORECAST]
    argv = [sys.executable, "-m", "loopcast.cli", "demo", "--run-dir", str(run_dir),
            *(a for s in sets for a in ("-s", s))]
    res = subprocess.run(argv, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"loopcast demo failed:\n{res.stdout[-2000:]}\n{res.stderr[-2000:]}")
    loaded = {**json.loads((run_dir / "run.latency.json").read_text()),
              **json.loads((run_dir / "controller.latency.json").read_text())}
    return {stage: np.asarray(loaded[stage]) for stage in STAGES}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3, help="rounds of one run per mode")
    ap.add_argument("--frames", type=int, default=500)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--speed", type=float, default=10.0)
    ap.add_argument("--broker", choices=("auto", "mosquitto", "embedded"), default="auto", help="--in-process")
    ap.add_argument("--in-process", action="store_true", help="everything in one process (bench/loop_latency.py)")
    args = ap.parse_args()
    setup_logging()
    work = Path(tempfile.mkdtemp(prefix="loopcast-bench-"))
    base = [f'paths.recording="{work}/rec"', f'paths.engines="{work}/engines"', f'paths.runs="{work}/runs"']
    cfg = load_settings(overrides=base)
    ensure_recording(cfg, progress=False)
    ensure_engine(cfg, new_run_dir(cfg, "train"), progress=False)
    runs = []
    with start_broker(args.broker) as broker:
        for _ in range(args.rounds):
            runs += [one_run(base, mode, work, args, broker.port) for mode in MODES]
        kind = broker.kind if args.in_process else "mosquitto"
    summary = _summary(runs)
    _print(runs, summary, cfg, args, kind)
    where = "one process" if args.in_process else "separate processes (loopcast demo)"
    path = write_result("record-overhead" + ("-inprocess" if args.in_process else ""), {
        "description": f"closed loop in {where}, {cfg.synth.fish.n_neurons} neurons, {args.frames} frames at "
                       f"{args.speed:g}x, audit log and session store on and off, broker {kind}",
        "runs": runs, "summary": summary,
        "config": to_dict(load_settings(overrides=base))})
    print(f"\nwrote {path}")
    return 0


def _summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for stage in STAGES:
        per_run = {m: [r[stage]["p99_ms"] for r in runs if r["mode"] == m] for m in MODES}
        med = {m: statistics.median(v) for m, v in per_run.items()}
        p50 = {m: statistics.median(r[stage]["p50_ms"] for r in runs if r["mode"] == m) for m in MODES}
        out[stage] = {"median_p99_ms": med, "median_p50_ms": p50, "p99_ms_per_run": per_run,
                      "added_p99_ms": {m: med[m] - med["off"] for m in MODES if m != "off"}}
    return out


def _print(runs: list[dict[str, Any]], summary: dict[str, Any], cfg: Any, args: argparse.Namespace,
           kind: str) -> None:
    print(f"\nexperiment record on and off: {cfg.synth.fish.n_neurons} neurons, {args.frames} frames at "
          f"{args.speed:g}x, broker {kind} (first {args.warmup} frames of each run dropped)")
    print(f"{'run':<5}{'mode':<8}" + "".join(f"{s + ' p50/p99/max ms':>32}" for s in STAGES) + f"{'MB/hour':>12}")
    for i, r in enumerate(runs):
        cells = "".join(f"{r[s]['p50_ms']:>12.2f}{r[s]['p99_ms']:>10.2f}{r[s]['max_ms']:>10.2f}" for s in STAGES)
        print(f"{i:<5}{r['mode']:<8}{cells}{sum(r['record_mb_per_hour'].values()):>12.1f}")
    for stage, s in summary.items():
        m = s["median_p99_ms"]
        print(f"{stage}: median p99 " + ", ".join(f"{k} {v:.3f} ms" for k, v in m.items()) + "; added over off: "
              + ", ".join(f"{k} {v:+.3f} ms" for k, v in s["added_p99_ms"].items()))


if __name__ == "__main__":
    sys.exit(main())
