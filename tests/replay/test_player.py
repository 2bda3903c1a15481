"""Replay over real ZeroMQ: what ingest receives is bit-identical to the store, paced as asked."""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from loopcast.realtime.ingest import Ingest, RigConfig
from loopcast.realtime.metrics import Metrics
from loopcast.realtime.wire.transport import Subscriber
from loopcast.replay.layout import Recording
from loopcast.replay.player import Player, ReplayConfig


def receive(sub: Subscriber, n: int, timeout_s: float = 10.0) -> list:
    out: list = []
    deadline = time.monotonic() + timeout_s
    while len(out) < n and time.monotonic() < deadline:
        out += sub.recv_all(100)
    return out


def replay_into_ingest(rec: Recording, cfg: ReplayConfig) -> tuple[list, float]:
    player = Player(rec, "tcp://127.0.0.1:*", cfg, "test", Metrics("replay"))
    sub = Subscriber(player.endpoint, topics=(b"frame",), rcvhwm=1000)
    t0 = time.monotonic()
    thread = threading.Thread(target=player.run, kwargs={"progress": False})
    thread.start()
    n = len(player.frame_range())
    msgs = receive(sub, n)
    thread.join(10)
    elapsed = time.monotonic() - t0
    player.close()
    sub.close()
    rig = RigConfig(name="test", shape=rec.volume_shape, dtype="uint16")
    ingest = Ingest(rig, Metrics("run"))
    return [ingest.process(m) for m in msgs], elapsed


def test_replay_is_bit_identical_with_stimuli_and_conditions(tiny_recording: Recording) -> None:
    # speed 0 outruns the receiver by design (newest wins at the HWM): a deep queue keeps every frame here
    frames, _ = replay_into_ingest(tiny_recording, ReplayConfig(speed=0, start=10, stop=40, sndhwm=100))
    assert [f.header.seq for f in frames] == list(range(10, 40))
    stimuli = tiny_recording.stimuli()
    offsets = tiny_recording.condition_offsets
    for f in frames:
        t = f.header.seq
        np.testing.assert_array_equal(f.data, tiny_recording.read_volume(t))
        np.testing.assert_allclose(f.header.stimulus, stimuli[t])
        assert offsets[f.header.condition] <= t < offsets[f.header.condition + 1]


def test_replay_keeps_the_recorded_rate_scaled_by_speed(tiny_recording: Recording) -> None:
    speed = 20.0   # 5 frames at 0.9141 s / 20 = 4 periods of ~46 ms between the first and last
    frames, elapsed = replay_into_ingest(tiny_recording, ReplayConfig(speed=speed, stop=5))
    assert len(frames) == 5
    assert elapsed >= 4 * tiny_recording.frame_period_s / speed * 0.95


def test_replay_range_outside_the_recording_is_refused(tiny_recording: Recording) -> None:
    player = Player(tiny_recording, "tcp://127.0.0.1:*", ReplayConfig(stop=10_000), "test", Metrics("replay"))
    with pytest.raises(ValueError, match="outside the recording"):
        player.run(progress=False)
    player.close()
