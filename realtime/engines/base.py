"""The engine interface: what every runtime offers, and the checks they share.

An engine lives at `<registry>/<name>/<version>/` (written by offline_training). This module never
imports torch, `models` or `offline_training`: the real-time side depends only on the artifact.
Every runtime offers the same narrow interface (`Engine`): `manifest`, `version`,
`check_neurons(n)`, `run(context (C, N)[, covariates (C+H, K)]) -> (H, N)` and `run_batch` for
(B, C, N). `engines.loader.load_engine(path, runtime, device)` picks one: ONNX Runtime on CPU or
CUDA (`engines.onnx_runtime`), TensorRT (`engines.tensorrt`, a serialized fp16 plan built from the
ONNX file) or torch (`engines.torch_runtime`, the torch.export program saved beside the ONNX file);
"auto" takes the fastest one available.

An engine may take a second input, `covariates` [batch, C + H, K]: the stimulus covariates of the
context steps followed by the H future steps (TiDE). `manifest.n_covariates` is K, 0 without one.

The manifest's optional `task` says what the output means: "forecast" (the default, and what manifests
without the field are: dF/F at lead times 1..H) or "spikes" (the expected spike count of the current
frame: H = 1, lead time 0) or "video" (the volumetric forecaster: `volumes` [batch, C, X, Y, Z] float32
and `lead_time` [batch] int64 in, the predicted dF/F `frame` [batch, X', Y', Z'] at that lead time out;
the manifest's `video` block says which downsampled, cropped grid the volumes live on; see
`realtime.forecast.video_reduce`) or "activation" (one probability per neuron that its response over the next H
frames meets the manifest's `activation` criterion: output [batch, 1, N], lead_times [H]). Video engines
run through `run_video`, trace engines (forecast, spikes, activation) through `run`. A trace engine's
manifest `signal` says what its context rows are: "dff" (causal dF/F) or "spike_prob" (causal spike
probabilities).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import numpy as np

from loopcast.realtime.engines.manifest import MANIFEST_FILE, VERSION_RE, EngineError, EngineManifest

# Numeric precisions of a runtime: bf16 runs the torch runtime's program under bfloat16 autocast (meant
# for CUDA); the other runtimes run the exported fp32 graph. Here, not in torch_runtime, so that checking
# a config never imports a runtime module.
PRECISIONS = ("fp32", "bf16")


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
                       if d.is_dir() and (m := VERSION_RE.match(d.name)))
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
        y: np.ndarray = self.run_batch(context[None], cov)[0]
        return y

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
        frames: np.ndarray = self._check_frames(self._infer(np.ascontiguousarray(volumes), lead), volumes.shape[0])
        return frames

    def run_video_traces(self, volumes: np.ndarray, lead_time: np.ndarray, reducer: Any) -> np.ndarray:
        """run_video's frames reduced to per-neuron traces (B, N) float32 by `reducer`
        (realtime.forecast.video_reduce.VolumeReducer). A runtime on a GPU overrides `_infer_traces` to reduce
        there and copy back only (B, N) values instead of B whole frames."""
        lead = self._check_video(volumes, lead_time)
        output_shape = tuple(self._video()["output_shape"])
        if tuple(reducer.output_shape) != output_shape:
            raise EngineError(f"engine {self.version}: the reducer's grid {tuple(reducer.output_shape)} is "
                              f"not the engine's output {output_shape}")
        y = self._infer_traces(np.ascontiguousarray(volumes), lead, reducer)
        if y.shape != (volumes.shape[0], reducer.n_neurons):
            raise EngineError(f"engine {self.version}: traces shape {y.shape} != (B, N) = "
                              f"{(volumes.shape[0], reducer.n_neurons)}")
        return y

    def _infer_traces(self, x: np.ndarray, lead: np.ndarray, reducer: Any) -> np.ndarray:
        traces: np.ndarray = reducer.reduce(self._check_frames(self._infer(x, lead), x.shape[0]))
        return traces

    def _video(self) -> dict[str, Any]:
        """The manifest's video block (EngineError for an engine that has none)."""
        video = self.manifest.video
        if video is None:
            raise EngineError(f"engine {self.version} is a {self.manifest.task!r} engine; run_video needs a video "
                              f"engine")
        return video

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
        if tuple(y.shape) != (batch, *self._video()["output_shape"]):
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
