"""Export a trained VideoUNet to a "video" engine: ONNX graph + manifest.json + config.toml.

The graph maps `volumes` [batch, C, X, Y, Z] float32 (the last C downsampled dF/F volumes) and
`lead_time` [batch] int64 (1..H) to `frame` [batch, X', Y', Z'] (the predicted volume at that lead
time, upsampled by 2**super_resolution in x and y). The manifest's "video" block
(VideoData.manifest_video()) tells the real-time side how the inputs were made and how to reduce a
frame to per-neuron traces. The version is built in the registry's staging directory and published
only after ONNX Runtime agrees with torch, exactly like trace engines (offline_training.export.engine).
"""
from __future__ import annotations

import copy
import functools
import logging
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from loopcast.config import dump_toml
from loopcast.models.video_unet import export_copy
from loopcast.offline_training.export.engine import (
    CONFIG_FILE,
    ONNX_FILE,
    TORCH_FILE,
    ExportConfig,
    ExportError,
    build_manifest,
    export_program,
    publish_engine,
    quiet_exporter,
)
from loopcast.offline_training.export.versions import engine_name, staging_dir

TASK = "video"
VOLUMES_NAME = "volumes"
LEAD_NAME = "lead_time"
FRAME_NAME = "frame"
VIDEO_PARITY_TOLERANCE = 1e-4
log = logging.getLogger(__name__)

__all__ = ["export_video_engine", "export_video_onnx", "video_parity_inputs", "check_video_parity",
           "ExportError", "TASK", "VOLUMES_NAME", "LEAD_NAME", "FRAME_NAME"]

Inputs = tuple[np.ndarray, np.ndarray]  # volumes (B, C, X, Y, Z) float32, lead_time (B,) int64


def export_video_engine(model: nn.Module, cfg: ExportConfig, registry_dir: str | Path, data: Any,
                        metrics: dict[str, Any], data_fingerprint: str, data_source: str,
                        name: str | None = None, tolerance: float = VIDEO_PARITY_TOLERANCE) -> Path:
    """Write a new video engine version under `<registry_dir>/<name>/` and return its directory.

    `data` is the VideoData the model was trained on (its manifest_video() block, input shape,
    neuron count and a few real windows for the parity check). Raises ExportError (and publishes
    nothing) when the export fails or ONNX Runtime disagrees with torch beyond `tolerance`."""
    video = dict(data.manifest_video())
    x, y, z = (int(v) for v in video["input_shape"])
    input_shape = (x, y, z)
    _check_model(model, cfg, video)
    name = name or engine_name(cfg.model, cfg.context, cfg.horizon)
    if any(p.device.type != "cpu" for p in model.parameters()):
        model = copy.deepcopy(model).cpu()  # exported and parity-checked on the CPU
    model = model.eval()
    staged = staging_dir(registry_dir, name)
    try:
        export_video_onnx(model, staged / ONNX_FILE, cfg.context, cfg.horizon, input_shape)
        inputs = video_parity_inputs(cfg.context, cfg.horizon, input_shape, cfg.seed, data)
        max_diff = check_video_parity(staged / ONNX_FILE, model, inputs, tolerance)
        files = {"onnx": ONNX_FILE, "config": CONFIG_FILE}
        if export_program(model, staged / TORCH_FILE, inputs[0], dynamic_n=False):
            files["torch"] = TORCH_FILE
        dump_toml(cfg, staged / CONFIG_FILE)
        manifest = functools.partial(build_video_manifest, name=name, model=model, cfg=cfg, n_neurons=_n_neurons(data),
                                     video=video, metrics=metrics, max_diff=max_diff, tolerance=tolerance,
                                     files=files, data={"fingerprint": data_fingerprint, "source": data_source})
        path = publish_engine(staged, lambda version: manifest(version=version))
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    # No TensorRT plan here (export.prebuild_tensorrt): realtime.engines.tensorrt serves trace engines only;
    # video engines run on ONNX Runtime or the torch program (model.pt2).
    log.info("exported video engine %s", path)
    return path


def _check_model(model: nn.Module, cfg: ExportConfig, video: dict[str, Any]) -> None:
    """The model's own config must agree with the train config and the data's video block."""
    mcfg = getattr(model, "config", None)
    want = {"context": cfg.context, "horizon": cfg.horizon,
            "super_resolution": int(video["super_resolution"])}
    bad = {k: (getattr(mcfg, k, None), v) for k, v in want.items() if getattr(mcfg, k, v) != v}
    if bad:
        raise ExportError("model config disagrees with the train config / data: "
                          + ", ".join(f"{k}: model {m} != {v}" for k, (m, v) in bad.items()))


def _n_neurons(data: Any) -> int:
    """Neurons the engine's frames reduce to (the data's reducer, i.e. its trace columns)."""
    return int(data.reducer.n_neurons)


