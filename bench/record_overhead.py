"""What the experiment record costs the closed loop: forecast and trigger latency with the record on
(the pipeline's session store and the controller's audit log) and off, in alternating runs of the loop
bench's setup (bench/loop_latency.py: live simulated fish -> pipeline -> controller -> MQTT broker in one
process, the policy firing on every forecast so every frame is a trigger).

Runs off, on, off, on, ... (--runs pairs), each --frames frames at --speed x the rig's frame rate,
drops the first --warmup frames of each, and reports p50/p99/max per run and the medians of the runs'
p99 per mode, with the record's disk size per hour at the rig's frame period.

    .venv/bin/python bench/record_overhead.py [--runs 3] [--frames 600] [--speed 10]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from loopcast.app import setup_logging
from loopcast.broker import free_port, start_broker
from loopcast.config import to_dict
from loopcast.inprocess import run_loop
from loopcast.settings import load_settings, new_run_dir
from loopcast.workflows import ensure_engine, ensure_recording

from common import quantiles, write_result

STAGES = {"forecast": "run", "trigger": "controller"}


def loop_overrides(broker_port: int, frames: int, speed: float) -> list[str]:
    return [f"mqtt.port={broker_port}", f'endpoints.frames="tcp://127.0.0.1:{free_port()}"',
            f'endpoints.forecasts="tcp://127.0.0.1:{free_port()}"', f"sim.n_frames={frames}", f"sim.speed={speed}",
            "pipeline.forecast.wait_subscribers=2", f"pipeline.max_frames={frames}",
            'controller.policy.mode="above"', "controller.policy.level=-1.0",
            "controller.interlocks.min_interval_s=0.0", "controller.interlocks.max_per_minute=1000000",
            "controller.interlocks.max_forecast_age_s=5.0", 'rig.name="bench"']


def one_run(base: list[str], record: bool, work: Path, args: argparse.Namespace, port: int) -> dict[str, Any]:
    flag = str(record).lower()
    cfg = load_settings(overrides=[*base, *loop_overrides(port, args.frames, args.speed),
                                   f"pipeline.record.enabled={flag}", f"controller.audit.enabled={flag}"])
    run_dir = work / f"run-{time.time_ns()}"
    run_dir.mkdir()
    t0 = time.monotonic()
    res = run_loop(cfg, timeout_s=args.frames * cfg.rig.frame_period_s / args.speed + 120, run_dir=run_dir)
    out: dict[str, Any] = {"record": record, "wall_s": time.monotonic() - t0, "triggers": len(res.triggers),
                           "forecasts": res.pipeline.forecasts}
    for stage, proc in STAGES.items():
        samples = res.metrics[proc].latency(stage).samples()
        out[stage] = quantiles(samples[args.warmup:])
    files = [f for f in run_dir.rglob("*") if f.is_file()]
    out["record_bytes"] = {"session": sum(f.stat().st_size for f in files if "session.zarr" in f.parts),
                           "audit": sum(f.stat().st_size for f in files if f.name.endswith(".audit.jsonl"))}
    out["record_mb_per_hour"] = {k: v / args.frames * 3600 / cfg.rig.frame_period_s / 1e6
                                 for k, v in out["record_bytes"].items()}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3, help="pairs of runs (off, on)")
    ap.add_argument("--frames", type=int, default=600)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--speed", type=float, default=10.0)
    ap.add_argument("--broker", choices=("auto", "mosquitto", "embedded"), default="auto")
    args = ap.parse_args()
    setup_logging()
    work = Path(tempfile.mkdtemp(prefix="loopcast-bench-"))
    base = [f'paths.recording="{work}/rec"', f'paths.engines="{work}/engines"', f'paths.runs="{work}/runs"']
    cfg = load_settings(overrides=base)
    ensure_recording(cfg, progress=False)
    ensure_engine(cfg, new_run_dir(cfg, "train"), progress=False)
    runs = []
    with start_broker(args.broker) as broker:
        for i in range(2 * args.runs):
            runs.append(one_run(base, record=bool(i % 2), work=work, args=args, port=broker.port))
        kind = broker.kind
    summary = _summary(runs)
    _print(runs, summary, cfg, args, kind)
    path = write_result("record-overhead", {
        "description": f"closed loop, {cfg.synth.fish.n_neurons} neurons, {args.frames} frames at {args.speed:g}x, "
                       f"record on vs off, broker {kind}", "runs": runs, "summary": summary,
        "config": to_dict(load_settings(overrides=base))})
    print(f"\nwrote {path}")
    return 0


def _summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for stage in STAGES:
        med = {mode: statistics.median(r[stage]["p99_ms"] for r in runs if r["record"] == on)
               for mode, on in (("off", False), ("on", True))}
        spread = {mode: [round(r[stage]["p99_ms"], 3) for r in runs if r["record"] == on]
                  for mode, on in (("off", False), ("on", True))}
        out[stage] = {"median_p99_ms": med, "p99_ms_per_run": spread, "added_p99_ms": med["on"] - med["off"]}
    return out


def _print(runs: list[dict[str, Any]], summary: dict[str, Any], cfg: Any, args: argparse.Namespace,
           kind: str) -> None:
    print(f"\nexperiment record on vs off: {cfg.synth.fish.n_neurons} neurons, {args.frames} frames at "
          f"{args.speed:g}x, broker {kind} (first {args.warmup} frames of each run dropped)")
    print(f"{'run':<5}{'record':<8}" + "".join(f"{s + ' p50/p99/max ms':>32}" for s in STAGES) + f"{'MB/hour':>12}")
    for i, r in enumerate(runs):
        cells = "".join(f"{r[s]['p50_ms']:>12.2f}{r[s]['p99_ms']:>10.2f}{r[s]['max_ms']:>10.2f}" for s in STAGES)
        print(f"{i:<5}{'on' if r['record'] else 'off':<8}{cells}{sum(r['record_mb_per_hour'].values()):>12.1f}")
    for stage, s in summary.items():
        m = s["median_p99_ms"]
        print(f"{stage}: median p99 off {m['off']:.3f} ms, on {m['on']:.3f} ms, added {s['added_p99_ms']:+.3f} ms")


if __name__ == "__main__":
    sys.exit(main())
