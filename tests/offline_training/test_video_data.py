"""prepare_video (downsampled per-voxel dF/F from raw) and VideoData (input windows, targets, frame cache)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from loopcast.offline_training.video.data import (
    VideoData,
    VideoDataConfig,
    VideoPrepConfig,
    prepare_video,
    video_array_name,
    video_attrs,
)
from loopcast.realtime.preprocess.dff import centered_dff
from loopcast.realtime.preprocess.voxel_dff import VoxelDff, downsample_xy
from loopcast.replay.fish import FishConfig
from loopcast.replay.layout import Recording
from loopcast.replay.store import RecordingError
from loopcast.replay.synth import SynthConfig, synthesize

T = 120
CENTERED = VideoPrepConfig(baseline="centered", window=30, stride=4, block_voxels=100)
CAUSAL = VideoPrepConfig(baseline="causal", window=40, decimate=4, warmup=5)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 48 x 32 x 8 recording whose 40 big nuclei all survive 4x striding (treat as read-only)."""
    fish = FishConfig(seed=7, shape=(48, 32, 8), n_neurons=40, n_ensembles=4, nucleus_radius_vox=(3.0, 3.0, 1.0))
    out = tmp_path_factory.mktemp("video") / "rec"
    synthesize(SynthConfig(fish=fish, n_frames=T, baseline_stride=4), out, progress=False)
    return out


@pytest.fixture(scope="module")
def downsampled(store: Path) -> np.ndarray:
    """(T, 12, 8, 8) float32: downsample_xy of every raw frame."""
    rec = Recording.open(store)
    return np.stack([downsample_xy(rec.read_volume(t), 4) for t in range(T)])


