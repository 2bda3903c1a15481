"""Round trip: synth -> store -> TensorStore and zarr-python readers -> replay -> ingest, bit for bit."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import zarr

from loopcast.realtime.ingest import Ingest, RigConfig
from loopcast.realtime.metrics import Metrics
from loopcast.realtime.wire.transport import Subscriber, TransportConfig
from loopcast.replay.fish import FishModel, stimulus_schedule
from loopcast.replay.layout import Recording
from loopcast.replay.player import Player, ReplayConfig
from loopcast.replay.synth import SynthConfig

FRAMES = 12


@pytest.fixture(scope="module")
def rendered(tiny_synth: SynthConfig) -> list[np.ndarray]:
    """The first FRAMES volumes, rendered again from the same seed (what synth must have stored)."""
    fish = FishModel(tiny_synth.fish)
    cov = stimulus_schedule(tiny_synth.fish, tiny_synth.n_frames).covariates
    return [fish.step(cov[t]).volume.copy() for t in range(FRAMES)]


def test_both_readers_return_the_rendered_volumes(tiny_store: Path, tiny_recording: Recording,
                                                  rendered: list[np.ndarray]) -> None:
    raw = zarr.open_array(store=str(tiny_store / "raw"), mode="r")
    for t, vol in enumerate(rendered):
        via_ts = tiny_recording.read_volume(t)
        assert via_ts.flags.f_contiguous and via_ts.dtype == np.uint16
        np.testing.assert_array_equal(via_ts, vol)
        np.testing.assert_array_equal(raw[:, :, :, t], vol)


@pytest.mark.parametrize("transport", ["tcp", "shm"])
def test_replayed_volumes_reach_ingest_bit_identical(tiny_recording: Recording, rendered: list[np.ndarray],
                                                     transport: str, tmp_path: Path) -> None:
    endpoint = "tcp://127.0.0.1:*" if transport == "tcp" else f"ipc://{tmp_path}/frames.sock"
    tcfg = TransportConfig(kind="shm" if transport == "shm" else "zmq", shm_dir=str(tmp_path),
                           shm_slots=FRAMES + 1)     # the test reads after the replay ends: no slot reuse
    player = Player(tiny_recording, endpoint, ReplayConfig(speed=0, stop=FRAMES, sndhwm=FRAMES + 1),
                    "test", Metrics("replay"), tcfg)
    sub = Subscriber(player.endpoint, topics=(b"frame",), rcvhwm=FRAMES + 1)
    rig = RigConfig(name="test", shape=tiny_recording.volume_shape, dtype="uint16")
    ingest = Ingest(rig, Metrics("run"), shm_dir=str(tmp_path))
    try:
        assert player.run(progress=False).frames == FRAMES
        msgs: list = []
        deadline = time.monotonic() + 10
        while len(msgs) < FRAMES and time.monotonic() < deadline:
            msgs += sub.recv_all(100)
        frames = [ingest.process(m) for m in msgs]
        assert [f.header.seq for f in frames if f is not None] == list(range(FRAMES))
        for f, vol in zip(frames, rendered):
            assert f is not None and f.intact()
            np.testing.assert_array_equal(f.data, vol)
        del frames, f
    finally:
        sub.close()
        ingest.close()
        player.close()
