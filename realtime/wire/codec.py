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
import re
import time
import uuid
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
MAX_HEADER_PART = 1024 * 1024  # bytes of a whole header part: refused before it is unpacked or copied
MAX_TOPIC_BYTES = 256          # bytes of a topic part
ALLOWED_DTYPES = frozenset({"uint8", "uint16", "int16", "float16", "float32", "float64"})
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1   # header integers (msgpack also carries uint64: refused)
MAX_SESSION = 64               # characters of a frame header's `session`
SESSION_RE = re.compile(rf"[A-Za-z0-9_.:-]{{1,{MAX_SESSION}}}")

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
    session: str = ""   # the source's acquisition id; "" = none (not sent)

    def to_wire(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["shape"] = list(self.shape)
        d["stimulus"] = list(self.stimulus)
        if self.shm is None:
            del d["shm"]
        if not self.session:
            del d["session"]
        return d


@dataclass(frozen=True)
class Frame:
    """A validated volume: header, array view on the received buffer, receive time."""

    header: FrameHeader
    data: np.ndarray
    t_recv_ns: int
    lease: Any = None   # shm transport: realtime.wire.shm.ShmLease; check .intact() after using `data`

    def intact(self) -> bool:
        """False if the shared-memory slot behind `data` was reused (or its file shrank) while the frame was in use."""
        return self.lease is None or self.lease.intact()

    def mapped(self) -> bool:
        """False if the shared-memory file behind `data` no longer covers it (reading it would fault)."""
        return self.lease is None or self.lease.mapped()


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
    registration: tuple[float, ...] = ()   # the frame's (dx, dy, dz, confidence); () without registration
    v: int = SCHEMA_VERSION

    def to_wire(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["shape"] = list(self.shape)
        d["lead_times"] = list(self.lead_times)
        d["registration"] = list(self.registration)
        return d


@dataclass(frozen=True)
class Forecast:
    """A decoded forecast: header and the (H, N) array (lead time x neuron)."""

    header: ForecastHeader
    data: np.ndarray
    t_recv_ns: int


def new_session_id() -> str:
    """A fresh `session` for a source's start: 12 hex digits (uuid4)."""
    return uuid.uuid4().hex[:12]


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
        condition=_get(h, "condition", int, -1), v=h["v"], kind=kind, shm=_shm_ref(h), session=_session(h))
    if header.seq < 0:
        raise WireError("missing_field", f"'seq' must be >= 0, got {header.seq}")
    if header.order not in ("C", "F"):
        raise WireError("bad_order", f"payload order must be 'C' or 'F', got {header.order[:32]!r}")
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


def _session(h: dict[str, Any]) -> str:
    """The optional `session`: 1 to MAX_SESSION characters of [A-Za-z0-9_.:-]; "" when absent."""
    if "session" not in h:
        return ""
    s = h["session"]
    if not isinstance(s, str) or not SESSION_RE.fullmatch(s):
        shown = repr(s[:MAX_SESSION + 1]) if isinstance(s, str) else type(s).__name__
        raise WireError("bad_session", f"'session' must be 1-{MAX_SESSION} characters of A-Z a-z 0-9 _ . : -, "
                        f"got {shown}")
    return s


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
        t_pub_ns=_get(h, "t_pub_ns", int, 0), frame=frame if isinstance(frame, dict) else {},
        registration=_registration(h), v=h["v"])
    if header.order not in ("C", "F"):
        raise WireError("bad_order", f"payload order must be 'C' or 'F', got {header.order[:32]!r}")
    if len(header.shape) != 2 or header.shape[0] != len(header.lead_times):
        raise WireError("bad_shape", f"forecast shape {list(header.shape)} must be [len(lead_times), N]")
    order: Order = "F" if header.order == "F" else "C"
    return Forecast(header=header, data=_array(payload, header.shape, header.dtype, order), t_recv_ns=t_recv)


