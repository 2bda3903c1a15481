"""Fault drills on a rig of real processes: `loopcast sim`, `loopcast run` and `loopcast controller` (each
started as `loopcast demo` starts them, in a directory of its own) on a Mosquitto broker the drill owns,
so that it can kill any of them (SIGKILL) and start it again.

What each drill injected, what was lost and how long recovery took is read from what the processes leave
behind (the controller's audit log, each process's Prometheus counters, the session record), never from
inside them. tests/test_drills.py runs each drill briefly; bench/drills.py runs them longer and writes the
figures of docs/reliability.md.
"""
from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiomqtt
import numpy as np

from loopcast.broker import MosquittoBroker, free_port
from loopcast.demo import scrape_counters, spawn, wait_or_stop
from loopcast.realtime.preprocess.dff import causal_dff_reference
from loopcast.realtime.preprocess.traces import TraceExtractor
from loopcast.realtime.record.audit import read_audit
from loopcast.realtime.record.config import FORECAST_CODES
from loopcast.realtime.wire.codec import mqtt_topic
from loopcast.realtime.wire.mqtt_security import client_options
from loopcast.replay.layout import Recording
from loopcast.session.data import FrameTable, SessionData, TraceTable, read_session
from loopcast.settings import LoopcastConfig, new_run_dir, with_overrides

AUDIT = "controller.audit.jsonl"


class DrillError(RuntimeError):
    """A drill's rig did not reach the state the drill waits for (the message names it and the logs)."""


def wait_until(what: str, predicate: Callable[[], bool], timeout_s: float, poll_s: float = 0.1) -> float:
    """Seconds until `predicate()` held; DrillError naming `what` after `timeout_s`."""
    t0 = time.monotonic()
    while not predicate():
        if time.monotonic() - t0 > timeout_s:
            raise DrillError(f"{what}: not within {timeout_s:.0f} s")
        time.sleep(poll_s)
    return time.monotonic() - t0


