"""A soak of the closed loop: `loopcast demo`'s loop (its fish, volume size, engine and pacing, 10x the rig's
frame rate by default) run for --minutes as real processes, checked for leaks and drift.

Processes: a broker (Mosquitto when installed: then sampled too), `loopcast controller` (armed at start, its
policy firing on every forecast with the interlocks opened up as in bench/loop_fullscale.py, duty limit and
session cap off too, so the trigger path runs on every frame and its p99 is over thousands of triggers),
`loopcast run` (its children too: the session record's writer and multiprocessing's resource tracker) and
`loopcast sim` over the shared-memory transport (--transport; the demo's default is zmq, where no shm file
exists to leak). Endpoints are ipc:// files in a private folder, as in the demo.

Measured, and the targets (TARGETS) each is held to:
- per process, every --sample-s seconds from /proc/<pid>: RSS (status VmRSS), open fds (fd/), of them
  sockets (fd/ links to socket:[...]), threads. RSS growth in % from the first sample after --warmup-minutes
  (counted from the fish's first frame) to the last one before shutdown: under 5 %. Open fds and sockets,
  each the least of the first 3 and of the last 3 samples after warm-up (a descriptor open for a moment,
  such as the /metrics connection the bench itself makes, is left out by taking the least): at most
  FD_SLACK more at the end.
- latency drift: p99 over the first --window-minutes after warm-up vs over the last --window-minutes, per
  stage, exactly: ingest, preprocess and forecast per frame from the session record's frames table
  (<run dir>/session.zarr, ms from the frame's source timestamp; the /metrics histograms would only give
  bucket bounds), the trigger from the controller's audit log (forecast in -> PUBACK of each sent trigger).
  The last p99 may exceed the first by DRIFT_PCT % or DRIFT_FLOOR_MS, whichever is larger. Short runs shrink
  the windows to half the time after warm-up, so that they never overlap.
- leaks after every process exited: files loopcast-* in /dev/shm and the configured shm dir that this run's
  processes made, files left in the ipc:// folder, and processes of the run still alive (e.g. an orphaned
  writer). Each must be none (the two ipc:// files are left today: libzmq >= 4.2 does not remove them and
  loopcast's Publisher.close() does not either; tests/test_leaks.py marks that xfail). Frames lost (sent by
  the fish, not taken by the pipeline) are reported only.

    .venv/bin/python bench/soak.py [--minutes 30] [--speed 10] [--transport shm] [-s key=value ...]

Run it on a quiet machine: on a busy one the two p99 windows compare the other load as much as the loop
(the result keeps the load average at the start and the end, and p99 per minute per stage).

A 30-minute run at 10x makes ~19,700 frames and a ~2 GB session record (every frame's dF/F and forecasts of
the 3000 neurons) under --runs. The result goes to bench/results/soak-<date>-<host>.json; a run shorter than
30 minutes is named soak-smoke-<N>min-... so that it cannot pass for the soak. tests/test_leaks.py runs the
leak checks (not the drift) on a tiny loop for ~20 s, with these functions.
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
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from loop_fullscale import FIRE_ON_EVERY_FORECAST

from loopcast.broker import start_broker
from loopcast.demo import RUN_CLOSE_S, demo_config, scrape_counters, spawn, wait_or_stop
from loopcast.settings import LoopcastConfig, load_settings, new_run_dir, with_overrides

from common import write_result

ROOT = Path(__file__).resolve().parent.parent
PROCESSES = ("controller", "run", "sim")      # started in this order, as `loopcast demo` does
RSS_GROWTH_PCT = 5.0
FD_SLACK = 2             # descriptors a process may hold more at the end than after warm-up (see the docstring)
DRIFT_PCT = 20.0         # the last window's p99 may be this much above the first's ...
DRIFT_FLOOR_MS = 1.0     # ... or this many ms, whichever is larger (a 3 ms p99 wobbles by more than 20 %)
TARGETS = {"rss_growth_pct": RSS_GROWTH_PCT, "fd_slack": FD_SLACK, "drift_pct": DRIFT_PCT,
           "drift_floor_ms": DRIFT_FLOOR_MS, "leftover_shm_files": 0, "leftover_socket_files": 0,
           "leftover_processes": 0}
UNKNOWN_AFTER_S = 2.0      # a child still unrecognisable this long after it appeared is an unknown one
SHM_PREFIX = "loopcast-"   # realtime/wire/shm.py: loopcast-<tag>-<pid of the writer>-<hex>
# Every forecast a trigger (bench/loop_fullscale.py's policy), with the duty limit and the session cap off too
EVERY_FORECAST_TRIGGERS = [*FIRE_ON_EVERY_FORECAST, "controller.interlocks.max_light_s=0",
                           "controller.interlocks.max_session_triggers=0"]


# --- sampling /proc ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ProcSample:
    """One look at a process: when (wall-clock s), RSS, open fds, the sockets among them, threads."""

    t: float
    rss_kb: int
    fds: int
    sockets: int
    threads: int


def sample_pid(pid: int, t: float) -> ProcSample | None:
    """A sample of process `pid`; None once it is gone (or a zombie: exited, not reaped)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        links = [_readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
    except OSError:
        return None
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    if "VmRSS" not in fields:
        return None
    return ProcSample(t, int(fields["VmRSS"].split()[0]), len(links),
                      sum(link.startswith("socket:") for link in links), int(fields["Threads"]))


def _readlink(path: str) -> str:
    try:
        return os.readlink(path)
    except OSError:       # closed between listing and reading
        return ""


def start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (tells a pid from a later process reusing it)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] == "Z" else int(fields[19])


