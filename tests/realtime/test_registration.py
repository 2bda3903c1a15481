"""Online rigid registration: shift recovery on blob volumes at SNR 2/4/8, confidence, and traces read through
a shift (zero shift = TraceExtractor; integer shift exact; sub-voxel shift much better than no correction).

Volumes: seeded Gaussian blobs (sigma 2, 2, 1 voxels, amplitude 0.5-1.5) rendered analytically at their
centres + the shift (an exact sub-voxel shift, no interpolation), plus Gaussian noise of std 1 / SNR."""
from __future__ import annotations

import numpy as np
import pytest

from loopcast.realtime.preprocess.registration import RegistrationConfig, Shift, ShiftEstimator
from loopcast.realtime.preprocess.shifted_traces import ShiftedTraces
from loopcast.realtime.preprocess.traces import TraceExtractor

SHAPE = (96, 64, 16)
Blobs = tuple[np.ndarray, np.ndarray]


def make_blobs(seed: int, n: int = 250) -> Blobs:
    """Blob centres (n, 3), away from the edges, and amplitudes (n,)."""
    rng = np.random.default_rng(seed)
    lo, hi = np.array([6, 6, 3]), np.array(SHAPE) - np.array([6, 6, 3])
    return rng.uniform(lo, hi, (n, 3)), rng.uniform(0.5, 1.5, n)


def render(blobs: Blobs, d: np.ndarray | tuple[float, float, float] = (0.0, 0.0, 0.0)) -> np.ndarray:
    """The blobs moved by d, as a float64 volume of SHAPE."""
    centres, amp = blobs
    sig = (2.0, 2.0, 1.0)
    gs = [np.exp(-0.5 * ((np.arange(n)[None, :] - (centres[:, k:k + 1] + d[k])) / sig[k]) ** 2)
          for k, n in enumerate(SHAPE)]
    return np.einsum("b,bx,by,bz->xyz", amp, *gs)


def segmentation(blobs: Blobs) -> np.ndarray:
    """Labels 1..N: each blob's voxels within 1.5 (x, y) / 0.6 (z) of its rounded centre, first come first kept."""
    seg = np.zeros(SHAPE, np.int32)
    grid = np.stack(np.meshgrid(*[np.arange(-2, 3)] * 2, [-1, 0, 1], indexing="ij"), -1).reshape(-1, 3)
    inside = grid[(grid[:, 0] ** 2 + grid[:, 1] ** 2) / 2.25 + grid[:, 2] ** 2 / 0.36 <= 1]
    for k, c in enumerate(np.round(blobs[0]).astype(int)):
        x, y, z = (c + inside).T
        free = seg[x, y, z] == 0
        seg[x[free], y[free], z[free]] = k + 1
    _, inverse = np.unique(seg, return_inverse=True)
    return inverse.reshape(SHAPE).astype(np.int32)


def estimator_for(ref: np.ndarray, rng: np.random.Generator, snr: float, n: int = 20) -> ShiftEstimator:
    est = ShiftEstimator(SHAPE, RegistrationConfig(warmup_frames=n, refresh_rate=0.0))
    for _ in range(n):
        est.add_reference_frame(ref + rng.normal(0, 1 / snr, SHAPE))
    assert est.ready
    return est


@pytest.mark.parametrize("snr", [2, 4, 8])
def test_recovers_sub_voxel_shifts(snr: float) -> None:
    blobs, rng = make_blobs(0), np.random.default_rng(int(snr))
    est = estimator_for(render(blobs), rng, snr)
    errors, confidences = [], []
    for _ in range(15):
        d = rng.uniform([-3, -3, -1.5], [3, 3, 1.5])
        shift = est.estimate(render(blobs, d) + rng.normal(0, 1 / snr, SHAPE))
        errors.append(np.abs(shift.as_array() - d))
        confidences.append(shift.confidence)
    med = np.median(errors, axis=0)
    assert med[0] < 0.2 and med[1] < 0.2 and med[2] < 0.3, med
    assert min(confidences) > 8


def test_confidence_is_low_for_noise_and_unrelated_volumes() -> None:
    rng = np.random.default_rng(5)
    est = estimator_for(render(make_blobs(0)), rng, 4)
    assert est.estimate(rng.normal(0, 1, SHAPE)).confidence < 6
    assert est.estimate(render(make_blobs(99)) + rng.normal(0, 0.25, SHAPE)).confidence < 6


