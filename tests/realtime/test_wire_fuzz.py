"""Wire fuzzing (hypothesis): generated messages drive the frame decoder, the forecast decoder, the MQTT control
and trigger parsers, and ingest itself with good frames interleaved.

The property everywhere: no uncaught exception; a message is either accepted or refused with a WireError whose
reason is one of the known set (ingest: counted in loopcast_frames_invalid_total under one of
`realtime.ingest.REASONS`); every good frame between bad ones is processed. Messages are drawn as specs
(plain tuples: a header with one field mutated to a wrong type, value or size, random msgpack of random
structure, random bytes, wrong part counts, shm references to bad paths and offsets) and rendered against a
context (the seq they start from, a directory of shm ring files and traps: a FIFO, a directory, symlinks, a
shrunk and an empty file). CI runs 1,000 cases, derandomized and without an example database, so a run is
reproducible. bench/fuzz_wire.py loads this file and runs the same strategies at >= 10,000 cases.
"""
from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loopcast.realtime.ingest import MAX_SEQ_JUMP, REASONS, Ingest, RigConfig
from loopcast.realtime.metrics import Metrics, MetricsConfig
from loopcast.realtime.wire.codec import (
    CONTROL_COMMANDS,
    MAX_SENDER,
    SESSION_RE,
    ControlMessage,
    ForecastHeader,
    FrameHeader,
    TriggerCommand,
    WireError,
    control_sender,
    decode_forecast,
    decode_frame,
    encode_frame,
    parse_control_message,
)
from loopcast.realtime.wire.shm import ShmReader, ShmRing

RIG = RigConfig(name="fuzz", shape=(6, 5, 3), dtype="uint16", n_covariates=4)
VOLUME = np.arange(90, dtype=np.uint16).reshape(RIG.shape)
FORECAST_REASONS = frozenset({"bad_parts", "bad_topic", "malformed_header", "bad_version", "missing_field",
                              "bad_shape", "bad_dtype", "bad_order", "truncated_payload", "oversized_payload",
                              "bad_registration"})
DELETE = "<delete>"   # a mutation that removes the field
CI = settings(max_examples=200, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# --- values --------------------------------------------------------------------------------------------------
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12), st.binary(max_size=12))
BIG = st.sampled_from(["x" * 70_000, [0] * 5_000, {f"k{i}": 0 for i in range(5_000)}, [[[[[[0]]]]]] * 50,
                       b"\0" * 70_000, [0.5] * 1_024 + [0.5]])
NEAR = st.sampled_from(["C", "F", "K", "volume", "forecast", "uint16", "float32", "complex128", [6, 5, 3], [0, 5, 3],
                        [6, 5, -3], [6, 5, 3, 1], [], 1, 1.0, True, -1, 0, 2**63 - 1, "", "a" * 65, "run/1",
                        "\0", [1.0, 2.0, 3.0, 4.0], [float("nan")] * 4, [True] * 4, {"path": 1}])
WRONG = st.one_of(SCALARS, NEAR, BIG, st.lists(SCALARS, max_size=6),
                  st.dictionaries(st.text(max_size=6), SCALARS, max_size=4))
ANY_MSGPACK = st.recursive(SCALARS, lambda c: st.lists(c, max_size=5) | st.dictionaries(st.text(max_size=8), c,
                                                                                         max_size=5), max_leaves=25)
# seq values that never make a mutated frame acceptable ahead of the next good one in the ingest stream:
# older than every good seq, or a jump past MAX_SEQ_JUMP
SEQ_WRONG = st.one_of(st.integers(-(2**63), 0), st.integers(2**40, 2**63 - 1), SCALARS.filter(
    lambda v: not isinstance(v, int) or isinstance(v, bool)))
FRAME_FIELDS = ("v", "seq", "t_src_ns", "kind", "shape", "dtype", "order", "rig", "stimulus", "condition", "shm",
                "session", "unknown")
FORECAST_FIELDS = ("v", "seq", "t_src_ns", "kind", "model", "engine_version", "lead_times", "shape", "dtype", "order",
                   "t_pub_ns", "frame", "registration", "unknown")
PAYLOADS = st.one_of(st.sampled_from(["exact", "half", "double", "empty", "one_more"]), st.binary(max_size=64))
SHM_PATHS = ("ring", "shrunk", "empty", "fifo", "dir", "link_out", "link_ring", "other", "gone", "passwd", "relative",
             "dotdot", "loop", "nul", "long")
