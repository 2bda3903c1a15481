"""Registration inside the preprocess stage (realtime/preprocess/motion.py): the reference's warm-up, traces
read through the measured shift on a moving simulated fish, the gauges, a reused shm slot that must not reach
the reference, a new session's new reference, and the voxel path moved back."""
from __future__ import annotations

import time
from typing import Any

import numpy as np
import pytest

from loopcast.realtime.metrics import Metrics, MetricsConfig
from loopcast.realtime.preprocess.dff import DffConfig
from loopcast.realtime.preprocess.registration import RegistrationConfig, Shift
from loopcast.realtime.preprocess.shifted_traces import ShiftedTraces
from loopcast.realtime.preprocess.stage import Preprocess, PreprocessConfig, Preprocessed, VoxelStageConfig
from loopcast.realtime.preprocess.traces import TraceExtractor
from loopcast.realtime.preprocess.voxel_dff import VoxelDff, VoxelDffConfig, downsample_xy
from loopcast.realtime.preprocess.voxel_shift import shift_back
from loopcast.realtime.spikes.oasis import OasisConfig
from loopcast.realtime.spikes.stage import SpikeConfig
from loopcast.realtime.wire.codec import Frame, FrameHeader
from loopcast.replay.fish import FishConfig, FishModel, stimulus_schedule
from loopcast.replay.motion import MotionConfig

DT = 0.9141
WARMUP = 8
MOVING = MotionConfig(drift_speed=(0.08, 0.08, 0.02), jump_rate=0.04, jump_size=(1.5, 1.5, 0.4),
                      max_shift=(4.0, 4.0, 1.5), seed=5)


@pytest.fixture(scope="module")
def moving_fish() -> tuple[np.ndarray, list[np.ndarray], np.ndarray]:
    """(segmentation, 70 uint16 F-order volumes of a drifting and jumping 300-neuron fish, true shifts (70, 3))."""
    fish = FishModel(FishConfig(shape=(64, 48, 12), n_neurons=300, n_ensembles=3, seed=4, motion=MOVING))
    cov = stimulus_schedule(fish.cfg, 70).covariates
    frames = [fish.step(c) for c in cov]
    return fish.anatomy.segmentation, [f.volume.copy(order="F") for f in frames], np.stack([f.shift for f in frames])


def config(**kw: Any) -> PreprocessConfig:
    spikes = SpikeConfig(dff_per_spike=0.08, oasis=OasisConfig(warmup=20), fit_in_background=False)
    reg = RegistrationConfig(enabled=True, warmup_frames=WARMUP, workers=1)
    return PreprocessConfig(dff=DffConfig(window=40, warmup=5), spikes=spikes, registration=reg, **kw)


def step(pre: Preprocess, frame: Frame) -> Preprocessed:
    out = pre.process(frame)
    assert out is not None
    return out


def shift_of(out: Preprocessed) -> Shift:
    assert out.shift is not None
    return out.shift


class Frames:
    """Frames of the volumes; `torn` marks seqs whose shm slot was 'reused' while they were read."""

    def __init__(self, torn: set[int] | None = None) -> None:
        self.torn = torn or set()

    def __call__(self, seq: int, vol: np.ndarray) -> Frame:
        header = FrameHeader(seq, time.time_ns(), vol.shape, str(vol.dtype), "F")
        f = Frame(header, vol, time.time_ns())
        if seq in self.torn:
            object.__setattr__(f, "intact", lambda: False)
        return f


def test_traces_follow_the_fish_after_the_reference_warm_up(moving_fish: tuple) -> None:
    seg, vols, shifts = moving_fish
    metrics = Metrics("t", MetricsConfig(enabled=False))
    pre = Preprocess(seg, config(), DT, metrics)
    out = [step(pre, Frames()(i, v)) for i, v in enumerate(vols)]
    assert all(o.shift is None and not o.ready for o in out[:WARMUP])     # reference warming up: no forecast
    assert all(o.shift is not None for o in out[WARMUP:]) and out[-1].ready
    origin = shifts[:WARMUP].mean(axis=0)                                 # the reference sits near there
    est = np.stack([shift_of(o).as_array() for o in out[WARMUP:]])
    err = np.abs(est - (shifts[WARMUP:] - origin))
    assert np.median(err[:, :2]) < 0.3 and np.median(err[:, 2]) < 0.3
    ext = TraceExtractor(seg)
    truth = np.stack([ShiftedTraces(ext).process(v, s) for v, s in zip(vols[WARMUP:], shifts[WARMUP:] - origin)])
    got = np.stack([o.fluorescence for o in out[WARMUP:]])
    plain = np.stack([ext.process(v) for v in vols[WARMUP:]])
    assert np.median(np.abs(got - truth)) < 0.25 * np.median(np.abs(plain - truth))   # correction helps
    last = shift_of(out[-1])
    assert metrics.registration_shift.labels(axis="x")._value.get() == pytest.approx(last.dx)
    assert metrics.registration_confidence._value.get() == pytest.approx(last.confidence)


