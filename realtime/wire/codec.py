"""Wire formats of ARCHITECTURE.md: ZeroMQ multipart [topic, msgpack header, raw payload].

Volumes travel in C order or in Fortran order (`order`: "F" is plane-major, x fastest: a light-sheet
camera's and ZAPBench's on-disk layout); with the shm transport the payload part is empty and the
header's `shm` names the shared-memory slot that holds it (realtime/wire/shm.py).

Everything that crosses a socket is encoded and decoded here, and nowhere else. Decoding checks the
header against the schema and the payload against the header (and, for volumes, against the rig's
expected shape and dtype); every failure is a `WireError` with a short machine-readable `reason`
that ingest counts in `loopcast_frames_invalid_total{reason=...}`.
"""
from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import msgpack
import numpy as np

SCHEMA_VERSION = 1
TOPIC_FRAME = b"frame"
FORECAST_PREFIX = "forecast/"
ACTIVATION_PREFIX = "activation/"
Order = Literal["C", "F"]   # memory order of a volume on the wire
MAX_STIMULUS = 1024   # stimulus covariates a header may carry
MAX_HEADER_ITEMS = 4096        # entries of any list or map in a header: bounded while unpacking, before conversion
MAX_HEADER_BYTES = 64 * 1024   # any string or binary value in a header
ALLOWED_DTYPES = frozenset({"uint8", "uint16", "int16", "float16", "float32", "float64"})

Part = bytes | memoryview | Any  # zmq.Frame has .buffer; bytes/memoryview pass through


