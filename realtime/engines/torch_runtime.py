"""Torch runtime: run an engine's saved torch.export program (`files["torch"]`, e.g. model.pt2).

The program takes `context` (B, C, N) and, for a covariate engine, `covariates` (B, C + H, K)
positionally, as the ONNX graph does. It is loaded with `torch.export.load(path).module()`; no model
code (`models`, `offline_training`) is imported. Useful on CUDA without TensorRT, and as a reference.
A video engine's frames are reduced to traces on the engine's device (`run_video_traces`), so a GPU
copies back (B, N) values rather than B whole predicted volumes.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from loopcast.realtime.engines.base import PRECISIONS, EngineBase
from loopcast.realtime.engines.manifest import EngineError

TORCH_FILE_KEY = "torch"


class TorchEngine(EngineBase):
    """An engine served by torch (CPU or CUDA) from its torch.export program."""

    runtime = "torch"

    def __init__(self, path: str | Path, threads: int = 1, device: str = "cpu", precision: str = "fp32") -> None:
        super().__init__(path)
        if precision not in PRECISIONS:
            raise EngineError(f"unknown precision {precision!r}; expected one of {list(PRECISIONS)}")
        self._torch = _import_torch()
        self.device = _torch_device(self._torch, device)
        self.precision = precision
        if self.device.type == "cpu" and threads >= 1:
            self._torch.set_num_threads(threads)
        self.program_path = self._program_path()
        self.module = self._load(self.program_path)
        self._reducer: Any = None                    # the reducer whose index tensors are on the device
        self._reduce_index: tuple[Any, Any, Any] | None = None

    def _program_path(self) -> Path:
        m = self.manifest
        if TORCH_FILE_KEY not in m.files:
            raise EngineError(f"{m.path}: engine {self.version} has no torch.export program ('files' has "
                              f"no '{TORCH_FILE_KEY}' entry); re-export the engine with this version of "
                              f"loopcast or use runtime 'onnxruntime'")
        p = m.file(TORCH_FILE_KEY)
        if not p.is_file():
            raise EngineError(f"{m.path}: torch.export program {p.name} is missing")
        return p

    def _load(self, path: Path) -> Any:
        try:
            program = self._torch.export.load(str(path))
        except Exception as exc:  # torch raises many types for bad or incompatible archives
            raise EngineError(f"{path}: torch.export.load cannot load it "
                              f"({type(exc).__name__}: {exc})") from exc
        try:
            return program_on(program, self.device)
        except Exception as exc:
            raise EngineError(f"{path}: cannot move the program to {self.device} ({exc})") from exc

    def _infer(self, x: np.ndarray, cov: np.ndarray | None) -> np.ndarray:
        torch = self._torch
        with torch.inference_mode():
            y: np.ndarray = self._forward(x, cov).cpu().numpy()             # contiguous float32
            return y

    def _infer_traces(self, x: np.ndarray, lead: np.ndarray, reducer: Any) -> np.ndarray:
        """Frames (B, X', Y', Z') on the device -> per-neuron means (B, N), reduced there."""
        torch = self._torch
        with torch.inference_mode():
            y = self._check_frames(self._forward(x, lead), x.shape[0])             # (B, X', Y', Z')
            traces = reduce_frames(y, self._reduction(reducer), reducer.n_neurons)  # (B, N)
            out: np.ndarray = traces.cpu().numpy()                           # (B, N), contiguous
            return out

    def _forward(self, x: np.ndarray, extra: np.ndarray | None) -> Any:
        """The program's output on the device (call under inference_mode)."""
        torch = self._torch
        args = [torch.from_numpy(x).to(self.device)]
        if extra is not None:
            args.append(torch.from_numpy(extra).to(self.device))
        try:
            with torch.autocast(self.device.type, torch.bfloat16, enabled=self.precision == "bf16"):
                y = self.module(*args)
        except Exception as exc:  # shape guards of the exported program, device mismatches, ...
            raise EngineError(f"{self.program_path}: the torch program failed on input "
                              f"{tuple(x.shape)} ({type(exc).__name__}: {exc})") from exc
        y = y[0] if isinstance(y, (tuple, list)) else y
        # Contiguous on the device: a trace model's (B, H, N) output is often a transposed view, and copying
        # that to the host keeps its strides, so numpy then transposed 2.3 M values on the CPU (+14 ms per
        # frame on the H100 machine at 71,721 neurons; bench/gpu/probe.py trace).
        return y.float().contiguous()

    def _reduction(self, reducer: Any) -> tuple[Any, Any, Any]:
        """The reducer's (voxel, neuron, 1 / count) index arrays as device tensors, made once."""
        if self._reducer is not reducer or self._reduce_index is None:
            self._reduce_index = reduction_index(reducer, self.device)
            self._reducer = reducer
        return self._reduce_index

    def close(self) -> None:
        """Drop the module and the reduction's index tensors (and their device memory)."""
        self.module = None
        self._reducer = self._reduce_index = None


def program_on(program: Any, device: Any) -> Any:
    """An ExportedProgram as a module on `device`. Export bakes the exporting device into factory ops
    (a lead-time embedding's arange, routing indices) and into input checks, so moving the weights
    alone is not enough: torch.export.passes.move_to_device_pass rewrites those too."""
    from torch.export.passes import move_to_device_pass
    if str(device) != "cpu":
        program = move_to_device_pass(program, device)
    return program.module()


def reduction_index(reducer: Any, device: Any) -> tuple[Any, Any, Any]:
    """A VolumeReducer's voxel (M,), neuron (M,) and weight 1 / count (M,) arrays as tensors on `device`."""
    torch = _import_torch()
    weights = (1.0 / reducer.counts[reducer.neuron_index]).astype(np.float32)
    arrays = (reducer.voxel_index, reducer.neuron_index, weights)
    return tuple(torch.from_numpy(np.ascontiguousarray(a)).to(device) for a in arrays)


def reduce_frames(frames: Any, index: tuple[Any, Any, Any], n_neurons: int) -> Any:
    """Frames (B, X', Y', Z') tensor -> per-neuron means (B, N) float32 on the frames' device."""
    torch = _import_torch()
    voxels, neurons, weights = index
    flat = frames.reshape(frames.shape[0], -1).float()                          # (B, V')
    traces = torch.zeros(frames.shape[0], n_neurons, device=frames.device)
    return traces.index_add_(1, neurons, flat[:, voxels] * weights)             # (B, N)


def _import_torch() -> Any:
    try:
        import torch
    except ImportError as exc:
        raise EngineError(f"the torch runtime needs PyTorch (pip install torch): {exc}") from None
    return torch


def _torch_device(torch: Any, device: str) -> Any:
    """Validate 'cpu' / 'cuda' / 'cuda:k' and return the torch.device."""
    if device != "cpu" and not device.startswith("cuda"):
        raise EngineError(f"unknown device {device!r}; expected 'cpu' or 'cuda'")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError) as exc:
        raise EngineError(f"bad device {device!r} ({exc})") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise EngineError(f"device {device!r}: torch sees no CUDA device (torch.cuda.is_available() is "
                              f"False; torch {torch.__version__}); use device 'cpu'")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise EngineError(f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s)")
    return dev
