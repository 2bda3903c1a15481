"""Export a trained model to an engine: ONNX graph + manifest.json + config.toml, checked for parity.

The real-time side loads only these files (realtime/engines/base.py); nothing here is imported there.
Three tasks share the format: "forecast" (trace forecasters, lead times 1..H, output 'forecast'),
"spikes" (causal spike inference, H = 1 at lead time 0: the current frame, output 'spikes') and
"activation" (per-neuron probability that the response over the next H frames meets a criterion:
output 'activation' [batch, 1, N], lead_times [H], an `activation` block passed in `extra`).
`signal` records what the context rows are: "dff" (causal dF/F) or "spike_prob" (causal spike
probabilities); the real-time pipeline feeds each engine its signal.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import functools
import importlib.metadata
import importlib.util
import json
import logging
import shutil
import subprocess
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from loopcast.config import dump_toml, json_default
from loopcast.offline_training.export.versions import engine_name, publish, staging_dir
from loopcast.offline_training.trace.train import TrainConfig
from loopcast.realtime.engines.manifest import EngineError, EngineManifest

FORMAT = "loopcast-engine"
FORMAT_VERSION = 1
INPUT_NAME = "context"
COVARIATES_NAME = "covariates"
OUTPUT_NAME = "forecast"
TASKS = ("forecast", "spikes", "activation")
OUTPUT_NAMES = {"forecast": OUTPUT_NAME, "spikes": "spikes", "activation": "activation"}
SIGNALS = ("dff", "spike_prob")
ONNX_FILE = "model.onnx"
TORCH_FILE = "model.pt2"
CONFIG_FILE = "config.toml"
MANIFEST_FILE = "manifest.json"
PARITY_TOLERANCE = 1e-5
CORE_FIELDS = ("format", "format_version", "name", "version", "task", "signal", "model", "model_config",
               "context", "horizon", "lead_times", "n_neurons", "inputs", "outputs", "normalisation",
               "metrics", "parity", "data", "code_version", "created", "files")
log = logging.getLogger(__name__)


class ExportError(RuntimeError):
    """The model could not be exported, or the exported graph disagrees with torch."""


class ExportConfig(Protocol):
    """What the exporter reads from a training config (TrainConfig, SpikeTrainConfig); the whole
    dataclass is saved as config.toml."""

    @property
    def model(self) -> str: ...

    @property
    def context(self) -> int: ...

    @property
    def horizon(self) -> int: ...

    @property
    def seed(self) -> int: ...


def export_engine(model: nn.Module, train_cfg: TrainConfig | ExportConfig, registry_dir: str | Path,
                  n_neurons: int, metrics: dict[str, Any], data_fingerprint: str, data_source: str,
                  parity_input: np.ndarray | tuple[np.ndarray, np.ndarray] | None = None,
                  name: str | None = None,
                  tolerance: float = PARITY_TOLERANCE, task: str = "forecast", signal: str = "dff",
                  extra: dict[str, Any] | None = None) -> Path:
    """Write a new engine version under `<registry_dir>/<name>/` and return its directory.
    `signal`: what the context rows are ("dff" or "spike_prob"); `extra`: more manifest fields (e.g.
    {"activation": {...}}, required for task "activation"), never one of the core fields."""
    check_export_args(task, signal, train_cfg.horizon, extra)
    name = name or engine_name(train_cfg.model, train_cfg.context, train_cfg.horizon)
    model = model.eval()
    output = OUTPUT_NAMES[task]
    k = n_covariates(model)
    staged = staging_dir(registry_dir, name)
    try:
        dynamic_n = export_onnx(model, staged / ONNX_FILE, train_cfg.context, n_neurons, output,
                                horizon=train_cfg.horizon, covariates=k)
        inputs = parity_inputs(train_cfg.context, n_neurons, train_cfg.seed, parity_input,
                               horizon=train_cfg.horizon, covariates=k)
        max_diff = check_parity(staged / ONNX_FILE, model, inputs, tolerance, output)
        files = {"onnx": ONNX_FILE, "config": CONFIG_FILE}
        if export_program(model, staged / TORCH_FILE, inputs[0], dynamic_n):
            files["torch"] = TORCH_FILE
        dump_toml(train_cfg, staged / CONFIG_FILE)
        manifest = functools.partial(build_manifest, name=name, model=model, cfg=train_cfg, n_neurons=n_neurons,
                                     dynamic_n=dynamic_n, metrics=metrics, max_diff=max_diff, tolerance=tolerance,
                                     data={"fingerprint": data_fingerprint, "source": data_source}, task=task,
                                     n_covariates=k, files=files, signal=signal, extra=extra)
        path = publish_engine(staged, lambda version: manifest(version=version))
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    prebuild_tensorrt(path)
    return path


def check_export_args(task: str, signal: str, horizon: int, extra: dict[str, Any] | None) -> None:
    """ExportError unless task, signal and the extra manifest fields fit together."""
    if task not in TASKS:
        raise ExportError(f"task must be one of {list(TASKS)}, got {task!r}")
    if signal not in SIGNALS:
        raise ExportError(f"signal must be one of {list(SIGNALS)}, got {signal!r}")
    if task == "spikes" and horizon != 1:
        raise ExportError(f"a spikes engine estimates the current frame only: horizon must be 1, got {horizon}")
    block = (extra or {}).get("activation")
    if task == "activation" and not (isinstance(block, dict) and block.get("window") == horizon):
        raise ExportError(f"an activation engine needs extra={{'activation': {{'criterion': ..., 'threshold': "
                          f"..., 'window': {horizon}}}}} (window = horizon), got {block!r}")
    check_extra(extra)


def check_extra(extra: dict[str, Any] | None) -> None:
    """ExportError if an extra manifest field would override a core one."""
    core = set(CORE_FIELDS) & set(extra or {})
    if core:
        raise ExportError(f"extra manifest fields may not override core fields {sorted(core)}")


def publish_engine(staged: Path, manifest: Callable[[str], dict[str, Any]]) -> Path:
    """Publish a staged engine as the next version of its registry entry, with manifest.json written for
    the version the registry assigns (offline_training.export.versions.publish: atomic, never half visible).
    The manifest is validated by the reader the rig uses (realtime.engines.manifest) before it is published."""
    def finalize(staged_dir: Path, version: str) -> None:
        text = json.dumps(manifest(version), indent=2, default=json_default) + "\n"
        (staged_dir / MANIFEST_FILE).write_text(text)
        try:
            EngineManifest.load(staged_dir / MANIFEST_FILE)
        except EngineError as exc:
            raise ExportError(f"the exported manifest is invalid: {exc}") from exc

    return publish(staged, finalize)[1]


def prebuild_tensorrt(path: Path) -> str:
    """Where TensorRT and CUDA exist, build the engine's fp16 plan now (cached beside the ONNX file,
    parity-checked against ONNX Runtime, see realtime.engines.tensorrt) so the rig never waits for a build.
    Returns what happened; a failed build raises (an engine that cannot run on the rig is an error)."""
    if importlib.util.find_spec("tensorrt") is None:
        return "skipped: tensorrt is not installed"
    if not torch.cuda.is_available():
        return "skipped: no CUDA device"
    from loopcast.realtime.engines.tensorrt import TensorRTEngine
    engine = TensorRTEngine(path)
    engine.close()
    log.info("built the TensorRT plan of %s (parity %s)", path, getattr(engine, "parity", None))
    return "built"


def n_covariates(model: nn.Module) -> int:
    """K for a model that takes stimulus covariates (`uses_covariates`, config.n_covariates), else 0."""
    if not getattr(model, "uses_covariates", False):
        return 0
    k = int(getattr(getattr(model, "config", None), "n_covariates", 0))
    if k < 1:
        raise ExportError(f"{type(model).__name__} uses covariates but its config has no n_covariates >= 1")
    return k


def _examples(context: int, n: int, horizon: int, covariates: int) -> tuple[torch.Tensor, ...]:
    x = torch.zeros(2, context, n, dtype=torch.float32)                           # (B, C, N)
    if not covariates:
        return (x,)
    return x, torch.zeros(2, context + horizon, covariates, dtype=torch.float32)   # (B, C + H, K)


def export_onnx(model: nn.Module, path: Path, context: int, n_neurons: int,
                output_name: str = OUTPUT_NAME, horizon: int = 1, covariates: int = 0) -> bool:
    """Export with the dynamo exporter; dynamic batch and neurons if possible. Returns dynamic-N.
    A covariate model gets a second input 'covariates' (B, C + H, K)."""
    batch = torch.export.Dim("batch")
    attempts = [(True, 7, {0: batch, 2: torch.export.Dim("neurons")}), (False, n_neurons, {0: batch})]
    names = [INPUT_NAME, COVARIATES_NAME][:2 if covariates else 1]
    errors: list[str] = []
    for dynamic_n, n, dims in attempts:
        shapes = (dims, {0: batch}) if covariates else (dims,)
        try:
            with quiet_exporter():
                torch.onnx.export(model, _examples(context, n, horizon, covariates), str(path),
                                  input_names=names, output_names=[output_name], dynamic_shapes=shapes,
                                  dynamo=True, external_data=False, verbose=False)
            return dynamic_n
        except Exception as exc:  # the exporter raises many types; keep the reasons
            errors.append(f"{'dynamic' if dynamic_n else 'static'} N: {type(exc).__name__}: {exc}")
    raise ExportError("ONNX export failed:\n" + "\n".join(errors))


def export_program(model: nn.Module, path: Path, example: tuple[np.ndarray, ...], dynamic_n: bool) -> bool:
    """Save the torch.export program (the 'torch' runtime's artifact) with the ONNX graph's dynamic
    axes; False (and a warning) if torch.export cannot capture the model."""
    batch = torch.export.Dim("batch")
    dims = {0: batch, 2: torch.export.Dim("neurons")} if dynamic_n else {0: batch}
    shapes = (dims, {0: batch})[:len(example)]
    args = tuple(torch.from_numpy(np.ascontiguousarray(np.repeat(a, 2, axis=0)[:2])) for a in example)
    try:
        with quiet_exporter():
            program = torch.export.export(model, args, dynamic_shapes=shapes)
            program.example_inputs = None   # else the archive carries them: 340 MB at a ZAPBench video grid
            torch.export.save(program, str(path))
        return True
    except Exception as exc:  # torch.export raises many types
        warnings.warn(f"no torch runtime artifact for {type(model).__name__}: {type(exc).__name__}: {exc}",
                      stacklevel=2)
        return False


def parity_inputs(context: int, n_neurons: int, seed: int,
                  real: np.ndarray | tuple[np.ndarray, np.ndarray] | None = None, horizon: int = 1,
                  covariates: int = 0) -> list[tuple[np.ndarray, ...]]:
    """Model inputs to compare runtimes on: a seeded random batch (2, C, N) [with covariates
    (2, C + H, K)] and, if given, a real window (C, N) [or ((C, N), (C + H, K))] as a batch of 1."""
    rng = np.random.default_rng(seed)
    batch = [rng.normal(0.0, 0.3, size=(2, context, n_neurons)).astype(np.float32)]
    if covariates:
        batch.append(rng.uniform(0.0, 1.0, size=(2, context + horizon, covariates)).astype(np.float32))
    inputs = [tuple(batch)]
    if real is not None:
        parts = tuple(real) if isinstance(real, tuple) else (real,)
        want = [(context, n_neurons), (context + horizon, covariates)][:len(batch)]
        got = [np.shape(p) for p in parts]
        if got != want:
            raise ExportError(f"parity_input shapes {got} != {want} ((C, N) [, (C + H, K)])")
        inputs.append(tuple(np.ascontiguousarray(np.asarray(p, dtype=np.float32)[None]) for p in parts))
    return inputs


@torch.no_grad()
def check_parity(onnx_path: Path, model: nn.Module, inputs: list[tuple[np.ndarray, ...]],
                 tolerance: float = PARITY_TOLERANCE, output_name: str = OUTPUT_NAME) -> float:
    """Max abs difference between ONNX Runtime (CPU) and torch over `inputs`; raises past tolerance."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = max(torch.get_num_threads(), 1)
    session = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
    max_diff = 0.0
    for args in inputs:
        args = args if isinstance(args, tuple) else (args,)
        got = session.run([output_name], dict(zip([INPUT_NAME, COVARIATES_NAME], args)))[0]
        want = model(*(torch.from_numpy(a) for a in args)).numpy()
        if got.shape != want.shape:
            raise ExportError(f"ONNX output shape {got.shape} != torch {want.shape} for input {args[0].shape}")
        max_diff = max(max_diff, float(np.max(np.abs(got - want))))
    if not max_diff <= tolerance:  # also catches NaN
        raise ExportError(f"ONNX Runtime vs torch max abs diff {max_diff:.3g} > tolerance {tolerance:g}")
    return max_diff


def build_manifest(name: str, version: str, model: nn.Module, cfg: TrainConfig | ExportConfig,
                   n_neurons: int, dynamic_n: bool, metrics: dict[str, Any], max_diff: float,
                   tolerance: float, data: dict[str, str], task: str = "forecast", n_covariates: int = 0,
                   files: dict[str, str] | None = None, signal: str = "dff",
                   extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The manifest.json mapping (format_version 1) that realtime.engines.manifest.EngineManifest reads; `extra`
    fields are merged in (ExportError if one would override a core field)."""
    mcfg = getattr(model, "config", None)
    if dataclasses.is_dataclass(mcfg) and not isinstance(mcfg, type):
        model_config = dataclasses.asdict(mcfg)
    else:
        model_config = cfg.model_config()  # type: ignore[union-attr]
    neurons: str | int = "neurons" if dynamic_n else n_neurons
    lead_times = {"spikes": [0], "activation": [cfg.horizon]}.get(task, list(range(1, cfg.horizon + 1)))
    rows = 1 if task == "activation" else cfg.horizon
    check_extra(extra)
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION, "name": name, "version": version,
        "task": task, "signal": signal, "model": cfg.model, "model_config": model_config,
        "context": cfg.context, "horizon": cfg.horizon,
        "lead_times": lead_times, "n_neurons": int(n_neurons),
        "inputs": _input_specs(cfg.context, cfg.horizon, neurons, n_covariates),
        "outputs": [{"name": OUTPUT_NAMES[task], "shape": ["batch", rows, neurons], "dtype": "float32"}],
        "normalisation": None, "metrics": metrics,
        "parity": {"max_abs_diff": max_diff, "tolerance": tolerance, "runtime": "onnxruntime-cpu"},
        "data": data, "code_version": code_version(),
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "files": files or {"onnx": ONNX_FILE, "config": CONFIG_FILE},
        **({"future_covariates": getattr(cfg, "future_covariates", "recorded")} if n_covariates else {}),
        **(extra or {}),
    }


def _input_specs(context: int, horizon: int, neurons: str | int, covariates: int) -> list[dict[str, Any]]:
    specs = [{"name": INPUT_NAME, "shape": ["batch", context, neurons], "dtype": "float32"}]
    if covariates:
        specs.append({"name": COVARIATES_NAME, "shape": ["batch", context + horizon, covariates],
                      "dtype": "float32"})
    return specs


def code_version() -> str:
    """`git describe --always --dirty` of the source tree, else the installed package version."""
    root = Path(__file__).resolve().parents[1]
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty", "--tags"], cwd=root,
                             capture_output=True, text=True, timeout=5)
        if out.returncode == 0 and out.stdout.strip():
            return "git:" + out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        return "loopcast " + importlib.metadata.version("loopcast")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


@contextlib.contextmanager
def quiet_exporter() -> Iterator[None]:
    """Silence the exporter's torchvision notices, deprecation chatter, and the tracebacks torch logs
    when a dynamic neuron axis is refused (export_onnx then retries with a static one)."""
    names = ("torch.onnx._internal.exporter._registration", "torch._subclasses.fake_tensor",
             "torch.export._trace", "torch.fx.experimental.symbolic_shapes")
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.filterwarnings("ignore", message=".*axis name.*will not be used")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
