"""Engine manifests: the manifest.json every exported engine carries, parsed and validated.

The real-time side loads an artifact, not code: this is the whole contract between offline_training
(which writes manifests) and the runtimes of realtime.engines (which read them). See realtime.engines for
what the tasks ("forecast", "spikes", "video", "activation") mean, and for `signal` which per-neuron
values ("dff" or "spike_prob") a trace engine's context rows hold.
"""
from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

FORMAT = "loopcast-engine"
FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
VERSION_RE = re.compile(r"^v(\d{4,})$")  # a registry version directory: v0001, v0002, ...
TASKS = ("forecast", "spikes", "video", "activation")
SIGNALS = ("dff", "spike_prob")
FUTURE_COVARIATES = ("recorded", "held")  # a covariate engine's future stimulus in training (the loop holds)
COVARIATES_INPUT = "covariates"
LEAD_INPUT = "lead_time"
ACTIVATION_KEYS = ("criterion", "threshold", "window")
VIDEO_KEYS = ("level", "factor", "crop_y", "super_resolution", "input_shape", "output_shape", "volume_shape")


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
    video: dict[str, Any] | None = None
    signal: str = "dff"
    activation: dict[str, Any] | None = None
    future_covariates: str = "recorded"

    @property
    def output_rows(self) -> int:
        """Rows of the output [batch, rows, N]: 1 for an activation engine (one probability per neuron
        over the next H frames), H otherwise."""
        return 1 if self.task == "activation" else self.horizon

    @property
    def n_covariates(self) -> int:
        """K of the optional 'covariates' input [batch, C + H, K]; 0 when the engine has none."""
        has = len(self.inputs) > 1 and self.inputs[1].name == COVARIATES_INPUT
        return int(self.inputs[1].shape[2]) if has else 0

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
    def load(cls, path: str | Path) -> EngineManifest:
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
        created=str(raw.get("created", "")), video=get.optional("video", dict, None),
        signal=get.optional("signal", str, "dff"), activation=get.optional("activation", dict, None),
        future_covariates=get.optional("future_covariates", str, "recorded"))
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
    if m.signal not in SIGNALS:
        raise bad(f"field 'signal' must be one of {list(SIGNALS)}, got {m.signal!r}")
    if m.future_covariates not in FUTURE_COVARIATES:
        raise bad(f"field 'future_covariates' must be one of {list(FUTURE_COVARIATES)}, got {m.future_covariates!r}")
    if m.context < 1 or m.horizon < 1 or m.n_neurons < 1:
        raise bad(f"context, horizon and n_neurons must be >= 1 ({m.context}, {m.horizon}, {m.n_neurons})")
    if m.task == "activation":
        _validate_activation(m, bad)
    elif len(m.lead_times) != m.horizon or not all(isinstance(t, int) for t in m.lead_times):
        raise bad(f"lead_times must be {m.horizon} integers, got {list(m.lead_times)}")
    if m.task == "video":
        _validate_video(m, bad)
    else:
        _validate_trace_io(m, bad)
    if "onnx" not in m.files:
        raise bad("'files' lacks 'onnx'")


def _validate_trace_io(m: EngineManifest, bad: Callable[[str], EngineError]) -> None:
    if len(m.inputs) not in (1, 2) or len(m.outputs) != 1:
        raise bad("one input (plus an optional 'covariates' input) and one output are supported")
    for spec, steps in ((m.inputs[0], m.context), (m.outputs[0], m.output_rows)):
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


def _validate_activation(m: EngineManifest, bad: Callable[[str], EngineError]) -> None:
    """One probability per neuron for the next H frames: lead_times [H] and an 'activation' block
    {criterion (str), threshold (finite number), window == H}."""
    if m.lead_times != (m.horizon,):
        raise bad(f"an 'activation' engine predicts one window of H = {m.horizon} frames: lead_times must be "
                  f"[{m.horizon}], got {list(m.lead_times)}")
    a = m.activation
    if a is None or any(k not in a for k in ACTIVATION_KEYS):
        raise bad(f"an 'activation' engine needs an 'activation' block with {list(ACTIVATION_KEYS)}, got {a!r}")
    threshold = a["threshold"]
    if (not isinstance(a["criterion"], str) or isinstance(threshold, bool)
            or not isinstance(threshold, (int, float)) or not math.isfinite(threshold)):
        raise bad(f"activation criterion must be a string and threshold a finite number, got "
                  f"{a['criterion']!r} and {threshold!r}")
    if a["window"] != m.horizon or isinstance(a["window"], bool):
        raise bad(f"activation window {a['window']!r} != horizon {m.horizon}")


def _validate_video(m: EngineManifest, bad: Callable[[str], EngineError]) -> None:
    """volumes [batch, C, X, Y, Z] float32 + lead_time [batch] int64 -> frame [batch, X', Y', Z'] float32,
    with a 'video' block whose input/output shapes agree with the specs."""
    if len(m.inputs) != 2 or len(m.outputs) != 1:
        raise bad("a video engine has two inputs (volumes, lead_time) and one output (frame)")
    vol, lead, out = m.inputs[0], m.inputs[1], m.outputs[0]
    if len(vol.shape) != 5 or vol.shape[1] != m.context or vol.dtype != "float32":
        raise bad(f"'{vol.name}' must be float32 [batch, {m.context}, X, Y, Z], got {list(vol.shape)} {vol.dtype}")
    if lead.name != LEAD_INPUT or len(lead.shape) != 1 or lead.dtype != "int64":
        raise bad(f"the second input must be int64 '{LEAD_INPUT}' [batch], got {lead.name!r} "
                  f"{list(lead.shape)} {lead.dtype}")
    if len(out.shape) != 4 or out.dtype != "float32":
        raise bad(f"'{out.name}' must be float32 [batch, X', Y', Z'], got {list(out.shape)} {out.dtype}")
    v = m.video
    if v is None or any(k not in v for k in VIDEO_KEYS):
        raise bad(f"a video engine needs a 'video' block with {list(VIDEO_KEYS)}, got {v!r}")
    if list(v["input_shape"]) != list(vol.shape[2:]) or list(v["output_shape"]) != list(out.shape[1:]):
        raise bad(f"video input/output shapes {v['input_shape']} / {v['output_shape']} disagree with the "
                  f"specs {list(vol.shape[2:])} / {list(out.shape[1:])}")
    if m.lead_times != tuple(range(1, m.horizon + 1)):
        raise bad(f"a video engine's lead_times must be 1..{m.horizon}, got {list(m.lead_times)}")
