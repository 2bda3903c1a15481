"""Wire fuzzing at scale: the strategies of tests/realtime/test_wire_fuzz.py at >= 10,000 cases.

Targets: frame decoding (decode_frame with an shm reader over a directory of rings and traps), forecast
decoding (decode_forecast), the controller's control parser (parse_control_message, control_sender), the
trigger parser (TriggerCommand.from_json) and ingest itself (streams of bad messages, each followed by a good
frame that must be accepted). Prints cases per target, refusals per reason, crashes (any exception other
than a WireError of a known reason, or a good frame not accepted) and the per-message handling time; then
the time to refuse a header with a 1,000,000-entry stimulus list (it stalled the loop ~220 ms before the
header bounds) and the cost of the shm reader's per-frame file checks. Writes bench/results/<name>-*.json.

    .venv/bin/python bench/fuzz_wire.py [--scale 1.0] [--name fuzz-wire]
"""
from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import sys
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import msgpack
import numpy as np
from hypothesis import HealthCheck, given, settings

from loopcast.realtime.ingest import Ingest
from loopcast.realtime.metrics import Metrics, MetricsConfig
from loopcast.realtime.wire.shm import ShmReader

from common import write_result

CASES = {"frame": 3000, "forecast": 2000, "control": 2000, "trigger": 1000, "ingest": 2000}   # 10,000
Outcomes = list[tuple[str, float]]   # (accepted or the reason, seconds to handle the message)


