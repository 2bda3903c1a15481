"""Trace extraction: the compiled CSR pass, the naive bincount and the torch path agree with a per-label
loop, in both memory orders, and saturated or non-finite voxels are handled as documented."""
from __future__ import annotations

import numpy as np
import pytest

from loopcast.realtime.preprocess.traces import TraceExtractor
from loopcast.realtime.preprocess.traces_torch import TorchTraceExtractor
from loopcast.realtime.wire.codec import Order


@pytest.fixture()
def seg_and_volume() -> tuple[np.ndarray, np.ndarray]:
    """A 20x16x5 segmentation with 40 labels of scattered voxels and a random uint16 volume."""
    rng = np.random.default_rng(3)
    seg = np.zeros((20, 16, 5), np.uint32)
    flat = seg.reshape(-1)
    voxels = rng.permutation(flat.size)[:400]
    flat[voxels] = np.r_[np.arange(1, 41), rng.integers(1, 41, 360)]   # every label present
    vol = rng.integers(100, 5000, size=seg.shape).astype(np.uint16)
    return seg, vol


def per_label_loop(seg: np.ndarray, vol: np.ndarray) -> np.ndarray:
    return np.array([vol[seg == i].astype(np.float64).mean() for i in range(1, int(seg.max()) + 1)])


@pytest.mark.parametrize("order", ["C", "F"])
@pytest.mark.parametrize("method", ["csr", "bincount"])
def test_means_equal_a_per_label_loop(seg_and_volume: tuple, order: Order, method: str) -> None:
    seg, vol = seg_and_volume
    expected = per_label_loop(seg, vol)
    out = TraceExtractor(seg, method=method).process(np.asarray(vol, order=order))
    assert out.dtype == np.float32 and out.shape == (40,)
    np.testing.assert_allclose(out, expected, rtol=1e-6)


@pytest.mark.parametrize("order", ["C", "F"])
def test_torch_path_equals_cpu_path(seg_and_volume: tuple, order: Order) -> None:
    seg, vol = seg_and_volume
    vol = np.asarray(vol, order=order)
    vol[0, 0, 0] = 65535
    vol[tuple(np.argwhere(seg == 2)[0])] = 65535
    cpu, cpu_stats = TraceExtractor(seg).process_with_stats(vol)
    dev, dev_stats = TorchTraceExtractor(seg, device="cpu").process_with_stats(vol)
    np.testing.assert_allclose(dev.numpy(), cpu, rtol=1e-6)
    assert dev_stats == cpu_stats and cpu_stats.saturated_neurons == 1


def test_saturated_voxels_are_counted_per_neuron(seg_and_volume: tuple) -> None:
    seg, vol = seg_and_volume
    ex = TraceExtractor(seg)
    assert ex.process_with_stats(vol)[1].saturated_voxels == 0
    sat = vol.copy()
    sat[seg == 7] = 65535                      # every voxel of neuron 7 (label 7)
    sat[seg == 0] = 65535                      # background saturation does not count
    one = np.argwhere(seg == 9)[0]
    sat[tuple(one)] = 65535                    # one voxel of neuron 9
    out, stats = ex.process_with_stats(sat)
    assert stats.saturated_neurons == 2
    assert stats.saturated_voxels == int((seg == 7).sum()) + 1
    assert out[6] == pytest.approx(65535.0)    # kept: the mean is a lower bound, not dropped


def test_nonfinite_voxels_only_spoil_their_own_neuron(seg_and_volume: tuple) -> None:
    seg, vol = seg_and_volume
    fvol = vol.astype(np.float32)
    fvol[tuple(np.argwhere(seg == 5)[0])] = np.nan
    out = TraceExtractor(seg).process(fvol)
    assert np.isnan(out[4]) and np.isfinite(np.delete(out, 4)).all()


def test_gapped_labels_and_wrong_shapes_are_rejected(seg_and_volume: tuple) -> None:
    seg, vol = seg_and_volume
    gapped = seg.copy()
    gapped[gapped == 3] = 0
    with pytest.raises(ValueError, match=r"1\.\.N without gaps.*\[3\]"):
        TraceExtractor(gapped)
    with pytest.raises(ValueError, match="volume shape"):
        TraceExtractor(seg).process(vol[:-1])
    with pytest.raises(ValueError, match="unknown trace extraction method"):
        TraceExtractor(seg, method="loop")
