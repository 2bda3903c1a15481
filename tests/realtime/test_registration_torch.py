"""TorchShiftEstimator and TorchShiftedTraces (CPU here; CUDA when a GPU is present) against their numpy twins.

Volumes: one smooth random base (sparse bright points, Gaussian-blurred) moved by exact sub-voxel shifts
(a Fourier phase ramp), plus Gaussian noise; seeded."""
from __future__ import annotations

from typing import Literal

import numpy as np
import pytest
from scipy.ndimage import gaussian_filter

torch = pytest.importorskip("torch")

from loopcast.realtime.preprocess.registration import (  # noqa: E402
    RegistrationConfig,
    Shift,
    ShiftEstimator,
)
from loopcast.realtime.preprocess.registration_torch import (  # noqa: E402
    TorchShiftedTraces,
    TorchShiftEstimator,
    device_volume,
)
from loopcast.realtime.preprocess.shifted_traces import ShiftedTraces  # noqa: E402
from loopcast.realtime.preprocess.traces import TraceExtractor  # noqa: E402

SHAPE = (64, 48, 16)
WARMUP = [(0.0, 0.0, 0.0), (0.2, -0.1, 0.0), (1.5, -1.0, 0.5), (0.0, 0.1, -0.1)]   # the third is aligned
SHIFTS = [(0.3, -1.7, 0.4), (2.25, 0.6, -0.8), (-3.4, 1.1, 0.0), (0.0, 0.0, 0.0), (-0.45, -2.6, 1.3)]
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