@dataclass
class DrillRig:
    """The closed loop as separate processes on `root`, each in root/<name>/ with the resolved config.
    `cfg` should already hold the rig's recording and engine; the rig sets endpoints, ports and the broker."""

    cfg: LoopcastConfig
    root: Path
    broker: MosquittoBroker = field(default_factory=MosquittoBroker)
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    dirs: dict[str, Path] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.broker.start()
        self.cfg = with_overrides(self.cfg, [
            f"mqtt.port={self.broker.port}", 'mqtt.host="127.0.0.1"',
            f'endpoints.frames="tcp://127.0.0.1:{free_port()}"',
            f'endpoints.forecasts="tcp://127.0.0.1:{free_port()}"',
            "metrics.sim=0", "metrics.run=0", "metrics.controller=0"])

    # --- processes ----------------------------------------------------------------------------
    def start(self, command: str, name: str | None = None) -> Path:
        """`loopcast <command>` in root/<name> (name defaults to the command); its directory."""
        name = name or command
        run_dir = new_run_dir(self.cfg, command, str(self.root / name))
        self.procs[name], self.dirs[name] = spawn(command, run_dir), run_dir
        return run_dir

    def kill(self, name: str) -> float:
        """SIGKILL a process; the wall-clock time (s) of the kill."""
        t = time.time()
        self.procs[name].send_signal(signal.SIGKILL)
        self.procs[name].wait(10)
        return t

    def alive(self, name: str) -> bool:
        return self.procs[name].poll() is None

    def stop(self, name: str, timeout_s: float = 20.0) -> int | None:
        """Stop one process as an operator would (SIGTERM): it closes its records; its exit code."""
        if self.procs[name].poll() is None:
            self.procs[name].send_signal(signal.SIGTERM)
        return wait_or_stop(self.procs[name], timeout_s)

    def close(self) -> dict[str, int | None]:
        """Stop every process (SIGTERM, then SIGKILL) and the broker; their exit codes."""
        codes = {}
        for name, proc in self.procs.items():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            codes[name] = wait_or_stop(proc, 20)
        self.broker.stop()
        return codes

    def log_tail(self, name: str, n: int = 3000) -> str:
        """The end of a process's log (for errors that name what went wrong)."""
        path = self.dirs[name] / f"{self.command(name)}.log"
        return path.read_text(errors="replace")[-n:] if path.exists() else f"(no log at {path})"

    # --- what the processes say ---------------------------------------------------------------
    def counters(self, name: str) -> dict[str, float]:
        return scrape_counters(self.dirs[name], self.command(name))

    def command(self, name: str) -> str:
        """The command a process runs: its name without the number of a restart ("run2" -> "run")."""
        return next(c for c in ("controller", "run", "sim", "replay") if name.startswith(c))

    def audit(self) -> list[dict[str, Any]]:
        """The controller's audit records so far (a record being written is left out)."""
        path = self.dirs["controller"] / AUDIT
        return read_audit(path).records if path.exists() else []

    def sent(self, after_ns: int = 0) -> list[dict[str, Any]]:
        """Audit records of triggers sent after `after_ns`."""
        return [r for r in self.audit() if r["kind"] == "forecast" and r["decision"] == "sent"
                and r["t_ns"] > after_ns]

    def status(self, timeout_s: float = 10.0) -> dict[str, Any]:
        """The controller's retained status document."""
        return asyncio.run(asyncio.wait_for(self._status(), timeout_s))

    async def _status(self) -> dict[str, Any]:
        m = self.cfg.mqtt
        async with aiomqtt.Client(m.host, m.port, identifier=f"drill-{time.time_ns()}",
                                  **client_options(m.security)) as c:
            await c.subscribe(mqtt_topic(self.cfg.rig.name, "status"), qos=1)
            async for msg in c.messages:
                return dict(json.loads(msg.payload))
        raise DrillError("status stream ended")

    def control(self, command: str) -> None:
        """Send an operator command to the controller."""
        asyncio.run(self._control(command))

    async def _control(self, command: str) -> None:
        m = self.cfg.mqtt
        async with aiomqtt.Client(m.host, m.port, identifier=f"drill-ctl-{time.time_ns()}",
                                  **client_options(m.security)) as c:
            payload = json.dumps({"command": command, "sender": "drill"})
            await c.publish(mqtt_topic(self.cfg.rig.name, "control"), payload, qos=1)

    def arm(self, timeout_s: float = 30.0) -> float:
        """Arm once the controller is online; seconds until its status says armed."""
        return wait_until("controller armed", self._try_arm, timeout_s, poll_s=0.3)

    def _try_arm(self) -> bool:
        try:
            status = self.status(timeout_s=2.0)
        except (TimeoutError, aiomqtt.MqttError):
            return False
        if status.get("armed"):
            return True
        if status.get("online"):
            self.control("arm")
        return False


def stale_sent(records: list[dict[str, Any]], max_age_s: float) -> list[dict[str, Any]]:
    """Sent triggers whose forecast was older than `max_age_s` when the decision was taken."""
    return [r for r in records if r["kind"] == "forecast" and r["decision"] == "sent"
            and abs(r["t_decision_ns"] - r["t_src_ns"]) > max_age_s * 1e9]


def states(records: list[dict[str, Any]], after_ns: int = 0) -> list[tuple[str, str, int]]:
    """(event, cause, t_ns) of the state records after `after_ns`."""
    return [(r["event"], r["cause"], r["t_ns"]) for r in records if r["kind"] == "state" and r["t_ns"] > after_ns]


# --- the drills ---------------------------------------------------------------------------------------
def start_loop(rig: DrillRig, timeout_s: float = 90.0) -> None:
    """Controller, pipeline, fish; armed; until the first trigger is sent."""
    rig.start("controller")
    rig.start("run")
    rig.start("sim")
    rig.arm(timeout_s)
    wait_until("a first trigger", lambda: len(rig.sent()) > 0, timeout_s)