def _registration(h: dict[str, Any]) -> tuple[float, ...]:
    """A forecast's `registration`: absent or [] (none), else exactly 4 finite numbers (dx, dy, dz, confidence)."""
    reg = h.get("registration", [])
    if reg == []:
        return ()
    if not (isinstance(reg, list) and len(reg) == 4
            and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in reg)):
        raise WireError("bad_registration", "'registration' must be [dx, dy, dz, confidence] (numbers) or []")
    out = tuple(float(x) for x in reg)
    if not all(math.isfinite(x) for x in out):
        raise WireError("bad_registration", "'registration' values must be finite numbers")
    return out


def _split(parts: Sequence[Part]) -> tuple[bytes, memoryview, memoryview]:
    """(topic, header, payload) without copying the header or payload; an oversized topic or header is
    refused here, before anything reads it."""
    if len(parts) != 3:
        raise WireError("bad_parts", f"expected 3 message parts [topic, header, payload], got {len(parts)}")
    topic, header = _buffer(parts[0]), _buffer(parts[1])
    if topic.nbytes > MAX_TOPIC_BYTES:
        raise WireError("bad_topic", f"topic of {topic.nbytes} B (max {MAX_TOPIC_BYTES})")
    if header.nbytes > MAX_HEADER_PART:
        raise WireError("malformed_header", f"header of {header.nbytes} B (max {MAX_HEADER_PART})")
    return bytes(topic), header, _buffer(parts[2])


def _buffer(part: Part) -> memoryview:
    """A flat byte view of one message part (bytes, memoryview or a zmq.Frame received with copy=False)."""
    try:
        view = part if isinstance(part, memoryview) else memoryview(getattr(part, "buffer", part))
        return view.cast("B") if view.format != "B" or view.ndim != 1 else view
    except (TypeError, ValueError) as exc:
        raise WireError("bad_parts", f"a message part is not a byte buffer ({type(part).__name__})") from exc


def _unpack_header(raw: memoryview) -> dict[str, Any]:
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
    if tp is int and (isinstance(value, bool) or not isinstance(value, int) or not INT64_MIN <= value <= INT64_MAX):
        raise WireError("missing_field", f"'{key}' must be a 64-bit integer, got {str(value)[:40]}")
    if tp is str and not isinstance(value, str):
        raise WireError("missing_field", f"'{key}' must be a string, got {str(value)[:40]}")
    return value


def _shape(h: dict[str, Any]) -> tuple[int, ...]:
    shape = h.get("shape")
    if (not isinstance(shape, list) or not shape
            or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in shape)):
        raise WireError("bad_shape", f"'shape' must be a non-empty list of positive ints, got {shape!r}")
    return tuple(shape)


def _dtype(h: dict[str, Any]) -> str:
    dtype = h.get("dtype")
    if not isinstance(dtype, str) or dtype not in ALLOWED_DTYPES:   # a list or map is not hashable
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
    expected = math.prod(shape) * dt.itemsize   # exact: np.prod wraps around at 2**63
    if payload.nbytes < expected:
        raise WireError("truncated_payload", f"payload {payload.nbytes} B < {expected} B for {list(shape)} {dtype}")
    if payload.nbytes > expected:
        raise WireError("oversized_payload", f"payload {payload.nbytes} B > {expected} B for {list(shape)} {dtype}")
    return np.frombuffer(payload, dtype=dt).reshape(shape, order=order)