SHM_INTS = st.one_of(st.sampled_from([0, 64, 128, 180, 181, 63, -64, 2**62, 2**63 - 1, -(2**63)]),
                     st.integers(-(2**63), 2**63 - 1))


def mutation(fields: tuple[str, ...]) -> st.SearchStrategy[tuple[str, Any]]:
    """(field, new value or DELETE); seq only to values that cannot pass as the next frame."""
    def value(field: str) -> st.SearchStrategy[Any]:
        return st.one_of(st.just(DELETE), SEQ_WRONG if field == "seq" else WRONG)
    return st.sampled_from(fields).flatmap(lambda f: st.tuples(st.just(f), value(f)))


SHM_SPEC = st.fixed_dictionaries({
    "path": st.sampled_from(SHM_PATHS), "slot": st.one_of(st.integers(-1, 5), WRONG), "offset": SHM_INTS,
    "nbytes": st.one_of(st.just(180), SHM_INTS), "seq": st.sampled_from(["same", "other", "wrong_type"]),
    "drop": st.sampled_from([None, "path", "offset", "nbytes", "seq", "slot"])})

FRAME_SPECS = st.one_of(
    st.tuples(st.just("mutate"), mutation(FRAME_FIELDS), PAYLOADS),
    st.tuples(st.just("shm"), SHM_SPEC, st.sampled_from(["empty", "exact"])),
    st.tuples(st.just("msgpack"), ANY_MSGPACK, PAYLOADS),
    st.tuples(st.just("fields"), st.dictionaries(st.sampled_from(FRAME_FIELDS[:1] + FRAME_FIELDS[2:]), WRONG,
                                                 max_size=8), PAYLOADS),   # not seq: see SEQ_WRONG
    st.tuples(st.just("raw"), st.binary(max_size=200), PAYLOADS),
    st.tuples(st.just("parts"), st.lists(st.binary(max_size=32), max_size=6).filter(lambda p: len(p) != 3),
              st.booleans()),
    st.tuples(st.just("topic"), st.one_of(st.binary(max_size=40), st.just(b"f" * 300)), PAYLOADS),
    # a valid frame of another session (from the same seq, or restarting at 0): accepted, the order starts over
    st.tuples(st.just("session"), st.from_regex(SESSION_RE, fullmatch=True), st.booleans()),
)
FORECAST_SPECS = st.one_of(
    st.tuples(st.just("mutate"), mutation(FORECAST_FIELDS), PAYLOADS),
    st.tuples(st.just("msgpack"), ANY_MSGPACK, PAYLOADS),
    st.tuples(st.just("raw"), st.binary(max_size=200), PAYLOADS),
    st.tuples(st.just("parts"), st.lists(st.binary(max_size=32), max_size=6).filter(lambda p: len(p) != 3),
              st.booleans()),
    st.tuples(st.just("topic"), st.one_of(st.binary(max_size=40), st.sampled_from([b"forecast/", b"activation/x",
                                                                                   b"frame"])), PAYLOADS),
)
JSONISH = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
                       lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
                       max_leaves=15)
CONTROL_PAYLOADS = st.one_of(
    st.sampled_from([c for c in CONTROL_COMMANDS] + ["ARM", " stop\n", "arm!", "", "{", '{"command": "arm"}',
                                                     '{"command": "STOP", "sender": "op"}', '{"command": 1}',
                                                     '{"command": "arm", "sender": ' + '"s' * 10 + '"}']),
    st.text(max_size=40), st.binary(max_size=40),
    st.builds(lambda d: json.dumps(d), st.dictionaries(st.sampled_from(["command", "sender", "x"]), JSONISH,
                                                       max_size=3)),
    st.builds(lambda n: '{"command": ' + "[" * n + "]" * n + "}", st.integers(1, 3_000) | st.integers(1, 200_000)),
    st.builds(lambda n: '{"sender": "' + "s" * n + '", "command": "arm"}', st.integers(0, 20_000)),
    st.binary(max_size=40).map(lambda b: b"{" + b),
)
TRIGGER_FIELDS = ("trigger_id", "rig", "pattern", "targets", "power_mw", "duration_ms", "seq", "model",
                  "engine_version", "decision_time_ns", "policy", "value", "lead", "v")