class WireError(ValueError):
    """A message that does not follow the wire contract. `reason` is a short label for metrics."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason


@dataclass(frozen=True)
class ShmRef:
    """Where a volume lies in a shared-memory ring: file, slot, byte offset/size, and the seq it holds."""

    path: str
    slot: int
    offset: int
    nbytes: int
    seq: int


@dataclass(frozen=True)
class FrameHeader:
    """Header of one volume from a microscope, replay or simulation."""

    seq: int
    t_src_ns: int
    shape: tuple[int, ...]
    dtype: str
    order: Order = "C"
    rig: str = ""
    stimulus: tuple[float, ...] = ()
    condition: int = -1
    v: int = SCHEMA_VERSION
    kind: str = "volume"
    shm: ShmRef | None = None

    def to_wire(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["shape"] = list(self.shape)
        d["stimulus"] = list(self.stimulus)
        if self.shm is None:
            del d["shm"]
        return d


@dataclass(frozen=True)
class Frame:
    """A validated volume: header, array view on the received buffer, receive time."""

    header: FrameHeader
    data: np.ndarray
    t_recv_ns: int
    lease: Any = None   # shm transport: realtime.wire.shm.ShmLease; check .intact() after using `data`

    def intact(self) -> bool:
        """False if the shared-memory slot behind `data` was reused while the frame was in use."""
        return self.lease is None or self.lease.intact()


@dataclass(frozen=True)
class ForecastHeader:
    """Header of a forecast: the producing frame's seq/t_src_ns/header plus model details."""

    seq: int
    t_src_ns: int
    model: str
    engine_version: str
    lead_times: tuple[int, ...]
    shape: tuple[int, ...]
    dtype: str = "float32"
    order: str = "C"
    kind: str = "forecast"
    t_pub_ns: int = 0
    frame: dict[str, Any] = field(default_factory=dict)
    v: int = SCHEMA_VERSION

    def to_wire(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["shape"] = list(self.shape)
        d["lead_times"] = list(self.lead_times)
        return d


@dataclass(frozen=True)
class Forecast:
    """A decoded forecast: header and the (H, N) array (lead time x neuron)."""

    header: ForecastHeader
    data: np.ndarray
    t_recv_ns: int


def volume_order(array: np.ndarray) -> Order:
    """"C" or "F": the memory order a volume travels in without a copy (C when both or neither)."""
    return "F" if array.flags.f_contiguous and not array.flags.c_contiguous else "C"


def encode_frame(header: FrameHeader, array: np.ndarray | None, topic: bytes = TOPIC_FRAME) -> list[Any]:
    """Multipart message for a volume; the payload is the array's own buffer (no copy when the array
    is contiguous in `header.order`). With `header.shm` set the payload is in shared memory: pass None."""
    packed = msgpack.packb(header.to_wire())
    if header.shm is not None:
        return [topic, packed, b""]
    if header.order not in ("C", "F"):
        raise ValueError(f"header order must be 'C' or 'F', got {header.order!r}")
    arr = np.asarray(array)
    if tuple(arr.shape) != tuple(header.shape) or str(arr.dtype) != header.dtype:
        raise ValueError(f"array {arr.shape}/{arr.dtype} does not match header "
                         f"{header.shape}/{header.dtype}")
    flat = arr.reshape(-1, order=header.order)   # a view when contiguous in that order
    return [topic, packed, np.ascontiguousarray(flat).data.cast("B")]


def encode_forecast(header: ForecastHeader, array: np.ndarray) -> list[Any]:
    """Multipart message for a forecast on topic `forecast/<model>` (or `activation/<model>`)."""
    arr = np.ascontiguousarray(array, dtype=np.dtype(header.dtype))
    if tuple(arr.shape) != tuple(header.shape):
        raise ValueError(f"forecast shape {arr.shape} != header shape {header.shape}")
    prefix = FORECAST_PREFIX if header.kind == "forecast" else ACTIVATION_PREFIX
    topic = f"{prefix}{header.model}".encode()
    return [topic, msgpack.packb(header.to_wire()), arr.data.cast("B")]


def decode_frame(parts: Sequence[Part], expected_shape: tuple[int, ...] | None = None,
                 expected_dtype: str | None = None, shm: Any = None) -> Frame:
    """Validate and decode a volume message; raises WireError with a reason on any violation.
    `shm` (a realtime.wire.shm.ShmReader) resolves shared-memory payloads; without it they are refused."""
    t_recv = time.time_ns()
    topic, raw_header, payload = _split(parts)
    if topic != TOPIC_FRAME:
        raise WireError("bad_topic", f"expected topic {TOPIC_FRAME!r}, got {topic[:32]!r}")
    h = _unpack_header(raw_header)
    kind = _get(h, "kind", str, "volume")
    if kind != "volume":
        raise WireError("bad_kind", f"a frame's 'kind' must be 'volume', got {kind[:32]!r}")
    header = FrameHeader(
        seq=_get(h, "seq", int), t_src_ns=_get(h, "t_src_ns", int),
        shape=_shape(h), dtype=_dtype(h), order=_get(h, "order", str),
        rig=_get(h, "rig", str, ""), stimulus=_floats(h.get("stimulus", [])),
        condition=_get(h, "condition", int, -1), v=h["v"], kind=kind, shm=_shm_ref(h))
    if header.order not in ("C", "F"):
        raise WireError("bad_order", f"payload order must be 'C' or 'F', got {header.order!r}")
    if expected_shape is not None and tuple(header.shape) != tuple(expected_shape):
        raise WireError("bad_shape", f"shape {list(header.shape)} != rig shape {list(expected_shape)}")
    if expected_dtype is not None and header.dtype != expected_dtype:
        raise WireError("bad_dtype", f"dtype {header.dtype} != rig dtype {expected_dtype}")
    if header.shm is None:
        data = _array(payload, header.shape, header.dtype, header.order)
        return Frame(header=header, data=data, t_recv_ns=t_recv)
    if shm is None:
        raise WireError("shm_unsupported", "volume is in shared memory but this receiver has no shm reader")
    if payload.nbytes:
        raise WireError("bad_shm", f"shm frame carries a {payload.nbytes} B payload; expected none")
    if header.shm.seq != header.seq:
        raise WireError("bad_shm", f"shm slot holds seq {header.shm.seq}, header says {header.seq}")
    data, lease = shm.view(header.shm, header.shape, header.dtype, header.order)
    return Frame(header=header, data=data, t_recv_ns=t_recv, lease=lease)


def _shm_ref(h: dict[str, Any]) -> ShmRef | None:
    ref = h.get("shm")
    if ref is None:
        return None
    if not isinstance(ref, dict):
        raise WireError("bad_shm", f"'shm' must be a map, got {type(ref).__name__}")
    try:
        out = ShmRef(path=_get(ref, "path", str), slot=_get(ref, "slot", int), offset=_get(ref, "offset", int),
                     nbytes=_get(ref, "nbytes", int), seq=_get(ref, "seq", int))
    except WireError as exc:
        raise WireError("bad_shm", str(exc)) from None
    if "\x00" in out.path or len(out.path) > 4096:
        raise WireError("bad_shm", "shm 'path' holds a NUL byte or is over 4096 characters")
    return out


def decode_forecast(parts: Sequence[Part]) -> Forecast:
    """Validate and decode a forecast (or activation) message."""
    t_recv = time.time_ns()
    topic, raw_header, payload = _split(parts)
    if not (topic.startswith(FORECAST_PREFIX.encode()) or topic.startswith(ACTIVATION_PREFIX.encode())):
        raise WireError("bad_topic", f"not a forecast topic: {topic[:32]!r}")
    h = _unpack_header(raw_header)
    lead = h.get("lead_times")
    if not isinstance(lead, list) or not all(isinstance(x, int) for x in lead):
        raise WireError("missing_field", "'lead_times' must be a list of integers")
    frame = h.get("frame", {})
    header = ForecastHeader(
        seq=_get(h, "seq", int), t_src_ns=_get(h, "t_src_ns", int), model=_get(h, "model", str),
        engine_version=_get(h, "engine_version", str), lead_times=tuple(lead), shape=_shape(h),
        dtype=_dtype(h), order=_get(h, "order", str, "C"), kind=_get(h, "kind", str, "forecast"),
        t_pub_ns=_get(h, "t_pub_ns", int, 0), frame=frame if isinstance(frame, dict) else {}, v=h["v"])
    if len(header.shape) != 2 or header.shape[0] != len(header.lead_times):
        raise WireError("bad_shape", f"forecast shape {list(header.shape)} must be [len(lead_times), N]")
    return Forecast(header=header, data=_array(payload, header.shape, header.dtype), t_recv_ns=t_recv)


def _split(parts: Sequence[Part]) -> tuple[bytes, bytes, memoryview]:
    if len(parts) != 3:
        raise WireError("bad_parts", f"expected 3 message parts [topic, header, payload], got {len(parts)}")
    topic = bytes(_buffer(parts[0]))
    return topic, bytes(_buffer(parts[1])), _buffer(parts[2])


def _buffer(part: Part) -> memoryview:
    if isinstance(part, memoryview):
        return part
    if isinstance(part, (bytes, bytearray)):
        return memoryview(part)
    return memoryview(part.buffer)  # zmq.Frame received with copy=False


def _unpack_header(raw: bytes) -> dict[str, Any]:
    try:
        h = msgpack.unpackb(raw, raw=False, strict_map_key=True, max_array_len=MAX_HEADER_ITEMS,
                            max_map_len=MAX_HEADER_ITEMS, max_str_len=MAX_HEADER_BYTES, max_bin_len=MAX_HEADER_BYTES)
    except Exception as exc:  # msgpack raises several unrelated types
        raise WireError("malformed_header", f"header is not valid msgpack ({type(exc).__name__})") from None
    if not isinstance(h, dict):
        raise WireError("malformed_header", f"header must be a map, got {type(h).__name__}")
    v = h.get("v")
    if type(v) is not int or v != SCHEMA_VERSION:   # exactly: 1.0 and true compare equal to 1
        raise WireError("bad_version", f"schema version {v!r}, this build speaks {SCHEMA_VERSION} (an integer)")
    return h


_MISSING = object()


def _get(h: dict[str, Any], key: str, tp: type, default: Any = _MISSING) -> Any:
    if key not in h:
        if default is _MISSING:
            raise WireError("missing_field", f"header has no '{key}'")
        return default
    value = h[key]
    if tp is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise WireError("missing_field", f"'{key}' must be an integer, got {value!r}")
    if tp is str and not isinstance(value, str):
        raise WireError("missing_field", f"'{key}' must be a string, got {value!r}")
    return value


def _shape(h: dict[str, Any]) -> tuple[int, ...]:
    shape = h.get("shape")
    if (not isinstance(shape, list) or not shape
            or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in shape)):
        raise WireError("bad_shape", f"'shape' must be a non-empty list of positive ints, got {shape!r}")
    return tuple(shape)


