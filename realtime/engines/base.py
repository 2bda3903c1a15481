"""Engine runtimes: load an exported engine directory (model.onnx + manifest.json), not model code.

An engine lives at `<registry>/<name>/<version>/` (written by offline_training). This module never
imports torch, `models` or `offline_training`: the real-time side depends only on the artifact.
Every runtime offers the same narrow interface (`Engine`): `manifest`, `version`,
`check_neurons(n)`, `run(context (C, N)[, covariates (C+H, K)]) -> (H, N)` and `run_batch` for
(B, C, N). `load_engine(path, runtime, device)` picks one: ONNX Runtime on CPU or CUDA (here),
TensorRT (`realtime.engine_trt`, a serialized fp16 plan built from the ONNX file) or torch
(`realtime.engine_torch`, the torch.export program saved beside the ONNX file); "auto" takes the
fastest one available.

An engine may take a second input, `covariates` [batch, C + H, K]: the stimulus covariates of the
context steps followed by the H future steps (TiDE). `manifest.n_covariates` is K, 0 without one.

The manifest's optional `task` says what the output means: "forecast" (the default, and what manifests
without the field are: dF/F at lead times 1..H) or "spikes" (the expected spike count of the current
frame: H = 1, lead time 0) or "video" (the volumetric forecaster: `volumes` [batch, C, X, Y, Z] float32
and `lead_time` [batch] int64 in, the predicted dF/F `frame` [batch, X', Y', Z'] at that lead time out;
the manifest's `video` block says which downsampled, cropped grid the volumes live on; see
`realtime.video_reduce`) or "activation" (one probability per neuron that its response over the next H
frames meets the manifest's `activation` criterion: output [batch, 1, N], lead_times [H]). Video engines
run through `run_video`, trace engines (forecast, spikes, activation) through `run`. A trace engine's
manifest `signal` says what its context rows are: "dff" (causal dF/F) or "spike_prob" (causal spike
probabilities).
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import onnxruntime as ort

from realtime.manifest import (COVARIATES_INPUT, FORMAT, FORMAT_VERSION, LEAD_INPUT,  # re-exported
                               MANIFEST_FILE, TASKS, VIDEO_KEYS, EngineError, EngineManifest, TensorSpec)

__all__ = ["COVARIATES_INPUT", "FORMAT", "FORMAT_VERSION", "LEAD_INPUT", "MANIFEST_FILE", "RUNTIMES", "TASKS",
           "VIDEO_KEYS", "Engine", "EngineBase", "EngineError", "EngineManifest", "OnnxEngine", "TensorSpec",
           "load_engine", "ort_providers", "resolve_engine"]
_VERSION_RE = re.compile(r"^v(\d{4,})$")
RUNTIMES = ("auto", "onnxruntime", "tensorrt", "torch")


class Engine(Protocol):
    """What the forecast stage needs from any runtime."""

    manifest: EngineManifest
    n_neurons: int

    @property
    def version(self) -> str: ...

    def check_neurons(self, n: int) -> None: ...

    def run(self, context: np.ndarray, covariates: np.ndarray | None = None) -> np.ndarray: ...

    def run_batch(self, context: np.ndarray, covariates: np.ndarray | None = None) -> np.ndarray: ...

    def run_video(self, volumes: np.ndarray, lead_time: np.ndarray) -> np.ndarray: ...

    def run_video_traces(self, volumes: np.ndarray, lead_time: np.ndarray, reducer: Any) -> np.ndarray: ...

    def close(self) -> None: ...


def resolve_engine(path: str | Path) -> Path:
    """A version directory -> itself; a registry name directory -> its highest version."""
    p = Path(path)
    hint = "create one with `loopcast train` (it exports to the engine registry)"
    if (p / MANIFEST_FILE).is_file():
        return p
    if p.is_dir():
        found = sorted((int(m.group(1)), d) for d in p.iterdir()
                       if d.is_dir() and (m := _VERSION_RE.match(d.name)))
        if found:
            return found[-1][1]
        names = sorted(d.name for d in p.iterdir() if d.is_dir() and not d.name.startswith("."))
        if names:
            raise EngineError(f"{p} holds no engine versions; is it a registry root? names here: "
                              f"{names[:10]} (pass <registry>/<name>), or {hint}")
    raise EngineError(f"no engine at {p}; {hint}")


class EngineBase:
    """The runtime-independent part of every engine: the manifest, neuron-count rules and the
    input/output checks. A runtime subclasses it and implements `_infer(x, cov) -> y` on
    (B, C, N) [+ (B, C + H, K)] float32 arrays."""

    runtime = "base"

    def __init__(self, path: str | Path) -> None:
        self.path = resolve_engine(path)
        self.manifest = EngineManifest.load(self.path / MANIFEST_FILE)
        self.n_neurons = self.manifest.n_neurons
        self._in = self.manifest.inputs[0].name
        self._extra = self.manifest.inputs[1].name if len(self.manifest.inputs) > 1 else None
        self._out = self.manifest.outputs[0].name

    @property
    def any_neurons(self) -> bool:
        """True for a 'spikes' engine with a symbolic neuron axis: the same per-neuron weights serve any
        N (a forecaster's weights or normalisation may be per neuron, so its N must match)."""
        m = self.manifest
        return m.task == "spikes" and isinstance(m.inputs[0].shape[2], str)

    @property
    def version(self) -> str:
        """'<name>/<version>', e.g. 'nlinear-c4-h8/v0001' (goes into forecast headers)."""
        return f"{self.manifest.name}/{self.manifest.version}"

    def check_neurons(self, n: int) -> None:
        """Raise EngineError unless the pipeline's neuron count matches the engine's; an engine that
        serves any N (see `any_neurons`) takes the pipeline's."""
        if self.any_neurons and n >= 1:
            self.n_neurons = n
            return
        if n != self.manifest.n_neurons:
            raise EngineError(f"engine {self.version} was trained on {self.manifest.n_neurons} neurons, "
                              f"the pipeline has {n}")

    def run(self, context: np.ndarray, covariates: np.ndarray | None = None) -> np.ndarray:
        """(H, N) float32 output (forecast or spike counts, see `manifest.task`) from context (C, N)
        float32 [and covariates (C + H, K) for an engine that takes them]."""
        self._require_trace_engine()
        _check_array(self.version, "context", context, 2)
        cov = None
        if covariates is not None:
            _check_array(self.version, "covariates", covariates, 2)
            cov = covariates[None]
        return self.run_batch(context[None], cov)[0]

    def run_batch(self, context: np.ndarray, covariates: np.ndarray | None = None) -> np.ndarray:
        """(B, H, N) from a batch of contexts (B, C, N) [and covariates (B, C + H, K)]; (B, 1, N) for an
        activation engine (`manifest.output_rows`)."""
        m = self.manifest
        self._require_trace_engine()
        _check_array(self.version, "context", context, 3)
        if context.shape[1:] != (m.context, self.n_neurons):
            raise EngineError(f"engine {self.version}: context shape {context.shape[1:]} != "
                              f"(C, N) = {(m.context, self.n_neurons)}")
        cov = self._check_covariates(covariates, context.shape[0])
        y = self._infer(np.ascontiguousarray(context), cov)
        if y.shape != (context.shape[0], m.output_rows, self.n_neurons):
            raise EngineError(f"engine {self.version}: output shape {y.shape} != (B, {m.output_rows}, N) "
                              f"(task {m.task!r})")
        return y

    def run_video(self, volumes: np.ndarray, lead_time: np.ndarray) -> np.ndarray:
        """A video engine's predicted frames (B, X', Y', Z') float32 from volumes (B, C, X, Y, Z) float32
        and integer lead times (B,) in [1, H]."""
        lead = self._check_video(volumes, lead_time)
        return self._check_frames(self._infer(np.ascontiguousarray(volumes), lead), volumes.shape[0])

    def run_video_traces(self, volumes: np.ndarray, lead_time: np.ndarray, reducer: Any) -> np.ndarray:
        """run_video's frames reduced to per-neuron traces (B, N) float32 by `reducer`
        (realtime.video_reduce.VolumeReducer). A runtime on a GPU overrides `_infer_traces` to reduce
        there and copy back only (B, N) values instead of B whole frames."""
        lead = self._check_video(volumes, lead_time)
        if tuple(reducer.output_shape) != tuple(self.manifest.video["output_shape"]):
            raise EngineError(f"engine {self.version}: the reducer's grid {tuple(reducer.output_shape)} is "
                              f"not the engine's output {tuple(self.manifest.video['output_shape'])}")
        y = self._infer_traces(np.ascontiguousarray(volumes), lead, reducer)
        if y.shape != (volumes.shape[0], reducer.n_neurons):
            raise EngineError(f"engine {self.version}: traces shape {y.shape} != (B, N) = "
                              f"{(volumes.shape[0], reducer.n_neurons)}")
        return y

    def _infer_traces(self, x: np.ndarray, lead: np.ndarray, reducer: Any) -> np.ndarray:
        return reducer.reduce(self._check_frames(self._infer(x, lead), x.shape[0]))

    def _check_video(self, volumes: np.ndarray, lead_time: np.ndarray) -> np.ndarray:
        """Validate a video call's inputs; the lead times as int64 (B,)."""
        m = self.manifest
        if m.task != "video" or m.video is None:
            raise EngineError(f"engine {self.version} is a {m.task!r} engine; run_video needs a video engine")
        _check_array(self.version, "volumes", volumes, 5)
        want = (m.context, *m.video["input_shape"])
        if volumes.shape[1:] != want:
            raise EngineError(f"engine {self.version}: volumes shape {volumes.shape[1:]} != (C, X, Y, Z) = {want}")
        lead = np.asarray(lead_time)
        if lead.shape != (volumes.shape[0],) or lead.dtype.kind not in "iu":
            raise EngineError(f"engine {self.version}: lead_time must be ({volumes.shape[0]},) integers, "
                              f"got {lead.dtype} {lead.shape}")
        if lead.size and (lead.min() < 1 or lead.max() > m.horizon):
            raise EngineError(f"engine {self.version}: lead times must lie in [1, {m.horizon}], got "
                              f"{sorted(set(lead.tolist()))}")
        return lead.astype(np.int64)

    def _check_frames(self, y: Any, batch: int) -> Any:
        """The runtime's predicted frames, if they are (B, X', Y', Z')."""
        if tuple(y.shape) != (batch, *self.manifest.video["output_shape"]):
            raise EngineError(f"engine {self.version}: output shape {tuple(y.shape)} != (B, X', Y', Z')")
        return y

    def _require_trace_engine(self) -> None:
        if self.manifest.task == "video":
            raise EngineError(f"engine {self.version} is a video engine: call run_video(volumes, lead_time)")

    def _check_covariates(self, covariates: np.ndarray | None, batch: int) -> np.ndarray | None:
        m = self.manifest
        if not m.n_covariates:
            if covariates is not None:
                raise EngineError(f"engine {self.version} takes no covariates")
            return None
        want = (batch, m.context + m.horizon, m.n_covariates)
        if covariates is None:
            raise EngineError(f"engine {self.version} needs stimulus covariates (C + H, K) = {want[1:]}")
        _check_array(self.version, "covariates", covariates, 3)
        if covariates.shape != want:
            raise EngineError(f"engine {self.version}: covariates shape {covariates.shape} != {want}")
        return np.ascontiguousarray(covariates)

    def _infer(self, x: np.ndarray, cov: np.ndarray | None) -> np.ndarray:
        raise NotImplementedError

    def close(self) -> None:
        """Release the runtime's resources (a no-op where there are none)."""


def _check_array(version: str, what: str, a: Any, ndim: int) -> None:
    if not isinstance(a, np.ndarray) or a.dtype != np.float32 or a.ndim != ndim:
        got = f"{a.dtype} with shape {a.shape}" if isinstance(a, np.ndarray) else type(a).__name__
        raise EngineError(f"engine {version}: {what} must be a {ndim}-d float32 ndarray, got {got}")


class OnnxEngine(EngineBase):
    """ONNX Runtime engine on CPU or CUDA: (C, N) float32 context in, (H, N) float32 out (a forecast,
    or for a 'spikes' engine the current frame's expected spike counts, H = 1)."""

    runtime = "onnxruntime"

    def __init__(self, path: str | Path, threads: int = 1, device: str = "cpu", memory_arena: bool = True) -> None:
        super().__init__(path)
        onnx_path = self.manifest.file("onnx")
        if not onnx_path.is_file():
            raise EngineError(f"{self.manifest.path}: ONNX file {onnx_path.name} is missing")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.enable_cpu_mem_arena = memory_arena   # off: buffers go back to the OS between calls
        self.device = device
        try:
            self.session = ort.InferenceSession(str(onnx_path), opts, providers=ort_providers(device))
        except Exception as exc:  # onnxruntime raises its own exception types
            raise EngineError(f"{onnx_path}: ONNX Runtime cannot load it ({exc})") from exc
        want = ({s.name for s in self.manifest.inputs}, {self._out})
        names = ({i.name for i in self.session.get_inputs()}, {o.name for o in self.session.get_outputs()})
        if not (want[0] <= names[0] and want[1] <= names[1]):
            raise EngineError(f"{onnx_path}: graph IO {names} does not match the manifest {want}")

    def _infer(self, x: np.ndarray, extra: np.ndarray | None) -> np.ndarray:
        """extra: the second input (covariates, or a video engine's lead times), fed by its name."""
        feeds = {self._in: x} if extra is None else {self._in: x, self._extra: extra}
        return self.session.run([self._out], feeds)[0]


def ort_providers(device: str) -> list[str]:
    """ONNX Runtime execution providers for 'cpu' or 'cuda' ('cuda[:k]' needs onnxruntime-gpu)."""
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if device.startswith("cuda"):
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise EngineError(f"device {device!r}: this onnxruntime has no CUDAExecutionProvider "
                              f"(available: {ort.get_available_providers()}; install onnxruntime-gpu)")
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    raise EngineError(f"unknown device {device!r}; expected 'cpu' or 'cuda'")


def load_engine(path: str | Path, runtime: str = "onnxruntime", threads: int = 1,
                device: str = "cpu", memory_arena: bool = True, precision: str = "fp32") -> Engine:
    """Open an engine with the named runtime on `device` ('cpu' or 'cuda').

    'onnxruntime' runs the ONNX file; 'tensorrt' the fp16 plan (built from the ONNX file on first use
    and cached beside it; CUDA only; trace engines only); 'torch' the saved torch.export program; 'auto'
    picks TensorRT on CUDA when importable (trace engines), else ONNX Runtime. `memory_arena` is ONNX
    Runtime's CPU arena: on, it keeps the largest call's buffers for reuse (faster); off, a large
    engine's peak goes back to the OS after each call. `precision` "bf16" runs the torch program under
    bfloat16 autocast (torch runtime only; TensorRT builds its own fp16 plan).
    """
    if runtime not in RUNTIMES:
        raise EngineError(f"unknown engine runtime {runtime!r}; available: {list(RUNTIMES)}")
    if runtime == "auto":
        trt = device.startswith("cuda") and _importable("tensorrt")
        runtime = "tensorrt" if trt and EngineManifest.load(resolve_engine(path)).task != "video" else "onnxruntime"
    if precision != "fp32" and runtime != "torch":
        raise EngineError(f"precision {precision!r} needs runtime 'torch' (runtime {runtime!r} runs the "
                          f"exported fp32 graph; TensorRT builds its own fp16 plan)")
    if runtime == "onnxruntime":
        return OnnxEngine(path, threads=threads, device=device, memory_arena=memory_arena)
    if runtime == "tensorrt":
        from realtime.engine_trt import TensorRTEngine
        return TensorRTEngine(path, device=device)
    from realtime.engine_torch import TorchEngine
    return TorchEngine(path, threads=threads, device=device, precision=precision)


def _importable(module: str) -> bool:
    import importlib.util
    return importlib.util.find_spec(module) is not None