def children(pid: int) -> list[int]:
    """The live children of `pid`, made by any of its threads."""
    out: set[int] = set()
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return []
    for tid in tasks:
        try:
            out.update(int(c) for c in Path(f"/proc/{pid}/task/{tid}/children").read_text().split())
        except OSError:
            continue
    return sorted(out)


def child_label(pid: int) -> str:
    """What a child of `loopcast run` is, from its command line. In the demo's configuration the one process
    multiprocessing spawns is the session record's writer (engine workers only with also_workers="processes")."""
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return "child"
    for key, name in (("resource_tracker", "resource-tracker"), ("forkserver", "forkserver"),
                      ("spawn_main", "writer")):
        if key in cmd:
            return name
    return "child"


@dataclass
class Sampler:
    """Samples of every registered process and, found as they appear, of the children of `parents`."""

    parents: tuple[str, ...] = ("run",)
    pids: dict[str, tuple[int, int | None]] = field(default_factory=dict)   # name -> (pid, start time)
    tracks: dict[str, list[ProcSample]] = field(default_factory=dict)
    _unknown: dict[int, float] = field(default_factory=dict)   # pid -> when first seen not yet recognisable

    def add(self, name: str, pid: int) -> None:
        self.pids[name] = (pid, start_time(pid))
        self.tracks[name] = []

    def sample(self) -> None:
        """One sample of each process still alive; registers new children first."""
        self._find_children()
        t = time.time()
        for name, (pid, _) in self.pids.items():
            s = sample_pid(pid, t)
            if s is not None:
                self.tracks[name].append(s)

    def _find_children(self) -> None:
        """Register new children by what they run. A child that does not read as a known one yet may still be
        between fork and exec (it shows its parent's command line): it is named "child" only if it still
        does UNKNOWN_AFTER_S after it was first seen."""
        known = {pid for pid, _ in self.pids.values()}
        now = time.monotonic()
        for parent in self.parents:
            if parent not in self.pids:
                continue
            for pid in children(self.pids[parent][0]):
                if pid in known:
                    continue
                label = child_label(pid)
                if label == "child" and now - self._unknown.setdefault(pid, now) < UNKNOWN_AFTER_S:
                    continue
                name = f"{parent}/{label}"
                self.add(name if name not in self.pids else f"{name}-{pid}", pid)

    def alive(self, skip: Iterable[str] = ()) -> list[str]:
        """'name pid' of each registered process that is still running (the same process, not a reused pid)."""
        return [f"{n} {pid}" for n, (pid, t0) in self.pids.items()
                if n not in skip and t0 is not None and start_time(pid) == t0]


# --- the loop ------------------------------------------------------------------------------------------------

@dataclass
class LoopRun:
    """One run of the loop: exit codes, samples, when frames flowed (wall-clock s) and what was left behind."""

    run_dir: Path
    codes: dict[str, int | None]
    sampler: Sampler
    t_first: float
    t_last: float
    leftovers: dict[str, list[str]]


