"""Forecast -> PUBACK at ZAPBench scale, the controller alone, on a quiet and on a busy machine.

`loopcast controller` (its own process, configs/loopcast.toml + configs/zapbench-scale.toml, armed, a
policy that fires on every forecast, the interlocks opened up) subscribes to this script's ZeroMQ PUB,
which sends nlinear-shaped forecasts, (8, 71,721) float32 (2.3 MB), at --rate per second. Each one
makes a trigger on 750 target neurons (ensemble 3 of the fish), published with QoS 1 to Mosquitto; the
controller's `trigger` latency runs from the forecast received to the PUBACK.

Conditions, one controller and one Mosquitto each (fresh), in this order:
  quiet      nothing else running
  busy       --hogs processes each spinning a core (the loop's `run` and the fish's renderer on 2 cores)
  busy-fifo  the same, with the controller (runtime.priority.controller) and Mosquitto under SCHED_FIFO
             at --priority, as docs/cpu.md proposes for a rig

Needs the fish's segmentation: --recording is a full-scale store (see bench/loop_fullscale.py).

    .venv/bin/python bench/trigger_latency.py --recording data/bench-zapbench [--forecasts 300 --rate 5]
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import zmq
from loop_fullscale import FIRE_ON_EVERY_FORECAST, prioritise_broker

from loopcast.broker import start_broker
from loopcast.demo import spawn, wait_or_stop
from loopcast.realtime.wire.codec import ForecastHeader, encode_forecast
from loopcast.settings import load_settings, new_run_dir

from common import print_table, quantiles, write_result

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = [ROOT / "configs/loopcast.toml", ROOT / "configs/zapbench-scale.toml"]
CONDITIONS = ("quiet", "busy", "busy-fifo")
HOG = "while True: pass"


def one(args: argparse.Namespace, condition: str, work: Path) -> dict[str, Any]:
    hogs = args.hogs if condition != "quiet" else 0
    priority = args.priority if condition == "busy-fifo" else 0
    endpoint = f"ipc://{work}/fc-{condition}"
    with start_broker("mosquitto") as broker:
        prioritise_broker(broker, priority)
        cfg = load_settings(CONFIGS, [
            f'paths.recording="{args.recording}"', f'paths.runs="{work}/runs"', "metrics.samples=true",
            "metrics.controller=0", f"mqtt.port={broker.port}", f'endpoints.forecasts="{endpoint}"',
            *FIRE_ON_EVERY_FORECAST, f"runtime.priority.controller={priority}"])
        run_dir = new_run_dir(cfg, f"trigger-{condition}")
        ctx = zmq.Context()
        pub = ctx.socket(zmq.XPUB)                  # XPUB: its subscription comes back as a message
        pub.bind(endpoint)
        controller = spawn("controller", run_dir)
        spinners = [subprocess.Popen([sys.executable, "-c", HOG]) for _ in range(hogs)]
        try:
            send(pub, controller, args.forecasts, args.rate, condition)
        finally:
            for p in spinners:
                p.kill()
            controller.send_signal(signal.SIGTERM)
            code = wait_or_stop(controller, 30, 10)
            pub.close(linger=0)
            ctx.term()
    samples = np.asarray(json.loads((run_dir / "controller.latency.json").read_text()).get("trigger", []))
    return {"condition": condition, "hogs": hogs, "priority": priority, "exit_code": code,
            "trigger": quantiles(samples), "run_dir": str(run_dir)}


def send(pub: zmq.Socket, controller: subprocess.Popen[bytes], n: int, rate: float, label: str) -> None:
    """Wait until the controller has subscribed (so its first forecast counts), then n forecasts at `rate`."""
    data = np.random.default_rng(0).standard_normal((8, 71721)).astype(np.float32)
    if not pub.poll(120_000, zmq.POLLIN):
        raise RuntimeError("the controller did not subscribe within 120 s; see its log")
    pub.recv()
    time.sleep(1.0)        # its broker session: connected and subscribed to control before the subscription
    for seq in range(n):
        if controller.poll() is not None:
            raise RuntimeError(f"the controller exited ({controller.returncode}); see its log")
        t = time.time_ns()
        header = ForecastHeader(seq=seq, t_src_ns=t, model="nlinear", engine_version="bench",
                                lead_times=tuple(range(1, 9)), shape=data.shape, t_pub_ns=t)
        pub.send_multipart(encode_forecast(header, data), copy=False)
        print(f"\r  {label}: {seq + 1}/{n} forecasts", end="", flush=True)
        time.sleep(1.0 / rate)
    print()
    time.sleep(1.0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recording", required=True, help="a full-scale store of the fish (its segmentation)")
    ap.add_argument("--forecasts", type=int, default=300, help="forecasts (= triggers) per condition")
    ap.add_argument("--rate", type=float, default=5.0, help="forecasts per second")
    ap.add_argument("--hogs", type=int, default=2, help="busy processes in the busy conditions")
    ap.add_argument("--priority", type=int, default=10, help="SCHED_FIFO priority in busy-fifo")
    ap.add_argument("--conditions", default=",".join(CONDITIONS))
    ap.add_argument("--name", default="trigger-latency")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="lc-trigger-") as tmp:
        rows = [one(args, c, Path(tmp)) for c in args.conditions.split(",")]
    print_table(f"forecast -> PUBACK, 71,721 neurons, 750 targets, {args.rate:g} forecasts/s",
                {f"{r['condition']}": r["trigger"] for r in rows})
    path = write_result(args.name, {"description": __doc__.split("\n\n")[0], "forecasts": args.forecasts,
                                    "rate_hz": args.rate, "rows": rows, "loadavg_end": os.getloadavg()})
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
