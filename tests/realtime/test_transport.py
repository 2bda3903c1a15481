"""Volume transports over real sockets: Fortran-order payloads, the shared-memory ring (in place, guarded
against slot reuse, across processes), and the pooled zero-copy sender."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from dataclasses import replace
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


# --- faults of the ring file: shrunk, replaced, not a regular file ------------------------------------------
def run_isolated(script: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run `script` in a child interpreter, so a regression's SIGBUS fails the test instead of killing pytest."""
    proc = subprocess.run([sys.executable, "-P", "-c", textwrap.dedent(script), *args], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, f"child exited {proc.returncode} (-7 = SIGBUS)\n{proc.stdout}\n{proc.stderr}"
    return proc


SHRINK = """
    import os, sys, time
    import numpy as np
    from loopcast.realtime.ingest import Ingest, RigConfig
    from loopcast.realtime.metrics import Metrics
    from loopcast.realtime.wire.codec import FrameHeader, ShmRef, encode_frame
    from loopcast.realtime.wire.shm import ShmRing

    directory = sys.argv[1]
    RIG = RigConfig(name="test", shape=(64, 64, 4), dtype="uint16")   # 32 KiB slots: pages a shrink can drop
    ring = ShmRing(RIG.shape, "uint16", "F", slots=4, directory=directory)
    metrics = Metrics("t")
    ingest = Ingest(RIG, metrics, shm_dir=directory)

    def vol(seq):
        return np.asfortranarray(np.full(RIG.shape, seq, np.uint16))

    def msg(ref):
        h = FrameHeader(seq=ref.seq, t_src_ns=time.time_ns(), shape=RIG.shape, dtype="uint16", order="F", shm=ref)
        return encode_frame(h, None)

    def slot_ref(path, seq):
        k = seq % ring.slots
        return ShmRef(path, k, k * ring.slot_bytes + 64, ring.nbytes, seq)

    first = ingest.process(msg(ring.write(0, vol(0))))
    assert first is not None and int(first.data[0, 0, 0]) == 0
    os.truncate(ring.path, ring.slot_bytes)           # shrinks under the mapped reader: slots 1.. are gone
    assert first.mapped() and first.intact()          # slot 0 is still covered
    assert ingest.process(msg(slot_ref(ring.path, 2))) is None   # its guard's page is past the end
    assert ingest.rejected.reason == "bad_shm", ingest.rejected
    os.truncate(ring.path, 0)                         # now slot 0 too: the frame in hand must not be read
    assert not first.mapped() and not first.intact()
    del first
    os.truncate(ring.path, ring.slot_bytes * ring.slots)   # the producer restores it and goes on
    second = ingest.process(msg(ring.write(3, vol(3))))
    assert second is not None and int(second.data[0, 0, 0]) == 3 and second.intact()
    del second

    # replaced under its name (another inode): mapped anew
    other = ShmRing(RIG.shape, "uint16", "F", slots=4, directory=directory)
    other.write(5, vol(5))
    os.replace(other.path, ring.path)
    third = ingest.process(msg(slot_ref(ring.path, 5)))
    assert third is not None and int(third.data[0, 0, 0]) == 5, ingest.rejected
    del third
    # unlinked while mapped: still read through the mapping, never a fault
    other.write(6, vol(6))
    os.unlink(ring.path)
    fourth = ingest.process(msg(slot_ref(ring.path, 6)))
    assert fourth is not None and int(fourth.data[0, 0, 0]) == 6, ingest.rejected
    assert metrics.count("loopcast_frames_invalid_total", reason="bad_shm") == 1
    print("ok")
"""


def test_a_ring_shrunk_under_a_mapped_reader_is_a_counted_rejection_not_sigbus(tmp_path: Path) -> None:
    assert run_isolated(SHRINK, str(tmp_path)).stdout.strip() == "ok"


@pytest.mark.parametrize("entry", ["fifo", "directory", "symlink_out", "symlink_in", "empty", "missing"])
def test_a_ring_name_that_is_not_a_regular_file_is_refused_at_once(tmp_path: Path, entry: str) -> None:
    """FIFOs, directories and symlinks named loopcast-* are refused without opening (a FIFO used to block
    the loop ~3 s); a symlink is never followed, not even to a real ring in the same directory."""
    ring = ShmRing(RIG.shape, "uint16", "F", slots=2, directory=str(tmp_path))
    ref = ring.write(1, volume(1))
    path = tmp_path / f"loopcast-{entry}"
    {"fifo": lambda: os.mkfifo(path), "directory": path.mkdir, "empty": path.touch, "missing": lambda: None,
     "symlink_out": lambda: path.symlink_to("/etc/passwd"), "symlink_in": lambda: path.symlink_to(ref.path)}[entry]()
    metrics = Metrics("t")
    ingest = Ingest(RIG, metrics, shm_dir=str(tmp_path))
    msg = encode_frame(FrameHeader(**{**header(1).__dict__, "order": "F", "shm": replace(ref, path=str(path))}),
                       None)
    t0 = time.perf_counter()
    assert ingest.process(msg) is None
    assert time.perf_counter() - t0 < 0.1
    assert ingest.rejected is not None and ingest.rejected.reason == "bad_shm"
    ok = encode_frame(FrameHeader(**{**header(2).__dict__, "order": "F", "shm": ring.write(2, volume(2))}), None)
    frame = ingest.process(ok)                                 # the next good frame goes through
    assert frame is not None
    np.testing.assert_array_equal(frame.data, volume(2))
    assert metrics.count("loopcast_frames_invalid_total", reason="bad_shm") == 1
    del frame
    ingest.close()
    ring.close()


SHRINK_BEFORE_PREPROCESS = """
    import os, sys, time
    import numpy as np
    from loopcast.realtime.engines.onnx_runtime import OnnxEngine
    from loopcast.realtime.forecast.stage import ForecastStage
    from loopcast.realtime.ingest import RigConfig
    from loopcast.realtime.metrics import Metrics, MetricsConfig
    from loopcast.realtime.pipeline import Pipeline, PipelineConfig
    from loopcast.realtime.wire.codec import FrameHeader, encode_frame
    from loopcast.realtime.wire.shm import ShmRing
    from loopcast.realtime.wire.transport import Publisher

    directory, engine = sys.argv[1], sys.argv[2]
    RIG = RigConfig(name="test", shape=(64, 64, 4), dtype="uint16", n_covariates=0)   # 32 KiB slots
    ring = ShmRing(RIG.shape, "uint16", "F", slots=8, directory=directory)

    def msg(seq):
        ref = ring.write(seq, np.asfortranarray(np.full(RIG.shape, 100 + seq, np.uint16)))
        return encode_frame(FrameHeader(seq, time.time_ns(), RIG.shape, "uint16", "F", shm=ref), None)

    class Batches:
        finished = False
        def __init__(self):
            self.batches = [lambda: [msg(0), msg(1), msg(2)], lambda: [restore(), msg(3)][1:]]
        def recv_all(self, timeout_ms, limit=64):
            return self.batches.pop(0)() if self.batches else []
        def close(self):
            pass

    def restore():
        os.truncate(ring.path, ring.slot_bytes * ring.slots)

    metrics = Metrics("run", MetricsConfig(enabled=False))
    seg = (np.arange(np.prod(RIG.shape), dtype=np.uint32).reshape(RIG.shape) % 10) + 1
    pub = Publisher("tcp://127.0.0.1:*")
    pipe = Pipeline(PipelineConfig(), RIG, Batches(), seg, ForecastStage(OnnxEngine(engine), pub, metrics), metrics,
                    shm_dir=directory)
    ingest = pipe.ingest.process
    def ingest_then_shrink(parts):
        frame = ingest(parts)
        if frame is not None and frame.header.seq == 2:   # accepted, then the ring shrinks before it is read
            os.truncate(ring.path, ring.slot_bytes * 2)
        return frame
    pipe.ingest.process = ingest_then_shrink
    assert pipe.step(0) == 2                           # frames 0 and 1; frame 2 dropped before preprocessing
    assert metrics.count("loopcast_frames_invalid_total", reason="bad_shm") == 1
    assert pipe.step(0) == 1 and pipe.report.last_seq == 3   # the next good frame goes through
    pipe.close()
    print("ok")
"""


def test_a_ring_shrunk_between_ingest_and_preprocess_is_dropped_not_read(tmp_path: Path,
                                                                          toy_engines: dict[str, Path]) -> None:
    assert run_isolated(SHRINK_BEFORE_PREPROCESS, str(tmp_path), str(toy_engines["mean"])).stdout.strip() == "ok"


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a file to another user needs root")
def test_a_ring_of_another_user_is_refused(tmp_path: Path) -> None:
    """Another user could truncate their ring under the reader: only the pipeline's user's (or root's) are mapped."""
    ring = ShmRing(RIG.shape, "uint16", "F", slots=2, directory=str(tmp_path))
    ref = ring.write(0, volume(0))
    os.chown(ring.path, 4242, 4242)
    reader = ShmReader(str(tmp_path))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(os, "geteuid", lambda: 1000)                # the pipeline as an ordinary user
        with pytest.raises(WireError, match="belongs to uid 4242"):
            reader.view(ref, RIG.shape, "uint16", "F")
    os.chown(ring.path, 1000, 1000)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(os, "geteuid", lambda: 1000)
        data, _ = reader.view(ref, RIG.shape, "uint16", "F")   # its own: mapped
    np.testing.assert_array_equal(data, volume(0))
    del data
    reader.close()
    ring.close()


SOURCE = textwrap.dedent("""
    import sys
    from loopcast.realtime.wire.transport import Publisher, flush_and_exit_context
    pub = Publisher(sys.argv[1], sndhwm=1000)
    assert pub.wait_for_subscribers(1, 10.0)
    for i in range(int(sys.argv[2])):
        pub.send([b"frame", str(i).encode(), bytes(4 << 20)])
    pub.close(linger_ms=int(sys.argv[3]))
    if int(sys.argv[3]):
        flush_and_exit_context(int(sys.argv[3]))
""")


def test_a_source_process_that_ends_flushes_its_last_frames(tmp_path: Path) -> None:
    """A source that sends and exits at once (as `loopcast replay` does) still delivers its last frames: the
    replay of a moving fish lost its last frame once in CI before sources flushed at exit."""
    import zmq
    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"frame")
    sub.setsockopt(zmq.RCVHWM, 1000)
    endpoint = f"ipc://{tmp_path}/frames"
    n = 25
    proc = subprocess.Popen([sys.executable, "-c", SOURCE, endpoint, str(n), "3000"])
    for _ in range(100):                       # the source binds; connect once its socket file is there
        if (tmp_path / "frames").exists():
            break
        time.sleep(0.05)
    sub.connect(endpoint)
    got: list[int] = []
    try:
        while len(got) < n and sub.poll(5_000):
            got.append(int(sub.recv_multipart()[1]))
    finally:
        assert proc.wait(30) == 0
        sub.close(linger=0)
        ctx.term()
    assert got == list(range(n))