def loop_config(cfg: LoopcastConfig, mqtt_port: int, sockets: Path, frames: int, speed: float,
                extra: Sequence[str] = ()) -> LoopcastConfig:
    """The demo's loop (loopcast.demo's own overrides: ipc:// endpoints in `sockets`, free metrics ports,
    its pacing) for `frames` frames at `speed`, with `extra` overrides on top."""
    cfg = with_overrides(cfg, [f"demo.frames={frames}", f"demo.speed={speed}", *extra])
    return demo_config(cfg, mqtt_port, sockets)


def run_loop(cfg: LoopcastConfig, run_dir: Path, sockets: Path, period_s: float,
             also: dict[str, int] | None = None) -> LoopRun:
    """Start the controller, the pipeline and the fish on `cfg` (from loop_config) in `run_dir`, sample them
    (and the `also` pids) every `period_s` until the fish is done, stop them as the demo does, and list
    what they left behind."""
    new_run_dir(cfg, "soak", str(run_dir))
    shm_before = shm_files(shm_dirs(cfg))
    sampler, procs = Sampler(), dict[str, subprocess.Popen[bytes]]()
    try:
        for name in PROCESSES:
            procs[name] = spawn(name, run_dir)
            sampler.add(name, procs[name].pid)
        for name, pid in (also or {}).items():
            sampler.add(name, pid)
        budget = cfg.demo.frames * cfg.rig.frame_period_s / cfg.demo.speed + 2 * cfg.demo.startup_timeout_s
        t_first, t_last = follow(procs, sampler, run_dir, period_s, time.time() + budget)
        codes = stop_loop(procs)
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
    left = leftovers(cfg, sockets, sampler, shm_before, skip=tuple(also or ()))
    return LoopRun(run_dir, codes, sampler, t_first, t_last, left)


def follow(procs: dict[str, subprocess.Popen[bytes]], sampler: Sampler, run_dir: Path, period_s: float,
           deadline: float) -> tuple[float, float]:
    """Sample until the fish exits (or another process, or the deadline); (first frame seen, end), wall s."""
    t_first = 0.0
    t_print = time.time()
    while procs["sim"].poll() is None and time.time() < deadline:
        sampler.sample()
        sent = scrape_counters(run_dir, "sim").get("loopcast_frames_sent_total", 0.0)
        t_first = t_first or (time.time() if sent else 0.0)
        if time.time() - t_print >= 60:
            t_print = time.time()
            print(f"  {(t_print - t_first) / 60 if t_first else 0:5.1f} min: {sent:.0f} frames sent", flush=True)
        if any(procs[p].poll() is not None for p in PROCESSES if p != "sim"):
            break
        time.sleep(period_s)
    return t_first, time.time()


def stop_loop(procs: dict[str, subprocess.Popen[bytes]]) -> dict[str, int | None]:
    """The fish ends by itself, the pipeline when idle, the controller on SIGTERM (as `loopcast demo`)."""
    codes = {"sim": wait_or_stop(procs["sim"], 30), "run": wait_or_stop(procs["run"], RUN_CLOSE_S)}
    if procs["controller"].poll() is None:
        procs["controller"].send_signal(signal.SIGTERM)
    codes["controller"] = wait_or_stop(procs["controller"], 15)
    return codes


# --- what is left behind -------------------------------------------------------------------------------------

def shm_dirs(cfg: LoopcastConfig) -> list[Path]:
    return sorted({Path("/dev/shm"), Path(cfg.transport.shm_dir)})


def shm_files(dirs: Iterable[Path]) -> set[str]:
    """Paths of the loopcast-* files in `dirs` now."""
    out: set[str] = set()
    for d in dirs:
        try:
            out.update(str(d / n) for n in os.listdir(d) if n.startswith(SHM_PREFIX))
        except OSError:
            continue
    return out


def leftovers(cfg: LoopcastConfig, sockets: Path, sampler: Sampler, shm_before: set[str],
              skip: Sequence[str] = ()) -> dict[str, list[str]]:
    """After the processes exited: shm files this run's processes made (their pid is in the name; new files of
    other programs are listed apart, not held against the run), files in the ipc:// folder, live processes."""
    pids = [pid for n, (pid, _) in sampler.pids.items() if n not in skip]
    new = shm_files(shm_dirs(cfg)) - shm_before
    ours = sorted(p for p in new if any(f"-{pid}-" in Path(p).name for pid in pids))
    return {"shm_files": ours, "shm_files_of_others": sorted(new - set(ours)),
            "socket_files": sorted(p.name for p in sockets.iterdir()) if sockets.is_dir() else [],
            "processes": sampler.alive(skip)}


