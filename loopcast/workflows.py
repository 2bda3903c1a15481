"""Offline workflows: synthesize a recording, train, export an engine (what `synth`, `train`,
`export`, `train-spikes`, `prepare-video`, `train-video`, `train-sbm`, `train-quantformer`, `evaluate` and
the demo's first run do).
The only app module that imports offline_training."""
from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from loopcast.app import UserError, engine_path, recording_present
from loopcast.config import from_dict, to_dict
from loopcast.models.zoo import build_model
from loopcast.offline_training.data.fingerprint import data_fingerprint
from loopcast.offline_training.export.engine import export_engine
from loopcast.offline_training.export.versions import engine_name
from loopcast.offline_training.fit.ddp import dist_env
from loopcast.offline_training.quantformer.train import QuantFormerResult, train_quantformer
from loopcast.offline_training.sbm.train import SBMResult, train_sbm
from loopcast.offline_training.spikes.train import train_spike_net
from loopcast.offline_training.trace.train import (
    TrainConfig,
    TrainResult,
    first_window,
    first_window_with_covariates,
    train,
)
from loopcast.offline_training.video.data import VideoData, prepare_video
from loopcast.offline_training.video.train import VideoTrainResult, train_video
from loopcast.realtime.engines.base import resolve_engine
from loopcast.realtime.engines.manifest import EngineError, EngineManifest
from loopcast.replay.layout import Recording
from loopcast.replay.synth import synthesize
from loopcast.settings import LoopcastConfig

log = logging.getLogger("loopcast")
CHECKPOINT = "model.pt"


def synth_recording(cfg: LoopcastConfig, out: str | None = None, overwrite: bool = False,
                    progress: bool = True) -> Recording:
    path = Path(out or cfg.paths.recording)
    t0 = time.monotonic()
    rec = synthesize(cfg.synth, path, progress=progress, overwrite=overwrite)
    log.info("synthesized %s: %d frames, %d neurons, volume %s in %.1f s", path, rec.n_frames,
             rec.n_neurons, "x".join(map(str, rec.volume_shape)), time.monotonic() - t0)
    return rec


def ensure_recording(cfg: LoopcastConfig, progress: bool = True) -> Recording:
    """The configured recording, synthesized first if it does not exist yet."""
    path = cfg.paths.recording
    if recording_present(path):
        return Recording.open(path)
    log.info("no recording at %s yet: synthesizing the simulated fish", path)
    return synth_recording(cfg, progress=progress)


def train_on_recording(cfg: LoopcastConfig, rec: Recording, run_dir: Path,
                       progress: bool = True) -> tuple[TrainResult, Path]:
    """Train [train] on the recording's train split; save a checkpoint and metrics in run_dir.
    Under torchrun every rank trains; only rank 0 writes (the others return the path it writes)."""
    traces = rec.traces()
    offsets = rec.condition_offsets
    covariates = rec.stimuli() if cfg.train.uses_covariates else None
    log.info("training %s (C=%d, H=%d) on %s: %d frames x %d neurons%s", cfg.train.model,
             cfg.train.context, cfg.train.horizon, rec.root, *traces.shape,
             "" if covariates is None else f", {covariates.shape[1]} stimulus covariates")
    result = train(traces, offsets, cfg.train, progress=progress, checkpoint=run_dir / "resume.pt",
                   covariates=covariates)
    ckpt = run_dir / CHECKPOINT
    if not dist_env().is_main:
        return result, ckpt
    torch.save({"train": to_dict(cfg.train), "state_dict": result.model.state_dict(),
                "metrics": result.metrics, "n_neurons": int(traces.shape[1]),
                "n_covariates": None if covariates is None else int(covariates.shape[1]),
                "data": {"fingerprint": data_fingerprint(traces, offsets), "source": str(rec.root)}},
               ckpt)
    (run_dir / "metrics.json").write_text(json.dumps(result.metrics, indent=2, default=_plain))
    log.info("val MAE %s; checkpoint %s", _mae_line(result.metrics), ckpt)
    return result, ckpt


def export_checkpoint(cfg: LoopcastConfig, ckpt: Path, rec: Recording | None = None) -> Path:
    """Checkpoint -> ONNX engine in the registry, parity-checked on a real val window. On torchrun ranks
    other than 0 nothing is exported: they return the engine's registry entry (rank 0 adds the version)."""
    if not dist_env().is_main:
        return Path(cfg.paths.engines) / engine_name(cfg.train.model, cfg.train.context, cfg.train.horizon)
    if not ckpt.is_file():
        raise UserError(f"no checkpoint at {ckpt}; run `loopcast train` first")
    saved: dict[str, Any] = torch.load(ckpt, map_location="cpu", weights_only=False)
    tcfg = from_dict(TrainConfig, saved["train"], "train")
    n_cov = saved.get("n_covariates")
    model = build_model(tcfg.model, tcfg.model_config(n_neurons=saved["n_neurons"], n_covariates=n_cov))
    model.load_state_dict(saved["state_dict"])
    window = None if rec is None else _parity_window(rec, tcfg, n_cov)
    path = export_engine(model, tcfg, cfg.paths.engines, saved["n_neurons"], saved["metrics"],
                         saved["data"]["fingerprint"], saved["data"]["source"], parity_input=window)
    log.info("exported engine %s", path)
    return path


def _parity_window(rec: Recording, tcfg: TrainConfig,
                   n_covariates: int | None) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """A real val window: its context (C, N), with its covariates (C + H, K) for a covariate model."""
    if n_covariates is None:
        return first_window(rec.traces(), rec.condition_offsets, tcfg)
    return first_window_with_covariates(rec.traces(), rec.condition_offsets, tcfg, rec.stimuli())