def test_a_torn_frame_never_reaches_the_reference_and_a_new_session_rebuilds_it(moving_fish: tuple) -> None:
    seg, vols, _ = moving_fish
    pre = Preprocess(seg, config(), DT, Metrics("t", MetricsConfig(enabled=False)))
    frames = Frames(torn={2, 12})
    for i, v in enumerate(vols[:14]):
        pre.process(frames(i, v))
    assert pre.motion is not None and pre.motion.estimator.n_reference == WARMUP   # frame 2 was not added
    ref = [r.copy() for r in pre.motion.estimator._ref or []]
    assert pre.process(frames(12, vols[12])) is None                               # torn after warm-up: kept out
    assert all(np.array_equal(a, b) for a, b in zip(ref, pre.motion.estimator._ref or [], strict=True))
    pre.reset()
    assert pre.motion.estimator.n_reference == 0 and step(pre, frames(20, vols[20])).shift is None


def test_warm_up_compiles_without_touching_the_reference(moving_fish: tuple) -> None:
    seg, vols, _ = moving_fish
    pre = Preprocess(seg, config(), DT, Metrics("t", MetricsConfig(enabled=False)))
    times = pre.warm_up("uint16")
    assert "registration" in times and pre.motion is not None and pre.motion.estimator.n_reference == 0


def test_the_voxel_path_is_moved_back_into_the_reference_frame(moving_fish: tuple) -> None:
    seg, vols, _ = moving_fish
    vcfg = VoxelDffConfig(window=8, warmup=2, decimate=1)
    pre = Preprocess(seg, config(voxels=VoxelStageConfig(enabled=True, factor=4, dff=vcfg)), DT,
                     Metrics("t", MetricsConfig(enabled=False)))
    by_hand = VoxelDff((16, 12, 12), vcfg)
    frames, moved = Frames(), 0
    for i, v in enumerate(vols[:WARMUP + 6]):
        out = step(pre, frames(i, v))
        ds = downsample_xy(v, 4)
        if out.shift is not None:   # after the reference: moved back by the shift in downsampled voxels
            ds = shift_back(ds, (out.shift.dx / 4, out.shift.dy / 4, out.shift.dz))
            moved += bool(np.abs(out.shift.as_array()).max() > 0.05)
        np.testing.assert_array_equal(out.voxel_dff, by_hand.process(ds)[0])
    assert moved


def test_the_torch_backend_registers_as_the_numpy_one(moving_fish: tuple) -> None:
    seg, vols, _ = moving_fish
    frames = Frames()
    pre = {b: Preprocess(seg, config(backend=b), DT, Metrics("t", MetricsConfig(enabled=False)))
           for b in ("numpy", "torch")}
    for stage in pre.values():
        stage.warm_up("uint16")
    for i, v in enumerate(vols[:WARMUP + 8]):
        a, b = step(pre["numpy"], frames(i, v)), step(pre["torch"], frames(i, v))
        assert (a.shift is None) == (b.shift is None) and a.ready == b.ready
        if a.shift is not None:
            assert np.abs(shift_of(b).as_array() - a.shift.as_array()).max() < 1e-3
        np.testing.assert_allclose(b.fluorescence, a.fluorescence, rtol=1e-4)


def test_nearest_reads_whole_voxels_and_records_the_sub_voxel_estimate(moving_fish: tuple) -> None:
    seg, vols, _ = moving_fish
    base = config()
    cfg = PreprocessConfig(**{**base.__dict__, "registration": RegistrationConfig(
        enabled=True, warmup_frames=WARMUP, workers=1, interpolation="nearest")})
    metrics = Metrics("t", MetricsConfig(enabled=False))
    pre = Preprocess(seg, cfg, DT, metrics)
    reader = ShiftedTraces(TraceExtractor(seg))
    fractional = 0
    for i, v in enumerate(vols[:WARMUP + 10]):
        out = step(pre, Frames()(i, v))
        if out.shift is None:
            continue
        d = out.shift.as_array()
        fractional += bool(np.any(np.abs(d - np.round(d)) > 0.05))
        np.testing.assert_array_equal(out.fluorescence, reader.process(v, np.round(d)))
        assert metrics.registration_shift.labels(axis="x")._value.get() == pytest.approx(d[0])
    assert fractional
    with pytest.raises(ValueError, match="interpolation"):
        RegistrationConfig(interpolation="cubic")