def load_cases() -> ModuleType:
    """tests/realtime/test_wire_fuzz.py, loaded by path (its strategies, renderers and properties)."""
    path = Path(__file__).resolve().parents[1] / "tests" / "realtime" / "test_wire_fuzz.py"
    spec = importlib.util.spec_from_file_location("loopcast_wire_fuzz_cases", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module   # dataclasses resolve the module's annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def timed(outcome: Callable[[], str]) -> Outcomes:
    t0 = time.perf_counter()
    out = outcome()
    return [(out, time.perf_counter() - t0)]


def handlers(m: ModuleType, shm: Any, reader: ShmReader) -> dict[str, tuple[Any, Callable[[Any], Outcomes]]]:
    """target -> (strategy, handler of one drawn case)."""
    def ingest(stream: Any) -> Outcomes:
        out: Outcomes = []
        m.ingest_stream(stream, shm, lambda o, s: out.append((o, s)))
        return out
    ctx = m.Ctx(7, shm)
    return {
        "frame": (m.FRAME_SPECS, lambda s: timed(lambda: m.frame_outcome(m.render_frame(s, ctx), reader))),
        "forecast": (m.FORECAST_SPECS, lambda s: timed(lambda: m.forecast_outcome(m.render_forecast(s, ctx)))),
        "control": (m.CONTROL_PAYLOADS, lambda p: timed(lambda: m.control_outcome(p))),
        "trigger": (m.TRIGGER_PAYLOADS, lambda s: timed(lambda: m.trigger_outcome(m.render_trigger(s)))),
        "ingest": (m.STREAM, ingest),
    }


def run_target(strategy: Any, handle: Callable[[Any], Outcomes], cases: int) -> dict[str, Any]:
    """`cases` drawn cases through `handle`; crashes are counted (with the first few shown), not raised."""
    tally: Counter[str] = Counter()
    seconds: list[float] = []
    crashes: list[str] = []
    slowest: list[Any] = [0.0, None]   # seconds, the case

    @settings(max_examples=cases, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(strategy)
    def one(case: Any) -> None:
        try:
            outcomes = handle(case)
        except Exception as exc:   # what the property forbids: counted as a crash
            where = traceback.extract_tb(exc.__traceback__)[-1]
            crashes.append(f"{type(exc).__name__}: {str(exc)[:160]} ({Path(where.filename).name}:{where.lineno})")
            return
        tally.update(o for o, _ in outcomes)
        seconds.extend(s for _, s in outcomes)
        worst = max(s for _, s in outcomes) if outcomes else 0.0
        if worst > slowest[0]:
            slowest[:] = [worst, case]

    t0 = time.perf_counter()
    one()
    wall = time.perf_counter() - t0
    s = np.asarray(seconds)
    again = min(max(x for _, x in handle(slowest[1])) for _ in range(5)) if slowest[1] is not None else 0.0
    return {"cases": cases, "messages": int(s.size), "wall_s": wall, "outcomes": dict(tally),
            "crashes": len(crashes), "crash_examples": crashes[:5], "over_1ms": int((s > 1e-3).sum()),
            "p50_us": float(np.median(s) * 1e6), "p99_us": float(np.percentile(s, 99) * 1e6),
            "max_ms": float(s.max() * 1e3), "slowest_case": repr(slowest[1])[:200],
            "slowest_case_again_ms": again * 1e3}   # the slowest case alone, best of 5: a GC pause or the input


def stimulus_refusal(m: ModuleType, reps: int = 50) -> dict[str, dict[str, Any]]:
    """Ingest.process of a header with a 1,000,000-entry stimulus list: floats (9 MB: refused by the header
    size bound) and small ints (1 MB: by the list bound while unpacking); min/median/max ms over `reps`."""
    ingest = Ingest(m.RIG, Metrics("bench", MetricsConfig(enabled=False)))
    out = {}
    for name, value in (("floats_9MB", 0.5), ("ints_1MB", 0)):
        msg = [b"frame", msgpack.packb({**m.frame_header(0), "stimulus": [value] * 1_000_000}), m.VOLUME.tobytes()]
        t = []
        for _ in range(reps):
            t0 = time.perf_counter()
            frame = ingest.process(msg)
            t.append(time.perf_counter() - t0)
        rejected = ingest.rejected
        assert frame is None and rejected is not None
        out[name] = {"header_bytes": len(msg[1]), "reason": rejected.reason, "min_ms": min(t) * 1e3,
                     "median_ms": float(np.median(t)) * 1e3, "max_ms": max(t) * 1e3}
    return out


def shm_check_cost(m: ModuleType, shm: Any, reps: int = 20_000) -> dict[str, float]:
    """ShmReader.view of a mapped slot (lstat of the name, fstat of the file, the guard) and
    ShmLease.mapped (fstat): the per-frame cost of the fault checks, independent of the volume's size."""
    reader = ShmReader(str(shm.root))
    ref = shm.ring.write(11, m.VOLUME)
    view = []
    for _ in range(reps):
        t0 = time.perf_counter()
        _, lease = reader.view(ref, m.RIG.shape, m.RIG.dtype, "C")
        view.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    for _ in range(reps):
        lease.mapped()
    mapped = (time.perf_counter() - t0) / reps
    reader.close()
    return {"view_median_us": float(np.median(view)) * 1e6, "mapped_us": mapped * 1e6}


def print_tables(rows: dict[str, dict[str, Any]]) -> None:
    print(f"\n{'target':<10}{'cases':>7}{'msgs':>7}{'accepted':>9}{'refused':>8}{'crashes':>8}"
          f"{'p50 us':>9}{'p99 us':>9}{'max ms':>8}{'>1 ms':>7}{'again ms':>9}")
    for name, r in rows.items():
        acc = r["outcomes"].get("accepted", 0)
        print(f"{name:<10}{r['cases']:>7}{r['messages']:>7}{acc:>9}{r['messages'] - acc:>8}{r['crashes']:>8}"
              f"{r['p50_us']:>9.1f}{r['p99_us']:>9.1f}{r['max_ms']:>8.2f}{r['over_1ms']:>7}"
              f"{r['slowest_case_again_ms']:>9.3f}")
    reasons: Counter[str] = Counter()
    for r in rows.values():
        reasons.update({k: v for k, v in r["outcomes"].items() if k != "accepted"})
    print(f"\n{'refusal reason':<22}{'count':>7}")
    for reason, n in sorted(reasons.items(), key=lambda kv: -kv[1]):
        print(f"{reason:<22}{n:>7}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scale", type=float, default=1.0, help="multiply every target's case count")
    ap.add_argument("--name", default="fuzz-wire")
    args = ap.parse_args()
    logging.getLogger("loopcast").setLevel(logging.ERROR)   # every refusal is logged (throttled): counted here
    m = load_cases()
    with tempfile.TemporaryDirectory(prefix="loopcast-fuzz-") as root:
        shm = m.ShmDir.make(Path(root))
        shm.ring.write(7, m.VOLUME)
        reader = ShmReader(root)
        rows = {name: run_target(strategy, handle, max(1, int(CASES[name] * args.scale)))
                for name, (strategy, handle) in handlers(m, shm, reader).items()}
        shm_cost = shm_check_cost(m, shm)
        reader.close()
        shm.close()
    stimulus = stimulus_refusal(m)
    print_tables(rows)
    for name, q in stimulus.items():
        print(f"\n1,000,000-entry stimulus ({name}, {q['header_bytes'] / 1e6:.1f} MB header): refused as "
              f"{q['reason']} in {q['median_ms']:.3f} ms median, {q['max_ms']:.3f} ms max")
    print(f"shm fault checks: view {shm_cost['view_median_us']:.1f} us median, mapped() {shm_cost['mapped_us']:.2f} us")
    crashes = sum(r["crashes"] for r in rows.values())
    path = write_result(args.name, {
        "description": "tests/realtime/test_wire_fuzz.py's strategies, hypothesis derandomized; crashes = any "
                       "exception but a WireError of a known reason, or a good frame between bad ones not accepted",
        "note": "max_ms includes pauses outside the handler (GC of hypothesis's heap, other processes on the "
                "cores: load_avg); slowest_case_again_ms is the slowest case handled again alone, best of 5",
        "load_avg": os.getloadavg(),
        "cases": sum(r["cases"] for r in rows.values()), "crashes": crashes, "targets": rows,
        "stimulus_1e6": stimulus, "shm_checks": shm_cost})
    print(f"\ncrashes={crashes}\nwrote {path}")
    return 1 if crashes else 0


if __name__ == "__main__":
    sys.exit(main())