def frames_lost(run_dir: Path) -> dict[str, Any]:
    """Frames the fish sent that the pipeline did not take (never received, or overwritten in the shm ring
    before it read them), and the frames whose forecast was skipped to keep up, from the summaries."""
    c = {p: json.loads(f.read_text()).get("counters", {}) if (f := run_dir / f"{p}.summary.json").is_file()
         else {} for p in ("sim", "run")}
    sent = c["sim"].get("loopcast_frames_sent_total", 0.0)
    received = c["run"].get("loopcast_frames_received_total", 0.0)
    overrun = c["run"].get('loopcast_frames_invalid_total{reason=shm_overrun}', 0.0)
    return {"sent": sent, "received": received, "lost": max(0.0, sent - received) + overrun,
            "forecast_skipped": c["run"].get('loopcast_frames_dropped_total{reason=forecast_skipped}', 0.0)}


# --- analysis ------------------------------------------------------------------------------------------------

def least(samples: Sequence[ProcSample], attr: str) -> int:
    return min(getattr(s, attr) for s in samples)


def process_growth(track: Sequence[ProcSample], t_settled: float, t_end: float) -> dict[str, Any]:
    """RSS, fds, sockets and threads after warm-up (`t_settled`) and at `t_end`; RSS growth in %."""
    after = [s for s in track if t_settled <= s.t <= t_end]
    if len(after) < 2:
        return {"samples": len(after)}
    first, last, head, tail = after[0], after[-1], after[:3], after[-3:]
    return {"samples": len(after), "rss_mb_settled": round(first.rss_kb / 1024, 1),
            "rss_mb_end": round(last.rss_kb / 1024, 1), "rss_mb_max": round(max(s.rss_kb for s in after) / 1024, 1),
            "rss_growth_pct": round(100.0 * (last.rss_kb - first.rss_kb) / max(first.rss_kb, 1), 2),
            "fds_settled": least(head, "fds"), "fds_end": least(tail, "fds"),
            "sockets_settled": least(head, "sockets"), "sockets_end": least(tail, "sockets"),
            "threads_settled": first.threads, "threads_end": last.threads}


