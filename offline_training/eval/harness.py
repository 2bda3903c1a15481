"""ZAPBench-style test-split evaluation of forecasters: MAE per step ahead per condition.

Metric. For each model and condition, MAE per step ahead h = 1..H is the mean of |forecast - target|
over the condition's stride-1 TEST windows and all neurons. Training conditions are scored on their
test ranges; a held-out condition (3 by default) on its whole test range, which starts
`max_context - C` frames late so that every C <= max_context scores the same target frames (for
training conditions the targets are the same for every C by construction). "average" is the mean of
the per-condition curves over the training conditions with test windows; the holdout is reported
separately and never enters it. A model undefined on a condition (the stimulus baseline without
repeats) gets n/a there, and n/a as its average.

A Forecaster is anything with `context`, `horizon` and
`predict(x (B, C, N), cov (B, C + H, K) | None, condition, starts) -> (B, H, N) | None`; adapters
wrap exported engines, the mean/last baselines and the stimulus baseline.
"""
from __future__ import annotations

import tomllib
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from loopcast.models.baselines import LastValue, LastValueConfig, MeanBaseline, MeanBaselineConfig
from loopcast.models.stimulus import StimulusBaseline, StimulusBaselineConfig
from loopcast.offline_training.data.splits import ConditionSplit, condition_splits, gather_windows, split_windows
from loopcast.offline_training.eval.plot import markdown_table, write_report
from loopcast.realtime.engines.base import Engine

BASELINES = ("mean", "last", "stimulus")
SPLIT_KEYS = ("holdout", "val_frac", "test_frac", "padding")  # what decides an engine's training windows


class Forecaster(Protocol):
    """What evaluation needs from a model."""

    @property
    def context(self) -> int: ...

    @property
    def horizon(self) -> int: ...

    def predict(self, x: np.ndarray, cov: np.ndarray | None, condition: int,
                starts: np.ndarray) -> np.ndarray | None: ...


@dataclass(frozen=True)
class EvalConfig:
    """Split parameters (as in TrainConfig), evaluation batch size and the table's steps ahead."""

    holdout: tuple[int, ...] = (3,)
    max_context: int = 256
    val_frac: float = 0.1
    test_frac: float = 0.2
    padding: int = 1
    batch_size: int = 64
    steps: tuple[int, ...] = (1, 8, 32)
    stride: int = 1            # score every stride-th test window (1 = ZAPBench's; >1 only to save compute)

    def __post_init__(self) -> None:
        if self.stride < 1 or self.batch_size < 1:
            raise ValueError(f"stride and batch_size must be >= 1, got {self.stride}, {self.batch_size}")

    @classmethod
    def from_train(cls, train: Any, **kw: Any) -> EvalConfig:
        """The split parameters of a TrainConfig (what the engines were trained with)."""
        keys = ("holdout", "max_context", "val_frac", "test_frac", "padding")
        return cls(**{k: getattr(train, k) for k in keys}, **kw)

    def splits(self, offsets: Sequence[int], context: int,
               names: Sequence[str] | None = None) -> list[ConditionSplit]:
        """ZAPBench condition splits for context length `context`."""
        return condition_splits(offsets, context, holdout=self.holdout, val_frac=self.val_frac,
                                test_frac=self.test_frac, padding=self.padding,
                                max_context=self.max_context, names=names)


@dataclass
class EngineForecaster:
    """An exported engine (realtime.engines.loader.load_engine) as a Forecaster."""

    engine: Engine
    baseline: bool = False

    @property
    def context(self) -> int:
        return self.engine.manifest.context

    @property
    def horizon(self) -> int:
        return self.engine.manifest.horizon

    def predict(self, x: np.ndarray, cov: np.ndarray | None, condition: int,
                starts: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        if self.engine.manifest.n_covariates and cov is not None:
            return self.engine.run_batch(x, np.ascontiguousarray(cov, dtype=np.float32))
        return self.engine.run_batch(x)


@dataclass
class TorchForecaster:
    """A torch module mapping (B, C, N) -> (B, H, N) (the mean and last-value baselines)."""

    module: nn.Module
    context: int
    horizon: int
    baseline: bool = True

    @torch.no_grad()
    def predict(self, x: np.ndarray, cov: np.ndarray | None, condition: int,
                starts: np.ndarray) -> np.ndarray:
        return self.module.eval()(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))).numpy()


