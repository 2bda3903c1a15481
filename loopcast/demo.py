"""`loopcast demo`: the whole closed loop on one machine, as separate processes like on a rig.

1. offline: synthesize the simulated fish's recording and train + export an engine (first run only);
2. start an MQTT broker (embedded amqtt by default), then `loopcast controller`, arm it over MQTT,
   then `loopcast run` (pipeline) and `loopcast sim` (the live fish, which obeys the triggers);
3. follow progress by scraping each process's /metrics; when the fish has sent its frames, stop
   everything and print frames, forecasts, triggers, the fish's response and per-stage latency.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import aiomqtt
from prometheus_client.parser import text_string_to_metric_families
from tqdm import tqdm

from loopcast.app import UserError
from loopcast.broker import Broker, EmbeddedBroker, MosquittoBroker
from loopcast.control import control_payload
from loopcast.realtime.metrics import STAGES
from loopcast.realtime.wire.codec import mqtt_topic
from loopcast.realtime.wire.mqtt_security import client_options
from loopcast.settings import LoopcastConfig, new_run_dir, with_overrides
from loopcast.workflows import ensure_engine, ensure_recording, export_checkpoint, synth_recording, train_on_recording

log = logging.getLogger("loopcast.demo")
PROCESSES = ("controller", "run", "sim")
RUN_CLOSE_S = 90.0   # the pipeline's stop, at most: the session record's writer may take 60 s on a saturated CPU


def run_demo(cfg: LoopcastConfig, run_dir: Path, args: argparse.Namespace) -> int:
    t0 = time.monotonic()
    engine = _prepare_offline(cfg, run_dir, fresh=getattr(args, "fresh", False))
    broker = start_demo_broker(cfg)
    procs: dict[str, subprocess.Popen[bytes]] = {}
    sockets = tempfile.TemporaryDirectory(prefix="loopcast-demo-")   # short ipc:// paths
    try:
        cfg = demo_config(cfg, broker.port if broker else cfg.mqtt.port, Path(sockets.name))
        new_run_dir(cfg, "demo", str(run_dir))  # the resolved config every process reads
        procs["controller"] = spawn("controller", run_dir)
        asyncio.run(_arm(cfg, cfg.demo.startup_timeout_s, procs["controller"]))
        procs["run"] = spawn("run", run_dir)
        procs["sim"] = spawn("sim", run_dir)
        _follow(cfg, procs, run_dir)
        failed = _shutdown(cfg, procs)
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
        if broker:
            broker.stop()
        sockets.cleanup()
    summary = _collect(run_dir, engine, time.monotonic() - t0)
    _print_report(cfg, summary, run_dir)
    healthy = not failed and summary["forecasts"] > 0
    if healthy and summary["triggers_sent"] == 0:
        print("note: no trigger fired: the policy's condition was never met (see [controller.policy])")
    if not healthy:
        for name in failed:
            print(log_tail(run_dir / f"{name}.log"), file=sys.stderr)
        print(f"demo FAILED: see the logs in {run_dir}", file=sys.stderr)
    return 0 if healthy else 1


def _prepare_offline(cfg: LoopcastConfig, run_dir: Path, fresh: bool) -> Path:
    if fresh:
        rec = synth_recording(cfg, overwrite=True)
        _, ckpt = train_on_recording(cfg, rec, run_dir)
        return export_checkpoint(cfg, ckpt, rec)
    ensure_recording(cfg)
    return ensure_engine(cfg, run_dir)


def start_demo_broker(cfg: LoopcastConfig) -> Broker | None:
    """The broker `mqtt.broker` names, started on a free port; None for an external one."""
    if cfg.mqtt.broker == "external":
        log.info("using the external MQTT broker at %s:%d (%s)", cfg.mqtt.host, cfg.mqtt.port,
                 cfg.mqtt.security.describe())
        return None
    if cfg.mqtt.security.use_tls or cfg.mqtt.username:
        raise UserError(f"the demo's own {cfg.mqtt.broker} broker takes anonymous plain TCP: with mqtt.username "
                        f"or TLS set, run your broker and set mqtt.broker = \"external\" (docs/mqtt-security.md)")
    broker = (EmbeddedBroker(port=0) if cfg.mqtt.broker == "embedded" else MosquittoBroker(port=0)).start()
    log.info("started %s MQTT broker on 127.0.0.1:%d", cfg.mqtt.broker, broker.port)
    return broker


def demo_config(cfg: LoopcastConfig, mqtt_port: int, sockets: Path) -> LoopcastConfig:
    """Private ipc:// endpoints and any free metrics ports (no port can be taken between choosing and
    binding it), the demo's pacing, and the pipeline waiting for its controller."""
    d = cfg.demo
    return with_overrides(cfg, [
        f"mqtt.port={mqtt_port}", f'endpoints.frames="ipc://{sockets}/frames"',
        f'endpoints.forecasts="ipc://{sockets}/forecasts"', *(f"metrics.{p}=0" for p in PROCESSES),
        f"sim.n_frames={d.frames}", f"sim.speed={d.speed}", f"sim.fault_every={d.fault_every}",
        f"sim.wait_timeout_s={d.startup_timeout_s}", "pipeline.forecast.wait_subscribers=1",
        f"pipeline.forecast.wait_timeout_s={d.startup_timeout_s}", "pipeline.idle_timeout_s=3.0"])


