"""Per-voxel causal dF/F: exact at decimate=1, the decimated-window definition, warm-up, repair,
and the xy downsampling."""
from __future__ import annotations

import numpy as np
import pytest

from loopcast.realtime.preprocess.dff import DffConfig, DffStats, causal_dff_reference
from loopcast.realtime.preprocess.voxel_dff import VoxelDff, VoxelDffConfig, downsample_xy
from loopcast.realtime.wire.codec import Order

SHAPE = (8, 6, 3)


@pytest.fixture()
def volumes() -> np.ndarray:
    """(T, 8, 6, 3) float32: drifting per-voxel baselines, sparse transients, noise."""
    rng = np.random.default_rng(0)
    t = 300
    base = rng.uniform(100, 900, SHAPE)
    drift = 1 + 0.15 * np.sin(np.arange(t) / 40.0)[:, None, None, None]
    events = (rng.random((t,) + SHAPE) < 0.02) * rng.uniform(0.2, 1.0, (t,) + SHAPE)
    return (base * drift * (1 + events) + rng.normal(0, 5, (t,) + SHAPE)).astype(np.float32)


def run(vols: np.ndarray, cfg: VoxelDffConfig) -> np.ndarray:
    vd = VoxelDff(vols.shape[1:], cfg)
    return np.stack([vd.process(v)[0] for v in vols])


def test_decimate_one_is_the_causal_reference_voxelwise(volumes: np.ndarray) -> None:
    out = run(volumes, VoxelDffConfig(window=50, decimate=1))
    ref = causal_dff_reference(volumes.reshape(len(volumes), -1), DffConfig(window=50))
    np.testing.assert_array_equal(out, ref.reshape(out.shape))


def test_decimated_window_definition(volumes: np.ndarray) -> None:
    """Slab j samples frames t = j mod d; F0 = percentile of its last window // d samples."""
    cfg = VoxelDffConfig(window=40, decimate=4, percentile=8.0)
    out = run(volumes, cfg).reshape(len(volumes), -1)
    flat = volumes.reshape(len(volumes), -1)
    edges = np.linspace(0, flat.shape[1], cfg.decimate + 1).round().astype(int)
    for j in range(cfg.decimate):
        cols = slice(edges[j], edges[j + 1])
        for t in (0, j, j + 1, 57, 130, 299):
            taken = np.arange(j, t + 1, cfg.decimate)[-cfg.samples:]        # frames sampled so far
            f0 = (np.percentile(flat[taken, cols], 8.0, axis=0).astype(np.float32) if len(taken)
                  else flat[t, cols])                                       # no sample yet: F0 = F
            expect = np.clip((flat[t, cols] - f0) / np.maximum(f0, 1.0), cfg.clip_min, cfg.clip_max)
            np.testing.assert_allclose(out[t, cols], expect, rtol=1e-6, atol=1e-7)


def test_warmup_before_a_voxel_has_a_sample(volumes: np.ndarray) -> None:
    cfg = VoxelDffConfig(window=40, decimate=4, warmup=3)
    vd = VoxelDff(SHAPE, cfg)
    first, stats = vd.process(volumes[0])
    np.testing.assert_array_equal(first, 0.0)          # every voxel: its own frame as F0
    assert stats == DffStats(0, 0) and not vd.ready
    vd.process(volumes[1])
    third, _ = vd.process(volumes[2])
    assert vd.ready
    last_slab = third.reshape(-1)[-(third.size // 4):]
    np.testing.assert_array_equal(last_slab, 0.0)      # slab 3 samples first at frame 3


def test_nonfinite_voxels_repeat_their_latest_sample(volumes: np.ndarray) -> None:
    vd = VoxelDff(SHAPE, VoxelDffConfig(window=20, decimate=1, warmup=1))
    vd.process(volumes[0])
    vol = volumes[1].copy()
    vol[0, 0, 0], vol[1, 2, 1] = np.nan, np.inf
    out, stats = vd.process(vol)
    assert stats.nonfinite == 2 and np.isfinite(out).all()
    assert out[0, 0, 0] == 0.0 and out[1, 2, 1] == 0.0  # F equals its one-sample baseline


def test_config_and_shape_errors() -> None:
    with pytest.raises(ValueError, match="decimate"):
        VoxelDffConfig(window=4, decimate=8)
    with pytest.raises(ValueError, match="shape"):
        VoxelDff(SHAPE, VoxelDffConfig(window=16)).process(np.zeros((8, 6, 4), np.float32))


@pytest.mark.parametrize("dtype", [np.uint16, np.float32])
@pytest.mark.parametrize("order", ["C", "F"])
def test_downsample_means_blocks_and_crops(dtype: type[np.generic], order: Order) -> None:
    rng = np.random.default_rng(1)
    vol = np.asarray(rng.integers(0, 65535, (37, 30, 5)), dtype=dtype, order=order)   # 37, 30 % 4 != 0
    expect = vol[:36, :28].astype(np.float64).reshape(9, 4, 7, 4, 5).mean(axis=(1, 3))
    out = downsample_xy(vol, 4)
    assert out.shape == (9, 7, 5) and out.dtype == np.float32 and out.flags.c_contiguous
    np.testing.assert_allclose(out, expect, rtol=1e-6)
    again = np.empty((9, 7, 5), np.float32)
    assert downsample_xy(vol, 4, out=again) is again
    np.testing.assert_array_equal(again, out)


def test_downsample_errors() -> None:
    with pytest.raises(ValueError, match="3-D"):
        downsample_xy(np.zeros((8, 8), np.uint16))
    with pytest.raises(ValueError, match="out must be"):
        downsample_xy(np.zeros((8, 8, 2), np.uint16), 4, out=np.zeros((2, 2, 2), np.float64))
