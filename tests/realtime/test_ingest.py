"""Ingest over real ZeroMQ sockets: every broken message in tests/broken/messages is counted under its
reason and dropped, and the next good frame still goes through. Sessions: a source restarting at seq 0 in a
new `session` is followed, and the pipeline starts its preprocessing over exactly as a fresh one."""
from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest

from loopcast.inprocess import MessageFeed
from loopcast.realtime.engines.onnx_runtime import OnnxEngine
from loopcast.realtime.forecast.stage import ForecastConfig, ForecastStage
from loopcast.realtime.ingest import REASONS, Ingest, RigConfig
from loopcast.realtime.metrics import Metrics, MetricsConfig
from loopcast.realtime.pipeline import Pipeline, PipelineConfig
from loopcast.realtime.preprocess.dff import DffConfig
from loopcast.realtime.preprocess.stage import PreprocessConfig, Preprocessed
from loopcast.realtime.spikes.oasis_params import OasisConfig
from loopcast.realtime.spikes.stage import SpikeConfig
from loopcast.realtime.wire.codec import SESSION_RE, Frame, FrameHeader, encode_frame, new_session_id
from loopcast.realtime.wire.transport import Publisher, Subscriber

BROKEN = Path(__file__).resolve().parents[1] / "broken" / "messages"
DOCS = Path(__file__).resolve().parents[2] / "docs" / "architecture.md"
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
    return [case.get("topic", "frame").encode(), raw_header, payload][: case.get("parts", 3)]


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


# Reasons no fixture can produce: ingest always has an shm reader (`shm_unsupported` is decode_frame's without
# one), `shm_overrun` needs a live ring (tests/realtime/test_transport.py), `undecodable` an internal failure
# (test_any_exception_while_decoding_is_a_counted_rejection).
NO_FIXTURE = {"shm_unsupported", "shm_overrun", "undecodable"}


def test_every_reason_is_documented_and_has_a_broken_message() -> None:
    fixtures = {json.loads(p.read_text())["expect"]["reason"] for p in CASES}
    assert fixtures <= REASONS
    assert REASONS - fixtures == NO_FIXTURE
    listed = DOCS.read_text().split("Rejections, counted in", 1)[1].split("Lists and maps", 1)[0]
    assert set(re.findall(r"`([a-z_]+)`", listed)) - {"loopcast_frames_invalid_total"} == REASONS


@pytest.mark.parametrize("stimulus", [[0.5] * 1_000_000, [0] * 1_000_000], ids=["floats_9MB", "ints_1MB"])
def test_a_million_entry_stimulus_is_refused_without_a_stall(stimulus: list[float]) -> None:
    """It used to stall the loop ~220 ms; now it is refused before anything is converted (bench/fuzz_wire.py
    measures it: well under 1 ms)."""
    metrics = Metrics("test")
    ingest = Ingest(RIG, metrics)
    header, vol = good(0, np.random.default_rng(0))
    msg = [b"frame", msgpack.packb({**header.to_wire(), "stimulus": stimulus}), vol.tobytes()]
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        assert ingest.process(msg) is None
        best = min(best, time.perf_counter() - t0)
    assert ingest.rejected is not None and ingest.rejected.reason == "malformed_header"
    assert best < 0.005, f"{best * 1e3:.2f} ms"
    assert ingest.process(encode_frame(*good(0, np.random.default_rng(0)))) is not None


# --- sessions ---------------------------------------------------------------------------------------------
def in_session(session: str, seqs: Sequence[int], seed: int = 0) -> list[list[Any]]:
    rng = np.random.default_rng(seed)
    out = []
    for s in seqs:
        header, vol = good(s, rng)
        out.append(encode_frame(FrameHeader(**{**header.__dict__, "session": session}), vol))
    return out


def test_a_new_session_restarts_the_seq_order_and_is_counted(caplog: pytest.LogCaptureFixture) -> None:
    metrics = Metrics("test")
    ingest = Ingest(RIG, metrics)
    news = []
    for msg in in_session("run-a", range(5)) + in_session("run-b", range(4)) + in_session("", [4]):
        assert ingest.process(msg) is not None, ingest.rejected
        news.append(ingest.new_session)
    assert news == [False] * 5 + [True] + [False] * 4        # the first session is no change; "" stays in b
    assert metrics.count("loopcast_session_changes_total") == 1
    assert sum(v for k, v in metrics.counters().items() if k.startswith("loopcast_frames_invalid")) == 0
    assert ingest.session == "run-b" and ingest.last_seq == 4
    assert "new session run-b (was run-a) at seq 0" in caplog.text


def test_without_a_session_a_restart_is_out_of_order_as_before() -> None:
    metrics = Metrics("test")
    ingest = Ingest(RIG, metrics)
    results = [ingest.process(m) for m in in_session("", [0, 1, 2, 0, 1])]
    assert [r is not None for r in results] == [True, True, True, False, False]
    assert metrics.count("loopcast_frames_invalid_total", reason="out_of_order_seq") == 2
    assert metrics.count("loopcast_session_changes_total") == 0