TRIGGER_PAYLOADS = st.one_of(
    st.tuples(st.just("mutate"), st.sampled_from(TRIGGER_FIELDS), st.one_of(st.just(DELETE), JSONISH,
                                                                          st.sampled_from([float("nan"), 1e400]))),
    st.tuples(st.just("raw"), st.one_of(st.text(max_size=60), st.binary(max_size=60)), st.none()),
    st.tuples(st.just("deep"), st.integers(1, 200_000), st.none()),
)


# --- the shm directory: one real ring and its traps ----------------------------------------------------------
@dataclass
class ShmDir:
    """A ring of RIG's volumes in `root`, with files and names that must all be refused beside it."""

    root: Path
    ring: ShmRing
    paths: dict[str, str]

    @classmethod
    def make(cls, root: Path) -> ShmDir:
        ring = ShmRing(RIG.shape, RIG.dtype, "C", slots=4, directory=str(root))
        shrunk = root / "loopcast-shrunk"
        shrunk.write_bytes(b"\0" * 200)
        os.mkfifo(root / "loopcast-fifo")
        (root / "loopcast-dir").mkdir()
        (root / "loopcast-empty").touch()
        (root / "loopcast-link-out").symlink_to("/etc/passwd")
        (root / "loopcast-link-ring").symlink_to(ring.path)
        (root / "loopcast-loop").symlink_to(root / "loopcast-loop")
        (root / "other-file").write_bytes(b"\0" * 4096)
        paths = {"ring": ring.path, "shrunk": str(shrunk), "empty": str(root / "loopcast-empty"),
                 "fifo": str(root / "loopcast-fifo"), "dir": str(root / "loopcast-dir"),
                 "link_out": str(root / "loopcast-link-out"), "link_ring": str(root / "loopcast-link-ring"),
                 "other": str(root / "other-file"), "gone": str(root / "loopcast-gone"), "passwd": "/etc/passwd",
                 "relative": Path(ring.path).name, "dotdot": str(root / "sub" / ".." / "loopcast-x"),
                 "loop": str(root / "loopcast-loop" / "loopcast-x"), "nul": str(root / "loopcast-\0"),
                 "long": str(root / ("loopcast-" + "x" * 300))}
        return cls(root, ring, paths)

    def close(self) -> None:
        self.ring.close()


@dataclass
class Ctx:
    """What a spec is rendered against: the seq its header starts from, and the shm directory."""

    seq: int
    shm: ShmDir


# --- rendering specs into messages ---------------------------------------------------------------------------
def good_header(seq: int) -> FrameHeader:
    return FrameHeader(seq=seq, t_src_ns=time.time_ns(), shape=RIG.shape, dtype=RIG.dtype, order="C", rig="fuzz",
                       stimulus=(0.0, 1.0, 2.0, 3.0), session="fuzz-a")


def frame_header(seq: int) -> dict[str, Any]:
    return good_header(seq).to_wire()


def good_frame(seq: int, shm: ShmDir | None = None) -> list[Any]:
    """A valid frame: the payload in the message, or (with `shm`) in the ring's slot."""
    if shm is None:
        return encode_frame(good_header(seq), VOLUME)
    return encode_frame(replace(good_header(seq), shm=shm.ring.write(seq, VOLUME)), None)


