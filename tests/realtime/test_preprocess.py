"""The preprocess stage end to end on rendered volumes of a small simulated fish: both backends, the
voxel path, and the counted repairs (saturation, non-finite samples)."""
from __future__ import annotations

import dataclasses
import time
from typing import Any

import numpy as np
import pytest

from loopcast.realtime.metrics import Metrics, MetricsConfig
from loopcast.realtime.preprocess.dff import DffConfig, causal_dff
from loopcast.realtime.preprocess.stage import Preprocess, PreprocessConfig, VoxelStageConfig
from loopcast.realtime.preprocess.traces import TraceExtractor
from loopcast.realtime.preprocess.voxel_dff import VoxelDff, VoxelDffConfig, downsample_xy
from loopcast.realtime.spikes.oasis import OasisConfig
from loopcast.realtime.spikes.stage import SpikeConfig
from loopcast.realtime.wire.codec import Frame, FrameHeader
from loopcast.replay.fish import FishConfig, FishModel, stimulus_schedule

DT = 0.9141


@pytest.fixture(scope="module")
def fish_volumes() -> tuple[np.ndarray, list[np.ndarray]]:
    """(segmentation, 80 rendered uint16 F-order volumes) of a 60-neuron fish on a 32x24x6 grid."""
    fish = FishModel(FishConfig(shape=(32, 24, 6), n_neurons=60, n_ensembles=3, seed=2,
                                nucleus_radius_vox=(1.2, 1.2, 0.8)))
    cov = stimulus_schedule(fish.cfg, 80).covariates
    return fish.anatomy.segmentation, [fish.step(c).volume.copy(order="F") for c in cov]


def config(**kw: Any) -> PreprocessConfig:
    spikes = SpikeConfig(dff_per_spike=0.08, oasis=OasisConfig(warmup=20), fit_in_background=False)
    return PreprocessConfig(dff=DffConfig(window=40, warmup=5), spikes=spikes, **kw)


def frame(seq: int, vol: np.ndarray) -> Frame:
    header = FrameHeader(seq, time.time_ns(), vol.shape, str(vol.dtype), "F" if vol.flags.f_contiguous else "C")
    return Frame(header, vol, time.time_ns())


def run(pre: Preprocess, vols: list[np.ndarray]) -> list:
    return [pre.process(frame(i, v)) for i, v in enumerate(vols)]


def test_numpy_backend_equals_the_offline_definitions(fish_volumes: tuple) -> None:
    seg, vols = fish_volumes
    cfg = config()
    out = run(Preprocess(seg, cfg, DT, Metrics("t", MetricsConfig(enabled=False))), vols)
    raw = np.stack([TraceExtractor(seg, "bincount").process(v) for v in vols])
    np.testing.assert_allclose(np.stack([o.fluorescence for o in out]), raw, rtol=1e-6)
    np.testing.assert_allclose(np.stack([o.dff for o in out]), causal_dff(raw, cfg.dff), atol=1e-6)
    assert [o.ready for o in out].index(True) == cfg.dff.warmup - 1
    counts = np.stack([o.spikes.count for o in out])
    assert not counts[:cfg.spikes.oasis.warmup].any() and counts[cfg.spikes.oasis.warmup:].any()
    last = out[-1].spikes
    np.testing.assert_allclose(last.rate_hz, last.count / DT, rtol=1e-6)
    np.testing.assert_allclose(last.prob, 1 - np.exp(-last.rate_hz * DT), rtol=1e-5, atol=1e-7)


def test_torch_backend_matches_numpy_backend(fish_volumes: tuple) -> None:
    seg, vols = fish_volumes
    metrics = Metrics("t", MetricsConfig(enabled=False))
    a = run(Preprocess(seg, config(), DT, metrics), vols)
    b = run(Preprocess(seg, config(backend="torch", device="cpu"), DT, metrics), vols)
    np.testing.assert_allclose(np.stack([o.dff for o in b]), np.stack([o.dff for o in a]), atol=1e-5)
    np.testing.assert_allclose(np.stack([o.spikes.count for o in b]), np.stack([o.spikes.count for o in a]),
                               atol=1e-3)


def test_voxel_path_is_the_downsampled_voxel_dff(fish_volumes: tuple) -> None:
    seg, vols = fish_volumes
    vcfg = VoxelDffConfig(window=16, decimate=4, warmup=2)
    pre = Preprocess(seg, config(voxels=VoxelStageConfig(enabled=True, factor=4, dff=vcfg)), DT,
                     Metrics("t", MetricsConfig(enabled=False)))
    out = run(pre, vols[:30])
    ref = VoxelDff((8, 6, 6), vcfg)
    expected = [ref.process(downsample_xy(v, 4))[0] for v in vols[:30]]
    assert out[0].voxel_dff.shape == (8, 6, 6)
    np.testing.assert_array_equal(np.stack([o.voxel_dff for o in out]), np.stack(expected))


def test_saturation_and_nonfinite_samples_are_counted_not_fatal(fish_volumes: tuple) -> None:
    seg, vols = fish_volumes
    metrics = Metrics("t", MetricsConfig(enabled=False))
    pre = Preprocess(seg, config(), DT, metrics)
    run(pre, vols[:10])
    hot = vols[10].copy(order="F")
    hot[seg == 3] = 65535                                # neuron 3 saturates
    res = pre.process(frame(10, hot))
    assert res is not None
    assert metrics.count("loopcast_values_invalid_total", kind="saturated_neuron") == 1
    assert res.fluorescence[2] == pytest.approx(65535.0)
    pre_f = Preprocess(seg, dataclasses.replace(config()), DT, metrics)
    run(pre_f, [v.astype(np.float32) for v in vols[:10]])
    bad = vols[10].astype(np.float32)
    bad[seg == 5] = np.nan
    res = pre_f.process(frame(10, bad))
    assert res is not None
    assert metrics.count("loopcast_values_invalid_total", kind="nonfinite_fluorescence") == 1
    assert np.isfinite(res.dff).all() and np.isfinite(res.spikes.prob).all()


def test_bad_backend_and_method_names_are_rejected() -> None:
    with pytest.raises(ValueError, match="unknown preprocess backend 'cuda'"):
        PreprocessConfig(backend="cuda")
    with pytest.raises(ValueError, match="unknown trace extraction method"):
        PreprocessConfig(traces="loop")
    with pytest.raises(ValueError, match="needs `engine`"):
        SpikeConfig(method="engine")