def broker_drill(rig: DrillRig, outage_s: float = 2.0, after_s: float = 5.0, timeout_s: float = 60.0) -> dict[str, Any]:
    """Mosquitto SIGKILLed mid-session, restarted on its port after `outage_s`: the controller disarms,
    reconnects and reports again, sends nothing stale; the fish's listener reconnects; triggers resume only
    after an operator's arm."""
    start_loop(rig)
    frames_before = rig.counters("sim").get("loopcast_frames_sent_total", 0.0)
    t_kill = time.time_ns()
    port, old = rig.broker.port, rig.broker
    os.kill(old.pid or 0, signal.SIGKILL)
    time.sleep(outage_s)
    old.stop()
    rig.broker = MosquittoBroker(port=port).start()
    t_up = time.time_ns()
    wait_until("the controller back on the broker", lambda: any(
        e == "broker_connected" for e, _, _ in states(rig.audit(), t_kill)), timeout_s)
    back = next(t for e, _, t in states(rig.audit(), t_kill) if e == "broker_connected")
    armed_after = bool(rig.status().get("armed"))
    stim_before = rig.counters("sim").get("loopcast_stimulations_total", 0.0)
    sent_unarmed = len(rig.sent(t_kill))
    t_arm = time.time_ns()
    rig.arm(timeout_s)
    wait_until("a trigger after the re-arm", lambda: len(rig.sent(t_arm)) > 0, timeout_s)
    wait_until("the fish's listener applying triggers again", lambda: rig.counters("sim").get(
        "loopcast_stimulations_total", 0.0) > stim_before, timeout_s)
    time.sleep(after_s)
    return _broker_report(rig, t_kill, t_up, back, t_arm, armed_after, sent_unarmed, frames_before)


def _broker_report(rig: DrillRig, t_kill: int, t_up: int, back: int, t_arm: int, armed_after: bool,
                   sent_unarmed: int, frames_before: float) -> dict[str, Any]:
    records = rig.audit()
    outage = [r for r in records if r["kind"] == "forecast" and t_kill < r["t_ns"] < t_arm]
    unsent = [r for r in outage if r["decision"] in ("suppressed", "publish_failed")]   # over the level, not sent
    sim, limits = rig.counters("sim"), rig.cfg.controller.interlocks
    return {"drill": "broker_killed", "injected": "SIGKILL to Mosquitto; restarted on its port",
            "outage_s": (t_up - t_kill) / 1e9, "reconnect_s": (back - t_kill) / 1e9,
            "reconnect_after_restart_s": (back - t_up) / 1e9,
            "disarmed_on_loss": not armed_after and any(e == "broker_lost" for e, _, _ in states(records, t_kill)),
            "sent_before_rearm": sent_unarmed, "stale_sent": len(stale_sent(records, limits.max_forecast_age_s)),
            "forecasts_over_level_unsent": len(unsent),
            "triggers_lost_est": _interval_bound(unsent, limits.min_interval_s),
            "first_trigger_after_arm_s": (rig.sent(t_arm)[0]["t_ns"] - t_arm) / 1e9,
            "frames_sent": sim.get("loopcast_frames_sent_total", 0.0) - frames_before,
            "frames_lost": _seq_gaps(rig.dirs["run"]), "records_lost": _audit_gaps(records),
            "processes_alive": {n: rig.alive(n) for n in rig.procs}}