@dataclass
class StimulusForecaster:
    """The fitted StimulusBaseline as a Forecaster (None where it is undefined)."""

    model: StimulusBaseline
    context: int
    horizon: int
    baseline: bool = True

    def predict(self, x: np.ndarray, cov: np.ndarray | None, condition: int,
                starts: np.ndarray) -> np.ndarray | None:
        return self.model.predict(condition, starts, self.context, self.horizon)


def baseline_forecasters(kinds: Sequence[str], contexts: Sequence[int], horizon: int,
                         traces: np.ndarray, offsets: Sequence[int], covariates: np.ndarray | None,
                         config: EvalConfig = EvalConfig()) -> dict[str, Forecaster]:
    """Baselines by kind: 'mean' (one per context, 'mean-c<C>'), 'last', 'stimulus' (needs covariates)."""
    bad = [k for k in kinds if k not in BASELINES]
    if bad:
        raise ValueError(f"unknown baselines {bad}; known: {list(BASELINES)}")
    c_min = min(contexts)
    out: dict[str, Forecaster] = {}
    if "mean" in kinds:
        for c in sorted(set(contexts)):
            out[f"mean-c{c}"] = TorchForecaster(MeanBaseline(MeanBaselineConfig(c, horizon)), c, horizon)
    if "last" in kinds:
        out["last"] = TorchForecaster(LastValue(LastValueConfig(c_min, horizon)), c_min, horizon)
    if "stimulus" in kinds:
        if covariates is None:
            raise ValueError("the stimulus baseline needs the recording's stimulus covariates")
        spans = {s.index: s.train for s in config.splits(offsets, c_min)}
        model = StimulusBaseline(StimulusBaselineConfig()).fit(traces, covariates, tuple(offsets), spans)
        out["stimulus"] = StimulusForecaster(model, c_min, horizon)
    return out


@dataclass(frozen=True)
class Condition:
    """One scored condition: index, name, whether held out, and its number of test windows."""

    index: int
    name: str
    holdout: bool
    windows: int

    @property
    def label(self) -> str:
        return f"{self.name} (holdout)" if self.holdout else self.name


@dataclass(frozen=True)
class EvalResult:
    """MAE per step ahead per (model, condition); `write` saves tables, figure and JSON."""

    horizon: int
    models: tuple[str, ...]
    conditions: tuple[Condition, ...]
    mae: dict[str, dict[int, np.ndarray]]   # model -> condition index -> (H,)
    baselines: frozenset[str] = frozenset()
    meta: dict[str, Any] = field(default_factory=dict)

    def average(self, model: str) -> np.ndarray:
        """(H,) mean over the training conditions with test windows (NaN if undefined on any)."""
        rows = [self.mae[model][c.index] for c in self.conditions if not c.holdout and c.windows]
        return np.mean(rows, axis=0) if rows else np.full(self.horizon, np.nan)

    def panels(self) -> list[tuple[str, dict[str, np.ndarray]]]:
        """(title, {model: (H,)}): 'average', each holdout, then each training condition."""
        out = [("average", {m: self.average(m) for m in self.models})]
        order = [c for c in self.conditions if c.holdout] + [c for c in self.conditions if not c.holdout]
        out += [(c.label, {m: self.mae[m][c.index] for m in self.models}) for c in order]
        return out

    def steps(self) -> list[int]:
        """The table's steps ahead that exist for this horizon."""
        return [s for s in self.meta.get("steps", (1, 8, 32)) if s <= self.horizon]

    def table(self) -> list[dict[str, Any]]:
        """Rows {condition, model, step k..., mean, windows}: models within each panel."""
        windows = {c.label: c.windows for c in self.conditions}
        rows = []
        for title, curves in self.panels():
            for m, curve in curves.items():
                row: dict[str, Any] = {"condition": title, "model": m}
                row.update({f"step {s}": float(curve[s - 1]) for s in self.steps()})
                row["mean"] = float(np.mean(curve))
                row["windows"] = windows.get(title, sum(c.windows for c in self.conditions if not c.holdout))
                rows.append(row)
        return rows

    def markdown(self) -> str:
        """The table as GitHub markdown, n/a where a model is undefined."""
        return markdown_table(self.table())

    def write(self, out_dir: str | Path) -> dict[str, Path]:
        """table.md, table.csv, mae_per_step.csv (long format), results.json and figure.png."""
        return write_report(self, Path(out_dir))

    def to_json(self) -> dict[str, Any]:
        """Plain JSON (NaN -> null)."""
        def plain(v: np.ndarray) -> list[float | None]:
            return [None if np.isnan(x) else float(x) for x in v]
        return {"horizon": self.horizon, "models": list(self.models), "baselines": sorted(self.baselines),
                "conditions": [c.__dict__ for c in self.conditions], **self.meta,
                "mae_per_step": {t: {m: plain(v) for m, v in curves.items()} for t, curves in self.panels()}}


