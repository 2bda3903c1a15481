"""Scoring video forecasters (offline_training.video.forecasters) like trace forecasters, on the data's
ZAPBench test targets, and recognising video engines on disk."""
from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from loopcast.offline_training.eval.harness import EvalConfig, EvalResult, Forecaster, evaluate_models
from loopcast.offline_training.video.forecasters import VIDEO_TASK, VideoForecaster
from loopcast.realtime.engines.base import resolve_engine
from loopcast.realtime.engines.manifest import MANIFEST_FILE

__all__ = ["evaluate_video", "is_video_engine"]


def is_video_engine(path: str | Path) -> bool:
    """Whether the engine at `path` (a version dir, or a registry name dir -> newest) is a video
    engine, read from its manifest's task (EngineError if there is no engine there)."""
    manifest = resolve_engine(path) / MANIFEST_FILE
    try:
        raw = json.loads(manifest.read_text())
    except (OSError, ValueError):
        return False  # unreadable: the ordinary loader reports it
    return isinstance(raw, dict) and raw.get("task") == VIDEO_TASK


def evaluate_video(engines_or_models: Mapping[str, Forecaster], data: Any,
                   trace_models: Mapping[str, Forecaster] | None = None,
                   config: EvalConfig = EvalConfig(), progress: bool = True,
                   covariates: np.ndarray | None = None) -> EvalResult:
    """Score video forecasters together with trace forecasters (engines, baselines) on the data's
    ZAPBench test targets (data.traces, data.offsets); labels must be distinct. `covariates`
    (T, K) stimulus covariates, for trace models that take them (TiDE engines)."""
    models: dict[str, Forecaster] = dict(engines_or_models)
    clash = sorted(set(models) & set(trace_models or {}))
    if clash:
        raise ValueError(f"labels used for both a video and a trace model: {clash}")
    models.update(trace_models or {})
    video = sorted(k for k, m in engines_or_models.items() if isinstance(m, VideoForecaster))
    meta = {"video": {"models": video, **dict(data.manifest_video())}}
    return evaluate_models(data.traces, data.offsets, models, names=_condition_names(data),
                           covariates=covariates, config=config, progress=progress, meta=meta)


def _condition_names(data: Any) -> list[str] | None:
    """The recording's condition names when there is one per condition, else None (defaults)."""
    names = list(getattr(getattr(data, "rec", None), "condition_names", None) or ())
    return names if len(names) == len(data.offsets) - 1 else None
