"""Engine runtimes: load an exported engine directory (model.onnx + manifest.json), not model code.

An engine lives at `<registry>/<name>/<version>/` (written by offline_training). This module never
imports torch, `models` or `offline_training`: the real-time side depends only on the artifact.
Every runtime offers the same narrow interface (`Engine`): `manifest`, `version`,
`check_neurons(n)`, `run(context (C, N)) -> forecast (H, N)`, so a TensorRT or torch runtime can
sit beside `OnnxEngine` later.

The manifest's optional `task` says what the output means: "forecast" (the default, and what manifests
without the field are: dF/F at lead times 1..H) or "spikes" (the expected spike count of the current
frame: H = 1, lead time 0).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, Sequence

import numpy as np
import onnxruntime as ort

FORMAT = "loopcast-engine"
FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
_VERSION_RE = re.compile(r"^v(\d{4,})$")
TASKS = ("forecast", "spikes")


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
    if len(m.inputs) != 1 or len(m.outputs) != 1:
        raise bad("exactly one input and one output are supported")
    for spec, steps in ((m.inputs[0], m.context), (m.outputs[0], m.horizon)):
        if len(spec.shape) != 3 or spec.shape[1] != steps or spec.dtype != "float32":
            raise bad(f"'{spec.name}' must be float32 [batch, {steps}, neurons], got "
                      f"{list(spec.shape)} {spec.dtype}")
    if "onnx" not in m.files:
        raise bad("'files' lacks 'onnx'")


class Engine(Protocol):
    """What the forecast stage needs from any runtime."""

    manifest: EngineManifest

    @property
    def version(self) -> str: ...

    def check_neurons(self, n: int) -> None: ...

    def run(self, context: np.ndarray) -> np.ndarray: ...


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


class OnnxEngine:
    """ONNX Runtime engine: (C, N) float32 context in, (H, N) float32 out (a forecast, or for a
    'spikes' engine the current frame's expected spike counts, H = 1)."""

    def __init__(self, path: str | Path, threads: int = 1,
                 providers: Sequence[str] = ("CPUExecutionProvider",)) -> None:
        self.path = resolve_engine(path)
        self.manifest = EngineManifest.load(self.path / MANIFEST_FILE)
        onnx_path = self.manifest.file("onnx")
        if not onnx_path.is_file():
            raise EngineError(f"{self.manifest.path}: ONNX file {onnx_path.name} is missing")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        try:
            self.session = ort.InferenceSession(str(onnx_path), opts, providers=list(providers))
        except Exception as exc:  # onnxruntime raises its own exception types
            raise EngineError(f"{onnx_path}: ONNX Runtime cannot load it ({exc})") from exc
        self._in = self.manifest.inputs[0].name
        self._out = self.manifest.outputs[0].name
        names = ({i.name for i in self.session.get_inputs()}, {o.name for o in self.session.get_outputs()})
        if self._in not in names[0] or self._out not in names[1]:
            raise EngineError(f"{onnx_path}: graph IO {names} does not match the manifest "
                              f"({self._in!r} -> {self._out!r})")
        self.n_neurons = self.manifest.n_neurons

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

    def run(self, context: np.ndarray) -> np.ndarray:
        """(H, N) float32 output (forecast or spike counts, see `manifest.task`) from context (C, N) float32."""
        m = self.manifest
        if not isinstance(context, np.ndarray) or context.dtype != np.float32:
            raise EngineError(f"engine {self.version}: context must be a float32 ndarray, got "
                              f"{getattr(context, 'dtype', type(context).__name__)}")
        if context.shape != (m.context, self.n_neurons):
            raise EngineError(f"engine {self.version}: context shape {context.shape} != "
                              f"(C, N) = {(m.context, self.n_neurons)}")
        x = np.ascontiguousarray(context)[None]  # (1, C, N)
        y = self.session.run([self._out], {self._in: x})[0]
        if y.shape != (1, m.horizon, self.n_neurons):
            raise EngineError(f"engine {self.version}: output shape {y.shape} != (1, H, N)")
        return y[0]  # (H, N)


def load_engine(path: str | Path, runtime: str = "onnxruntime", threads: int = 1) -> Engine:
    """Open an engine with the named runtime (only 'onnxruntime' for now)."""
    if runtime == "onnxruntime":
        return OnnxEngine(path, threads=threads)
    raise EngineError(f"unknown engine runtime {runtime!r}; available: ['onnxruntime']")
