"""The closed loop at ZAPBench scale, as deployed: separate processes, shared-memory transport, Mosquitto.

Per run: Mosquitto, then `loopcast controller` (armed at start; its policy fires on every forecast and the
interlocks are opened up, so every forecast makes a trigger and forecast -> PUBACK is measured on each;
it and Mosquitto run under SCHED_FIFO, --priority, as on a rig: docs/cpu.md),
`loopcast run` (ingest, traces, causal dF/F, streaming OASIS, the engines) and `loopcast sim --transport shm`
(the simulated fish, 2048 x 1328 x 72 uint16 volumes of 71,721 neurons, at the rig's 0.9141 s period), all
with configs/loopcast.toml + configs/zapbench-scale.toml. Every process warms up before frames flow, so
every frame counts, the first included: latency is over all of them (nothing excluded), and a frame is
lost if the fish sent it and the pipeline did not take it (by reason: seq gaps, shm overruns, ...).

Engines: nlinear C=4 H=8 is the main forecaster (on the pipeline's thread); TSMixer C=4 H=32 (ZAPBench's
short-context config) is served beside it in its own thread (`pipeline.forecast.also`), so one run
measures both. Seeded random weights: latency does not depend on them. Exported once into --work.

Per stage: p50 / p99 / max per run, p99.9 over the runs pooled; frames lost by reason; CPU (cores busy)
and RSS per process (after a settle time, at the end, growth); latency drift (p50 / p99 per tenth of the
run). Beside them, in the same invocation: bench/preprocess.py's per-stage times at the same scale.

The pipeline and the controller need the fish's segmentation and neuron count: --recording is a
full-scale store of the same fish (`loopcast synth -c configs/loopcast.toml -c configs/zapbench-scale.toml
-s synth.write_raw=false -s synth.n_frames=30 --out data/zapbench-traces`, ~1 min, or the 45 GB store
with raw volumes that bench/replay.py uses).

    .venv/bin/python bench/loop_fullscale.py --recording data/bench-zapbench [--frames 1000,1000,1970]
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
from procstat import ProcSampler

from loopcast.broker import start_broker
from loopcast.demo import scrape_counters, spawn, wait_or_stop
from loopcast.settings import load_settings, new_run_dir

from common import quantiles, write_result

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = [ROOT / "configs/loopcast.toml", ROOT / "configs/zapbench-scale.toml"]   # --scale replaces the second
PROCESSES = ("controller", "run", "sim")
SETTLE_S = 120.0     # RSS growth is measured from this long after the first frame


# The controller armed, its policy firing on every nlinear forecast, the interlocks opened up: every
# forecast makes a trigger, so forecast -> PUBACK is measured on each (also bench/trigger_latency.py)
FIRE_ON_EVERY_FORECAST = [
    'controller.policy.mode="above"', "controller.policy.level=-1.0", 'controller.policy.model="nlinear"',
    "controller.interlocks.armed_at_start=true", "controller.interlocks.min_interval_s=0.0",
    "controller.interlocks.max_per_minute=1000000", "controller.interlocks.max_forecast_age_s=5.0",
    'rig.name="bench"']


def prioritise_broker(broker: object, priority: int) -> int | None:
    """Mosquitto's pid (None for the embedded broker), under SCHED_FIFO at `priority` when > 0, as a
    rig's unit would run it (docs/cpu.md); single-threaded, so its main thread is all of it."""
    pid: int | None = getattr(broker, "pid", None)
    if priority and pid is not None:
        os.sched_setscheduler(pid, os.SCHED_FIFO, os.sched_param(priority))
    return pid


def engines(n: int, work: Path, seed: int) -> dict[str, Path]:
    """nlinear C=4 H=8 and TSMixer C=4 H=32 at n neurons, seeded random weights (reused when present)."""
    import torch

    from loopcast.models.zoo import MODELS, model_config
    from loopcast.offline_training.export.engine import export_engine
    from loopcast.offline_training.trace.train import TrainConfig

    from trace_windows import Windows, dff_recording, parity_window, stimulus_recording
    specs = {"nlinear": (4, 8, {}), "tsmixer": (4, 32, {"n_blocks": 2, "mlp_dim": 256, "revin": False})}
    out = {}
    for name, (c, h, options) in specs.items():
        registry = work / "engines"
        found = sorted((registry / f"{name}-c{c}-h{h}").glob("v0*"))
        if found and f'"n_neurons": {n},' in (found[-1] / "manifest.json").read_text():
            out[name] = found[-1]
            continue
        torch.manual_seed(seed)
        model = MODELS[name][1](model_config(name, {"context": c, "horizon": h, **options,
                                                      **({"n_neurons": n} if name == "tsmixer" else {})})).eval()
        k = int(getattr(model.config, "n_covariates", 0)) if getattr(type(model), "uses_covariates", False) else 0
        dff = dff_recording(64, n, seed)
        stim = stimulus_recording(64 + h, k, seed + 1) if k else None
        train = TrainConfig(model=name, context=c, horizon=h, seed=seed, model_options=options)
        out[name] = export_engine(model, train, str(registry), n, metrics={},
                                  data_fingerprint=f"random-weights-seed{seed}",
                                  data_source="bench/loop_fullscale.py (seeded random weights)",
                                  parity_input=parity_window(Windows(dff, stim, c, h)))
        print(f"exported {out[name]}")
    return out


