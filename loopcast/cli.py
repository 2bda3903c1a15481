"""`loopcast` — one console script, one subcommand per part of the loop.

Every subcommand reads configs/loopcast.toml (or -c FILE, repeatable: later files win), applies
`-s section.key=value` overrides, saves the resolved config in its run directory, and, for the
long-running parts, serves Prometheus metrics and writes a summary JSON when it stops.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from loopcast import app
from loopcast.config import ConfigError
from loopcast.realtime.engines.manifest import EngineError
from loopcast.settings import LoopcastConfig, load_settings, new_run_dir, training_sections

log = logging.getLogger("loopcast")
FLUSH_MS = 2000   # a source process's last frames may take this long to leave at its end


def cmd_synth(cfg: LoopcastConfig, args: argparse.Namespace, run_dir: Path) -> int:
    from loopcast.replay.layout import RecordingError
    from loopcast.workflows import synth_recording
    try:
        synth_recording(cfg, out=args.out, overwrite=args.overwrite)
    except RecordingError as exc:
        raise app.UserError(f"{exc} (command line: --overwrite)") from exc
    return 0


def cmd_replay(cfg: LoopcastConfig, args: argparse.Namespace, run_dir: Path) -> int:
    from loopcast.replay.layout import RecordingError
    from loopcast.replay.player import Player
    rec = app.open_recording(cfg, args.recording)
    try:
        volumes = rec.volume(cfg.replay.array, cfg.replay.level)
    except RecordingError as exc:
        raise app.UserError(str(exc)) from exc
    _check_rig(cfg, volumes.shape, str(volumes.dtype))
    metrics = app.process_metrics(cfg, "replay", run_dir)
    player = Player(rec, cfg.endpoints.frames, cfg.replay, cfg.rig.name, metrics, cfg.transport)
    log.info("replaying %s on %s at speed %s (0 = as fast as possible)", args.recording or cfg.paths.recording,
             player.endpoint, cfg.replay.speed)
    try:
        report = player.run(progress=True)
    except TimeoutError as exc:   # nobody subscribed to the frames
        raise app.UserError(f"{exc} (is `loopcast run` listening there? replay.wait_subscribers = 0 sends "
                            "anyway)") from exc
    finally:
        from loopcast.realtime.wire.transport import flush_and_exit_context
        player.close(linger_ms=FLUSH_MS)
        flush_and_exit_context(FLUSH_MS)   # the last frames leave before the process does
        metrics.close()
    metrics.write_summary(run_dir / "replay.summary.json", {"volumes_per_s": report.volumes_per_s},
                          samples=cfg.metrics.samples)
    log.info("sent %d volumes in %.1f s (%.2f volumes/s)", report.frames, report.seconds, report.volumes_per_s)
    return 0


def _check_rig(cfg: LoopcastConfig, shape: tuple[int, ...], dtype: str) -> None:
    """The pipeline rejects volumes that are not [rig] shape/dtype: say so before streaming any."""
    if tuple(shape) == tuple(cfg.rig.shape) and dtype == cfg.rig.dtype:
        return
    scale = " (-c configs/loopcast.toml -c configs/zapbench-scale.toml for ZAPBench's)" \
        if tuple(shape) == (2048, 1328, 72) else ""
    raise app.UserError(f"the recording's {cfg.replay.array} volumes (level {cfg.replay.level}) are "
                        f"{list(shape)} {dtype} but [rig] says {list(cfg.rig.shape)} {cfg.rig.dtype}: "
                        f"set rig.shape/rig.dtype to match{scale}")


def cmd_sim(cfg: LoopcastConfig, args: argparse.Namespace, run_dir: Path) -> int:
    metrics = app.process_metrics(cfg, "sim", run_dir)
    sim = app.build_sim(cfg, metrics, mqtt=not args.no_mqtt, run_dir=run_dir)
    log.info("live simulated fish on %s: %d neurons, %s voxels, speed %sx", sim.endpoint,
             cfg.synth.fish.n_neurons, "x".join(map(str, cfg.rig.shape)), cfg.sim.speed)
    try:
        report = app.run_until_signalled(sim.run)
    except TimeoutError as exc:   # nobody subscribed to the frames
        raise app.UserError(f"{exc} (is `loopcast run` listening there? sim.wait_subscribers = 0 sends anyway)") \
            from exc
    finally:
        from loopcast.realtime.wire.transport import flush_and_exit_context
        sim.close(linger_ms=FLUSH_MS)
        flush_and_exit_context(FLUSH_MS)
    metrics.write_summary(run_dir / "sim.summary.json", {"sim": report.__dict__}, samples=cfg.metrics.samples)
    metrics.close()
    log.info("sent %d frames, applied %d triggers; fish response %s", report.frames,
             report.triggers_received, json.dumps(report.response))
    return 0


def cmd_run(cfg: LoopcastConfig, args: argparse.Namespace, run_dir: Path) -> int:
    rec = app.open_recording(cfg)
    metrics = app.process_metrics(cfg, "run", run_dir)
    pipeline = app.build_pipeline(cfg, metrics, rec.segmentation(), run_dir, app.neuron_groups(rec))
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: pipeline.stop())
    log.info("pipeline: frames from %s, forecasts on %s", cfg.endpoints.frames, cfg.endpoints.forecasts)
    try:
        report = pipeline.run()
    finally:
        pipeline.close()
    metrics.write_summary(run_dir / "run.summary.json", {"pipeline": report.__dict__}, samples=cfg.metrics.samples)
    metrics.close()
    log.info("processed %d frames, published %d forecasts", report.frames, report.forecasts)
    return 0


def cmd_controller(cfg: LoopcastConfig, args: argparse.Namespace, run_dir: Path) -> int:
    rec = app.open_recording(cfg)
    metrics = app.process_metrics(cfg, "controller", run_dir)
    controller = app.build_controller(cfg, metrics, rec, run_dir)
    log.info("controller for rig %s: forecasts from %s, MQTT %s:%d, %s", cfg.rig.name,
             cfg.endpoints.forecasts, cfg.mqtt.host, cfg.mqtt.port,
             "ARMED at start" if cfg.controller.interlocks.armed_at_start else "disarmed until armed")
    log.info("audit log: %s", controller.audit.path or "off (controller.audit.enabled = false)")
    app.run_until_signalled(controller.run)
    metrics.write_summary(run_dir / "controller.summary.json", {"controller": controller.status()},
                          samples=cfg.metrics.samples)
    metrics.close()
    return 0


def cmd_train(cfg: LoopcastConfig, args: argparse.Namespace, run_dir: Path) -> int:
    from loopcast.workflows import export_checkpoint, train_on_recording
    rec = app.open_recording(cfg, args.data)
    _, ckpt = train_on_recording(cfg, rec, run_dir)
    if args.export:
        export_checkpoint(cfg, ckpt, rec)
    else:
        log.info("export it with: loopcast export --checkpoint %s", ckpt)
    return 0


def cmd_train_spikes(cfg: LoopcastConfig, args: argparse.Namespace, run_dir: Path) -> int:
    from loopcast.workflows import train_spikes
    path, metrics = train_spikes(cfg, run_dir, args.work_dir)
    print(f"engine {path}")
    for label, row in [("val", metrics.get("val", {})), *sorted(metrics.get("heldout", {}).items())]:
        print(f"{label:>8}: spike correlation (median over neurons) {row.get('corr_median', float('nan')):.3f}, "
              f"first-difference baseline {row.get('baseline_corr_median', float('nan')):.3f}")
    return 0


def cmd_export(cfg: LoopcastConfig, args: argparse.Namespace, run_dir: Path) -> int:
    from loopcast.workflows import export_checkpoint
    rec = app.open_recording(cfg) if app.recording_present(cfg.paths.recording) else None
    export_checkpoint(cfg, Path(args.checkpoint), rec)
    return 0


def cmd_evaluate(cfg: LoopcastConfig, args: argparse.Namespace, run_dir: Path) -> int:
    from loopcast.offline_training.eval.harness import EvalConfig, evaluate_engines
    from loopcast.replay.layout import RecordingError
    rec = app.open_recording(cfg, args.data)
    engines = args.engines or [str(app.engine_path(cfg))]
    try:
        covariates = rec.stimuli()
        result = evaluate_engines(engines, rec.traces(), rec.condition_offsets, rec.condition_names,
                                  covariates, args.baselines, EvalConfig.from_train(cfg.train),
                                  device=args.device, threads=cfg.train.threads,
                                  meta={"data": rec.root, "data_fingerprint": rec.fingerprint()},
                                  recording=rec)
    except (RecordingError, ValueError) as exc:
        raise app.UserError(str(exc)) from exc
    paths = result.write(Path(args.out) if args.out else run_dir)
    print(result.markdown())
    log.info("evaluation written to %s (table.md, table.csv, figure.png)", paths["markdown"].parent)
    return 0


def cmd_prepare_video(cfg: LoopcastConfig, args: argparse.Namespace, run_dir: Path) -> int:
    from loopcast.replay.layout import RecordingError
    from loopcast.workflows import prepare_video_volumes
    rec = app.open_recording(cfg, args.data)
    try:
        location = prepare_video_volumes(cfg, rec, overwrite=args.overwrite)
    except (RecordingError, ValueError) as exc:
        raise app.UserError(f"{exc} (command line: --overwrite)" if "overwrite" in str(exc) else str(exc)) from exc
    print(f"dF/F volumes {location}")
    return 0


def cmd_train_video(cfg: LoopcastConfig, args: argparse.Namespace, run_dir: Path) -> int:
    from loopcast.workflows import train_video_on_recording
    result, path = _train(cfg, args, run_dir, lambda c, rec, d: train_video_on_recording(
        c, rec, d, resume=args.resume, export=not args.no_export))
    print(f"best val MAE {result.best_val_mae:.4f} at step {result.best_step}"
          + (f"; engine {path}" if path else f"; checkpoint {result.checkpoints.get('best')}"))
    return 0


def cmd_train_sbm(cfg: LoopcastConfig, args: argparse.Namespace, run_dir: Path) -> int:
    from loopcast.workflows import train_sbm_on_recording
    result = _train(cfg, args, run_dir, train_sbm_on_recording)
    m = result.metrics
    for group in ("train_conditions", "holdout"):
        row = m.get("next_step", {}).get(group)
        if row:
            print(f"next-step MAE ({group}): SBM {row['model']:.4f}, "
                  + ", ".join(f"{k} {v:.4f}" for k, v in row.items() if k != "model"))
    for group, cal in m.get("calibration", {}).items():
        print(f"calibration ({group}): per-neuron mean r {cal.get('neuron_r', float('nan')):.3f}, "
              f"slope {cal.get('slope', float('nan')):.3f}, ECE {cal.get('ece', float('nan')):.4f}")
    _print_outputs(result.engine, run_dir)
    return 0


def cmd_train_quantformer(cfg: LoopcastConfig, args: argparse.Namespace, run_dir: Path) -> int:
    from loopcast.workflows import train_quantformer_on_recording
    result = _train(cfg, args, run_dir, train_quantformer_on_recording)
    for split in ("test", "holdout"):
        row = result.metrics.get(split)
        if row:
            act, fc = row["activation"], row["forecast"]
            print(f"{split}: activation AUROC {act['auroc']:.3f}, F1 {act['f1']:.3f} (base rate "
                  f"{act['base_rate']:.3f}); forecast MAE " + ", ".join(f"{k} {v['mae']:.4f}" for k, v in fc.items()))
    _print_outputs(result.engine, run_dir)
    if result.forecast_engine is not None:
        print(f"forecast engine {result.forecast_engine}")
    return 0


def _train(cfg: LoopcastConfig, args: argparse.Namespace, run_dir: Path,
           workflow: Callable[[LoopcastConfig, Any, Path], Any]) -> Any:
    """workflow(cfg, recording, run_dir) on --data (or paths.recording); bad data -> a UserError."""
    from loopcast.replay.layout import RecordingError
    rec = app.open_recording(cfg, args.data)
    try:
        return workflow(cfg, rec, run_dir)
    except (RecordingError, ValueError) as exc:
        raise app.UserError(str(exc)) from exc


def _print_outputs(engine: Path | None, run_dir: Path) -> None:
    print(f"engine {engine}" if engine else "no engine exported")
    print(f"metrics, figures and checkpoint in {run_dir}")


def cmd_control(cfg: LoopcastConfig, args: argparse.Namespace, run_dir: Path) -> int:
    from loopcast.control import send_control
    status = asyncio.run(send_control(cfg, args.action, timeout_s=args.timeout))
    print(json.dumps(status, indent=2))
    return 0


def cmd_session(cfg: LoopcastConfig, args: argparse.Namespace, run_dir: Path) -> int:
    from loopcast.session import commands
    from loopcast.session.data import RecordError
    try:
        return commands.run(args)
    except RecordError as exc:
        raise app.UserError(str(exc)) from exc


def cmd_demo(cfg: LoopcastConfig, args: argparse.Namespace, run_dir: Path) -> int:
    from loopcast.demo import run_demo
    return run_demo(cfg, run_dir, args)


COMMANDS: dict[str, tuple[Callable[..., int], str]] = {
    "synth": (cmd_synth, "write a seeded synthetic recording in the ZAPBench layout"),
    "replay": (cmd_replay, "stream a recording's volumes over ZeroMQ like a rig"),
    "sim": (cmd_sim, "live simulated fish at frame rate, responding to MQTT triggers"),
    "run": (cmd_run, "the real-time pipeline: ingest, dF/F, spikes, forecast, publish"),
    "controller": (cmd_controller, "forecasts -> trigger policy -> interlocks -> MQTT"),
    "train": (cmd_train, "train the trace forecaster on a recording's train split"),
    "export": (cmd_export, "export a checkpoint to an ONNX engine with its manifest"),
    "evaluate": (cmd_evaluate, "score engines and baselines on the test split: MAE per step ahead per condition"),
    "prepare-video": (cmd_prepare_video, "write a recording's 4x-downsampled dF/F volumes for the video model"),
    "train-video": (cmd_train_video, "train the volumetric video forecaster (4D UNet); export its engine"),
    "train-sbm": (cmd_train_sbm, "train the Sparse Brain Model on causal spike probabilities; export its engine"),
    "train-quantformer": (cmd_train_quantformer, "pretrain and fine-tune QuantFormer; export its activation engine"),
    "train-spikes": (cmd_train_spikes, "train the causal spike-inference net on simulated fish; export it"),
    "control": (cmd_control, "send arm / disarm / stop / reset to a controller"),
    "session": (cmd_session, "after a run: `report` RUN_DIR (summary and figure) or `export-nwb` RUN_DIR"),
    "demo": (cmd_demo, "the whole closed loop on the embedded defaults"),
}


# The training sections each command reads, resolved (imported, validated) before it starts; the
# other commands (run, controller, sim, replay, synth, control) leave them as tables, unimported.
TRAINING_READ: dict[str, tuple[str, ...]] = {
    "train": ("train",), "export": ("train",), "evaluate": ("train",), "demo": ("train",),
    "train-spikes": ("train_spikes",), "prepare-video": ("prepare_video",), "train-video": ("train_video",),
    "train-sbm": ("train_sbm",), "train-quantformer": ("train_quantformer",)}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loopcast", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (_, helptext) in COMMANDS.items():
        p = sub.add_parser(name, help=helptext, description=helptext)
        p.add_argument("-c", "--config", action="append", default=[], help="TOML config (repeatable)")
        p.add_argument("-s", "--set", action="append", default=[], metavar="KEY=VALUE",
                       help="dotted override, e.g. -s sim.speed=10 (repeatable)")
        p.add_argument("--run-dir", help="where the resolved config, logs and summaries go")
        p.add_argument("-v", "--verbose", action="store_true")
        _add_command_args(name, p)
    return parser


def _add_command_args(name: str, p: argparse.ArgumentParser) -> None:
    if name == "synth":
        p.add_argument("--out", help="store path (default: paths.recording)")
        p.add_argument("--overwrite", action="store_true")
    elif name == "replay":
        p.add_argument("--recording", help="store path (default: paths.recording)")
        p.add_argument("--speed", type=float, help="1 = recorded rate, 0 = as fast as possible")
        p.add_argument("--array", help="volumes to stream: raw, aligned or df_over_f (default: replay.array)")
        p.add_argument("--level", type=int, help="multiscale level, 2 = 4x downsampled xy (default: replay.level)")
        p.add_argument("--transport", choices=("zmq", "shm"), help="payload in the message or in shared memory")
    elif name == "sim":
        p.add_argument("--no-mqtt", action="store_true", help="do not listen for triggers")
        p.add_argument("--transport", choices=("zmq", "shm"), help="payload in the message or in shared memory")
        p.add_argument("--speed", type=float, help="1 = the rig's frame rate, 0 = as fast as possible")
        p.add_argument("--frames", type=int, help="stop after this many frames")
    elif name == "run":
        p.add_argument("--frames", type=int, help="stop after this many valid frames")
    elif name == "train":
        p.add_argument("--data", help="recording to train on (default: paths.recording)")
        p.add_argument("--export", action="store_true", help="export the engine right after training")
    elif name == "evaluate":
        p.add_argument("--engines", nargs="+", metavar="ENGINE",
                       help="registry name dirs (newest version) or version dirs; same horizon "
                            "(default: the configured engine)")
        p.add_argument("--baselines", nargs="*", choices=("mean", "last", "stimulus"),
                       default=["mean", "last", "stimulus"], help="baselines to score beside them")
        p.add_argument("--data", help="recording to evaluate on (default: paths.recording)")
        p.add_argument("--out", help="where table.md, table.csv, figure.png go (default: the run dir)")
        p.add_argument("--device", default="cpu", help="cpu or cuda (ONNX Runtime)")
    elif name == "prepare-video":
        p.add_argument("--data", help="recording (default: paths.recording); must be a local path")
        p.add_argument("--overwrite", action="store_true", help="replace existing dF/F volumes at that level")
    elif name == "train-video":
        p.add_argument("--data", help="recording with prepared dF/F volumes (default: paths.recording)")
        p.add_argument("--resume", action="store_true", help="continue from <run-dir>/last.pt")
        p.add_argument("--no-export", action="store_true", help="keep the checkpoint, do not export an engine")
    elif name in ("train-sbm", "train-quantformer"):
        p.add_argument("--data", help="recording to train on (default: paths.recording)")
    elif name == "train-spikes":
        p.add_argument("--work-dir", help="cache of simulated recordings (default: <paths.recording>/../spike-train)")
    elif name == "export":
        p.add_argument("--checkpoint", required=True, help="model.pt written by `loopcast train`")
    elif name == "control":
        p.add_argument("action", choices=("arm", "disarm", "stop", "reset"))
        p.add_argument("--timeout", type=float, default=5.0)
    elif name == "demo":
        p.add_argument("--fresh", action="store_true", help="re-synthesize and retrain")
    elif name == "session":
        from loopcast.session.commands import add_arguments
        add_arguments(p)


# Convenience flags that are just overrides of one config key.
SHORTCUTS = {("replay", "speed"): "replay.speed", ("sim", "speed"): "sim.speed",
             ("sim", "frames"): "sim.n_frames", ("run", "frames"): "pipeline.max_frames",
             ("replay", "level"): "replay.level", ("replay", "array"): 'replay.array="{}"',
             ("replay", "transport"): 'transport.kind="{}"', ("sim", "transport"): 'transport.kind="{}"'}


def _shortcut_overrides(args: argparse.Namespace) -> list[str]:
    out = []
    for (cmd, flag), key in SHORTCUTS.items():
        value = getattr(args, flag, None)
        if args.command == cmd and value is not None:
            out.append(key.format(value) if "{}" in key else f"{key}={value}")
    return out


def command_settings(args: argparse.Namespace) -> LoopcastConfig:
    """The command's config: its -c files (default configs/loopcast.toml), then its -s overrides and
    shortcut flags, resolved, with the training sections it reads (TRAINING_READ) validated."""
    cfg = load_settings(args.config or None, [*args.set, *_shortcut_overrides(args)])
    if args.command in TRAINING_READ:
        training_sections(cfg, *TRAINING_READ[args.command])
    return cfg


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    app.setup_logging(args.verbose)
    try:
        cfg = command_settings(args)
        app.configure_process(cfg, args.command)
        under_torchrun = int(os.environ.get("WORLD_SIZE", "1")) > 1   # torchrun's protocol
        if under_torchrun and not args.run_dir:
            raise app.UserError("under torchrun pass --run-dir: every rank must share one run directory")
        # `session` reads a run directory; it makes none
        run_dir = Path(args.session_dir) if args.command == "session" else new_run_dir(cfg, args.command, args.run_dir)
        code = COMMANDS[args.command][0](cfg, args, run_dir)
        if under_torchrun:                       # a rank leaves without gloo's teardown
            from loopcast.offline_training.fit.ddp import exit_rank
            exit_rank(code)
        return code
    except (ConfigError, app.UserError, EngineError) as exc:
        print(f"loopcast {args.command}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