class Mover:
    """A smooth random base volume; `moved(d)` is it moved by d (content at p + d) plus noise."""

    def __init__(self, seed: int, shape: tuple[int, int, int] = SHAPE) -> None:
        self.rng = np.random.default_rng(seed)
        points = np.zeros(shape)
        inner = (slice(8, -8), slice(8, -8), slice(3, -3))    # content never wraps around the edge
        spots = np.zeros(points[inner].size)
        spots[self.rng.choice(spots.size, spots.size // 100, replace=False)] = 4000.0
        points[inner] = spots.reshape(points[inner].shape)
        self.spectrum = np.fft.fftn(gaussian_filter(points, (2.0, 2.0, 0.8)))
        self.freqs = np.meshgrid(*[np.fft.fftfreq(n) for n in shape], indexing="ij")
        self.shape = shape

    def moved(self, d: tuple[float, float, float], dtype: str = "float32") -> np.ndarray:
        ramp = np.exp(-2j * np.pi * sum(f * s for f, s in zip(self.freqs, d, strict=True)))
        vol = np.fft.ifftn(self.spectrum * ramp).real + 200.0 + self.rng.normal(0, 5, self.shape)
        return np.clip(vol, 0, 65535).astype(dtype)


def pair(cfg: RegistrationConfig, mover: Mover, dtype: str, device: str = "cpu"
         ) -> tuple[ShiftEstimator, TorchShiftEstimator]:
    """A numpy and a torch estimator given the same warm-up volumes."""
    est, twin = ShiftEstimator(SHAPE, cfg), TorchShiftEstimator(SHAPE, cfg, device)
    for d in WARMUP:
        vol = mover.moved(d, dtype)
        est.add_reference_frame(vol)
        twin.add_reference_frame(device_volume(vol, device))
    assert est.ready and twin.ready and twin.n_reference == len(WARMUP)
    return est, twin


def assert_agree(a: Shift, b: Shift) -> None:
    assert np.all(np.abs(a.as_array() - b.as_array()) <= 0.02), (a, b)
    assert abs(a.confidence - b.confidence) <= 0.05 * abs(a.confidence), (a, b)


@pytest.mark.parametrize(("stride", "dtype"), [((1, 1), "float32"), ((1, 1), "uint16"), ((2, 1), "uint16")])
def test_estimator_agrees_with_numpy(stride: tuple[int, int], dtype: str) -> None:
    cfg = RegistrationConfig(warmup_frames=len(WARMUP), refresh_rate=0.1, stride=stride)
    mover = Mover(0)
    est, twin = pair(cfg, mover, dtype)
    for d in SHIFTS:
        vol = mover.moved(d, dtype)
        a, b = est.estimate(vol), twin.estimate(device_volume(vol))
        assert_agree(a, b)
        assert np.all(np.abs(b.as_array() - d) < 0.3), (b, d)                # and near the truth
        assert b.confidence > 8


def test_estimator_agrees_on_unrelated_volumes_and_without_whitening() -> None:
    cfg = RegistrationConfig(warmup_frames=len(WARMUP), refresh_rate=0.0, whiten=0.0, upsample=20)
    est, twin = pair(cfg, Mover(1), "float32")
    other = Mover(2).moved((0.0, 0.0, 0.0))
    a, b = est.estimate(other), twin.estimate(torch.from_numpy(other))
    assert_agree(a, b)
    assert b.confidence < 8


def test_estimator_checks_its_input() -> None:
    twin = TorchShiftEstimator(SHAPE, RegistrationConfig(warmup_frames=2))
    vol = Mover(0).moved((0.0, 0.0, 0.0))
    with pytest.raises(RuntimeError):
        twin.estimate(torch.from_numpy(vol))
    with pytest.raises(ValueError):
        twin.add_reference_frame(torch.zeros(SHAPE[::-1]))
    with pytest.raises(TypeError):
        twin.add_reference_frame(torch.from_numpy(vol.astype(np.int16)))
    for _ in range(3):                                                        # the third is ignored
        twin.add_reference_frame(torch.from_numpy(vol))
    assert twin.ready and twin.n_reference == 2


def segmentation(shape: tuple[int, int, int], seed: int) -> np.ndarray:
    """Labels 1..N: compact 2x2x2 neurons on a grid of 3x3x2 cells (the volume's edges included) and, last,
    a few neurons of voxels scattered over the whole volume."""
    rng = np.random.default_rng(seed)
    seg = np.zeros(shape, np.int32)
    label = 0
    for x in range(0, shape[0] - 1, 3):
        for y in range(0, shape[1] - 1, 3):
            for z in range(0, shape[2] - 1, 2):
                if rng.random() < 0.6:
                    label += 1
                    seg[x:x + 2, y:y + 2, z:z + 2] = label
    background = np.flatnonzero(seg == 0)
    for _ in range(4):
        label += 1
        seg.reshape(-1)[rng.choice(background, 6, replace=False)] = label
        background = np.flatnonzero(seg == 0)
    return seg


TRACE_SHIFTS = [(0.0, 0.0, 0.0), (1.0, -2.0, 1.0), (0.3, -0.6, 0.25), (-2.7, 3.4, -1.5), (25.2, -30.5, 9.0)]


@pytest.mark.parametrize("order", ["C", "F"])
@pytest.mark.parametrize("dtype", ["uint16", "float32"])
def test_shifted_traces_equal_numpy(order: Literal["C", "F"], dtype: str) -> None:
    shape = (20, 16, 8)
    extractor = TraceExtractor(segmentation(shape, 3))
    rng = np.random.default_rng(4)
    vol = np.asarray(rng.uniform(0, 60000, shape).astype(dtype), order=order)
    numpy_twin, twin = ShiftedTraces(extractor), TorchShiftedTraces(extractor)
    for d in TRACE_SHIFTS:
        got = twin.process(device_volume(vol), np.array(d))
        assert got.dtype == torch.float32 and got.shape == (extractor.n_neurons,)
        np.testing.assert_allclose(got.numpy(), numpy_twin.process(vol, np.array(d)), rtol=3e-6)
    np.testing.assert_allclose(twin.process(device_volume(vol), Shift(0.0, 0.0, 0.0, 1.0)).numpy(),
                               extractor.process(vol), rtol=1e-6)


def test_shifted_traces_on_a_strided_view_and_a_nan() -> None:
    shape = (12, 10, 6)
    extractor = TraceExtractor(segmentation(shape, 5))
    vol = np.random.default_rng(6).uniform(0, 1000, shape).astype(np.float32)
    vol[5, 4, 2] = np.nan
    numpy_twin, twin = ShiftedTraces(extractor), TorchShiftedTraces(extractor)
    strided = torch.from_numpy(np.ascontiguousarray(vol.transpose(1, 2, 0))).permute(2, 0, 1)   # (y, z, x) memory
    for d in [(0.0, 0.0, 0.0), (0.5, -0.25, 0.75)]:
        want = numpy_twin.process(vol, np.array(d))
        got = twin.process(strided, np.array(d)).numpy()
        np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
        np.testing.assert_allclose(got, want, rtol=3e-6)


@CUDA
def test_cuda_twins_agree_with_numpy() -> None:
    cfg = RegistrationConfig(warmup_frames=len(WARMUP), refresh_rate=0.1, stride=(2, 1))
    mover = Mover(0)
    est, twin = pair(cfg, mover, "uint16", "cuda")
    extractor = TraceExtractor(segmentation(SHAPE, 7))
    numpy_traces, traces = ShiftedTraces(extractor), TorchShiftedTraces(extractor, "cuda")
    for d in SHIFTS:
        vol = mover.moved(d, "uint16")
        dev = device_volume(vol, "cuda")
        a, b = est.estimate(vol), twin.estimate(dev)
        assert_agree(a, b)
        got = traces.process(dev, b)
        assert got.device.type == "cuda"
        np.testing.assert_allclose(got.cpu().numpy(), numpy_traces.process(vol, b), rtol=3e-6)


def test_measure_and_commit_follow_numpy() -> None:
    """A measured frame that is never committed (torn) leaves both references as they were."""
    cfg = RegistrationConfig(warmup_frames=3, refresh_rate=0.2)
    mover = Mover(8)
    est, twin = ShiftEstimator(SHAPE, cfg), TorchShiftEstimator(SHAPE, cfg)
    for k, d in enumerate([(0.0, 0.0, 0.0), (0.7, 0.0, -0.6), (3.0, 3.0, 1.0), (0.0, -0.4, 0.2), *SHIFTS]):
        vol = mover.moved(d)
        a, b = est.measure(vol), twin.measure(torch.from_numpy(vol))
        assert (a is None) == (b is None) == (k == 0)
        if a is not None and b is not None:
            assert_agree(a, b)
        if k != 2:                                                            # frame 2: torn, not committed
            est.commit()
            twin.commit()
            twin.commit()                                                     # a second commit: nothing
        assert twin.n_reference == est.n_reference and twin.ready == est.ready


@pytest.mark.parametrize("d", [(2.0, -1.0, 0.0), (0.5, -0.25, 0.75)])
def test_saturation_is_counted_through_the_shift_as_without_it(d: tuple[float, float, float]) -> None:
    shape = (24, 20, 8)
    extractor = TraceExtractor(segmentation(shape, 9))
    vol = np.random.default_rng(8).integers(100, 1000, shape).astype(np.uint16)
    vol[10:13, 8:10, 3:5] = 65535
    f, stats = ShiftedTraces(extractor).process_with_stats(vol, np.array(d))
    got, tstats = TorchShiftedTraces(extractor).process_with_stats(device_volume(vol), np.array(d), 65535.0)
    np.testing.assert_allclose(got.numpy(), f, rtol=3e-6)
    assert stats == tstats and stats.saturated_voxels > 0
    if d == (2.0, -1.0, 0.0):   # a whole-voxel shift: exactly the plain count on the volume moved back
        moved = np.roll(vol, (-2, 1, 0), axis=(0, 1, 2))
        assert stats == extractor.process_with_stats(moved)[1]
    clean = vol.copy()
    clean[clean == 65535] = 500
    assert ShiftedTraces(extractor).process_with_stats(clean, np.array(d))[1].saturated_voxels == 0
