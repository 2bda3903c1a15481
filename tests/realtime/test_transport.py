"""Volume transports over real sockets: Fortran-order payloads, the shared-memory ring (in place, guarded
against slot reuse, across processes), and the pooled zero-copy sender."""
from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Literal

import numpy as np
import pytest

from loopcast.realtime.ingest import Ingest, RigConfig
from loopcast.realtime.metrics import Metrics
from loopcast.realtime.preprocess.stage import Preprocess, PreprocessConfig
from loopcast.realtime.wire.codec import FrameHeader, WireError, decode_frame, encode_frame
from loopcast.realtime.wire.shm import ShmReader, ShmRing
from loopcast.realtime.wire.transport import Subscriber, TransportConfig, VolumeSender

RIG = RigConfig(name="test", shape=(12, 10, 4), dtype="uint16")


def volume(seq: int) -> np.ndarray:
    """(x, y, z) uint16 in Fortran order, distinct per seq."""
    v = np.random.default_rng(seq).integers(0, 4000, size=RIG.shape, dtype=np.uint16)
    return np.asfortranarray(v)


def header(seq: int) -> FrameHeader:
    return FrameHeader(seq=seq, t_src_ns=time.time_ns(), shape=RIG.shape, dtype="uint16", rig="test")


def receive(sub: Subscriber, n: int) -> list:
    msgs: list = []
    deadline = time.monotonic() + 10.0
    while len(msgs) < n and time.monotonic() < deadline:
        msgs += sub.recv_all(100)
    assert len(msgs) == n, f"received {len(msgs)} of {n}"
    return msgs


@pytest.mark.parametrize("kind", ["zmq", "shm"])
def test_fortran_volumes_arrive_bit_identical_in_their_order(link, kind: Literal["zmq", "shm"],
                                                             tmp_path: Path) -> None:
    pub, sub = link
    sender = VolumeSender(pub, TransportConfig(kind=kind, shm_dir=str(tmp_path)))
    ingest = Ingest(RIG, Metrics("t"), shm_dir=str(tmp_path))
    sent = [volume(s) for s in range(3)]
    for s, v in enumerate(sent):
        sender.send(header(s), v)
    frames = [ingest.process(m) for m in receive(sub, 3)]
    for f, v in zip(frames, sent):
        assert f is not None and f.header.order == "F" and f.data.flags.f_contiguous
        np.testing.assert_array_equal(f.data, v)
        assert (f.header.shm is not None) == (kind == "shm") and f.intact()
    if kind == "shm":
        assert frames[0] is not None
        assert not frames[0].data.flags.writeable            # a read-only view on the ring, not a copy
    sender.close()
    ingest.close()


def test_rendering_into_the_slot_sends_without_a_copy(link, tmp_path: Path) -> None:
    pub, sub = link
    sender = VolumeSender(pub, TransportConfig(kind="shm", shm_dir=str(tmp_path), shm_slots=3))
    buf = sender.buffer(0, RIG.shape, "uint16", "F")
    buf[...] = volume(0)
    sender.send(header(0), buf)
    assert sender.ring is not None and np.shares_memory(buf, sender.ring.slot_view(0))
    (msg,) = receive(sub, 1)
    frame = decode_frame(msg, RIG.shape, "uint16", ShmReader(str(tmp_path)))
    np.testing.assert_array_equal(frame.data, volume(0))
    sender.close()
    assert not list(tmp_path.iterdir()), "closing the sender removes its ring file"


def test_a_reused_slot_is_detected_before_and_after_use(tmp_path: Path) -> None:
    ring = ShmRing(RIG.shape, "uint16", "F", slots=2, directory=str(tmp_path))
    reader = ShmReader(str(tmp_path))
    ref0 = ring.write(0, volume(0))
    data, lease = reader.view(ref0, RIG.shape, "uint16", "F")
    np.testing.assert_array_equal(data, volume(0))
    assert lease.intact()
    ring.write(2, volume(2))                                   # same slot, two frames later
    assert not lease.intact()
    with pytest.raises(WireError, match="shm_overrun"):
        reader.view(ref0, RIG.shape, "uint16", "F")
    ring.acquire(4)                                            # being written: not readable either
    with pytest.raises(WireError, match="shm_overrun"):
        reader.view(ring.commit(2).__class__(ref0.path, 0, ref0.offset, ref0.nbytes, 4), RIG.shape, "uint16", "F")
    ring.close()


