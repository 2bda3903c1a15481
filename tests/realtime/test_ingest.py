"""Ingest over real ZeroMQ sockets: every broken message in tests/broken/messages is counted under its
reason and dropped, and the next good frame still goes through."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest

from loopcast.realtime.ingest import Ingest, RigConfig
from loopcast.realtime.metrics import Metrics
from loopcast.realtime.wire.codec import FrameHeader, encode_frame
from loopcast.realtime.wire.transport import Subscriber

BROKEN = Path(__file__).resolve().parents[1] / "broken" / "messages"
CASES = sorted(BROKEN.glob("*.json"))
RIG = RigConfig(name="test", shape=(12, 10, 4), dtype="uint16")


def good(seq: int, rng: np.random.Generator) -> tuple[FrameHeader, np.ndarray]:
    vol = rng.integers(0, 4000, size=RIG.shape, dtype=np.uint16)
    return FrameHeader(seq=seq, t_src_ns=time.time_ns(), shape=RIG.shape, dtype="uint16", rig="test"), vol


def broken_parts(case: dict[str, Any], seq: int, rng: np.random.Generator) -> list[Any]:
    header, vol = good(seq, rng)
    h = {**header.to_wire(), **case.get("header", {})}
    h = {k: v for k, v in h.items() if v is not None}
    raw_header = bytes.fromhex(case["header_raw_hex"]) if "header_raw_hex" in case else msgpack.packb(h)
    size = {"half": vol.nbytes // 2, "double": vol.nbytes * 2, None: vol.nbytes}.get(
        case.get("payload_bytes"), case.get("payload_bytes"))
    payload = (vol.tobytes() * 2)[:size]
    return [b"frame", raw_header, payload][: case.get("parts", 3)]


def recv_all(sub: Subscriber, n: int) -> list[Any]:
    msgs: list[Any] = []
    deadline = time.monotonic() + 5.0
    while len(msgs) < n and time.monotonic() < deadline:
        msgs += sub.recv_all(100)
    assert len(msgs) == n, f"received {len(msgs)} of {n} messages"
    return msgs


@pytest.mark.parametrize("path", CASES, ids=[p.stem for p in CASES])
def test_broken_message_is_counted_dropped_and_next_frame_passes(path: Path, link, caplog) -> None:
    case = json.loads(path.read_text())
    pub, sub = link
    rng = np.random.default_rng(0)
    metrics = Metrics("test")
    ingest = Ingest(RIG, metrics)
    seqs = case.get("seqs", [0])
    for s in seqs:
        pub.send(encode_frame(*good(s, rng)))
    pub.send(broken_parts(case, seqs[-1] + 1, rng))
    nxt_header, nxt_vol = good(max(seqs) + 1, rng)
    pub.send(encode_frame(nxt_header, nxt_vol))

    results = [ingest.process(m) for m in recv_all(sub, len(seqs) + 2)]

    assert all(r is not None for r in results[: len(seqs)])
    assert results[-2] is None
    reason = case["expect"]["reason"]
    assert metrics.count("loopcast_frames_invalid_total", reason=reason) == 1
    assert sum(v for k, v in metrics.counters().items() if k.startswith("loopcast_frames_invalid")) == 1
    assert case["expect"]["message"] in caplog.text
    assert results[-1] is not None and results[-1].header.seq == max(seqs) + 1
    np.testing.assert_array_equal(results[-1].data, nxt_vol)
    assert metrics.count("loopcast_frames_received_total") == len(seqs) + 1


def test_seq_gap_counts_lost_frames_and_keeps_the_frame() -> None:
    rng = np.random.default_rng(1)
    metrics = Metrics("test")
    ingest = Ingest(RIG, metrics)
    for s in (0, 1, 5):
        assert ingest.process(encode_frame(*good(s, rng))) is not None
    assert metrics.count("loopcast_frames_dropped_total", reason="seq_gap") == 3
    assert metrics.count("loopcast_frames_received_total") == 3


def test_ingest_latency_is_recorded() -> None:
    metrics = Metrics("test")
    ingest = Ingest(RIG, metrics)
    ingest.process(encode_frame(*good(0, np.random.default_rng(2))))
    s = metrics.latency("ingest").summary()
    assert s["count"] == 1 and 0 <= s["p50_ms"] < 1000


def test_a_flood_of_bad_frames_is_all_counted_but_logged_once(caplog) -> None:
    """At full scale a falling-behind consumer sees a problem every frame: one log line, every one counted."""
    rng = np.random.default_rng(3)
    metrics = Metrics("test")
    ingest = Ingest(RIG, metrics)
    header, vol = good(0, rng)
    assert ingest.process(encode_frame(header, vol)) is not None
    for _ in range(50):
        assert ingest.process(encode_frame(header, vol)) is None          # duplicate seq, 50 times
    assert metrics.count("loopcast_frames_invalid_total", reason="duplicate_seq") == 50
    assert caplog.text.count("duplicate_seq") == 1
    ingest.throttle._last["duplicate_seq"] -= ingest.throttle.interval_s   # the interval has passed
    ingest.process(encode_frame(header, vol))
    assert caplog.text.count("duplicate_seq") == 2 and "+49 more like it" in caplog.text


def test_a_real_jump_is_followed_from_its_second_frame() -> None:
    rng = np.random.default_rng(0)
    metrics = Metrics("test")
    ingest = Ingest(RIG, metrics)
    seqs = [0, 1, 2, 500_000, 500_001, 500_002]
    results = [ingest.process(encode_frame(*good(s, rng))) for s in seqs]
    assert [r is not None for r in results] == [True, True, True, False, True, True]
    assert metrics.count("loopcast_frames_invalid_total", reason="seq_jump") == 1
    assert ingest.last_seq == 500_002


def test_any_exception_while_decoding_is_a_counted_rejection(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(0)
    metrics = Metrics("test")
    ingest = Ingest(RIG, metrics)

    def broken(*a: Any, **kw: Any) -> Any:
        raise OSError("the volume vanished under the reader")
    monkeypatch.setattr("loopcast.realtime.ingest.decode_frame", broken)
    assert ingest.process(encode_frame(*good(0, rng))) is None
    assert ingest.rejected is not None and ingest.rejected.reason == "undecodable"
    assert metrics.count("loopcast_frames_invalid_total", reason="undecodable") == 1