# --- MQTT payloads (JSON) -------------------------------------------------------------------------
CONTROL_COMMANDS = ("arm", "disarm", "stop", "reset")
MAX_CONTROL_BYTES = 4096       # a control message: refused unread above this
MAX_TRIGGER_BYTES = 1 << 20    # a trigger command (targets: a few thousand neuron indices at most)


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
        d = _json_object(payload, MAX_TRIGGER_BYTES, "malformed_trigger")
        if type(d.get("v")) is not int or d["v"] != SCHEMA_VERSION:
            raise WireError("malformed_trigger", f"trigger must be a JSON object with v={SCHEMA_VERSION}")
        names = {f.name for f in dataclasses.fields(cls)}
        missing = sorted(names - set(d) - {"policy", "value", "lead"})
        if missing:
            raise WireError("malformed_trigger", f"trigger lacks {missing}")
        targets = d["targets"]
        if not isinstance(targets, list) or not all(type(x) is int and x >= 0 for x in targets):
            raise WireError("malformed_trigger", "'targets' must be a list of neuron indices >= 0")
        d["targets"] = tuple(targets)
        _check_types(d, _TRIGGER_TYPES, "malformed_trigger")
        return cls(**{k: v for k, v in d.items() if k in names})


_NUMBER = (int, float)
_TRIGGER_TYPES: dict[str, tuple[type, ...]] = {
    "trigger_id": (str,), "rig": (str,), "pattern": (str,), "power_mw": _NUMBER, "duration_ms": _NUMBER,
    "seq": (int,), "model": (str,), "engine_version": (str,), "decision_time_ns": (int,), "policy": (str,),
    "value": _NUMBER, "lead": (int,)}
_FINITE = ("power_mw", "duration_ms")   # what a stimulator computes with


def _check_types(d: dict[str, Any], types: dict[str, tuple[type, ...]], reason: str) -> None:
    """Each present key of `types` holds one of its types (bools are not numbers); _FINITE ones are finite."""
    for key, tps in types.items():
        if key not in d:
            continue
        value = d[key]
        if isinstance(value, bool) or not isinstance(value, tps) \
                or (key in _FINITE and not math.isfinite(d[key])):
            raise WireError(reason, f"'{key}' must be {' or '.join(t.__name__ for t in tps)}, got {str(value)[:40]!r}")


def _json_object(payload: bytes | str, limit: int, reason: str) -> dict[str, Any]:
    """A JSON object of at most `limit` bytes (characters of a str); any other payload (too long, not UTF-8,
    not JSON, nested past the parser's recursion limit, not an object) is WireError(reason)."""
    if len(payload) > limit:
        raise WireError(reason, f"payload of {len(payload)} B (max {limit})")
    try:
        d = json.loads(payload)
    except (ValueError, RecursionError) as exc:   # UnicodeDecodeError is a ValueError
        raise WireError(reason, f"not JSON ({type(exc).__name__})") from None
    if not isinstance(d, dict):
        raise WireError(reason, f"must be a JSON object, got {type(d).__name__}")
    return d


MAX_SENDER = 200   # characters of a control message's sender that are kept


@dataclass(frozen=True)
class ControlMessage:
    """A control message: the command and who sent it (the JSON form's `sender`; None for plain text)."""

    command: str
    sender: str | None = None


def parse_control_message(payload: bytes | str) -> ControlMessage:
    """A control message: plain `arm|disarm|stop|reset` or JSON {"command": ..., "sender": ...}, at most
    MAX_CONTROL_BYTES long."""
    if len(payload) > MAX_CONTROL_BYTES:
        raise WireError("malformed_control", f"control message of {len(payload)} B (max {MAX_CONTROL_BYTES})")
    text = payload.decode(errors="replace") if isinstance(payload, (bytes, bytearray)) else payload
    text = text.strip()
    sender = None
    if text.startswith("{"):
        doc = _json_object(text, MAX_CONTROL_BYTES, "malformed_control")
        command = doc.get("command", "")
        text = command if isinstance(command, str) else ""
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
    if len(payload) > MAX_CONTROL_BYTES:
        return None
    text = payload.decode(errors="replace") if isinstance(payload, (bytes, bytearray)) else payload
    try:
        doc = _json_object(text, MAX_CONTROL_BYTES, "malformed_control")
    except WireError:
        return None
    return _sender(doc)


def _sender(doc: dict[str, Any]) -> str | None:
    sender = doc.get("sender")
    return sender[:MAX_SENDER] if isinstance(sender, str) else None
