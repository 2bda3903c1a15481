"""The fault drills of docs/reliability.md, longer than the suite's (tests/test_drills.py) and repeated: each
drill on a fresh rig of real processes (loopcast/drill.py: `loopcast sim`, `run`, `controller` or `replay`
on a Mosquitto the drill kills and restarts), what was injected, what was lost, how long recovery took.

The rig is the demo-sized fish (300 neurons, 48 x 32 x 8 voxels) at 10x its frame rate (91 ms period), an
nlinear engine trained here first; a trigger on every forecast the interlocks allow (min interval 0.3 s).

    .venv/bin/python bench/drills.py [--repeats 3] [--outage-s 5] [--slow-frames 300]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from loopcast.drill import DrillRig, broker_drill, run_killed_drill, slow_stage_drill, source_restart_drill
from loopcast.settings import load_settings, new_run_dir
from loopcast.workflows import ensure_engine, ensure_recording

from common import write_result

RIG = ["rig.shape=[48, 32, 8]", "synth.fish.n_neurons=300", "synth.fish.n_ensembles=4", "synth.n_frames=500",
       "train.horizon=4", "train.max_epochs=5", "pipeline.preprocess.dff.warmup=5",
       "pipeline.preprocess.spikes.warmup=10", 'mqtt.broker="external"', 'rig.name="drill"', "sim.speed=10",
       "sim.n_frames=0", "sim.fault_every=0", "sim.wait_timeout_s=60", "replay.speed=10",
       "pipeline.forecast.wait_subscribers=1", "pipeline.forecast.wait_timeout_s=60", "pipeline.forecast.watch=false",
       'controller.policy.mode="above"', "controller.policy.level=-1.0", "controller.policy.duration_ms=100.0",
       "controller.interlocks.min_interval_s=0.3", "controller.interlocks.max_forecast_age_s=0.5",
       "controller.interlocks.max_per_minute=1000", "controller.watchdog_s=2.0", "controller.mqtt.reconnect_s=0.2",
       "pipeline.record.flush_s=0.2"]


def prepare(root: Path) -> list[str]:
    """The tiny recording and its engine under `root`; the overrides that point at them."""
    sets = [f'paths.recording="{root}/rec"', f'paths.engines="{root}/engines"', f'paths.runs="{root}/runs"', *RIG]
    cfg = load_settings(overrides=sets)
    ensure_recording(cfg, progress=False)
    ensure_engine(cfg, new_run_dir(cfg, "train"), progress=False)
    return sets


def repeat(name: str, sets: list[str], root: Path, n: int,
           drill: Callable[[DrillRig], dict[str, Any]]) -> list[dict[str, Any]]:
    runs = []
    for k in tqdm(range(n), desc=name, unit="drill"):
        rig = DrillRig(load_settings(overrides=sets), root / f"{name}-{k}")
        try:
            out = drill(rig)
        finally:
            codes = rig.close()
        runs.append({**out, "exit_codes": codes})
    return runs


def summary(runs: list[dict[str, Any]], keys: list[str]) -> dict[str, Any]:
    """Per key: the values of every run, and their median where numeric."""
    out: dict[str, Any] = {}
    for key in keys:
        vals = [r.get(key) for r in runs]
        nums = [v for v in vals if isinstance(v, (int, float)) and not isinstance(v, bool)]
        out[key] = {"runs": vals, **({"median": float(np.median(nums))} if nums else {})}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--outage-s", type=float, default=5.0)
    ap.add_argument("--slow-frames", type=int, default=300)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="loopcast-drills-") as tmp:
        root = Path(tmp)
        sets = prepare(root)
        drills = {
            "broker_killed": (lambda r: broker_drill(r, outage_s=args.outage_s, after_s=5.0),
                              ["outage_s", "reconnect_s", "reconnect_after_restart_s", "disarmed_on_loss",
                               "sent_before_rearm", "stale_sent", "forecasts_over_level_unsent", "triggers_lost_est",
                               "first_trigger_after_arm_s",
                               "frames_lost", "records_lost"]),
            "pipeline_killed": (lambda r: run_killed_drill(r, down_s=args.outage_s),
                                ["watchdog_disarm_s", "restart_to_first_forecast_s", "sent_while_down_or_unarmed",
                                 "stale_sent", "first_trigger_after_arm_s", "frames_lost", "records_lost"]),
            "source_restarted": (source_restart_drill,
                                 ["session_changes", "frames_sent_new_session", "frames_accepted_since",
                                  "frames_refused_since", "kill_to_first_forecast_s"]),
            "slow_stage": (lambda r: slow_stage_drill(r, slowdown=3.0, frames=args.slow_frames),
                           ["frames", "frames_lost", "forecasts", "skipped", "latency_p50_ms", "latency_p99_ms",
                            "latency_max_ms", "latency_bound_ms", "dff_max_abs_error"]),
        }
        results: dict[str, dict[str, Any]] = {}
        for name, (drill, keys) in drills.items():
            runs = repeat(name, sets, root, args.repeats, drill)
            results[name] = {"runs": runs, "summary": summary(runs, keys)}
            print_drill(name, results[name]["summary"])
    path = write_result("drills", {"repeats": args.repeats, "outage_s": args.outage_s, "rig": RIG, **results})
    print(f"\nwrote {path}")
    return 0


def print_drill(name: str, s: dict[str, Any]) -> None:
    print(f"\n{name}")
    for key, v in s.items():
        med = f"{v['median']:.3g}" if "median" in v else ""
        print(f"  {key:<32}{med:>10}   {v['runs']}")


if __name__ == "__main__":
    sys.exit(main())