def preprocess_alone(frames: int) -> dict[str, Any]:
    """bench/preprocess.py at the same scale (traces, dF/F, OASIS alone, no loop around them)."""
    cmd = [sys.executable, str(ROOT / "bench/preprocess.py"), *(a for c in CONFIGS[1:] for a in ("-c", str(c))),
           "--frames", str(frames), "--naive-frames", "3", "--naive-deconv-frames", "2", "--skip", "voxel",
           "--name", "loop-fullscale-preprocess"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    path = next(line.split(" ", 1)[1] for line in out.splitlines() if line.startswith("wrote "))
    rows = json.loads(Path(path).read_text())["rows"]
    return {k: v for k, v in rows.items() if k in ("traces", "dff", "deconv")}


def one_run(args: argparse.Namespace, i: int, frames: int, eng: dict[str, Path], sockets: Path) -> dict[str, Any]:
    with start_broker(args.broker) as broker:
        broker_pid = prioritise_broker(broker, args.priority)
        cfg = load_settings(CONFIGS, [
            f'paths.recording="{args.recording}"', f'paths.runs="{args.work}/runs"', "metrics.samples=true",
            *(f"metrics.{p}=0" for p in PROCESSES), f"mqtt.port={broker.port}",
            f'endpoints.frames="ipc://{sockets}/frames-{i}"', f'endpoints.forecasts="ipc://{sockets}/fc-{i}"',
            'transport.kind="shm"', f"sim.n_frames={frames}", "sim.speed=1.0", "sim.wait_timeout_s=600",
            f'pipeline.forecast.engine="{eng["nlinear"]}"', f'pipeline.forecast.also=["{eng["tsmixer"]}"]',
            "pipeline.forecast.watch=false", "pipeline.forecast.wait_subscribers=1",
            "pipeline.forecast.wait_timeout_s=600", "pipeline.idle_timeout_s=10.0",
            *FIRE_ON_EVERY_FORECAST, f"runtime.priority.controller={args.priority}", *args.set])
        run_dir = new_run_dir(cfg, f"loop-fullscale-{i}")
        sampler = ProcSampler(1.0).start()
        procs: dict[str, subprocess.Popen[bytes]] = {}
        t_first = t_last = 0.0
        sent = 0.0
        try:
            for name in PROCESSES:
                procs[name] = spawn(name, run_dir)
                sampler.add(name, procs[name].pid)
            if broker_pid is not None:
                sampler.add("mosquitto", broker_pid)
            deadline = time.monotonic() + frames * cfg.rig.frame_period_s + 900
            while procs["sim"].poll() is None and time.monotonic() < deadline:
                sent = max(sent, scrape_counters(run_dir, "sim").get("loopcast_frames_sent_total", 0.0))
                now = time.monotonic()
                t_first = t_first or (now if sent else 0.0)
                print(f"\r  run {i + 1}: {sent:.0f}/{frames} frames sent", end="", flush=True)
                if any(procs[p].poll() is not None for p in ("controller", "run")):
                    break
                time.sleep(1.0)
            t_last = time.monotonic()
            print()
            codes = {"sim": wait_or_stop(procs["sim"], 30, 30), "run": wait_or_stop(procs["run"], 120, 30)}
            procs["controller"].send_signal(signal.SIGTERM)
            codes["controller"] = wait_or_stop(procs["controller"], 30, 30)
        finally:
            for p in procs.values():
                if p.poll() is None:
                    p.kill()
            sampler.stop()
    return collect(run_dir, codes, sampler, t_first, t_last)


def collect(run_dir: Path, codes: dict[str, int | None], sampler: ProcSampler, t0: float, t1: float) -> dict:
    summary = {p: load(run_dir / f"{p}.summary.json") for p in PROCESSES}
    samples = {**load(run_dir / "run.latency.json"), **load(run_dir / "controller.latency.json")}
    c = {p: summary[p].get("counters", {}) for p in PROCESSES}
    sent = c["sim"].get("loopcast_frames_sent_total", 0.0)
    received = c["run"].get("loopcast_frames_received_total", 0.0)
    lost = {k.split("=", 1)[1].rstrip("}"): v for k, v in c["run"].items()
            if k.startswith(("loopcast_frames_dropped_total{", "loopcast_frames_invalid_total{")) and v}
    lost["never_received"] = max(0.0, sent - received - sum(v for k, v in lost.items() if k != "forecast_skipped"))
    return {"run_dir": str(run_dir), "exit_codes": codes, "frames_sent": sent, "frames_received": received,
            "lost": lost, "counters": c, "pipeline": summary["run"].get("pipeline", {}),
            "controller": summary["controller"].get("controller", {}),
            "stages": {s: quantiles(np.asarray(v)) for s, v in samples.items()},
            "drift": {s: drift(np.asarray(v)) for s, v in samples.items() if len(v) >= 100},
            "processes": {n: tr.window(t0, t1, SETTLE_S) for n, tr in sampler.tracks.items()},
            "samples": samples}


def drift(x: np.ndarray, parts: int = 10) -> list[dict[str, float]]:
    """p50 / p99 in ms per tenth of the run, in order."""
    return [{"p50_ms": float(np.percentile(p, 50) * 1e3), "p99_ms": float(np.percentile(p, 99) * 1e3)}
            for p in np.array_split(x, parts)]


def load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def report(runs: list[dict], alone: dict[str, Any], frames: list[int]) -> dict[str, Any]:
    stages = sorted({s for r in runs for s in r["stages"]})
    pooled = {s: np.concatenate([np.asarray(r["samples"].get(s, [])) for r in runs]) for s in stages}
    print(f"\nclosed loop, {len(runs)} run(s) of {'/'.join(map(str, frames))} frames at the rig's rate (ms)")
    print(f"{'stage':<18}" + "".join(f"{'run ' + str(i + 1) + ' p50/p99/max':>26}" for i in range(len(runs)))
          + f"{'pooled p99.9':>14}")
    for s in stages:
        cells = "".join(f"{q['p50_ms']:>10.1f}{q['p99_ms']:>8.1f}{q['max_ms']:>8.1f}" if q.get("n") else f"{'-':>26}"
                        for q in (r["stages"].get(s, {}) for r in runs))
        p999 = np.percentile(pooled[s], 99.9) * 1e3 if pooled[s].size else float("nan")
        print(f"{s:<18}{cells}{p999:>14.1f}")
    print("alone (bench/preprocess.py, same invocation): "
          + ", ".join(f"{k} p50 {v['p50_ms']:.1f} / p99 {v['p99_ms']:.1f}" for k, v in alone.items()))
    for i, r in enumerate(runs):
        procs = ", ".join(f"{n} {p.get('cpu_cores', 0):.2f} cores {p.get('rss_mb_end', 0):.0f} MB "
                          f"({p.get('rss_growth_pct', 0):+.1f} %)" for n, p in r["processes"].items())
        print(f"run {i + 1}: sent {r['frames_sent']:.0f}, received {r['frames_received']:.0f}, lost "
              f"{json.dumps(r['lost'])}, exits {r['exit_codes']}\n       {procs}")
    return {s: {"p999_ms": float(np.percentile(v, 99.9) * 1e3), **quantiles(v)} for s, v in pooled.items() if v.size}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recording", required=True, help="a full-scale store of the same fish (segmentation)")
    ap.add_argument("--frames", default="1000,1000,1000", help="frames of each run, comma list (one run each; "
                    "1970 frames = 30 min at the rig's rate, a soak)")
    ap.add_argument("--work", default=str(ROOT / "data/bench-fullscale"), help="engines and run dirs")
    ap.add_argument("--broker", choices=("auto", "mosquitto", "embedded"), default="mosquitto")
    ap.add_argument("--preprocess-frames", type=int, default=200, help="bench/preprocess.py frames (0 = skip)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--name", default="loop-fullscale")
    ap.add_argument("--scale", default=str(CONFIGS[1]), help="config layered on configs/loopcast.toml ('' = none: "
                    "the demo's fish, for a quick check of this script)")
    ap.add_argument("--priority", type=int, default=10, help="SCHED_FIFO priority of the controller "
                    "(runtime.priority.controller) and of the bench's Mosquitto, as a rig would run them "
                    "(docs/cpu.md); 0 = both as the OS starts them")
    ap.add_argument("-s", "--set", action="append", default=[], help="config override for every process")
    args = ap.parse_args()
    CONFIGS[1:] = [Path(args.scale)] if args.scale else []
    per_run = [int(x) for x in args.frames.split(",") if x.strip()]
    if not (Path(args.recording) / "segmentation").exists():
        raise SystemExit(f"{args.recording}: no full-scale recording there (see this script's docstring)")
    t0 = time.monotonic()
    cfg = load_settings(CONFIGS)
    eng = engines(cfg.synth.fish.n_neurons, Path(args.work), args.seed)
    alone = preprocess_alone(args.preprocess_frames) if args.preprocess_frames else {}
    runs = []
    with tempfile.TemporaryDirectory(prefix="lc-") as sockets:
        for i, frames in enumerate(per_run):
            runs.append(one_run(args, i, frames, eng, Path(sockets)))
    pooled = report(runs, alone, per_run)
    path = write_result(args.name, {
        "description": __doc__.split("\n\n")[0], "frames": per_run,
        "engines": {k: str(v) for k, v in eng.items()}, "overrides": args.set, "priority": args.priority,
        "preprocess_alone": alone,
        "pooled": pooled, "runs": [{k: v for k, v in r.items() if k != "samples"} for r in runs],
        "loadavg_end": os.getloadavg(), "wall_s": round(time.monotonic() - t0, 1)})
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