def _dtype(h: dict[str, Any]) -> str:
    dtype = h.get("dtype")
    if dtype not in ALLOWED_DTYPES:
        raise WireError("bad_dtype", f"'dtype' must be one of {sorted(ALLOWED_DTYPES)}, got {dtype!r}")
    return str(dtype)


def _floats(values: Any) -> tuple[float, ...]:
    if (not isinstance(values, list) or len(values) > MAX_STIMULUS
            or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in values)):
        raise WireError("missing_field", f"'stimulus' must be a list of at most {MAX_STIMULUS} numbers")
    out = tuple(float(x) for x in values)
    if not all(math.isfinite(x) for x in out):
        raise WireError("missing_field", "'stimulus' values must be finite")
    return out


def _array(payload: memoryview, shape: tuple[int, ...], dtype: str, order: Order = "C") -> np.ndarray:
    dt = np.dtype(dtype)
    expected = int(np.prod(shape)) * dt.itemsize
    if payload.nbytes < expected:
        raise WireError("truncated_payload", f"payload {payload.nbytes} B < {expected} B for {list(shape)} {dtype}")
    if payload.nbytes > expected:
        raise WireError("oversized_payload", f"payload {payload.nbytes} B > {expected} B for {list(shape)} {dtype}")
    return np.frombuffer(payload, dtype=dt).reshape(shape, order=order)