def latency_series(run_dir: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """stage -> (wall-clock s each was received, latency ms): ingest/preprocess/forecast of every valid frame
    from the session record, trigger (forecast in -> PUBACK) of every sent trigger from the audit log."""
    import zarr

    from loopcast.realtime.record.audit import read_audit
    from loopcast.realtime.record.store import read_table
    from loopcast.session.data import LATENCY_COLUMNS
    group = zarr.open_group(str(run_dir / "session.zarr"), mode="r")["frames"]
    table, names = read_table(group), list(group.attrs["index_columns"])   # type: ignore[arg-type]
    index = table["index"]
    valid = index[:, names.index("status")] == 0
    t = index[valid, names.index("t_recv_ns")] / 1e9
    out = {stage: (t, table["latency_ms"][valid, i].astype(np.float64)) for i, stage in enumerate(LATENCY_COLUMNS)}
    sent = [r for r in read_audit(run_dir / "controller.audit.jsonl").records
            if r.get("kind") == "forecast" and r.get("decision") == "sent"]
    out["trigger"] = (np.array([r["t_recv_ns"] / 1e9 for r in sent]),
                      np.array([(r["t_puback_ns"] - r["t_recv_ns"]) / 1e6 for r in sent]))
    return out


def windows(t_settled: float, t_end: float, window_s: float) -> tuple[tuple[float, float], tuple[float, float]]:
    """The first and the last window of `window_s` between warm-up and the end, shrunk so they never overlap."""
    w = max(0.0, min(window_s, (t_end - t_settled) / 2))
    return (t_settled, t_settled + w), (t_end - w, t_end)


def drift(t: np.ndarray, ms: np.ndarray, first: tuple[float, float], last: tuple[float, float]) -> dict[str, Any]:
    """p99 (ms) in the first and in the last window, their sample counts, and whether it drifted."""
    out: dict[str, Any] = {}
    for name, (lo, hi) in (("first", first), ("last", last)):
        x = ms[(t >= lo) & (t <= hi) & np.isfinite(ms)]
        out[f"n_{name}"] = int(x.size)
        out[f"p99_ms_{name}"] = float(np.percentile(x, 99)) if x.size else float("nan")
    a, b = out["p99_ms_first"], out["p99_ms_last"]
    out["drift_pct"] = round(100.0 * (b - a) / a, 1) if a > 0 else float("nan")
    out["ok"] = bool(out["n_first"] and out["n_last"] and b <= max(a * (1 + DRIFT_PCT / 100), a + DRIFT_FLOOR_MS))
    return out


def p99_per_minute(t: np.ndarray, ms: np.ndarray, t0: float) -> list[float | None]:
    """p99 (ms) of each whole minute from `t0` (the first frame), in order: where a drift starts."""
    minute = np.floor((t - t0) / 60).astype(int)
    return [float(np.percentile(ms[minute == m], 99)) if np.any(minute == m) else None
            for m in range(int(minute.max()) + 1 if minute.size else 0)]


# --- verdict and report --------------------------------------------------------------------------------------

Row = tuple[str, str, str, bool | None]   # check, measured, target, passed (None: reported only)


def process_rows(name: str, p: dict[str, Any]) -> list[Row]:
    """RSS growth, open fds and open sockets of one process, against their targets."""
    if "rss_growth_pct" not in p:
        return [(f"{name}: samples after warm-up", str(p.get("samples", 0)), ">= 2", False)]
    rows: list[Row] = [(f"{name}: RSS growth", f"{p['rss_mb_settled']:.0f} -> {p['rss_mb_end']:.0f} MB "
                        f"({p['rss_growth_pct']:+.2f} %)", f"< {RSS_GROWTH_PCT:g} %",
                        p["rss_growth_pct"] < RSS_GROWTH_PCT)]
    for what in ("fds", "sockets"):
        a, b = p[f"{what}_settled"], p[f"{what}_end"]
        rows.append((f"{name}: open {what}", f"{a} -> {b}", f"<= +{FD_SLACK}", b - a <= FD_SLACK))
    return rows


def verdicts(procs: dict[str, dict[str, Any]], lat: dict[str, dict[str, Any]], run: LoopRun,
             lost: dict[str, Any]) -> list[Row]:
    """The rows of the table: processes, latency drift per stage, leftovers, exit codes, frames lost."""
    rows = [row for name, p in procs.items() for row in process_rows(name, p)]
    for stage, d in lat.items():
        rows.append((f"p99 {stage}", f"{d['p99_ms_first']:.2f} -> {d['p99_ms_last']:.2f} ms "
                     f"(n {d['n_first']}/{d['n_last']})", f"<= +{DRIFT_PCT:g} % or +{DRIFT_FLOOR_MS:g} ms", d["ok"]))
    for what, items in run.leftovers.items():
        if what != "shm_files_of_others":
            rows.append((f"left after exit: {what.replace('_', ' ')}", str(len(items)), "0", not items))
    rows.append(("exit codes", " ".join(f"{k}={v}" for k, v in run.codes.items()), "all 0",
                 all(v == 0 for v in run.codes.values())))
    rows.append(("frames lost", f"{lost['lost']:.0f} of {lost['sent']:.0f}", "(reported)", None))
    return rows


def print_verdicts(rows: Sequence[Row]) -> bool:
    """The table; True when every checked row passed."""
    print(f"\n{'check':<38}{'measured':<40}{'target':<26}result")
    for check, value, target, ok in rows:
        print(f"{check:<38}{value:<40}{target:<26}{'-' if ok is None else 'PASS' if ok else 'FAIL'}")
    passed = all(ok is not False for _, _, _, ok in rows)
    print(f"\nsoak {'PASSED' if passed else 'FAILED'}")
    return passed


def analyse(run: LoopRun, args: argparse.Namespace) -> dict[str, Any]:
    """Per-process growth and latency drift per stage between warm-up and the last frame, frames lost, the
    verdict rows. Samples after the last frame are left out: they may catch a process closing down."""
    t_settled = run.t_first + args.warmup_minutes * 60
    series = latency_series(run.run_dir)
    t_end = max((float(t.max()) for t, _ in series.values() if t.size), default=run.t_last)
    procs = {n: process_growth(tr, t_settled, t_end) for n, tr in run.sampler.tracks.items()}
    first, last = windows(t_settled, t_end, args.window_minutes * 60)
    lat = {s: drift(t, ms, first, last) for s, (t, ms) in series.items()}
    per_minute = {s: p99_per_minute(t, ms, run.t_first) for s, (t, ms) in series.items()}
    lost = frames_lost(run.run_dir)
    since = {k: [round(w[0] - run.t_first, 1), round(w[1] - run.t_first, 1)] for k, w in (("first", first),
                                                                                           ("last", last))}
    return {"processes": procs, "latency": lat, "windows_s_from_first_frame": since, "p99_ms_per_minute": per_minute,
            "frames": lost,
            "leftovers": run.leftovers, "exit_codes": run.codes, "rows": verdicts(procs, lat, run, lost)}


def timeline(run: LoopRun) -> dict[str, list[list[float]]]:
    """Per process: [s from the first frame, RSS MB, fds, sockets, threads] of every sample."""
    return {n: [[round(s.t - run.t_first, 1), round(s.rss_kb / 1024, 1), s.fds, s.sockets, s.threads] for s in tr]
            for n, tr in run.sampler.tracks.items()}


# --- main ----------------------------------------------------------------------------------------------------

def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=30.0, help="how long the fish sends frames")
    ap.add_argument("--speed", type=float, default=10.0, help="x the rig's frame rate")
    ap.add_argument("--warmup-minutes", type=float, default=1.0, help="from the first frame, left out")
    ap.add_argument("--window-minutes", type=float, default=5.0, help="p99 windows, first and last")
    ap.add_argument("--sample-s", type=float, default=5.0, help="seconds between /proc samples")
    ap.add_argument("--transport", choices=("shm", "zmq"), default="shm")
    ap.add_argument("--broker", choices=("auto", "mosquitto", "embedded"), default="auto")
    ap.add_argument("--runs", default=str(ROOT / "runs"), help="where the run directory goes")
    ap.add_argument("--name", default="", help="result name (default: soak, or soak-smoke-<N>min under 30 min)")
    ap.add_argument("-s", "--set", action="append", default=[], help="config override for every process")
    return ap.parse_args(argv)