def spawn(command: str, run_dir: Path) -> subprocess.Popen[bytes]:
    """`loopcast <command>` on the run directory's config, its output in <run_dir>/<command>.log."""
    logfile = open(run_dir / f"{command}.log", "wb")
    # -P: the installed package, never a `loopcast/` folder in the working directory
    argv = [sys.executable, "-P", "-m", "loopcast.cli", command, "-c", str(run_dir / "config.toml"),
            "--run-dir", str(run_dir)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(argv, stdout=logfile, stderr=subprocess.STDOUT, env=env)


async def _arm(cfg: LoopcastConfig, timeout_s: float, proc: subprocess.Popen[bytes]) -> None:
    """Wait for the controller's retained status to say online, send `arm`, wait until armed."""
    try:
        await asyncio.wait_for(_arm_when_online(cfg, proc), timeout_s)
    except TimeoutError:
        raise RuntimeError(f"controller not armed after {timeout_s} s; see controller.log") from None


async def _arm_when_online(cfg: LoopcastConfig, proc: subprocess.Popen[bytes]) -> None:
    rig, m = cfg.rig.name, cfg.mqtt
    async with aiomqtt.Client(m.host, m.port, identifier=f"loopcast-demo-{time.time_ns()}",
                              **client_options(m.security)) as c:
        await c.subscribe(mqtt_topic(rig, "status"), qos=1)
        armed_sent = False
        async for msg in c.messages:
            status = json.loads(msg.payload)
            if status.get("armed"):
                log.info("controller armed")
                return
            if status.get("online") and not armed_sent:
                await c.publish(mqtt_topic(rig, "control"), control_payload("arm", "loopcast demo"), qos=1)
                armed_sent = True
            if proc.poll() is not None:
                raise RuntimeError("the controller exited; see controller.log")


def scrape_counters(run_dir: Path, process: str) -> dict[str, float]:
    """Counters (*_total) from a process's /metrics, found through the port file it wrote."""
    try:
        port = int((run_dir / f"{process}.metrics-port").read_text())
    except (OSError, ValueError):
        return {}
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=1).read().decode()
    except OSError:
        return {}
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name.endswith("_total"):
                out[s.name] = out.get(s.name, 0.0) + s.value
    return out


def _follow(cfg: LoopcastConfig, procs: dict[str, subprocess.Popen[bytes]], run_dir: Path) -> None:
    """A progress bar over the fish's frames, with forecasts and triggers from the other processes."""
    budget = cfg.demo.frames * cfg.rig.frame_period_s / cfg.demo.speed + 2 * cfg.demo.startup_timeout_s
    deadline = time.monotonic() + budget
    with tqdm(total=cfg.demo.frames, unit="frame", desc="closed loop") as bar:
        while procs["sim"].poll() is None and time.monotonic() < deadline:
            sim, run, ctl = (scrape_counters(run_dir, p) for p in ("sim", "run", "controller"))
            bar.n = int(sim.get("loopcast_frames_sent_total", bar.n))
            bar.set_postfix(forecasts=int(run.get("loopcast_forecasts_published_total", 0)),
                            triggers=int(ctl.get("loopcast_triggers_sent_total", 0)))
            bar.refresh()
            if any(procs[p].poll() is not None for p in ("controller", "run")):
                break
            time.sleep(0.5)
        bar.n = cfg.demo.frames if procs["sim"].poll() == 0 else bar.n
        bar.refresh()


def _shutdown(cfg: LoopcastConfig, procs: dict[str, subprocess.Popen[bytes]]) -> list[str]:
    """Sim ends by itself; the pipeline stops when idle; the controller on SIGTERM. The processes that did
    not exit with 0."""
    codes = {"sim": wait_or_stop(procs["sim"], 10), "run": wait_or_stop(procs["run"], RUN_CLOSE_S)}
    if procs["controller"].poll() is None:
        procs["controller"].send_signal(signal.SIGTERM)
    codes["controller"] = wait_or_stop(procs["controller"], 15)
    bad = {k: v for k, v in codes.items() if v != 0}
    for name, code in bad.items():
        log.error("%s exited with %s", name, code)
    return list(bad)