def ensure_engine(cfg: LoopcastConfig, run_dir: Path, progress: bool = True) -> Path:
    """The configured engine, trained and exported first if the registry has none."""
    try:
        return resolve_engine(engine_path(cfg))
    except EngineError:
        log.info("no engine at %s yet: training one", engine_path(cfg))
    rec = ensure_recording(cfg, progress)
    _, ckpt = train_on_recording(cfg, rec, run_dir, progress)
    return export_checkpoint(cfg, ckpt, rec)


def train_spikes(cfg: LoopcastConfig, run_dir: Path, work_dir: str | Path | None = None,
                 progress: bool = True) -> tuple[Path, dict[str, Any]]:
    """Train [train_spikes] on simulated fish (cached in work_dir), export a 'spikes' engine to
    paths.engines; returns (engine dir, its metrics), also written to run_dir/metrics.json. Training
    checkpoints to run_dir/resume.pt after every epoch; a rerun with the same run_dir resumes it."""
    work = Path(work_dir) if work_dir is not None else Path(cfg.paths.recording).parent / "spike-train"
    sc = cfg.train_spikes
    log.info("training %s (C=%d) on simulated fish: snrs %s x seeds %s, %d frames x %d neurons; cache %s",
             sc.model, sc.context, list(sc.snrs), list(sc.seeds), sc.n_frames, sc.fish.n_neurons, work)
    path = train_spike_net(sc, cfg.paths.engines, work, progress=progress, run_dir=run_dir)
    metrics = EngineManifest.load(path).metrics or {}
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, default=_plain))
    log.info("exported spikes engine %s", path)
    return path, metrics


def prepare_video_volumes(cfg: LoopcastConfig, rec: Recording, overwrite: bool = False,
                          progress: bool = True) -> str:
    """Write the recording's 4x-downsampled dF/F volumes ([prepare_video]) for the video model."""
    pc = dataclasses.replace(cfg.prepare_video, overwrite=overwrite or cfg.prepare_video.overwrite)
    t0 = time.monotonic()
    vol = prepare_video(rec, pc, progress=progress)
    log.info("wrote %s: %s x %d frames (%s baseline) in %.1f s", vol.location, "x".join(map(str, vol.shape)),
             vol.n_frames, pc.baseline, time.monotonic() - t0)
    return vol.location


def train_video_on_recording(cfg: LoopcastConfig, rec: Recording, run_dir: Path, resume: bool = False,
                             export: bool = True, progress: bool = True) -> tuple[VideoTrainResult, Path | None]:
    """Train [train_video] on the recording (its prepared dF/F volumes); export the best checkpoint to
    the engine registry unless export=False. Under torchrun only rank 0 exports."""
    from loopcast.offline_training.video.export import export_video_engine
    vc = cfg.train_video
    sr = int(vc.model_options.get("super_resolution", 0))
    data = VideoData(rec, vc.data, super_resolution=sr)
    log.info("training video_unet (C=%d, H=%d) on %s: %d frames, input %s -> output %s, %d neurons", vc.context,
             vc.horizon, rec.root, data.n_frames, data.input_shape, data.output_shape, data.n_neurons)
    result = train_video(rec, vc, run_dir, progress=progress, resume=resume)
    log.info("best val MAE %.4f at step %d; checkpoints %s", result.best_val_mae, result.best_step,
             result.checkpoints.get("best"))
    if not export or not dist_env().is_main:
        return result, None
    metrics = {"val": {"model": {"mae": result.best_val_mae}}, "best_step": result.best_step,
               "history": list(result.history)}
    path = export_video_engine(result.model, vc, cfg.paths.engines, data, metrics, result.data_fingerprint,
                               result.data_source)
    log.info("exported video engine %s", path)
    return result, path


def train_sbm_on_recording(cfg: LoopcastConfig, rec: Recording, run_dir: Path,
                           progress: bool = True) -> SBMResult:
    """Train [train_sbm] on the recording's causal spike probabilities as the pipeline computes them
    ([pipeline.preprocess]); evaluate; export `sbm-c<C>-h<H>` into the engine registry."""
    sc = cfg.train_sbm
    log.info("training the Sparse Brain Model (tau=%d, rollout %d) on %s: %d frames x %d neurons", sc.context,
             sc.horizon, rec.root, rec.n_frames, rec.n_neurons)
    return train_sbm(rec, sc, cfg.paths.engines, run_dir, progress=progress, pre=cfg.pipeline.preprocess)


def train_quantformer_on_recording(cfg: LoopcastConfig, rec: Recording, run_dir: Path,
                                   progress: bool = True) -> QuantFormerResult:
    """Pretrain and fine-tune [train_quantformer] on the recording's causal dF/F
    ([pipeline.preprocess.dff]); evaluate; export the activation engine (and the forecaster)."""
    qc = cfg.train_quantformer
    log.info("training QuantFormer (C=%d, H=%d, codebook %d) on %s: %d frames x %d neurons", qc.context,
             qc.horizon, qc.codebook_size, rec.root, rec.n_frames, rec.n_neurons)
    return train_quantformer(rec, qc, cfg.paths.engines, run_dir, progress=progress, dff=cfg.pipeline.preprocess.dff)


def _mae_line(metrics: dict[str, Any]) -> str:
    val = metrics.get("val", {})
    model = val.get("model", {}).get("mae", float("nan"))
    base = val.get("mean_baseline", {}).get("mae", float("nan"))
    return f"{model:.4f} (mean-of-context baseline {base:.4f})"


def _plain(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    return str(obj)