def test_warm_up_aligns_a_moved_volume_and_refresh_follows_the_rule() -> None:
    blobs, rng = make_blobs(1), np.random.default_rng(2)
    est = ShiftEstimator(SHAPE, RegistrationConfig(warmup_frames=4, refresh_rate=0.1))
    for d in [(0, 0, 0), (0, 0, 0), (2.0, -1.5, 0.0), (0, 0, 0)]:
        est.add_reference_frame(render(blobs, np.array(d)) + rng.normal(0, 0.1, SHAPE))
    shift = est.estimate(render(blobs, np.array([0.5, 0.5, 0.5])) + rng.normal(0, 0.1, SHAPE))
    np.testing.assert_allclose(shift.as_array(), [0.5, 0.5, 0.5], atol=0.15)
    ref = [r.copy() for r in est._ref or []]
    est.estimate(rng.normal(0, 1, SHAPE))                         # not confident: the reference is kept
    assert all(np.array_equal(a, b) for a, b in zip(ref, est._ref or [], strict=True))
    est.estimate(render(blobs, np.array([4.0, 0.0, 0.0])))       # confident but too far: kept
    assert all(np.array_equal(a, b) for a, b in zip(ref, est._ref or [], strict=True))
    est.estimate(render(blobs, np.array([0.3, 0.0, 0.0])))       # confident and small: blended in
    assert not all(np.array_equal(a, b) for a, b in zip(ref, est._ref or [], strict=True))


def test_estimate_needs_a_reference_and_the_right_shape() -> None:
    est = ShiftEstimator(SHAPE)
    with pytest.raises(RuntimeError):
        est.estimate(np.zeros(SHAPE))
    with pytest.raises(ValueError):
        est.add_reference_frame(np.zeros((8, 8, 8)))


@pytest.mark.parametrize("order", ["C", "F"])
def test_zero_shift_equals_trace_extractor(order: str) -> None:
    blobs = make_blobs(3)
    seg = segmentation(blobs)
    vol = np.asarray((render(blobs) * 1000 + 100).astype(np.uint16), order=order)   # type: ignore[call-overload]
    extractor = TraceExtractor(seg)
    out = ShiftedTraces(extractor).process(vol, Shift(0.0, 0.0, 0.0, 1.0))
    np.testing.assert_array_equal(out, extractor.process(vol))


def test_integer_shift_gives_the_unshifted_traces_exactly() -> None:
    blobs = make_blobs(4)
    vol = render(blobs).astype(np.float32)
    extractor = TraceExtractor(segmentation(blobs))
    d = (3, -2, 1)
    moved = np.roll(vol, d, axis=(0, 1, 2))                      # labels are >= 4 voxels from every edge
    out = ShiftedTraces(extractor).process(moved, np.array(d, np.float64))
    np.testing.assert_array_equal(out, extractor.process(vol))


def test_sub_voxel_shift_is_much_closer_to_the_truth_than_no_correction() -> None:
    blobs = make_blobs(6)
    extractor = TraceExtractor(segmentation(blobs))
    truth = extractor.process(render(blobs))
    d = np.array([0.6, -1.3, 0.4])
    moved = render(blobs, d)
    corrected = ShiftedTraces(extractor).process(moved, d)
    err_corrected = 1 - np.corrcoef(corrected, truth)[0, 1]      # trilinear sampling also lowers the peaks of
    err_none = 1 - np.corrcoef(extractor.process(moved), truth)[0, 1]   # narrow blobs (a gain: see the report)
    assert err_corrected < 0.1 * err_none, (err_corrected, err_none)
    assert np.abs(corrected - truth).mean() < 0.6 * np.abs(extractor.process(moved) - truth).mean()


@pytest.mark.parametrize("order", ["C", "F"])
def test_shifted_traces_match_trilinear_map_coordinates_at_the_edges(order: str) -> None:
    from scipy.ndimage import map_coordinates
    rng = np.random.default_rng(8)
    seg = rng.integers(0, 30, (12, 10, 6)).astype(np.int32)      # labels touch every edge
    seg.reshape(-1)[:30] = np.arange(30)
    vol = np.asarray(rng.uniform(0, 100, seg.shape), order=order)  # type: ignore[call-overload]
    d = np.array([1.3, -0.6, 0.45])
    out = ShiftedTraces(TraceExtractor(seg)).process(vol, d)
    coords = np.argwhere(seg > 0)
    samples = map_coordinates(vol, (coords + d).T, order=1, mode="nearest")
    expected = np.bincount(seg[tuple(coords.T)] - 1, samples) / np.bincount(seg[tuple(coords.T)] - 1)
    np.testing.assert_allclose(out, expected, rtol=1e-5)


@pytest.mark.parametrize("stride", [(1, 1), (2, 3), (4, 4)])
def test_projections_are_the_same_in_either_memory_order(stride: tuple[int, int]) -> None:
    vol = np.random.default_rng(3).integers(0, 4000, (37, 29, 11)).astype(np.uint16)
    est = ShiftEstimator(vol.shape, RegistrationConfig(stride=stride))
    want = [vol[::stride[0], ::stride[1]].astype(np.float64).sum(axis=a) for a in (2, 1, 0)]
    for order in ("C", "F"):
        for got, w in zip(est.projections(np.asarray(vol, order=order)), want, strict=True):
            np.testing.assert_allclose(got, w)