def run_killed_drill(rig: DrillRig, down_s: float = 2.0, timeout_s: float = 90.0) -> dict[str, Any]:
    """`loopcast run` SIGKILLed mid-session: the controller sees forecasts stop, sends nothing stale, its
    watchdog disarms it; a new pipeline warms up and triggers resume only after an explicit arm."""
    start_loop(rig)
    run1 = rig.counters("run").get("loopcast_frames_received_total", 0.0)
    t_kill_s = rig.kill("run")
    t_kill = int(t_kill_s * 1e9)
    wait_until("the watchdog's disarm", lambda: any(e == "disarmed" and "watchdog" in c
                                                    for e, c, _ in states(rig.audit(), t_kill)), timeout_s)
    t_disarm = next(t for e, c, t in states(rig.audit(), t_kill) if e == "disarmed" and "watchdog" in c)
    time.sleep(max(0.0, down_s - (time.time() - t_kill_s)))
    t_restart = time.time_ns()
    rig.start("run", "run2")
    wait_until("forecasts from the new pipeline", lambda: any(
        r["kind"] == "forecast" for r in rig.audit() if r["t_ns"] > t_restart), timeout_s)
    first_fc = next(r["t_ns"] for r in rig.audit() if r["kind"] == "forecast" and r["t_ns"] > t_restart)
    time.sleep(1.0)   # forecasts flow while disarmed: none may fire
    sent_unarmed = len(rig.sent(t_kill))
    t_arm = time.time_ns()
    rig.arm(timeout_s)
    wait_until("a trigger after the arm", lambda: len(rig.sent(t_arm)) > 0, timeout_s)
    records = rig.audit()
    sim, run2 = rig.counters("sim"), rig.counters("run2")
    alive = {n: rig.alive(n) for n in rig.procs}
    rig.stop("run2")   # its session store is read closed: a live one may not have flushed a table yet
    return {"drill": "pipeline_killed", "injected": "SIGKILL to `loopcast run`; a new one started",
            "watchdog_disarm_s": (t_disarm - t_kill) / 1e9, "restart_to_first_forecast_s": (first_fc - t_restart) / 1e9,
            "sent_while_down_or_unarmed": sent_unarmed,
            "stale_sent": len(stale_sent(records, rig.cfg.controller.interlocks.max_forecast_age_s)),
            "first_trigger_after_arm_s": (rig.sent(t_arm)[0]["t_ns"] - t_arm) / 1e9,
            "frames_lost": _frames_between(rig.dirs["run"], rig.dirs["run2"]),
            "frames_lost_by_counters": sim.get("loopcast_frames_sent_total", 0.0) - run1
            - run2.get("loopcast_frames_received_total", 0.0),
            "records_lost": _audit_gaps(records), "processes_alive": alive}


def source_restart_drill(rig: DrillRig, after_s: float = 3.0, timeout_s: float = 90.0) -> dict[str, Any]:
    """The fish (the acquisition) SIGKILLed and started again: its seq restarts at 0 under a new `session`;
    the pipeline starts a new session (seq order and dF/F warm-up over) instead of refusing every frame."""
    start_loop(rig)
    before = rig.counters("run")
    t_kill = rig.kill("sim")
    rig.start("sim", "sim2")
    wait_until("frames of the new session", lambda: _delta(rig.counters("run"), before,
                                                           "loopcast_frames_received_total") > 0, timeout_s)
    time.sleep(after_s)
    run, sim2 = rig.counters("run"), rig.counters("sim2")
    firsts = [r["t_ns"] for r in rig.audit() if r["kind"] == "forecast" and r["t_src_ns"] > t_kill * 1e9]
    invalid = sum(_delta(run, before, k) for k in run if k.startswith("loopcast_frames_invalid"))
    return {"drill": "source_restarted", "injected": "SIGKILL to `loopcast sim`; a new one (seq from 0)",
            "session_changes": run.get("loopcast_session_changes_total", 0.0),
            "frames_sent_new_session": sim2.get("loopcast_frames_sent_total", 0.0),
            "frames_accepted_since": _delta(run, before, "loopcast_frames_received_total"),
            "frames_refused_since": invalid,
            "kill_to_first_forecast_s": min(firsts) / 1e9 - t_kill if firsts else None,
            "pipeline_alive": rig.alive("run")}


def _interval_bound(records: list[dict[str, Any]], min_interval_s: float) -> int:
    """How many of these refused wishes the interval interlock alone would have let through, spaced by their
    frames' source times (while the broker is down the controller reads no forecast: they queue and are
    decided in a burst on reconnect, disarmed): the triggers lost."""
    sent, last = 0, -float("inf")
    for t in sorted(r["t_src_ns"] / 1e9 for r in records):
        if t - last >= min_interval_s:
            sent, last = sent + 1, t
    return sent


def _delta(now: dict[str, float], before: dict[str, float], key: str) -> float:
    return now.get(key, 0.0) - before.get(key, 0.0)


def _seq_gaps(run_dir: Path) -> int:
    """Frames missing between the first and the last one the pipeline recorded (up to its last flush)."""
    frames = read_session(run_dir).frames
    if frames is None or not frames.valid.any():
        raise DrillError(f"no frames recorded in {run_dir}")
    seqs = np.unique(frames.seq[frames.valid])
    return int(seqs[-1] - seqs[0] + 1 - seqs.size)