def scoring_windows(offsets: Sequence[int], context: int, horizon: int, config: EvalConfig,
                 names: Sequence[str] | None = None) -> tuple[list[ConditionSplit], dict[int, np.ndarray]]:
    """Splits and test window starts (every config.stride-th) per condition, held-out ones included, for one C."""
    splits = config.splits(offsets, context, names)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # short ranges: reported as 0 windows / n/a
        starts = split_windows(splits, "test", context, horizon, include_holdout=True)
    return splits, {k: s[::config.stride] for k, s in starts.items()}


def evaluate_models(traces: np.ndarray, offsets: Sequence[int], models: Mapping[str, Forecaster],
                    names: Sequence[str] | None = None, covariates: np.ndarray | None = None,
                    config: EvalConfig = EvalConfig(), progress: bool = True,
                    meta: Mapping[str, Any] | None = None) -> EvalResult:
    """Score every model on the test split (see the module docstring); all must share H."""
    if not models:
        raise ValueError("nothing to evaluate: no models")
    horizons = {label: m.horizon for label, m in models.items()}
    if len(set(horizons.values())) != 1:
        raise ValueError(f"models evaluated together must share the horizon, got {horizons}")
    horizon = next(iter(horizons.values()))
    traces = np.ascontiguousarray(traces, dtype=np.float32)
    if traces.ndim != 2 or offsets[-1] > traces.shape[0]:
        raise ValueError(f"traces must be (T, N) with T >= {offsets[-1]}, got {traces.shape}")
    mae: dict[str, dict[int, np.ndarray]] = {}
    targets: dict[int, np.ndarray] | None = None
    for label, model in models.items():
        splits, starts = scoring_windows(offsets, model.context, horizon, config, names)
        targets = _same_targets(targets, starts, model.context, label)
        mae[label] = score(model, traces, covariates, starts, config.batch_size, progress, label)
    conditions = tuple(Condition(s.index, s.name, s.holdout, len(targets.get(s.index, ())))  # type: ignore[union-attr]
                       for s in splits)
    info = {"max_context": config.max_context, "holdout": list(config.holdout), "steps": list(config.steps),
            "window_stride": config.stride,
            "contexts": {label: m.context for label, m in models.items()}, **(meta or {})}
    return EvalResult(horizon=horizon, models=tuple(models), conditions=conditions, mae=mae,
                      baselines=frozenset(k for k, m in models.items() if getattr(m, "baseline", False)),
                      meta=info)


def _same_targets(ref: dict[int, np.ndarray] | None, starts: dict[int, np.ndarray], context: int,
                  label: str) -> dict[int, np.ndarray]:
    """First target frame of every window; must be identical for every model."""
    first = {k: s + context for k, s in starts.items()}
    if ref is not None and (ref.keys() != first.keys()
                            or any(not np.array_equal(ref[k], first[k]) for k in ref)):
        raise ValueError(f"model {label} (C={context}) would be scored on different target frames")
    return first


def score(model: Forecaster, traces: np.ndarray, covariates: np.ndarray | None,
          starts: Mapping[int, np.ndarray], batch_size: int = 64, progress: bool = False,
          label: str = "") -> dict[int, np.ndarray]:
    """{condition: (H,) MAE per step} over the windows at `starts` (NaN: no windows or undefined)."""
    c, h = model.context, model.horizon
    bar = tqdm(total=int(sum(len(s) for s in starts.values())), desc=f"eval {label}", unit="win",
               disable=not progress, leave=False)
    out = {}
    for k, s in starts.items():
        total = np.zeros(h, dtype=np.float64)
        for i in range(0, len(s), batch_size):
            batch = s[i:i + batch_size]
            x, y = gather_windows(traces, batch, c, h)
            cov = None if covariates is None else gather_windows(covariates, batch, c + h, 0)[0]
            pred = model.predict(x, cov, k, batch)
            if pred is None:
                total[:] = np.nan
                bar.update(len(s) - i)
                break
            if pred.shape != y.shape:
                raise ValueError(f"model {label}: forecast shape {pred.shape} != targets {y.shape}")
            total += np.abs(pred.astype(np.float64) - y).sum(axis=(0, 2))
            bar.update(len(batch))
        out[k] = total / (len(s) * traces.shape[1]) if len(s) else np.full(h, np.nan)
    bar.close()
    return out


