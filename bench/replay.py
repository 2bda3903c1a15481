"""Replay from a local store, as fast as possible (or at --speed), per volume transport (tcp, ipc, shm).

For each transport a consumer process subscribes (SUB + Ingest, bench/consumer.py) and the replay
player streams the recording at speed 0 (read-ahead from the store, newest-wins at the consumer).
Reports the player's volumes/s, what the consumer received, seq gaps, and source -> ingest latency
p50/p99; plus the store's own read rate (read_volume in a loop) as the ceiling.

    .venv/bin/python bench/replay.py --recording data/bench-zapbench [--frames 200] [--name replay-fullscale]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from loopcast.broker import free_port
from loopcast.realtime.metrics import Metrics
from loopcast.realtime.wire.transport import TransportConfig
from loopcast.replay.layout import Recording
from loopcast.replay.player import Player, ReplayConfig

from common import quantiles, write_result
from consumer import Consumer


def endpoint_for(transport: str, work: Path) -> str:
    if transport == "tcp":
        return f"tcp://127.0.0.1:{free_port()}"
    return f"ipc://{work}/frames-{transport}.sock"       # shm: headers over ipc, payloads in /dev/shm


def store_read_rate(rec: Recording, frames: int) -> dict[str, float]:
    vol = rec.volume("raw", 0)
    t = []
    for k in range(frames):
        t0 = time.perf_counter()
        vol.read(k % rec.n_frames)
        t.append(time.perf_counter() - t0)
    a = np.asarray(t)
    return {"volumes_per_s": float(1 / a.mean()), **quantiles(a)}


def run_transport(rec: Recording, transport: str, frames: int, work: Path, read_ahead: int,
                  speed: float) -> dict:
    endpoint = endpoint_for(transport, work)
    vol = rec.volume("raw", 0)
    consumer = Consumer(endpoint, vol.shape, str(vol.dtype), idle_s=5.0)
    tcfg = TransportConfig(kind="shm" if transport == "shm" else "zmq")
    player = Player(rec, endpoint, ReplayConfig(speed=speed, stop=min(frames, rec.n_frames), read_ahead=read_ahead),
                    "bench", Metrics("bench-replay"), tcfg)
    consumer.start()
    try:
        report = player.run(progress=True)
        res = consumer.result()
    finally:
        player.close()
    return {"transport": transport, "sent": report.frames, "seconds": report.seconds,
            "volumes_per_s": report.volumes_per_s, "received": res.received, "seq_gaps": res.seq_gaps,
            "invalid": res.invalid, "latency": quantiles(np.asarray(res.latency_s))}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recording", required=True)
    ap.add_argument("--frames", type=int, default=200)
    ap.add_argument("--transports", default="tcp,ipc,shm")
    ap.add_argument("--read-ahead", type=int, default=3)
    ap.add_argument("--name", default="replay")
    ap.add_argument("--speed", type=float, default=0.0, help="0 = as fast as possible, 1 = the recorded rate")
    args = ap.parse_args()
    rec = Recording.open(args.recording)
    work = Path(tempfile.mkdtemp(prefix="loopcast-bench-"))
    shape = rec.volume("raw", 0).shape
    mb = int(np.prod(shape)) * 2 / 1e6
    print(f"recording {args.recording}: {rec.n_frames} frames of {'x'.join(map(str, shape))} uint16 "
          f"({mb:.0f} MB each), {rec.n_neurons} neurons")
    # the store read also warms the page cache for every transport
    rows: dict[str, dict[str, Any]] = {"store_read": store_read_rate(rec, args.frames)}
    for t in args.transports.split(","):
        rows[t] = run_transport(rec, t, args.frames, work, args.read_ahead, args.speed)
    print(f"\n{'transport':<12}{'vol/s':>8}{'sent':>7}{'recv':>7}{'gaps':>7}{'p50 ms':>9}{'p99 ms':>9}")
    print(f"{'store read':<12}{rows['store_read']['volumes_per_s']:>8.2f}")
    for t in args.transports.split(","):
        r, q = rows[t], rows[t]["latency"]
        print(f"{t:<12}{r['volumes_per_s']:>8.2f}{r['sent']:>7}{r['received']:>7}{r['seq_gaps']:>7.0f}"
              f"{q.get('p50_ms', float('nan')):>9.1f}{q.get('p99_ms', float('nan')):>9.1f}")
    path = write_result(args.name, {
        "description": f"replay at speed {args.speed:g} (0 = as fast as possible) from {args.recording} "
                       f"({'x'.join(map(str, shape))}, {mb:.0f} MB/volume), "
                       f"{args.frames} frames per transport, consumer = SUB + Ingest in another process",
        "speed": args.speed, "volume_shape": list(shape), "volume_mb": mb, "rows": rows})
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
