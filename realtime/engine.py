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
frame: H = 1, lead time 0).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import onnxruntime as ort

FORMAT = "loopcast-engine"
FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
_VERSION_RE = re.compile(r"^v(\d{4,})$")
TASKS = ("forecast", "spikes")
COVARIATES_INPUT = "covariates"
RUNTIMES = ("auto", "onnxruntime", "tensorrt", "torch")


class EngineError(RuntimeError):
    """An engine that cannot be found, parsed, loaded, or fed the given input."""


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output: name, shape (ints or symbolic names), dtype."""

    name: str
    shape: tuple[int | str, ...]
    dtype: str


@dataclass(frozen=True)
class EngineManifest:
    """The validated contents of an engine's manifest.json."""

    path: Path
    name: str
    version: str
    model: str
    model_config: dict[str, Any]
    context: int
    horizon: int
    lead_times: tuple[int, ...]
    n_neurons: int
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    files: dict[str, str]
    task: str = "forecast"
    normalisation: Any = None
    metrics: dict[str, Any] | None = None
    parity: dict[str, Any] | None = None
    data: dict[str, Any] | None = None
    code_version: str = ""
    created: str = ""

    @property
    def n_covariates(self) -> int:
        """K of the optional 'covariates' input [batch, C + H, K]; 0 when the engine has none."""
        return int(self.inputs[1].shape[2]) if len(self.inputs) > 1 else 0

    @property
    def engine_dir(self) -> Path:
        """The version directory holding this manifest."""
        return self.path.parent

    def file(self, key: str) -> Path:
        """Absolute path of one of the engine's files (e.g. 'onnx')."""
        if key not in self.files:
            raise EngineError(f"{self.path}: 'files' has no '{key}' entry")
        return self.engine_dir / self.files[key]

    @classmethod
    def load(cls, path: str | Path) -> "EngineManifest":
        """Parse and validate a manifest.json (or the version directory holding one)."""
        p = Path(path)
        p = p / MANIFEST_FILE if p.is_dir() else p
        try:
            raw = json.loads(p.read_text())
        except FileNotFoundError:
            raise EngineError(f"{p}: manifest not found") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise EngineError(f"{p}: manifest is not valid JSON ({exc})") from None
        return _parse_manifest(p, raw)


def _parse_manifest(p: Path, raw: Any) -> EngineManifest:
    if not isinstance(raw, dict):
        raise EngineError(f"{p}: manifest must be a JSON object")
    get = _Getter(p, raw)
    if raw.get("format") != FORMAT or raw.get("format_version") != FORMAT_VERSION:
        raise EngineError(f"{p}: not a {FORMAT} v{FORMAT_VERSION} manifest "
                          f"(format={raw.get('format')!r}, format_version={raw.get('format_version')!r})")
    m = EngineManifest(
        path=p, name=get("name", str), version=get("version", str), model=get("model", str),
        model_config=get("model_config", dict), context=get("context", int), horizon=get("horizon", int),
        lead_times=tuple(get("lead_times", list)), n_neurons=get("n_neurons", int),
        inputs=get.specs("inputs"), outputs=get.specs("outputs"), files=get("files", dict),
        task=get.optional("task", str, "forecast"),
        normalisation=raw.get("normalisation"), metrics=raw.get("metrics"), parity=raw.get("parity"),
        data=raw.get("data"), code_version=str(raw.get("code_version", "")),
        created=str(raw.get("created", "")))
    _validate(m)
    return m


class _Getter:
    """Typed field access on a raw manifest; errors name the file and the field."""

    def __init__(self, path: Path, raw: dict[str, Any]) -> None:
        self.path, self.raw = path, raw

    def __call__(self, key: str, tp: type) -> Any:
        if key not in self.raw:
            raise EngineError(f"{self.path}: manifest lacks required field '{key}'")
        value = self.raw[key]
        if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
            raise EngineError(f"{self.path}: field '{key}' must be {tp.__name__}, got {value!r}")
        return value

    def optional(self, key: str, tp: type, default: Any) -> Any:
        """Like calling the getter, but `default` when the field is absent."""
        return self(key, tp) if key in self.raw else default

    def specs(self, key: str) -> tuple[TensorSpec, ...]:
        items = self(key, list)
        out = []
        for i, d in enumerate(items):
            ok = (isinstance(d, dict) and isinstance(d.get("name"), str) and isinstance(d.get("dtype"), str)
                  and isinstance(d.get("shape"), list)
                  and all(isinstance(s, (int, str)) and not isinstance(s, bool) for s in d["shape"]))
            if not ok:
                raise EngineError(f"{self.path}: '{key}[{i}]' must be {{name, shape, dtype}}, got {d!r}")
            out.append(TensorSpec(d["name"], tuple(d["shape"]), d["dtype"]))
        return tuple(out)