# --- MQTT payloads (JSON) -------------------------------------------------------------------------
CONTROL_COMMANDS = ("arm", "disarm", "stop", "reset")


def mqtt_topic(rig: str, kind: str) -> str:
    """`loopcast/<rig>/<kind>` for kind in trigger, status, control."""
    if kind not in ("trigger", "status", "control"):
        raise ValueError(f"unknown MQTT topic kind {kind!r}")
    return f"loopcast/{rig}/{kind}"


@dataclass(frozen=True)
class TriggerCommand:
    """One stimulation command (MQTT `loopcast/<rig>/trigger`, QoS 1). Targets are 0-based neuron indices."""

    trigger_id: str
    rig: str
    pattern: str
    targets: tuple[int, ...]
    power_mw: float
    duration_ms: float
    seq: int
    model: str
    engine_version: str
    decision_time_ns: int
    policy: str = ""
    value: float = 0.0
    lead: int = 0
    v: int = SCHEMA_VERSION

    def to_json(self) -> bytes:
        # shallow, not dataclasses.asdict: asdict deep-copies the targets one element at a time (0.4 ms for
        # 750 targets, on the trigger's latency path; this is 0.05 ms)
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["targets"] = list(self.targets)
        return json.dumps(d, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, payload: bytes | str) -> TriggerCommand:
        try:
            d = json.loads(payload)
        except (ValueError, UnicodeDecodeError) as exc:
            raise WireError("malformed_trigger", f"trigger is not JSON ({exc})") from None
        if not isinstance(d, dict) or d.get("v") != SCHEMA_VERSION:
            raise WireError("malformed_trigger", f"trigger must be a JSON object with v={SCHEMA_VERSION}")
        names = {f.name for f in dataclasses.fields(cls)}
        missing = sorted(names - set(d) - {"policy", "value", "lead"})
        if missing:
            raise WireError("malformed_trigger", f"trigger lacks {missing}")
        targets = d["targets"]
        if not isinstance(targets, list) or not all(isinstance(x, int) and x >= 0 for x in targets):
            raise WireError("malformed_trigger", "'targets' must be a list of neuron indices >= 0")
        d["targets"] = tuple(targets)
        return cls(**{k: v for k, v in d.items() if k in names})


MAX_SENDER = 200   # characters of a control message's sender that are kept


@dataclass(frozen=True)
class ControlMessage:
    """A control message: the command and who sent it (the JSON form's `sender`; None for plain text)."""

    command: str
    sender: str | None = None


def parse_control_message(payload: bytes | str) -> ControlMessage:
    """A control message: plain `arm|disarm|stop|reset` or JSON {"command": ..., "sender": ...}."""
    text = payload.decode(errors="replace") if isinstance(payload, (bytes, bytearray)) else payload
    text = text.strip()
    sender = None
    if text.startswith("{"):
        try:
            doc = json.loads(text)
            text = str(doc.get("command", ""))
        except (ValueError, AttributeError):
            raise WireError("malformed_control", "control JSON must be an object with 'command'") from None
        sender = _sender(doc)
    cmd = text.lower()
    if cmd not in CONTROL_COMMANDS:
        raise WireError("malformed_control", f"unknown control command {text[:40]!r}; use {list(CONTROL_COMMANDS)}")
    return ControlMessage(cmd, sender)


def parse_control(payload: bytes | str) -> str:
    """The command of a control message (see `parse_control_message`)."""
    return parse_control_message(payload).command


def control_sender(payload: bytes | str) -> str | None:
    """The `sender` of a JSON control message, whether or not its command is valid; None if it has none."""
    text = payload.decode(errors="replace") if isinstance(payload, (bytes, bytearray)) else payload
    try:
        doc = json.loads(text)
    except ValueError:
        return None
    return _sender(doc) if isinstance(doc, dict) else None


def _sender(doc: dict[str, Any]) -> str | None:
    sender = doc.get("sender")
    return sender[:MAX_SENDER] if isinstance(sender, str) else None