@pytest.fixture(scope="module")
def prepared(store: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the recording with the centered level-2 video prepared."""
    root = tmp_path_factory.mktemp("prepared") / "rec"
    shutil.copytree(store, root)
    prepare_video(root, CENTERED, progress=False)
    return root


def copy_of(store: Path, tmp_path: Path) -> Path:
    shutil.copytree(store, tmp_path / "rec")
    return tmp_path / "rec"


def read_all(rec: Recording, level: int = 2) -> np.ndarray:
    vol = rec.volume("df_over_f", level)
    return np.stack([vol.read(t) for t in range(vol.n_frames)])        # (T, X, Y, Z)


def test_centered_equals_centered_dff_on_the_downsampled_series(prepared: Path, downsampled: np.ndarray) -> None:
    rec = Recording.open(prepared)
    vol = rec.volume("df_over_f", 2)
    assert vol.shape == (12, 8, 8) and vol.n_frames == T and vol.dtype == np.float32
    assert vol.location.endswith(video_array_name(2))
    series = downsampled.reshape(T, -1)                                 # (T, V) C order, V = 768 > 100
    want = centered_dff(series, CENTERED.dff_config(), stride=4).reshape(downsampled.shape)
    np.testing.assert_array_equal(read_all(rec), want)
    assert not [p for p in prepared.iterdir() if p.name.startswith(".video-prep-")]   # temp memmap removed


def test_causal_equals_voxel_dff_frame_by_frame(store: Path, downsampled: np.ndarray, tmp_path: Path) -> None:
    root = copy_of(store, tmp_path)
    vol = prepare_video(Recording.open(root), CAUSAL, progress=False)
    assert vol.shape == (12, 8, 8) and vol.n_frames == T
    online = VoxelDff((12, 8, 8), CAUSAL.voxel_config())
    want = np.stack([online.process(downsampled[t])[0] for t in range(T)])
    np.testing.assert_array_equal(read_all(Recording.open(root)), want)


def test_attrs_round_trip_and_overwrite(prepared: Path, tmp_path: Path) -> None:
    rec = Recording.open(prepared)
    attrs = video_attrs(rec, 2)
    assert {k: attrs[k] for k in CENTERED.attrs()} == CENTERED.attrs()
    assert attrs["baseline"] == "centered" and attrs["stride"] == 4 and attrs["window"] == 30
    assert attrs["factor"] == 4 and attrs["level"] == 2 and attrs["source_fingerprint"] == rec.fingerprint()
    root = copy_of(prepared, tmp_path)
    with pytest.raises(RecordingError, match="already exists.*overwrite"):
        prepare_video(root, CENTERED, progress=False)
    prepare_video(root, VideoPrepConfig(**{**CAUSAL.__dict__, "overwrite": True}), progress=False)
    again = video_attrs(Recording.open(root), 2)
    assert again["baseline"] == "causal" and again["decimate"] == 4 and "stride" not in again
    meta_path = root / video_array_name(2) / "zarr.json"               # a ZAPBench array has no such attrs
    meta = json.loads(meta_path.read_text())
    meta.pop("attributes")
    meta_path.write_text(json.dumps(meta))
    assert video_attrs(Recording.open(root), 2) == {}


def test_prepare_rejects_bad_targets(store: Path) -> None:
    with pytest.raises(RecordingError, match="local paths only"):
        prepare_video(store, CENTERED, out_root="gs://bucket/rec", progress=False)
    with pytest.raises(ValueError, match="unknown baseline"):
        VideoPrepConfig(baseline="median")
    with pytest.raises(ValueError, match="decimate"):
        VideoPrepConfig(baseline="causal", window=4, decimate=8)


def test_video_data_inputs_and_targets(prepared: Path) -> None:
    rec = Recording.open(prepared)
    data = VideoData(rec, VideoDataConfig(level=2, crop_y=4, cache_frames=64), super_resolution=1)
    assert data.input_shape == (12, 4, 8) and data.output_shape == (24, 8, 8) and data.volume_shape == (48, 32, 8)
    assert data.grid.crop_y == (2, 6) and data.grid.stride == 2 and data.offsets == tuple(rec.condition_offsets)
    assert data.reducer.stats["neurons"] == rec.n_neurons == data.traces.shape[1]
    starts = np.array([0, 5, 7, T - 4])
    x = data.inputs(starts, 4)
    assert x.shape == (4, 4, 12, 4, 8) and x.dtype == np.float32 and x.flags.c_contiguous
    vol = rec.volume("df_over_f", 2)
    for b, s in enumerate(starts):
        for c in range(4):
            np.testing.assert_array_equal(x[b, c], vol.read(int(s) + c)[:, 2:6, :])
    traces = rec.traces()
    leads = np.array([1, 3, 2, 0]) + np.array([0, 0, 0, 1])
    starts_t = np.array([0, 5, 7, T - 6])
    np.testing.assert_array_equal(data.targets(starts_t, 4, leads), traces[starts_t + 3 + leads])
    all_t = data.all_targets(starts_t, 4, 2)                            # the last window reaches frame T-1
    assert all_t.shape == (4, 2, rec.n_neurons)
    np.testing.assert_array_equal(all_t[:, 1], traces[starts_t + 3 + 2])
    with pytest.raises(IndexError, match="leave the recording"):
        data.all_targets(starts_t, 4, 3)
    block = data.manifest_video()
    assert block["crop_y"] == [2, 6] and block["factor"] == 4 and block["super_resolution"] == 1
    assert block["output_shape"] == [24, 8, 8] and block["dff"]["baseline"] == "centered"


def test_frame_cache_is_bounded(prepared: Path) -> None:
    data = VideoData(prepared, VideoDataConfig(cache_frames=5))
    vol = data.volume
    for starts in (np.array([0, 20, 40]), np.array([1, 2]), np.array([50, 90, 10, 60])):
        x = data.inputs(starts, 3)
        assert data.cached_frames <= 5
        for b, s in enumerate(starts):
            np.testing.assert_array_equal(x[b, 2], vol.read(int(s) + 2))
    misses = data.cache_stats["misses"]
    data.inputs(np.array([61]), 2)                       # frames 61, 62: still cached from the last batch
    assert data.cache_stats["misses"] == misses and data.cache_stats["hits"] >= 2


def test_index_validation(prepared: Path) -> None:
    data = VideoData(prepared, VideoDataConfig())
    with pytest.raises(IndexError, match="leave the recording"):
        data.inputs(np.array([T - 2]), 4)
    with pytest.raises(IndexError, match="leave the recording"):
        data.inputs(np.array([-1]), 2)
    with pytest.raises(IndexError, match="leave the recording"):
        data.targets(np.array([T - 5]), 4, np.array([2]))
    with pytest.raises(ValueError, match="leads must be"):
        data.targets(np.array([0]), 4, np.array([0]))
    with pytest.raises(ValueError, match="integer array"):
        data.inputs(np.array([0.5]), 2)
    with pytest.raises(ValueError, match="crop_y must be in"):
        VideoData(prepared, VideoDataConfig(crop_y=9))


def test_missing_video_names_prepare_video(store: Path) -> None:
    with pytest.raises(RecordingError, match="prepare_video.*loopcast prepare-video"):
        VideoData(store, VideoDataConfig(level=2))