def _example(context: int, horizon: int, input_shape: tuple[int, int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    volumes = torch.zeros(2, context, *input_shape, dtype=torch.float32)   # (B, C, X, Y, Z)
    lead = torch.tensor([1, horizon], dtype=torch.int64)                    # (B,)
    return volumes, lead


def export_video_onnx(model: nn.Module, path: Path, context: int, horizon: int,
                      input_shape: tuple[int, int, int]) -> None:
    """Export with the dynamo exporter: inputs 'volumes', 'lead_time', output 'frame', dynamic batch.
    GroupNorms are exported axis-wise (models.video_unet.AxiswiseGroupNorm): ONNX Runtime's own
    normalisation drifts by ~1e-3 over ZAPBench-size volumes."""
    batch = torch.export.Dim("batch")
    try:
        with quiet_exporter():
            torch.onnx.export(export_copy(model), _example(context, horizon, input_shape), str(path),
                              input_names=[VOLUMES_NAME, LEAD_NAME], output_names=[FRAME_NAME],
                              dynamic_shapes=({0: batch}, {0: batch}), dynamo=True,
                              external_data=False, verbose=False)
    except Exception as exc:  # the exporter raises many types
        raise ExportError(f"ONNX export of {type(model).__name__} failed: {type(exc).__name__}: {exc}") from exc


def video_parity_inputs(context: int, horizon: int, input_shape: tuple[int, int, int], seed: int,
                        data: Any | None = None) -> list[Inputs]:
    """Inputs to compare runtimes on: a seeded random batch of 2 at lead times (1, H) and, with
    `data`, two real windows (batch 2, lead times (mid, 1)) and one (batch 1, lead time H)."""
    rng = np.random.default_rng(seed)
    random = rng.normal(0.0, 0.3, size=(2, context, *input_shape)).astype(np.float32)
    out = [(random, np.array([1, horizon], dtype=np.int64))]
    if data is not None:
        last = int(data.traces.shape[0]) - context
        starts = np.array([0, max(last // 2, 0)], dtype=np.int64)
        real = np.ascontiguousarray(data.inputs(starts, context), dtype=np.float32)
        if real.shape != (2, context, *input_shape):
            raise ExportError(f"data.inputs gave {real.shape}, expected {(2, context, *input_shape)}")
        out.append((real, np.array([max(horizon // 2, 1), 1], dtype=np.int64)))
        out.append((real[1:], np.array([horizon], dtype=np.int64)))
    return out


@torch.no_grad()
def check_video_parity(onnx_path: Path, model: nn.Module, inputs: list[Inputs],
                       tolerance: float = VIDEO_PARITY_TOLERANCE) -> float:
    """Max abs difference between ONNX Runtime (CPU) and torch over `inputs`; raises past tolerance."""
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = max(torch.get_num_threads(), 1)
    session = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
    max_diff = 0.0
    for volumes, lead in inputs:
        got = session.run([FRAME_NAME], {VOLUMES_NAME: volumes, LEAD_NAME: lead})[0]
        want = model(torch.from_numpy(volumes), torch.from_numpy(lead)).numpy()
        if got.shape != want.shape:
            raise ExportError(f"ONNX output shape {got.shape} != torch {want.shape} for input {volumes.shape}")
        max_diff = max(max_diff, float(np.max(np.abs(got - want))))
    if not max_diff <= tolerance:  # also catches NaN
        raise ExportError(f"video engine: ONNX Runtime vs torch max abs diff {max_diff:.3g} "
                          f"> tolerance {tolerance:g}")
    return max_diff


def build_video_manifest(name: str, version: str, model: nn.Module, cfg: ExportConfig, n_neurons: int,
                         video: dict[str, Any], metrics: dict[str, Any], max_diff: float, tolerance: float,
                         data: dict[str, str], files: dict[str, str]) -> dict[str, Any]:
    """The trace manifest (export.build_manifest) with the video task's inputs, outputs and block."""
    manifest = build_manifest(name=name, version=version, model=model, cfg=cfg, n_neurons=n_neurons,
                              dynamic_n=False, metrics=metrics, max_diff=max_diff, tolerance=tolerance,
                              data=data, task="forecast", files=files)
    c, in_shape, out_shape = cfg.context, list(video["input_shape"]), list(video["output_shape"])
    manifest.update({
        "task": TASK,
        "inputs": [{"name": VOLUMES_NAME, "shape": ["batch", c, *in_shape], "dtype": "float32"},
                   {"name": LEAD_NAME, "shape": ["batch"], "dtype": "int64"}],
        "outputs": [{"name": FRAME_NAME, "shape": ["batch", *out_shape], "dtype": "float32"}],
        "video": video,
    })
    return manifest
