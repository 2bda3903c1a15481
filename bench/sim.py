"""Live simulated rig throughput: the synthetic fish rendered and published as fast as possible.

For each transport a consumer process (SUB + Ingest, bench/consumer.py) receives the volumes. Reports
volumes/s sustained by the simulator (render + publish), the render time per volume (fish.step),
what the consumer received and source -> ingest latency p50/p99. ZAPBench's rate is 1/0.9141 s =
1.09 volumes/s: the simulator keeps up with a real rig when volumes/s >= 1.1.

    .venv/bin/python bench/sim.py -c configs/zapbench-scale.toml [--frames 120] [--name sim-fullscale]
    .venv/bin/python bench/sim.py -c configs/zapbench-ds4.toml --frames 600 --name sim-ds4
"""
from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from loopcast.broker import free_port
from loopcast.config import to_dict
from loopcast.realtime.metrics import Metrics
from loopcast.realtime.wire.transport import TransportConfig
from loopcast.replay.fish import FishModel
from loopcast.replay.sim import LiveSim, SimConfig
from loopcast.settings import DEFAULT_CONFIG, load_settings

from common import quantiles, write_result
from consumer import Consumer


def run_transport(fish: FishModel, transport: str, frames: int, work: Path) -> dict:
    endpoint = (f"tcp://127.0.0.1:{free_port()}" if transport == "tcp"
                else f"ipc://{work}/sim-{transport}.sock")
    consumer = Consumer(endpoint, fish.cfg.shape, "uint16", idle_s=5.0)
    sim = LiveSim(fish, SimConfig(speed=0, n_frames=frames, wait_subscribers=1), "bench", endpoint,
                  Metrics("bench-sim"), None, TransportConfig(kind="shm" if transport == "shm" else "zmq"))
    consumer.start()
    t0 = time.monotonic()
    try:
        asyncio.run(sim.run(asyncio.Event()))
        seconds = time.monotonic() - t0
        res = consumer.result()
    finally:
        sim.close()
    render = np.asarray(sim.render_s)
    return {"transport": transport, "sent": sim.report.frames, "seconds": seconds,
            "volumes_per_s": sim.report.frames / seconds,
            "render_p50_ms": float(np.median(render) * 1e3), "render_p99_ms": float(np.percentile(render, 99) * 1e3),
            "received": res.received, "seq_gaps": res.seq_gaps, "invalid": res.invalid,
            "latency": quantiles(np.asarray(res.latency_s))}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-c", "--config", action="append", default=[], help="config layered on configs/loopcast.toml")
    ap.add_argument("--frames", type=int, default=120)
    ap.add_argument("--transports", default="tcp,ipc,shm")
    ap.add_argument("--name", default="sim")
    args = ap.parse_args()
    cfg = load_settings([DEFAULT_CONFIG, *args.config])
    fc = cfg.synth.fish
    t0 = time.monotonic()
    fish = FishModel(fc)
    build_s = time.monotonic() - t0
    vox = int(np.prod(fc.shape))
    print(f"fish: {fc.n_neurons} neurons, {'x'.join(map(str, fc.shape))} voxels ({vox * 2 / 1e6:.0f} MB/volume), "
          f"built in {build_s:.1f} s")
    work = Path(tempfile.mkdtemp(prefix="loopcast-bench-"))
    rows = {t: run_transport(fish, t, args.frames, work) for t in args.transports.split(",")}
    print(f"\n{'transport':<10}{'vol/s':>8}{'render p50':>12}{'p99':>8}{'recv':>7}{'gaps':>6}{'lat p50':>9}{'p99':>8}")
    for t, r in rows.items():
        q = r["latency"]
        print(f"{t:<10}{r['volumes_per_s']:>8.2f}{r['render_p50_ms']:>12.1f}{r['render_p99_ms']:>8.1f}"
              f"{r['received']:>7}{r['seq_gaps']:>6.0f}{q.get('p50_ms', float('nan')):>9.1f}"
              f"{q.get('p99_ms', float('nan')):>8.1f}")
    path = write_result(args.name, {
        "description": f"live sim at speed 0: {fc.n_neurons} neurons, {'x'.join(map(str, fc.shape))} uint16, "
                       f"{args.frames} frames per transport, consumer = SUB + Ingest in another process",
        "fish_build_s": build_s, "rows": rows, "config": to_dict(cfg.synth.fish)})
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
