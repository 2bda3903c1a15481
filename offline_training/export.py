"""Export a trained model to an engine: ONNX graph + manifest.json + config.toml, checked for parity.

The real-time side loads only these files (realtime/engine.py); nothing here is imported there.
Two tasks share the format: "forecast" (trace forecasters, lead times 1..H, output 'forecast') and
"spikes" (causal spike inference, H = 1 at lead time 0: the current frame, output 'spikes').
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import importlib.metadata
import json
import logging
import shutil
import subprocess
import warnings
from pathlib import Path
from typing import Any, Iterator, Protocol

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from loopcast.config import dump_toml
from offline_training.registry import engine_name, publish, staging_dir
from offline_training.train import TrainConfig

FORMAT = "loopcast-engine"
FORMAT_VERSION = 1
INPUT_NAME = "context"
OUTPUT_NAME = "forecast"
TASKS = ("forecast", "spikes")
OUTPUT_NAMES = {"forecast": OUTPUT_NAME, "spikes": "spikes"}
ONNX_FILE = "model.onnx"
CONFIG_FILE = "config.toml"
MANIFEST_FILE = "manifest.json"
PARITY_TOLERANCE = 1e-5


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
                  parity_input: np.ndarray | None = None, name: str | None = None,
                  tolerance: float = PARITY_TOLERANCE, task: str = "forecast") -> Path:
    """Write a new engine version under `<registry_dir>/<name>/` and return its directory."""
    if task not in TASKS:
        raise ExportError(f"task must be one of {list(TASKS)}, got {task!r}")
    if task == "spikes" and train_cfg.horizon != 1:
        raise ExportError(f"a spikes engine estimates the current frame only: horizon must be 1, "
                          f"got {train_cfg.horizon}")
    name = name or engine_name(train_cfg.model, train_cfg.context, train_cfg.horizon)
    model = model.eval()
    output = OUTPUT_NAMES[task]
    staged = staging_dir(registry_dir, name)
    try:
        dynamic_n = export_onnx(model, staged / ONNX_FILE, train_cfg.context, n_neurons, output)
        inputs = parity_inputs(train_cfg.context, n_neurons, train_cfg.seed, parity_input)
        max_diff = check_parity(staged / ONNX_FILE, model, inputs, tolerance, output)
        dump_toml(train_cfg, staged / CONFIG_FILE)
        fields = dict(name=name, model=model, cfg=train_cfg, n_neurons=n_neurons, dynamic_n=dynamic_n,
                      metrics=metrics, max_diff=max_diff, tolerance=tolerance,
                      data={"fingerprint": data_fingerprint, "source": data_source}, task=task)

        def finalize(staged_dir: Path, version: str) -> None:
            manifest = build_manifest(version=version, **fields)
            text = json.dumps(manifest, indent=2, default=_json_default) + "\n"
            (staged_dir / MANIFEST_FILE).write_text(text)

        _, path = publish(staged, finalize)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    return path


def export_onnx(model: nn.Module, path: Path, context: int, n_neurons: int,
                output_name: str = OUTPUT_NAME) -> bool:
    """Export with the dynamo exporter; dynamic batch and neurons if possible. Returns dynamic-N."""
    batch = torch.export.Dim("batch")
    attempts = [(True, 7, {0: batch, 2: torch.export.Dim("neurons")}), (False, n_neurons, {0: batch})]
    errors = []
    for dynamic_n, n, dims in attempts:
        example = torch.zeros(2, context, n, dtype=torch.float32)
        try:
            with _quiet_exporter():
                torch.onnx.export(model, (example,), str(path), input_names=[INPUT_NAME],
                                  output_names=[output_name], dynamic_shapes=(dims,), dynamo=True,
                                  external_data=False, verbose=False)
            return dynamic_n
        except Exception as exc:  # the exporter raises many types; keep the reasons
            errors.append(f"{'dynamic' if dynamic_n else 'static'} N: {type(exc).__name__}: {exc}")
    raise ExportError("ONNX export failed:\n" + "\n".join(errors))


def parity_inputs(context: int, n_neurons: int, seed: int,
                  real: np.ndarray | None = None) -> list[np.ndarray]:
    """A seeded random batch (2, C, N) and, if given, a real window (C, N) as (1, C, N)."""
    rng = np.random.default_rng(seed)
    inputs = [rng.normal(0.0, 0.3, size=(2, context, n_neurons)).astype(np.float32)]
    if real is not None:
        real = np.asarray(real, dtype=np.float32)
        if real.shape != (context, n_neurons):
            raise ExportError(f"parity_input shape {real.shape} != (C, N) = {(context, n_neurons)}")
        inputs.append(np.ascontiguousarray(real[None]))
    return inputs


@torch.no_grad()
def check_parity(onnx_path: Path, model: nn.Module, inputs: list[np.ndarray],
                 tolerance: float = PARITY_TOLERANCE, output_name: str = OUTPUT_NAME) -> float:
    """Max abs difference between ONNX Runtime (CPU) and torch over `inputs`; raises past tolerance."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = max(torch.get_num_threads(), 1)
    session = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
    max_diff = 0.0
    for x in inputs:
        got = session.run([output_name], {INPUT_NAME: x})[0]
        want = model(torch.from_numpy(x)).numpy()
        if got.shape != want.shape:
            raise ExportError(f"ONNX output shape {got.shape} != torch {want.shape} for input {x.shape}")
        max_diff = max(max_diff, float(np.max(np.abs(got - want))))
    if not max_diff <= tolerance:  # also catches NaN
        raise ExportError(f"ONNX Runtime vs torch max abs diff {max_diff:.3g} > tolerance {tolerance:g}")
    return max_diff


def build_manifest(name: str, version: str, model: nn.Module, cfg: TrainConfig | ExportConfig,
                   n_neurons: int, dynamic_n: bool, metrics: dict[str, Any], max_diff: float,
                   tolerance: float, data: dict[str, str], task: str = "forecast") -> dict[str, Any]:
    """The manifest.json mapping (format_version 1) that realtime.engine.EngineManifest reads."""
    mcfg = getattr(model, "config", None)
    if dataclasses.is_dataclass(mcfg) and not isinstance(mcfg, type):
        model_config = dataclasses.asdict(mcfg)
    else:
        model_config = cfg.model_config()  # type: ignore[union-attr]
    neurons: str | int = "neurons" if dynamic_n else n_neurons
    lead_times = [0] if task == "spikes" else list(range(1, cfg.horizon + 1))
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION, "name": name, "version": version,
        "task": task, "model": cfg.model, "model_config": model_config,
        "context": cfg.context, "horizon": cfg.horizon,
        "lead_times": lead_times, "n_neurons": int(n_neurons),
        "inputs": [{"name": INPUT_NAME, "shape": ["batch", cfg.context, neurons], "dtype": "float32"}],
        "outputs": [{"name": OUTPUT_NAMES[task], "shape": ["batch", cfg.horizon, neurons], "dtype": "float32"}],
        "normalisation": None, "metrics": metrics,
        "parity": {"max_abs_diff": max_diff, "tolerance": tolerance, "runtime": "onnxruntime-cpu"},
        "data": data, "code_version": code_version(),
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "files": {"onnx": ONNX_FILE, "config": CONFIG_FILE},
    }


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
def _quiet_exporter() -> Iterator[None]:
    """Silence the exporter's torchvision notices and deprecation chatter."""
    logger = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            yield
    finally:
        logger.setLevel(level)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