def test_preprocess_drops_and_counts_a_frame_whose_slot_was_reused(tmp_path: Path) -> None:
    seg = np.zeros(RIG.shape, np.uint32)
    seg[1:3, 1:3, 0], seg[5:8, 4:6, 2] = 1, 2
    metrics = Metrics("t")
    pre = Preprocess(seg, PreprocessConfig(), 0.9, metrics)
    ring = ShmRing(RIG.shape, "uint16", "F", slots=2, directory=str(tmp_path))
    reader = ShmReader(str(tmp_path))
    msgs = [encode_frame(FrameHeader(**{**header(s).__dict__, "order": "F", "shm": ring.write(s, volume(s))}), None)
            for s in (0, 1)]
    frames = [decode_frame(m, RIG.shape, "uint16", reader) for m in msgs]
    assert pre.process(frames[0]) is not None
    ring.write(3, volume(3))                                   # overwrites frame 1's slot before it is used
    assert pre.process(frames[1]) is None
    assert metrics.count("loopcast_frames_invalid_total", reason="shm_overrun") == 1
    ring.close()


def test_zmq_sender_reuses_a_buffer_only_after_zeromq_released_it(link) -> None:
    pub, sub = link
    sender = VolumeSender(pub, TransportConfig(kind="zmq"))
    a = sender.buffer(0, RIG.shape, "uint16", "F")
    a[...] = volume(0)
    sender.send(header(0), a)
    receive(sub, 1)
    deadline = time.monotonic() + 5.0
    while not all(t is None or t.done for _, t in sender._pool) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert sender.buffer(1, RIG.shape, "uint16", "F") is a     # released: reused, no new allocation
    b = sender.buffer(2, RIG.shape, "uint16", "F")              # `a` handed out again: never shared
    assert b is not a
    sender.close()


def test_shm_frames_cross_processes(link, tmp_path: Path) -> None:
    """A producer process renders into its ring; this process views the slots in place."""
    pub, sub = link
    pub.close()
    endpoint = "ipc://" + str(tmp_path / "frames.sock")
    sub2 = Subscriber(endpoint, topics=(b"frame",), rcvhwm=100)
    script = textwrap.dedent(f"""
        import time, numpy as np
        from loopcast.realtime.wire.transport import Publisher, TransportConfig, VolumeSender
        from loopcast.realtime.wire.codec import FrameHeader
        pub = Publisher({endpoint!r}, sndhwm=100)
        assert pub.wait_for_subscribers(1, 10.0)
        sender = VolumeSender(pub, TransportConfig(kind="shm", shm_dir={str(tmp_path)!r}, shm_slots=8))
        for s in range(5):
            buf = sender.buffer(s, {RIG.shape!r}, "uint16", "F")
            buf[...] = np.random.default_rng(s).integers(0, 4000, size={RIG.shape!r}, dtype=np.uint16)
            sender.send(FrameHeader(seq=s, t_src_ns=time.time_ns(), shape={RIG.shape!r}, dtype="uint16"), buf)
        input()          # keep the ring alive until the test has read it
        sender.close()
    """)
    proc = subprocess.Popen([sys.executable, "-P", "-c", script], stdin=subprocess.PIPE, text=True)
    try:
        ingest = Ingest(RIG, Metrics("t"), shm_dir=str(tmp_path))
        frames = [ingest.process(m) for m in receive(sub2, 5)]
        for s, f in enumerate(frames):
            assert f is not None and f.header.shm is not None and f.intact()
            np.testing.assert_array_equal(f.data, volume(s))
        del frames
        ingest.close()
    finally:
        proc.communicate("\n", timeout=10)
        sub2.close()
    assert proc.returncode == 0
    assert not list(tmp_path.glob("loopcast-*")), "the producer removed its ring on close"