def prepare(args: argparse.Namespace) -> LoopcastConfig:
    """The demo's config with paths from the repository root; its recording and engine made if missing."""
    from loopcast.workflows import ensure_engine, ensure_recording
    cfg = load_settings(overrides=[f'paths.recording="{ROOT / "data/synth"}"', f'paths.engines="{ROOT / "engines"}"',
                                   f'paths.runs="{args.runs}"', *args.set])
    ensure_recording(cfg, progress=False)
    with tempfile.TemporaryDirectory(prefix="loopcast-soak-train-") as train_dir:   # used only when training
        ensure_engine(cfg, Path(train_dir), progress=False)
    return cfg


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    cfg = prepare(args)
    frames = round(args.minutes * 60 * args.speed / cfg.rig.frame_period_s)
    run_dir = Path(args.runs) / f"soak-{time.strftime('%Y%m%d-%H%M%S')}"
    extra = [*EVERY_FORECAST_TRIGGERS, f'transport.kind="{args.transport}"', *args.set]
    load = os.getloadavg()
    print(f"soak: {frames} frames at {args.speed:g}x ({args.minutes:g} min), run dir {run_dir}", flush=True)
    with start_broker(args.broker) as broker, tempfile.TemporaryDirectory(prefix="lc-soak-") as sockets:
        cfg = loop_config(cfg, broker.port, Path(sockets), frames, args.speed, extra)
        pid = getattr(broker, "pid", None)
        run = run_loop(cfg, run_dir, Path(sockets), args.sample_s, {"broker": pid} if pid else None)
    out = analyse(run, args)
    passed = print_verdicts(out["rows"])
    name = args.name or ("soak" if args.minutes >= 30 else f"soak-smoke-{args.minutes:g}min")
    path = write_result(name, {"description": __doc__.split("\n\n")[0], "args": vars(args), "frames_total": frames,
                               "targets": TARGETS, "passed": passed, "run_dir": str(run_dir),
                               "run_dir_mb": round(du(run_dir) / 1e6, 1),
                               "loadavg": {"start": load, "end": os.getloadavg()}, **out, "timeline": timeline(run)})
    print(f"wrote {path}")
    return 0 if passed else 1


def du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


if __name__ == "__main__":
    sys.exit(main())
