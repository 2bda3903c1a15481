"""Closed-loop latency per stage, live simulated fish -> pipeline -> controller -> MQTT broker.

Runs the real parts in one process (loopcast.inprocess) for --frames frames, drops the first
--warmup frames, and reports p50/p99/max per stage as ARCHITECTURE.md defines them:
ingest/preprocess/forecast from the frame's source timestamp, trigger from forecast received to
PUBACK. The policy fires on every forecast and the interlocks are opened up, so every forecast
produces a trigger and the trigger stage is measured as often as the others.

    .venv/bin/python bench/loop_latency.py [--frames 1100] [--speed 10] [--broker auto]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from loopcast.app import setup_logging
from loopcast.broker import free_port, start_broker
from loopcast.config import to_dict
from loopcast.inprocess import run_loop
from loopcast.realtime.metrics import STAGES
from loopcast.settings import load_settings, new_run_dir
from loopcast.workflows import ensure_engine, ensure_recording

from common import print_table, quantiles, write_result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=1100)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--speed", type=float, default=10.0, help="x the rig's frame rate")
    ap.add_argument("--broker", choices=("auto", "mosquitto", "embedded"), default="auto")
    ap.add_argument("-s", "--set", action="append", default=[], help="config override")
    args = ap.parse_args()
    setup_logging()
    work = Path(tempfile.mkdtemp(prefix="loopcast-bench-"))
    base = [f'paths.recording="{work}/rec"', f'paths.engines="{work}/engines"', f'paths.runs="{work}/runs"',
            *args.set]
    cfg = load_settings(overrides=base)
    ensure_recording(cfg, progress=False)
    ensure_engine(cfg, new_run_dir(cfg, "train"), progress=False)
    with start_broker(args.broker) as broker:
        cfg = load_settings(overrides=[*base, f"mqtt.port={broker.port}",
                                       f'endpoints.frames="tcp://127.0.0.1:{free_port()}"',
                                       f'endpoints.forecasts="tcp://127.0.0.1:{free_port()}"',
                                       f"sim.n_frames={args.frames}", f"sim.speed={args.speed}",
                                       "pipeline.forecast.wait_subscribers=2", f"pipeline.max_frames={args.frames}",
                                       'controller.policy.mode="above"', "controller.policy.level=-1.0",
                                       "controller.interlocks.min_interval_s=0.0",
                                       "controller.interlocks.max_per_minute=1000000",
                                       "controller.interlocks.max_forecast_age_s=5.0", 'rig.name="bench"'])
        t0 = time.monotonic()
        res = run_loop(cfg, timeout_s=args.frames * cfg.rig.frame_period_s / args.speed + 120)
        seconds = time.monotonic() - t0
        broker_kind = broker.kind
    rows = {}
    for stage in STAGES:
        proc = "controller" if stage == "trigger" else "run"
        samples = res.metrics[proc].latency(stage).samples()
        skip = args.warmup if stage != "trigger" else min(args.warmup, samples.size // 10)
        rows[stage] = quantiles(samples[skip:])
    title = (f"closed-loop latency: {cfg.synth.fish.n_neurons} neurons, {'x'.join(map(str, cfg.rig.shape))} "
             f"uint16 volumes, {args.frames} frames at {args.speed:g}x rig rate, broker {broker_kind}")
    print_table(title, rows)
    path = write_result("loop_latency", {
        "description": title, "stages": rows, "wall_s": seconds,
        "frames": {"sent": res.sim.frames, "processed": res.pipeline.frames, "forecasts": res.pipeline.forecasts,
                   "triggers": len(res.triggers), "warmup_excluded": args.warmup},
        "counters": {p: m.counters() for p, m in res.metrics.items()},
        "config": to_dict(cfg)})
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