def _frames_between(killed: Path, restarted: Path) -> int:
    """Frames no pipeline handled: from the killed one's last recorded seq to the new one's first (the killed
    store reads up to its last flush, so a frame it handled but had not flushed counts as lost)."""
    first, second = read_session(killed).frames, read_session(restarted).frames
    if first is None or second is None or not len(first) or not len(second):
        raise DrillError(f"no frames recorded in {killed} or {restarted}")
    return int(second.seq[second.valid].min() - first.seq[first.valid].max() - 1)


def _audit_gaps(records: list[dict[str, Any]]) -> int:
    """Records missing from the audit log: gaps in its running number `n`."""
    ns = [r["n"] for r in records]
    return sum(b - a - 1 for a, b in zip(ns, ns[1:]) if b > a + 1)


def slow_stage_drill(rig: DrillRig, slowdown: float = 3.0, frames: int = 120,
                     timeout_s: float = 120.0) -> dict[str, Any]:
    """The forecast stage `slowdown` x slower than the frame period, on a replayed recording: latency stays
    bounded, skipped frames are counted, and the dF/F of every frame equals the offline reference."""
    period_s = rig.cfg.rig.frame_period_s / rig.cfg.replay.speed
    delay_ms = slowdown * period_s * 1000
    rig.cfg = with_overrides(rig.cfg, [f"pipeline.forecast.drill_delay_ms={delay_ms}", f"pipeline.max_frames={frames}",
                                       "pipeline.forecast.wait_subscribers=0", "pipeline.source.rcvhwm=1000",
                                       f"replay.stop={frames}", "replay.wait_subscribers=1"])
    run_dir = rig.start("run")
    rig.start("replay")
    wait_until("the pipeline's end", lambda: not rig.alive("run"), timeout_s, poll_s=0.5)
    data = read_session(run_dir)
    if data.frames is None or data.dff is None:
        raise DrillError(f"no session record in {run_dir}: {rig.log_tail('run')}")
    return _slow_report(rig, data, data.frames, data.dff, delay_ms, period_s, frames)


def _slow_report(rig: DrillRig, data: SessionData, table: FrameTable, dff: TraceTable, delay_ms: float,
                 period_s: float, frames: int) -> dict[str, Any]:
    codes = table.forecast[table.valid]
    made = np.flatnonzero(codes == FORECAST_CODES.index("forecast"))
    series = next(iter(data.forecasts.values()))
    rec = Recording.open(rig.cfg.paths.recording)
    extractor = TraceExtractor(rec.segmentation())
    f_ref = np.stack([extractor.process(rec.read_volume(t)) for t in range(frames)])
    ref = causal_dff_reference(f_ref, rig.cfg.pipeline.preprocess.dff)[:, data.neurons]
    live = dff.data[np.argsort(dff.seq)]
    slow = f"{delay_ms / 1000 / period_s:.1f}x the {period_s * 1000:.0f} ms period"
    return {"drill": "slow_stage", "injected": f"every forecast {delay_ms:.0f} ms late ({slow})",
            "frames": len(codes), "frames_lost": frames - int(table.valid.sum()),
            "forecasts": int(made.size), "skipped": int(np.sum(codes == FORECAST_CODES.index("skipped"))),
            **{f"latency_{k}_ms": v for k, v in _quantiles(series.latency_ms).items()},
            # the newest frame waits for the forecast in flight, then its own: a queue would grow without end
            "latency_bound_ms": 2 * (delay_ms + period_s * 1000),
            "latency_first_last_third_p50_ms": _thirds(series.latency_ms),
            "dff_max_abs_error": float(np.max(np.abs(live - ref[np.sort(dff.seq)]))) if live.size else None,
            "dff_frames_compared": int(live.shape[0])}


def _thirds(x: np.ndarray) -> list[float]:
    """Median latency of the first and the last third of the forecasts: a backlog would make them drift."""
    k = max(1, len(x) // 3)
    return [float(np.median(x[:k])), float(np.median(x[-k:]))] if len(x) else []


def _quantiles(x: np.ndarray) -> dict[str, float]:
    x = np.asarray(x, dtype=np.float64)
    return {"p50": float(np.median(x)), "p99": float(np.percentile(x, 99)), "max": float(x.max())} if x.size else {}