def evaluate_engines(engines: Sequence[str | Path], traces: np.ndarray, offsets: Sequence[int],
                     names: Sequence[str] | None = None, covariates: np.ndarray | None = None,
                     baselines: Sequence[str] = BASELINES, config: EvalConfig = EvalConfig(),
                     runtime: str = "onnxruntime", device: str = "cpu", threads: int = 1,
                     progress: bool = True, meta: Mapping[str, Any] | None = None,
                     recording: Any = None) -> EvalResult:
    """Load engines (registry name dirs -> newest version, or version dirs) and score them with
    the baselines; labels are '<name>/<version>'. Video engines read their input volumes from
    `recording` (replay.layout.Recording, its prepared dF/F volumes) and are scored on its traces."""
    from loopcast.realtime.engines.loader import load_engine
    models: dict[str, Forecaster] = {}
    grids: dict[tuple[int, int, int], Any] = {}
    for path in engines:
        engine = load_engine(path, runtime=runtime, threads=threads, device=device)
        engine.check_neurons(traces.shape[1])
        check_training_splits(engine, config)
        models[engine.version] = _engine_forecaster(engine, recording, grids)
    if not models:
        raise ValueError("no engines to evaluate")
    horizon = next(iter(models.values())).horizon
    if any(m.horizon != horizon for m in models.values()):
        raise ValueError("engines evaluated together must share the horizon, got "
                         + ", ".join(f"{k}: H={m.horizon}" for k, m in models.items()))
    contexts = [m.context for m in models.values()]
    models.update(baseline_forecasters(baselines, contexts, horizon, traces, offsets, covariates, config))
    engine_meta = {k: str(m.engine.manifest.engine_dir) for k, m in models.items() if hasattr(m, "engine")}
    return evaluate_models(traces, offsets, models, names, covariates, config, progress,
                           {"engines": engine_meta, **(meta or {})})


def check_training_splits(engine: Engine, config: EvalConfig) -> None:
    """Refuse an engine trained with other split parameters than this evaluation's: its training windows
    could overlap the test windows scored here. An engine without its training config is only warned about."""
    m = engine.manifest
    path = m.file("config") if "config" in m.files else None
    if path is None or not path.is_file():
        warnings.warn(f"engine {engine.version} has no training config: its train/test split cannot be "
                      f"checked against this evaluation's", stacklevel=2)
        return
    trained = tomllib.loads(path.read_text())
    differ = {k: (trained[k], getattr(config, k)) for k in SPLIT_KEYS
              if k in trained and _split_value(trained[k]) != _split_value(getattr(config, k))}
    if differ:
        detail = ", ".join(f"{k} {a} (this evaluation: {b})" for k, (a, b) in differ.items())
        raise ValueError(f"engine {engine.version} was trained with {detail}; its training windows may "
                         f"overlap the test windows scored here. Evaluate it with its own split parameters "
                         f"(e.g. -s train.{next(iter(differ))}=...)")


def _split_value(v: Any) -> Any:
    return tuple(int(x) for x in v) if isinstance(v, (list, tuple)) else float(v)


def _engine_forecaster(engine: Engine, recording: Any, grids: dict[tuple[int, int, int], Any]) -> Forecaster:
    """A trace engine as is; a video engine over the recording's volumes (one VideoData per grid).
    Engines that do not forecast dF/F (activation probabilities, spike-probability forecasts such as the
    SBM's) are refused: their metrics come from their own training (metrics.json and the manifest)."""
    m = engine.manifest
    if m.task == "activation" or m.signal != "dff":
        what = "activation probabilities" if m.task == "activation" else f"{m.signal!r} forecasts"
        raise ValueError(f"engine {engine.version} gives {what}, not dF/F: `loopcast evaluate` scores dF/F "
                         f"forecasters; its test metrics are in its manifest ('metrics') and in the "
                         f"metrics.json of the run that trained it")
    if m.task != "video":
        return EngineForecaster(engine)
    if recording is None:
        raise ValueError(f"engine {engine.version} is a video engine: evaluating it needs the recording "
                         f"(its prepared dF/F volumes), not only traces")
    from loopcast.offline_training.video.forecasters import video_forecaster
    return video_forecaster(engine, recording, cache=grids)
