"""Video output grid and the strided-segmentation reduction of predicted frames to per-neuron traces."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from loopcast.realtime.forecast.video_reduce import VideoGrid, VolumeReducer, centre_crop, crop_y
from loopcast.replay.fish import FishConfig
from loopcast.replay.synth import SynthConfig, synthesize


def random_segmentation(shape: tuple[int, int, int] = (40, 48, 5), n_boxes: int = 40,
                        seed: int = 0) -> np.ndarray:
    """Random small boxes (many too thin to survive striding), labels compacted to 1..N."""
    rng = np.random.default_rng(seed)
    seg = np.zeros(shape, np.uint32)
    for lab in range(1, n_boxes + 1):
        c = rng.integers(0, shape)
        h = rng.integers(0, (3, 3, 2))
        seg[max(c[0] - h[0], 0):c[0] + h[0] + 1, max(c[1] - h[1], 0):c[1] + h[1] + 1,
            max(c[2] - h[2], 0):c[2] + h[2] + 1] = lab
    _, inv = np.unique(seg, return_inverse=True)
    return inv.reshape(shape).astype(np.uint32)                 # 0 stays 0 (the smallest value)


def grid_for(seg_shape: tuple[int, int, int], factor: int, crop: int, sr: int) -> VideoGrid:
    y0, y1 = centre_crop(seg_shape[1] // factor, crop)
    k = 2 ** sr
    return VideoGrid(factor, (y0, y1), sr, ((seg_shape[0] // factor) * k, (y1 - y0) * k, seg_shape[2]))


def naive_means(seg: np.ndarray, grid: VideoGrid, frames: np.ndarray,
                reducer: VolumeReducer) -> np.ndarray:
    """Per-neuron loop: mean over the strided labels; a lost neuron's single voxel must be the nearest
    output voxel to its full-resolution centroid (checked by brute force over the whole grid)."""
    s, y_off, shape = grid.stride, grid.y_offset, grid.output_shape
    strided = seg[::s, y_off:y_off + shape[1] * s:s, :][:shape[0]]
    ii, jj, kk = np.meshgrid(*(np.arange(n) for n in shape), indexing="ij")
    full = np.stack([ii * s, y_off + jj * s, kk], -1).reshape(-1, 3).astype(np.float64)
    out = np.empty((len(frames), int(seg.max())), np.float64)
    for i in range(out.shape[1]):
        mask = strided == i + 1
        if mask.any():
            out[:, i] = frames[:, mask].mean(axis=1)
            continue
        dist = np.linalg.norm(full - np.argwhere(seg == i + 1).mean(0), axis=1)
        (vox,) = reducer.voxel_index[reducer.neuron_index == i]
        assert dist[vox] == pytest.approx(dist.min(), abs=1e-9), f"neuron {i}: not the nearest voxel"
        out[:, i] = frames.reshape(len(frames), -1)[:, vox]
    return out


@pytest.mark.parametrize("factor,crop,sr", [(4, 0, 0), (4, 8, 1), (4, 6, 2), (2, 10, 1)])
def test_reduce_equals_naive_loop(factor: int, crop: int, sr: int) -> None:
    seg = random_segmentation()
    grid = grid_for(seg.shape, factor, crop, sr)
    red = VolumeReducer(seg, grid)
    frames = np.random.default_rng(1).normal(size=(3, *grid.output_shape)).astype(np.float32)
    got = red.reduce(frames)
    assert got.shape == (3, seg.max()) and got.dtype == np.float32 and got.flags.c_contiguous
    np.testing.assert_allclose(got, naive_means(seg, grid, frames, red), rtol=1e-5, atol=1e-6)
    st = red.stats
    assert st["neurons"] == red.n_neurons == seg.max()
    assert st["strided"] + st["fallback_lost"] + st["fallback_outside_crop"] == st["neurons"]
    assert st["fallback_lost"] + st["fallback_outside_crop"] > 0       # the thin boxes need the fallback
    np.testing.assert_array_equal(red.counts, np.bincount(red.neuron_index, minlength=red.n_neurons))
    assert (np.diff(red.neuron_index) >= 0).all() and red.voxel_index.max() < np.prod(grid.output_shape)


def test_fallback_neurons_map_to_their_centroid_voxel() -> None:
    seg = np.zeros((16, 24, 3), np.uint32)
    seg[0:8, 8:16, :] = 1                       # survives stride 4
    seg[5, 11, 2] = 2                           # lost: centroid (5, 11, 2) -> output (1, (11-4)/4 ~ 2, 2)
    seg[9:11, 1:3, 0] = 3                       # y below the crop (rows 4..20 full-res): outside
    seg[13, 21, 1] = 4                          # y above the crop
    grid = VideoGrid(4, (1, 5), 0, (4, 4, 3))   # downsampled rows 1..5 of 6
    red = VolumeReducer(seg, grid)
    assert red.stats == {"neurons": 4, "strided": 1, "fallback_lost": 1, "fallback_outside_crop": 2}
    np.testing.assert_array_equal(red.fallback_neurons, [1, 2, 3])
    voxel = dict(zip(red.neuron_index[red.neuron_index > 0].tolist(), red.voxel_index[red.neuron_index > 0]))
    shape = grid.output_shape
    assert voxel[1] == np.ravel_multi_index((1, 2, 2), shape)
    assert voxel[2] == np.ravel_multi_index((2, 0, 0), shape)          # (9.5, 1.5) -> x 2, y clamped to 0
    assert voxel[3] == np.ravel_multi_index((3, 3, 1), shape)          # (13, 21) -> x 3, y clamped to 3
    frames = np.arange(2 * 48, dtype=np.float32).reshape(2, *shape)
    got = red.reduce(frames)
    np.testing.assert_allclose(got[:, 0], frames[:, 0:2, 1:3, :].mean(axis=(1, 2, 3)))
    np.testing.assert_array_equal(got[:, 1], frames[:, 1, 2, 2])


def test_label_and_shape_errors() -> None:
    seg = np.zeros((8, 8, 2), np.uint32)
    seg[0:4, 0:4, :] = 1
    seg[4:8, 4:8, :] = 3                        # label 2 missing
    grid = VideoGrid(4, (0, 2), 0, (2, 2, 2))
    with pytest.raises(ValueError, match="no voxel in the full segmentation"):
        VolumeReducer(seg, grid)
    seg[4:8, 0:4, :] = 2
    with pytest.raises(ValueError, match="labels up to 3 but n_neurons is 2"):
        VolumeReducer(seg, grid, n_neurons=2)
    with pytest.raises(ValueError, match="no voxel in the full segmentation"):
        VolumeReducer(seg, grid, n_neurons=5)   # neurons 4, 5 have no voxels
    with pytest.raises(ValueError, match="3-D integer"):
        VolumeReducer(seg.astype(np.float32), grid)
    with pytest.raises(ValueError, match="does not cover the output grid"):
        VolumeReducer(seg, VideoGrid(4, (0, 2), 0, (4, 2, 2)))
    red = VolumeReducer(seg, grid, n_neurons=3)
    for bad in (np.zeros((1, 2, 2, 3), np.float32), np.zeros((1, 2, 2, 2)), np.zeros((2, 2, 2), np.float32)):
        with pytest.raises(ValueError, match="expected frames"):
            red.reduce(bad)


def test_grid_validation_and_manifest() -> None:
    g = VideoGrid(4, (10, 74), 1, (1024, 128, 72))
    assert g.stride == 2 and g.y_offset == 40 and g.crop_y == (10, 74)
    block = {"level": 2, "factor": 4, "crop_y": [10, 74], "super_resolution": 1, "output_shape": [1024, 128, 72],
             "input_shape": [512, 64, 72], "volume_shape": [2048, 1328, 72], "dff": {}}
    assert VideoGrid.from_manifest(block) == g
    with pytest.raises(ValueError, match="2\\*\\*level"):
        VideoGrid.from_manifest({**block, "level": 3})
    with pytest.raises(ValueError, match="lacks"):
        VideoGrid.from_manifest({"factor": 4})
    with pytest.raises(ValueError, match="divisible by 2\\*\\*super_resolution"):
        VideoGrid(2, (0, 4), 2, (8, 16, 1))
    with pytest.raises(ValueError, match="super_resolution must be one of"):
        VideoGrid(8, (0, 4), 3, (8, 32, 1))
    with pytest.raises(ValueError, match="imply Y'"):
        VideoGrid(4, (0, 4), 1, (8, 4, 1))


def test_crop_helpers() -> None:
    assert centre_crop(332, 0) == (0, 332)
    assert centre_crop(332, 256) == (38, 294)
    assert centre_crop(9, 4) == (2, 6)
    with pytest.raises(ValueError, match="crop_y must be in"):
        centre_crop(8, 9)
    vol = np.arange(2 * 3 * 8 * 2, dtype=np.float32).reshape(2, 3, 8, 2)
    np.testing.assert_array_equal(crop_y(vol, (2, 6)), vol[:, :, 2:6, :])
    np.testing.assert_array_equal(crop_y(vol[0], (0, 8)), vol[0])
    with pytest.raises(ValueError, match="does not fit"):
        crop_y(vol, (4, 9))


@pytest.mark.parametrize("radius,n_neurons", [((3.0, 3.0, 1.0), 40), ((1.2, 1.2, 0.8), 150)])
def test_synthetic_fish_segmentation(tmp_path: Path, radius: tuple[float, float, float], n_neurons: int) -> None:
    """Big nuclei all survive 4x striding; the default small ones mostly fall back (all still counted)."""
    fish = FishConfig(seed=7, shape=(48, 32, 8), n_neurons=n_neurons, n_ensembles=4, nucleus_radius_vox=radius)
    rec = synthesize(SynthConfig(fish=fish, n_frames=20, baseline_stride=4), tmp_path / "rec", progress=False)
    seg = rec.segmentation()
    red = VolumeReducer(seg, grid_for(seg.shape, 4, 0, 0), n_neurons=rec.n_neurons)
    st = red.stats
    assert st["neurons"] == n_neurons and st["fallback_outside_crop"] == 0
    assert (st["strided"] == n_neurons) if n_neurons == 40 else (st["fallback_lost"] > n_neurons // 2)
    frame = np.random.default_rng(0).random((1, *red.output_shape), dtype=np.float32)
    assert np.isfinite(red.reduce(frame)).all()