def payload(kind: Any, exact: bytes) -> bytes:
    if isinstance(kind, bytes):
        return kind
    return {"exact": exact, "half": exact[: len(exact) // 2], "double": exact * 2, "empty": b"",
            "one_more": exact + b"\0"}[kind]


def mutated(header: dict[str, Any], field: str, value: Any) -> dict[str, Any]:
    out = dict(header)
    if isinstance(value, str) and value == DELETE:
        out.pop(field, None)
    else:
        out[field] = value
    return out


def pack(obj: Any) -> bytes:
    """msgpack of anything the strategies draw (ints past 64 bits become a string, as no sender could pack them)."""
    try:
        return msgpack.packb(obj)
    except (OverflowError, TypeError, ValueError):
        return msgpack.packb(repr(obj)[:100])


def shm_message(spec: dict[str, Any], body: str, ctx: Ctx) -> list[Any]:
    seq = {"same": ctx.seq, "other": ctx.seq + 1, "wrong_type": "x"}[spec["seq"]]
    ref = {"path": ctx.shm.paths[spec["path"]], "slot": spec["slot"], "offset": spec["offset"],
           "nbytes": spec["nbytes"], "seq": seq}
    if spec["drop"]:
        del ref[spec["drop"]]
    return [b"frame", pack({**frame_header(ctx.seq), "shm": ref}), payload(body, VOLUME.tobytes())]


def render_frame(spec: tuple[Any, ...], ctx: Ctx) -> list[Any]:
    """The multipart message a frame spec stands for."""
    kind, a, b = spec
    exact = VOLUME.tobytes()
    if kind == "mutate":
        return [b"frame", pack(mutated(frame_header(ctx.seq), *a)), payload(b, exact)]
    if kind == "shm":
        return shm_message(a, b, ctx)
    if kind == "msgpack":
        return [b"frame", pack(a), payload(b, exact)]
    if kind == "fields":
        return [b"frame", pack({**frame_header(ctx.seq), **a}), payload(b, exact)]
    if kind == "raw":
        return [b"frame", a, payload(b, exact)]
    if kind == "parts":
        return ([b"frame"] if b else []) + list(a)
    if kind == "session":
        return encode_frame(replace(good_header(0 if b else ctx.seq), session=a), VOLUME)
    return [a, pack(frame_header(ctx.seq)), payload(b, exact)]


def forecast_header(seq: int) -> dict[str, Any]:
    return ForecastHeader(seq=seq, t_src_ns=time.time_ns(), model="m", engine_version="m/v0001", lead_times=(1, 2),
                          shape=(2, 5), t_pub_ns=time.time_ns(), frame=frame_header(seq)).to_wire()


def render_forecast(spec: tuple[Any, ...], ctx: Ctx) -> list[Any]:
    kind, a, b = spec
    exact = np.zeros((2, 5), np.float32).tobytes()
    if kind == "mutate":
        return [b"forecast/m", pack(mutated(forecast_header(ctx.seq), *a)), payload(b, exact)]
    if kind == "msgpack":
        return [b"forecast/m", pack(a), payload(b, exact)]
    if kind == "raw":
        return [b"forecast/m", a, payload(b, exact)]
    if kind == "parts":
        return ([b"forecast/m"] if b else []) + list(a)
    return [a, pack(forecast_header(ctx.seq)), payload(b, exact)]


def render_trigger(spec: tuple[Any, ...]) -> bytes | str:
    kind, a, b = spec
    if kind == "raw":
        return a
    if kind == "deep":
        return '{"v": 1, "targets": ' + "[" * a + "]" * a + "}"
    good = TriggerCommand("t1", "fuzz", "p", (0, 3), 5.0, 20.0, 7, "m", "m/v1", 1).to_json()
    doc = mutated(json.loads(good), a, b)
    try:
        return json.dumps(doc)
    except ValueError:
        return "{"


# --- what must hold ------------------------------------------------------------------------------------------
def frame_outcome(parts: list[Any], reader: ShmReader) -> str:
    """'accepted', or the reason decode_frame refused it with (one of REASONS); anything else raises."""
    try:
        frame = decode_frame(parts, RIG.shape, RIG.dtype, reader)
    except WireError as exc:
        assert exc.reason in REASONS, exc
        return exc.reason
    assert frame.data.shape == RIG.shape
    return "accepted"


def forecast_outcome(parts: list[Any]) -> str:
    try:
        forecast = decode_forecast(parts)
    except WireError as exc:
        assert exc.reason in FORECAST_REASONS, exc
        return exc.reason
    assert forecast.data.shape == tuple(forecast.header.shape)
    return "accepted"


def control_outcome(payload: bytes | str) -> str:
    sender = control_sender(payload)
    assert sender is None or (isinstance(sender, str) and len(sender) <= MAX_SENDER)
    try:
        msg = parse_control_message(payload)
    except WireError as exc:
        assert exc.reason == "malformed_control", exc
        return exc.reason
    assert isinstance(msg, ControlMessage) and msg.command in CONTROL_COMMANDS
    return "accepted"


def trigger_outcome(payload: bytes | str) -> str:
    try:
        cmd = TriggerCommand.from_json(payload)
    except WireError as exc:
        assert exc.reason == "malformed_trigger", exc
        return exc.reason
    assert all(type(t) is int and t >= 0 for t in cmd.targets)
    assert np.isfinite(cmd.power_mw) and np.isfinite(cmd.duration_ms)
    return "accepted"


STREAM = st.lists(st.tuples(FRAME_SPECS, st.booleans()), min_size=1, max_size=8)


def ingest_stream(stream: list[tuple[tuple[Any, ...], bool]], shm: ShmDir,
                  record: Callable[[str, float], None] = lambda outcome, s: None) -> None:
    """A good frame, then each bad message followed by a good frame (in the message or in the ring): every
    good frame is accepted, every refused message is counted under a reason of REASONS, nothing raises."""
    metrics = Metrics("fuzz", MetricsConfig(enabled=False))
    ingest = Ingest(RIG, metrics, shm_dir=str(shm.root))
    seq, refused, accepted = 1000, 0, 1
    assert ingest.process(good_frame(seq)) is not None
    for spec, via_shm in stream:
        t0 = time.perf_counter()
        frame = ingest.process(render_frame(spec, Ctx(seq, shm)))
        outcome = "accepted" if frame is not None else ingest.rejected.reason if ingest.rejected else "?"
        record(outcome, time.perf_counter() - t0)
        assert outcome in REASONS or outcome == "accepted", outcome
        refused, accepted = refused + (frame is None), accepted + (frame is not None)
        seq += 2   # past a mutated frame accepted as seq + 1; within MAX_SEQ_JUMP
        nxt = ingest.process(good_frame(seq, shm if via_shm else None))
        assert nxt is not None and nxt.header.seq == seq, (spec, ingest.rejected)
        accepted += 1
    invalid = sum(v for k, v in metrics.counters().items() if k.startswith("loopcast_frames_invalid_total"))
    assert invalid == refused and metrics.count("loopcast_frames_received_total") == accepted
    ingest.close()


assert 2 <= MAX_SEQ_JUMP < 2**40   # SEQ_WRONG's jumps are jumps; the stream's good frames step by 2


# --- the CI tests: 1,000 cases in all --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def shm_dir() -> Iterator[ShmDir]:
    with tempfile.TemporaryDirectory(prefix="loopcast-fuzz-") as root:
        d = ShmDir.make(Path(root))
        d.ring.write(7, VOLUME)
        yield d
        d.close()


@CI
@given(spec=FRAME_SPECS)
def test_frame_decoding_refuses_with_a_known_reason(shm_dir: ShmDir, spec: tuple[Any, ...]) -> None:
    reader = ShmReader(str(shm_dir.root))
    frame_outcome(render_frame(spec, Ctx(7, shm_dir)), reader)
    reader.close()


@CI
@given(spec=FORECAST_SPECS)
def test_forecast_decoding_refuses_with_a_known_reason(shm_dir: ShmDir, spec: tuple[Any, ...]) -> None:
    forecast_outcome(render_forecast(spec, Ctx(7, shm_dir)))


@settings(CI, max_examples=150)
@given(payload=CONTROL_PAYLOADS)
def test_control_parsing_refuses_with_a_known_reason(payload: bytes | str) -> None:
    control_outcome(payload)


@settings(CI, max_examples=100)
@given(spec=TRIGGER_PAYLOADS)
def test_trigger_parsing_refuses_with_a_known_reason(spec: tuple[Any, ...]) -> None:
    trigger_outcome(render_trigger(spec))


@settings(CI, max_examples=350)
@given(stream=STREAM)
def test_ingest_counts_every_bad_message_and_passes_every_good_frame(
        shm_dir: ShmDir, stream: list[tuple[tuple[Any, ...], bool]]) -> None:
    ingest_stream(stream, shm_dir)


def test_the_good_messages_are_accepted(shm_dir: ShmDir) -> None:
    """The renderers' baselines are valid, so what the fuzzer refuses is what it mutated."""
    reader = ShmReader(str(shm_dir.root))
    assert frame_outcome(good_frame(7), reader) == "accepted"
    assert frame_outcome(good_frame(8, shm_dir), reader) == "accepted"
    assert forecast_outcome(render_forecast(("mutate", ("unknown", 1), "exact"), Ctx(7, shm_dir))) == "accepted"
    assert trigger_outcome(render_trigger(("mutate", "policy", "p"))) == "accepted"
    assert control_outcome('{"command": "arm", "sender": "op"}') == "accepted"
    reader.close()