def log_tail(path: Path, lines: int = 12) -> str:
    """The last `lines` lines of a process's log, indented under its name."""
    try:
        tail = path.read_text(errors="replace").splitlines()[-lines:]
    except OSError as exc:
        return f"{path.name}: unreadable ({exc})"
    return "\n".join([f"last lines of {path.name}:", *(f"  | {line}" for line in tail)])


def wait_or_stop(proc: subprocess.Popen[bytes], timeout: float, grace_s: float = 10.0) -> int | None:
    """The exit code within `timeout`; else SIGTERM and `grace_s` more, else SIGKILL (None)."""
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            return None


def _collect(run_dir: Path, engine: Path, seconds: float) -> dict[str, Any]:
    s = {p: _load(run_dir / f"{p}.summary.json") for p in PROCESSES}
    c = {p: s[p].get("counters", {}) for p in PROCESSES}
    latency = {**s["run"].get("latency", {}), **s["controller"].get("latency", {})}
    manifest = _load(engine / "manifest.json")
    out = {"seconds": seconds, "engine": f"{manifest.get('name')}/{manifest.get('version')}",
           "val": manifest.get("metrics", {}).get("val", {}),
           "frames_sent": c["sim"].get("loopcast_frames_sent_total", 0),
           "faults_injected": s["sim"].get("sim", {}).get("faults", 0),
           "frames_received": c["run"].get("loopcast_frames_received_total", 0),
           "invalid": _labelled(c["run"], "loopcast_frames_invalid_total"),
           "dropped": _labelled(c["run"], "loopcast_frames_dropped_total"),
           "forecasts": sum(_labelled(c["run"], "loopcast_forecasts_published_total").values()),
           "triggers_sent": c["controller"].get("loopcast_triggers_sent_total", 0),
           "suppressed": _labelled(c["controller"], "loopcast_triggers_suppressed_total"),
           "stimulations": len(s["sim"].get("sim", {}).get("stimulations", [])),
           "response": s["sim"].get("sim", {}).get("response", {}), "latency": latency}
    (run_dir / "demo.summary.json").write_text(json.dumps(out, indent=2))
    return out


def _load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def _labelled(counters: dict[str, float], name: str) -> dict[str, float]:
    return {k.split("=", 1)[1].rstrip("}"): v for k, v in counters.items() if k.startswith(name + "{") and v}


def _print_report(cfg: LoopcastConfig, s: dict[str, Any], run_dir: Path) -> None:
    fish, d = cfg.synth.fish, cfg.demo
    val = s["val"]
    resp = s["response"]
    lines = [
        "", f"loopcast demo: closed loop on a simulated rig ({s['seconds']:.0f} s, run dir {run_dir})",
        f"  fish       {fish.n_neurons} neurons, {'x'.join(map(str, cfg.rig.shape))} voxels, {d.frames} frames "
        f"at {d.speed:g}x the {cfg.rig.frame_period_s} s frame period",
        f"  engine     {s['engine']} (val MAE {val.get('model', {}).get('mae', float('nan')):.4f}, "
        f"mean-of-context baseline {val.get('mean_baseline', {}).get('mae', float('nan')):.4f})",
        f"  frames     sent {s['frames_sent']:.0f} (+{s['faults_injected']} malformed injected), received "
        f"{s['frames_received']:.0f}, invalid {_fmt(s['invalid'])}, dropped {_fmt(s['dropped'])}",
        f"  forecasts  {s['forecasts']:.0f} made",
        f"  triggers   {s['triggers_sent']:.0f} sent, suppressed by interlocks {_fmt(s['suppressed'])}",
        f"  response   {s['stimulations']} stimulations applied; stimulated neurons fired "
        f"{resp.get('rate_ratio', 0):.1f}x their unstimulated rate "
        f"({resp.get('stimulated_neurons', 0)} neurons, fluorescence x{resp.get('fluorescence_ratio', 0):.2f})",
        "  latency    stage        p50 ms    p99 ms    max ms       n   (from the frame's source timestamp;"
        " trigger: forecast in -> PUBACK)"]
    for stage in STAGES:
        q = s["latency"].get(stage)
        if q:
            lines.append(f"             {stage:<10} {q['p50_ms']:>8.2f}  {q['p99_ms']:>8.2f}  {q['max_ms']:>8.2f}"
                         f"  {q['count']:>6}")
    lines += [f"  record     {run_dir} (session.zarr, controller.audit.jsonl; docs/record.md); look at it with:",
              f"               loopcast session report {run_dir}",
              f"               loopcast session export-nwb {run_dir}"]
    print("\n".join(lines))


def _fmt(d: dict[str, float]) -> str:
    total = sum(d.values())
    return f"{total:.0f}" + (" (" + ", ".join(f"{k} {v:.0f}" for k, v in sorted(d.items())) + ")" if d else "")
