"""`loopcast synth` at scale: volumes/s written to a ZAPBench-layout store, and what it costs on disk.

    .venv/bin/python bench/synth.py -c configs/zapbench-scale.toml --frames 300 --out data/bench-zapbench
Keeps the store (bench/replay.py streams it); delete it afterwards, a full-scale one is ~35 GB.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time

from loopcast.config import to_dict
from loopcast.replay.synth import synthesize
from loopcast.settings import DEFAULT_CONFIG, load_settings

from common import write_result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-c", "--config", action="append", default=[], help="config layered on configs/loopcast.toml")
    ap.add_argument("--frames", type=int, default=300)
    ap.add_argument("--out", required=True)
    ap.add_argument("--name", default="synth")
    args = ap.parse_args()
    cfg = load_settings([DEFAULT_CONFIG, *args.config], [f"synth.n_frames={args.frames}"])
    fc = cfg.synth.fish
    t0 = time.monotonic()
    rec = synthesize(cfg.synth, args.out, progress=True, overwrite=True)
    seconds = time.monotonic() - t0
    timing = rec.meta.get("timing", {})
    size = int(subprocess.run(["du", "-sb", args.out], capture_output=True, text=True).stdout.split()[0])
    raw_mb = fc.shape[0] * fc.shape[1] * fc.shape[2] * 2 / 1e6
    loop_s = float(timing.get("frames_s", seconds))
    row = {"frames": args.frames, "neurons": fc.n_neurons, "shape": list(fc.shape), "total_s": seconds,
           "frames_s": loop_s, "volumes_per_s": args.frames / loop_s, "timing": timing,
           "uncompressed_mb_per_volume": raw_mb, "store_bytes": size,
           "compression_ratio": args.frames * raw_mb * 1e6 / size}
    print(f"\nsynth {fc.n_neurons} neurons, {'x'.join(map(str, fc.shape))}, {args.frames} frames: "
          f"{row['volumes_per_s']:.2f} volumes/s written ({loop_s:.0f} s in the frame loop, {seconds:.0f} s total), "
          f"{size / 1e9:.1f} GB on disk (x{row['compression_ratio']:.1f} compression)")
    path = write_result(args.name, {"description": f"loopcast synth at {'x'.join(map(str, fc.shape))}", **row,
                                    "config": to_dict(cfg.synth)})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