def test_a_rejected_frame_never_changes_the_session() -> None:
    metrics = Metrics("test")
    ingest = Ingest(RIG, metrics)
    for m in in_session("run-a", range(3)):
        assert ingest.process(m) is not None
    header, vol = good(0, np.random.default_rng(0))
    bad = encode_frame(FrameHeader(**{**header.__dict__, "session": "run-b", "stimulus": (1.0,)}), vol)
    assert ingest.process(bad) is None and ingest.rejected is not None
    assert ingest.rejected.reason == "bad_stimulus"
    assert ingest.session == "run-a" and ingest.process(in_session("run-a", [3])[0]) is not None
    assert metrics.count("loopcast_session_changes_total") == 0


SESSION_SHAPE = (8, 8, 2)
SESSION_RIG = RigConfig(name="test", shape=SESSION_SHAPE, dtype="uint16", n_covariates=0)
SESSION_CFG = PipelineConfig(preprocess=PreprocessConfig(dff=DffConfig(warmup=2, window=6),
                                                         spikes=SpikeConfig(oasis=OasisConfig(warmup=5),
                                                                            fit_in_background=False)),
                             forecast=ForecastConfig(also_schedule="every"))


def session_volumes(session: str, n: int, seed: int) -> list[list[Any]]:
    """Frames 0..n-1 of one session: noisy volumes with transients."""
    rng = np.random.default_rng(seed)
    out = []
    for seq in range(n):
        vol = rng.integers(100, 120, size=SESSION_SHAPE).astype(np.uint16)
        vol[rng.random(SESSION_SHAPE) < 0.1] += 200
        out.append(encode_frame(FrameHeader(seq, time.time_ns(), SESSION_SHAPE, "uint16", session=session), vol))
    return out


def run_sessions(engine: Path, messages: list[list[Any]]) -> tuple[Pipeline, Metrics, list[Preprocessed]]:
    """A pipeline of one toy forecaster run over `messages`; every frame's preprocess output kept."""
    metrics = Metrics("run", MetricsConfig(enabled=False))
    pub = Publisher("tcp://127.0.0.1:*")
    segmentation = (np.arange(np.prod(SESSION_SHAPE), dtype=np.uint32).reshape(SESSION_SHAPE) % 10) + 1
    pipe = Pipeline(SESSION_CFG, SESSION_RIG, MessageFeed(messages), segmentation,
                    ForecastStage(OnnxEngine(engine), pub, metrics), metrics)
    pres: list[Preprocessed] = []
    pipe.preprocess.process = keep(pipe.preprocess.process, pres)  # type: ignore[method-assign]
    pipe.run()
    pipe.close()
    pub.close()
    return pipe, metrics, pres


def keep(process: Callable[[Frame], Preprocessed | None], sink: list[Preprocessed]) -> Callable[..., Any]:
    def wrapped(frame: Frame) -> Preprocessed | None:
        out = process(frame)
        if out is not None:
            sink.append(Preprocessed(out.seq, out.fluorescence.copy(), out.dff.copy(), out.spikes, out.ready,
                                     out.voxel_dff, out.spikes_ready))
        return out
    return wrapped


def test_a_new_session_restarts_the_pipeline_exactly_as_a_fresh_one(toy_engines: dict[str, Path]) -> None:
    """Session a (frames 0..11), then session b (0..8): every frame processed, none out of order, one
    session change, and b's dF/F, spikes and forecasts are exactly a fresh pipeline's on b alone."""
    a, b = session_volumes("a1", 12, seed=0), session_volumes("b2", 9, seed=1)
    both, metrics, pres = run_sessions(toy_engines["mean"], a + b)
    only_a, _, _ = run_sessions(toy_engines["mean"], a)
    only_b, _, pres_b = run_sessions(toy_engines["mean"], b)

    assert both.report.frames == 21 and [p.seq for p in pres] == list(range(12)) + list(range(9))
    assert sum(v for k, v in metrics.counters().items() if k.startswith("loopcast_frames_invalid")) == 0
    assert metrics.count("loopcast_session_changes_total") == 1 and both.report.session_changes == 1
    for got, fresh in zip(pres[12:], pres_b, strict=True):
        np.testing.assert_array_equal(got.dff, fresh.dff)
        np.testing.assert_array_equal(got.spikes.prob, fresh.spikes.prob)
        assert (got.ready, got.spikes_ready) == (fresh.ready, fresh.spikes_ready)
    assert any(p.ready for p in pres_b) and not pres[12].ready      # b warmed up again from its frame 0
    assert both.report.forecasts == only_a.report.forecasts + only_b.report.forecasts


def test_the_sources_session_ids_pass_the_contract_and_round_trip() -> None:
    from loopcast.replay.player import frame_header
    ids = {new_session_id() for _ in range(100)}
    assert len(ids) == 100 and all(SESSION_RE.fullmatch(s) for s in ids)
    vol = np.zeros(RIG.shape, np.uint16)
    msg = encode_frame(frame_header(3, vol, np.zeros((4, 26)), np.array([0]), "test", session="0123abcd"), vol)
    frame = Ingest(RIG, Metrics("test")).process(msg)
    assert frame is not None and frame.header.session == "0123abcd"
    assert "session" not in FrameHeader(0, 0, RIG.shape, "uint16").to_wire()   # none: not sent, as before
