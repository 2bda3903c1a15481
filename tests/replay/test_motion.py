"""Rigid motion of the simulated fish: off changes nothing, the shifts are seeded and have the configured
statistics, a rendered shift moves the image by that much, and recordings keep the true shifts."""
from __future__ import annotations

import asyncio
import dataclasses
import hashlib
from pathlib import Path

import numpy as np
import pytest

from loopcast.realtime.metrics import Metrics
from loopcast.replay.fish import N_COVARIATES, FishConfig, FishModel
from loopcast.replay.layout import Recording, RecordingError
from loopcast.replay.motion import MotionConfig, RigidMotion, motion_sequence
from loopcast.replay.render import shift_volume
from loopcast.replay.sim import LiveSim, SimConfig
from loopcast.replay.synth import SynthConfig, synthesize

U = np.full(N_COVARIATES, 0.3)
MOVING = MotionConfig(drift_speed=(0.05, 0.05, 0.01), jump_rate=0.05, jump_size=(1.0, 1.0, 0.3), seed=3)
# sha256 of the first 5 volumes of the tiny fish under covariates U, rendered before motion existed
STATIC_HASH = "a8088c2ad15ff952"


def _volumes(cfg: FishConfig, n: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    fish = FishModel(cfg)
    frames = [fish.step(U) for _ in range(n)]
    return [f.volume for f in frames], [f.shift for f in frames]


def test_motion_off_gives_the_volumes_of_before(tiny_fish: FishConfig) -> None:
    assert not tiny_fish.motion.enabled
    vols, shifts = _volumes(tiny_fish, 5)
    h = hashlib.sha256()
    for v in vols:
        h.update(v.tobytes(order="F"))
    assert h.hexdigest()[:16] == STATIC_HASH
    assert all(s.dtype == np.float32 and not s.any() for s in shifts)
    off = dataclasses.replace(tiny_fish, motion=MotionConfig(jump_rate=0.5, jump_size=(0.0, 0.0, 0.0), seed=9))
    assert not off.motion.enabled
    assert all(np.array_equal(a, b) for a, b in zip(vols, _volumes(off, 5)[0]))


def test_moving_fish_frame_zero_is_the_static_one_and_later_frames_move(tiny_fish: FishConfig) -> None:
    vols, _ = _volumes(tiny_fish, 3)
    moved, shifts = _volumes(dataclasses.replace(tiny_fish, motion=MOVING), 3)
    assert not shifts[0].any() and np.array_equal(vols[0], moved[0])
    assert shifts[2].any() and not np.array_equal(vols[2], moved[2])
    np.testing.assert_array_equal(np.stack(shifts), motion_sequence(MOVING, 3))


def test_shift_sequence_is_seeded_with_the_configured_drift_and_jump_rate() -> None:
    drift = MotionConfig(drift_speed=(0.02, 0.05, 0.01), max_shift=(1e6, 1e6, 1e6), seed=1)
    a = motion_sequence(drift, 4000)
    np.testing.assert_array_equal(a, motion_sequence(drift, 4000))
    assert not np.array_equal(a, motion_sequence(dataclasses.replace(drift, seed=2), 4000))
    assert a.shape == (4000, 3) and a.dtype == np.float32 and not a[0].any()
    np.testing.assert_allclose(np.diff(a.astype(np.float64), axis=0).std(axis=0), drift.drift_speed, rtol=0.1)
    jumps = MotionConfig(jump_rate=0.02, jump_size=(2.0, 2.0, 0.5), max_shift=(1e6, 1e6, 1e6), seed=1)
    motion = RigidMotion(jumps)
    steps = np.diff(motion.sequence(5000), axis=0)
    moved = np.flatnonzero(np.abs(steps).sum(axis=1) > 0)
    assert 0.015 < len(moved) / len(steps) < 0.025 and motion.n_jumps >= len(moved)
    np.testing.assert_allclose(steps[moved].std(axis=0), jumps.jump_size, rtol=0.25)
    clamp = motion_sequence(dataclasses.replace(drift, max_shift=(0.5, 0.5, 0.1)), 2000)
    assert (np.abs(clamp) <= np.asarray([0.5, 0.5, 0.1], np.float32)).all()


@pytest.mark.parametrize("shift", [(0.3, -0.7, 0.25), (1.6, 0.45, -0.4)])
def test_a_rendered_shift_moves_the_image_by_that_much(tiny_fish: FishConfig, shift: tuple[float, ...]) -> None:
    fish = FishModel(dataclasses.replace(tiny_fish, snr=0.0, read_noise=0.0, shot_noise_gain=0.0))
    frame = fish.step(U)
    static = fish._renderer.expected(frame.fluorescence, 1.0)
    out = np.empty(tiny_fish.shape, np.uint16, order="F")
    fish._renderer.render(frame.fluorescence, 1.0, out, np.asarray(shift, np.float32))
    assert out.flags.f_contiguous                                  # noiseless: rounding only
    assert np.abs(out - np.float64(tiny_fish.background_counts) - shift_volume(static, shift)).max() <= 0.5 + 1e-3
    padded = np.pad(static, 3)                                     # a margin: nothing leaves the volume
    np.testing.assert_allclose(_com(shift_volume(padded, shift)) - _com(padded), shift, atol=0.02)
    rendered = np.pad(out.astype(np.float64) - tiny_fish.background_counts, 3)
    assert np.abs(_com(rendered) - _com(padded) - shift).max() < 0.25    # what left the edges is lost


def _com(vol: np.ndarray) -> np.ndarray:
    """Centre of mass (x, y, z) of a non-negative volume."""
    w = np.asarray(vol, np.float64)
    return np.array([(w.sum(axis=tuple(b for b in range(3) if b != a)) * np.arange(w.shape[a])).sum() / w.sum()
                     for a in range(3)])


def test_shift_volume_is_exact_for_whole_voxels_and_linear_between() -> None:
    v = np.random.default_rng(0).random((6, 5, 4)).astype(np.float32)
    np.testing.assert_array_equal(shift_volume(v, (1, 0, -2))[1:, :, :2], v[:-1, :, 2:])
    half = shift_volume(v, (0.5, 0, 0))
    np.testing.assert_allclose(half[1:], 0.5 * (v[1:] + v[:-1]), rtol=1e-6)
    np.testing.assert_array_equal(shift_volume(v, (0, 0, 0)), v)


def test_a_recording_with_motion_keeps_the_true_shifts(tiny_fish: FishConfig, tmp_path: Path,
                                                       tiny_recording: Recording) -> None:
    fish = dataclasses.replace(tiny_fish, shape=(24, 16, 4), n_neurons=40, n_ensembles=2, motion=MOVING)
    rec = synthesize(SynthConfig(fish=fish, n_frames=70, baseline_stride=4, write_raw=False), tmp_path / "m",
                     progress=False)
    shifts = rec.ground_truth("shifts")
    assert shifts.shape == (70, 3) and shifts.dtype == np.float32 and rec.has("ground_truth/shifts")
    np.testing.assert_array_equal(shifts, motion_sequence(MOVING, 70))
    assert Recording.open(tmp_path / "m").has("ground_truth/shifts")
    assert not tiny_recording.has("ground_truth/shifts")          # a recording without motion opens, lacks it
    with pytest.raises(RecordingError, match="missing"):
        tiny_recording.ground_truth("shifts")


def test_the_live_sim_records_the_true_shifts(tiny_fish: FishConfig, tmp_path: Path) -> None:
    fish = dataclasses.replace(tiny_fish, shape=(24, 16, 4), n_neurons=40, n_ensembles=2, motion=MOVING)
    path = tmp_path / "sim.shifts.npy"
    sim = LiveSim(FishModel(fish), SimConfig(speed=0, n_frames=70, wait_subscribers=0), "mo", "tcp://127.0.0.1:*",
                  Metrics("sim"), shifts_path=path)
    report = asyncio.run(sim.run(asyncio.Event()))
    np.testing.assert_array_equal(np.load(path), motion_sequence(MOVING, 64))     # flushed every 64 frames
    sim.close()
    np.testing.assert_array_equal(np.load(path), motion_sequence(MOVING, 70))
    np.testing.assert_array_equal(np.asarray(report.shifts, np.float32), motion_sequence(MOVING, 70))