def _validate(m: EngineManifest) -> None:
    def bad(msg: str) -> EngineError:
        return EngineError(f"{m.path}: {msg}")

    if m.task not in TASKS:
        raise bad(f"field 'task' must be one of {list(TASKS)}, got {m.task!r}")
    if m.task == "spikes" and (m.horizon != 1 or m.lead_times != (0,)):
        raise bad(f"a 'spikes' engine estimates the current frame: horizon must be 1 and lead_times [0], "
                  f"got {m.horizon} and {list(m.lead_times)}")
    if m.context < 1 or m.horizon < 1 or m.n_neurons < 1:
        raise bad(f"context, horizon and n_neurons must be >= 1 ({m.context}, {m.horizon}, {m.n_neurons})")
    if len(m.lead_times) != m.horizon or not all(isinstance(t, int) for t in m.lead_times):
        raise bad(f"lead_times must be {m.horizon} integers, got {list(m.lead_times)}")
    if len(m.inputs) not in (1, 2) or len(m.outputs) != 1:
        raise bad("one input (plus an optional 'covariates' input) and one output are supported")
    for spec, steps in ((m.inputs[0], m.context), (m.outputs[0], m.horizon)):
        if len(spec.shape) != 3 or spec.shape[1] != steps or spec.dtype != "float32":
            raise bad(f"'{spec.name}' must be float32 [batch, {steps}, neurons], got "
                      f"{list(spec.shape)} {spec.dtype}")
    if len(m.inputs) == 2:
        cov = m.inputs[1]
        ok = (cov.name == COVARIATES_INPUT and len(cov.shape) == 3 and cov.shape[1] == m.context + m.horizon
              and isinstance(cov.shape[2], int) and cov.shape[2] >= 1 and cov.dtype == "float32")
        if not ok:
            raise bad(f"a second input must be float32 '{COVARIATES_INPUT}' [batch, C + H = "
                      f"{m.context + m.horizon}, K >= 1], got {cov.name!r} {list(cov.shape)} {cov.dtype}")
    if "onnx" not in m.files:
        raise bad("'files' lacks 'onnx'")


class Engine(Protocol):
    """What the forecast stage needs from any runtime."""

    manifest: EngineManifest
    n_neurons: int

    @property
    def version(self) -> str: ...

    def check_neurons(self, n: int) -> None: ...

    def run(self, context: np.ndarray, covariates: np.ndarray | None = None) -> np.ndarray: ...

    def run_batch(self, context: np.ndarray, covariates: np.ndarray | None = None) -> np.ndarray: ...

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
        _check_array(self.version, "context", context, 2)
        cov = None
        if covariates is not None:
            _check_array(self.version, "covariates", covariates, 2)
            cov = covariates[None]
        return self.run_batch(context[None], cov)[0]

    def run_batch(self, context: np.ndarray, covariates: np.ndarray | None = None) -> np.ndarray:
        """(B, H, N) from a batch of contexts (B, C, N) [and covariates (B, C + H, K)]."""
        m = self.manifest
        _check_array(self.version, "context", context, 3)
        if context.shape[1:] != (m.context, self.n_neurons):
            raise EngineError(f"engine {self.version}: context shape {context.shape[1:]} != "
                              f"(C, N) = {(m.context, self.n_neurons)}")
        cov = self._check_covariates(covariates, context.shape[0])
        y = self._infer(np.ascontiguousarray(context), cov)
        if y.shape != (context.shape[0], m.horizon, self.n_neurons):
            raise EngineError(f"engine {self.version}: output shape {y.shape} != (B, H, N)")
        return y

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

    def __init__(self, path: str | Path, threads: int = 1, device: str = "cpu") -> None:
        super().__init__(path)
        onnx_path = self.manifest.file("onnx")
        if not onnx_path.is_file():
            raise EngineError(f"{self.manifest.path}: ONNX file {onnx_path.name} is missing")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        self.device = device
        try:
            self.session = ort.InferenceSession(str(onnx_path), opts, providers=ort_providers(device))
        except Exception as exc:  # onnxruntime raises its own exception types
            raise EngineError(f"{onnx_path}: ONNX Runtime cannot load it ({exc})") from exc
        want = ({s.name for s in self.manifest.inputs}, {self._out})
        names = ({i.name for i in self.session.get_inputs()}, {o.name for o in self.session.get_outputs()})
        if not (want[0] <= names[0] and want[1] <= names[1]):
            raise EngineError(f"{onnx_path}: graph IO {names} does not match the manifest {want}")

    def _infer(self, x: np.ndarray, cov: np.ndarray | None) -> np.ndarray:
        feeds = {self._in: x} if cov is None else {self._in: x, COVARIATES_INPUT: cov}
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
                device: str = "cpu") -> Engine:
    """Open an engine with the named runtime on `device` ('cpu' or 'cuda').

    'onnxruntime' runs the ONNX file; 'tensorrt' the fp16 plan (built from the ONNX file on first use
    and cached beside it; CUDA only); 'torch' the saved torch.export program; 'auto' picks TensorRT on
    CUDA when importable, else ONNX Runtime.
    """
    if runtime not in RUNTIMES:
        raise EngineError(f"unknown engine runtime {runtime!r}; available: {list(RUNTIMES)}")
    if runtime == "auto":
        runtime = "tensorrt" if device.startswith("cuda") and _importable("tensorrt") else "onnxruntime"
    if runtime == "onnxruntime":
        return OnnxEngine(path, threads=threads, device=device)
    if runtime == "tensorrt":
        from realtime.engine_trt import TensorRTEngine
        return TensorRTEngine(path, device=device)
    from realtime.engine_torch import TorchEngine
    return TorchEngine(path, threads=threads, device=device)


def _importable(module: str) -> bool:
    import importlib.util
    return importlib.util.find_spec(module) is not None
