"""What the session record costs: the loop thread's time per frame, the writer's, and the disk rate.

Feeds a real SessionRecorder (realtime/record/session.py) what the pipeline hands it per frame — one
frame row, the frame's dF/F (and spike probabilities), and one forecast per stage — at the demo scale
(3000 neurons, nlinear H=8) and at ZAPBench scale (71,721 neurons, nlinear H=8 + TSMixer H=32, as in
bench/loop_fullscale.py), for the neuron subsets and frame strides of [pipeline.record]. Frames are fed as
fast as the writer keeps up (the queue is never allowed to fill), so "writer ms/frame" is the writer
thread's throughput (making the random values is not counted); the disk rate is the store's size per frame
at the rig's 0.9141 s period. The values are fresh Gaussian noise every frame, which zarr's default zstd
cannot compress: the disk rates are upper bounds (real dF/F and forecasts are smoother).

    .venv/bin/python bench/record_cost.py [--frames 300]
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from loopcast.realtime.metrics import Metrics
from loopcast.realtime.record.config import RecordConfig, StageInfo
from loopcast.realtime.record.session import SessionRecorder, select_neurons

from common import print_table, quantiles, write_result

PERIOD_S = 0.9141
SCALES = {   # name -> (neurons, stages as (model, H))
    "demo": (3000, (("nlinear", 8),)),
    "zapbench": (71_721, (("nlinear", 8), ("tsmixer", 32))),
}
CASES = (("demo", "all", 1), ("zapbench", "all", 1), ("zapbench", "stride:16", 1), ("zapbench", "stride:16", 4),
         ("zapbench", "stride:64", 1))
POLICY_NEURONS = 1500   # the default policy's monitored + target ensembles at ZAPBench scale (~750 each)


def run_case(scale: str, spec: str, every: int, frames: int, work: Path) -> dict[str, Any]:
    n, models = SCALES[scale]
    rng = np.random.default_rng(0)
    extra = rng.choice(n, size=min(POLICY_NEURONS, n // 10), replace=False) if scale == "zapbench" else None
    neurons = select_neurons(spec, n, extra)
    stages = [StageInfo(f"forecast/{m}", "forecast", m, "dff", tuple(range(1, h + 1)), 4) for m, h in models]
    manifest = work / "manifest.json"
    manifest.write_text("{}")
    store = work / f"{scale}-{spec.replace(':', '')}-{every}.zarr"
    rec = SessionRecorder(RecordConfig(frame_every=every, flush_s=5.0), store, neurons, stages, Metrics("bench"),
                          {"rig": "bench", "frame_period_s": PERIOD_S})
    loop_s, make_s = [], 0.0
    t0 = time.perf_counter()
    for s in range(frames):
        t = time.perf_counter()   # fresh values every frame (noise: incompressible, an upper bound on disk)
        dff = rng.normal(0.0, 0.1, size=n).astype(np.float32)
        preds = {m: rng.normal(0.0, 0.1, size=(h, n)).astype(np.float32) for m, h in models}
        while rec._queue.qsize() > rec.cfg.max_queue // 2:   # never drop: measure the writer's throughput
            time.sleep(0.001)
        make_s += time.perf_counter() - t
        t = time.perf_counter()
        now = time.time_ns()
        rec.rows(s, now, dff, None)
        rec.frame(s, now, now, "forecast", (1.0, 10.0, 12.0))
        for m, _ in models:
            rec.forecast(f"forecast/{m}", s, now, now, f"{m}/v0001", manifest, preds[m])
        loop_s.append(time.perf_counter() - t)
    rec.close()
    wall = time.perf_counter() - t0 - make_s
    rec.check()
    size = sum(f.stat().st_size for f in store.rglob("*") if f.is_file())
    per_frame = size / frames
    shutil.rmtree(store)
    return {"scale": scale, "neurons": spec, "recorded_neurons": int(neurons.size), "frame_every": every,
            "models": [f"{m} H={h}" for m, h in models], "frames": frames,
            "loop_thread": quantiles(np.asarray(loop_s)), "writer_ms_per_frame": wall / frames * 1e3,
            "bytes_per_frame": per_frame, "mb_per_hour": per_frame * 3600 / PERIOD_S / 1e6}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=300)
    ap.add_argument("--work", help="where the stores are written (default: a temporary directory)")
    args = ap.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="loopcast-record-"))
    work.mkdir(parents=True, exist_ok=True)
    results = [run_case(scale, spec, every, args.frames, work) for scale, spec, every in CASES]
    rows = {f"{r['scale']} {r['neurons']} every {r['frame_every']} ({r['recorded_neurons']} n)": r["loop_thread"]
            for r in results}
    print_table("session record: the pipeline thread's cost per frame (rows + frame + forecasts queued)", rows)
    print(f"\n{'case':<44}{'writer ms/frame':>16}{'MB/frame':>10}{'MB/hour':>10}")
    for label, r in zip(rows, results):
        print(f"{label:<44}{r['writer_ms_per_frame']:>16.1f}{r['bytes_per_frame'] / 1e6:>10.3f}"
              f"{r['mb_per_hour']:>10.0f}")
    path = write_result("record-cost", {"description": "session record cost per frame and disk rate at the "
                                        "rig's 0.9141 s period (bench/record_cost.py)", "cases": results})
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
