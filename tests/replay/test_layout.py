"""Recordings in the ZAPBench layout: synthesis round trip, array specs, metadata, a zarr-python-written copy.
(Broken stores and the TensorStore layer: test_store.py.)"""
from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr

from loopcast.config import load_config
from loopcast.realtime.preprocess.dff import DffConfig, centered_dff
from loopcast.realtime.preprocess.traces import TraceExtractor
from loopcast.replay.fish import FishModel, stimulus_schedule
from loopcast.replay.layout import (
    CONDITION_NAMES,
    FRAME_PERIOD_S,
    HOLDOUT_CONDITIONS,
    N_COVARIATES,
    TRAIN_CONDITIONS,
    ZAPBENCH_CONDITION_OFFSETS,
    Recording,
    RecordingError,
)
from loopcast.replay.synth import SynthConfig, synthesize


def _broken_copy(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(src, dst)
    return dst


def test_constants() -> None:
    assert ZAPBENCH_CONDITION_OFFSETS[-1] == 7879 and len(CONDITION_NAMES) == 9
    assert TRAIN_CONDITIONS == (0, 1, 2, 4, 5, 6, 7, 8) and HOLDOUT_CONDITIONS == (3,)
    assert FRAME_PERIOD_S == 0.9141 and N_COVARIATES == 26


def test_round_trip_volumes_bit_for_bit(tiny_synth: SynthConfig, tiny_recording: Recording) -> None:
    fish, sched = FishModel(tiny_synth.fish), stimulus_schedule(tiny_synth.fish, tiny_synth.n_frames)
    check = {0, 1, 17, 63, 64, 120, tiny_synth.n_frames - 1}
    for t in range(tiny_synth.n_frames):
        frame = fish.step(sched.covariates[t])
        if t in check:
            vol = tiny_recording.read_volume(t)
            assert vol.dtype == np.uint16 and vol.flags.f_contiguous
            np.testing.assert_array_equal(vol, frame.volume)
            np.testing.assert_array_equal(tiny_recording.ground_truth("spikes")[t], frame.spikes)
    np.testing.assert_array_equal(tiny_recording.segmentation(), fish.anatomy.segmentation)
    np.testing.assert_array_equal(tiny_recording.positions(), fish.anatomy.positions)
    np.testing.assert_array_equal(tiny_recording.stimuli(), sched.covariates)
    with pytest.raises(IndexError):
        tiny_recording.read_volume(tiny_synth.n_frames)


def test_traces_come_from_the_volumes(tiny_synth: SynthConfig, tiny_recording: Recording) -> None:
    means = TraceExtractor(tiny_recording.segmentation())
    f = np.stack([means.process(tiny_recording.read_volume(t)) for t in range(tiny_recording.n_frames)])
    expect = centered_dff(f, DffConfig(), stride=tiny_synth.baseline_stride)
    np.testing.assert_array_equal(tiny_recording.traces(), expect)


def test_array_specs(tiny_store: Path, tiny_synth: SynthConfig) -> None:
    t, n, shape = tiny_synth.n_frames, tiny_synth.fish.n_neurons, tiny_synth.fish.shape
    specs = {"raw": ((*shape, t), "uint16", ("x", "y", "z", "t")),
             "segmentation": (shape, "uint32", ("x", "y", "z")),
             "traces": ((t, n), "float32", ("t", "f")),
             "positions": ((n, 3), "float32", ("f", "xyz")),
             "ground_truth/spikes": ((t, n), "float32", ("t", "f")),
             "ground_truth/calcium": ((t, n), "float32", ("t", "f")),
             "ground_truth/stimulated": ((t, n), "bool", ("t", "f")),
             "ground_truth/ensemble": ((n,), "int32", ("f",))}
    for name, (shp, dtype, dims) in specs.items():
        arr = zarr.open_array(str(tiny_store / name), mode="r")
        assert arr.metadata.zarr_format == 3 and arr.shape == shp and arr.dtype == np.dtype(dtype), name
        if dims is not None:
            assert arr.metadata.dimension_names is not None and tuple(arr.metadata.dimension_names) == dims, name
    assert zarr.open_array(str(tiny_store / "raw"), mode="r").chunks == (*shape[:2], 1, 1)   # (512, 512, 1, 1)
    assert zarr.open_array(str(tiny_store / "traces"), mode="r").chunks == (t, n)            # clipped (512, 512)
    stim = zarr.open_array(str(tiny_store / "stimuli_features"), mode="r")
    assert stim.metadata.zarr_format == 2 and (tiny_store / "stimuli_features" / ".zarray").is_file()
    assert stim.shape == (t, N_COVARIATES) and stim.dtype == np.float32


def test_metadata_and_config(tiny_store: Path, tiny_synth: SynthConfig, tiny_recording: Recording) -> None:
    rec = tiny_recording
    assert (rec.n_frames, rec.n_neurons, rec.volume_shape) == (200, 150, (48, 32, 8))
    assert rec.frame_period_s == 0.9141 and rec.condition_names == CONDITION_NAMES
    assert rec.condition_offsets == stimulus_schedule(tiny_synth.fish, 200).offsets
    assert rec.meta["format"] == "loopcast-recording" and rec.meta["version"] == 1
    assert rec.meta["source"] == "synthetic" and rec.meta["seed"] == tiny_synth.fish.seed
    assert load_config(SynthConfig, tiny_store / "synth.toml") == tiny_synth
    fp = rec.fingerprint()
    assert len(fp) == 16 and fp == Recording.open(tiny_store).fingerprint()
    with pytest.raises(RecordingError, match="unknown ground truth"):
        rec.ground_truth("voltage")


def test_refuses_to_overwrite(tiny_synth: SynthConfig, tmp_path: Path) -> None:
    cfg = dataclasses.replace(tiny_synth, n_frames=30, write_raw=False)
    out = tmp_path / "rec"
    synthesize(cfg, out, progress=False)
    with pytest.raises(RecordingError, match="already exists"):
        synthesize(cfg, out, progress=False)
    rec = synthesize(cfg, out, progress=False, overwrite=True)
    assert rec.n_frames == 30 and not rec.has("raw")
    other = tmp_path / "not_a_recording"
    other.mkdir()
    (other / "precious.txt").write_text("keep me")
    with pytest.raises(RecordingError, match="not a loopcast recording"):
        synthesize(cfg, other, progress=False, overwrite=True)
    assert (other / "precious.txt").is_file()


def test_opto_pulses_in_synthesis(tiny_synth: SynthConfig, tmp_path: Path) -> None:
    cfg = dataclasses.replace(tiny_synth, n_frames=60, write_raw=False, opto_period_frames=20)
    rec = synthesize(cfg, tmp_path / "opto", progress=False)
    stim = rec.ground_truth("stimulated")
    assert stim.dtype == np.bool_ and stim.any(axis=1).sum() == 3 * cfg.opto_duration_frames


@pytest.mark.parametrize("name", ["traces", "stimuli_features", "raw", "positions"])
def test_missing_array(tiny_store: Path, tmp_path: Path, name: str) -> None:
    root = _broken_copy(tiny_store, tmp_path)
    shutil.rmtree(root / name)
    with pytest.raises(RecordingError, match=f"{root / name}: array missing"):
        Recording.open(root)


def test_zapbench_copy_without_metadata(tmp_path: Path) -> None:
    t, n = ZAPBENCH_CONDITION_OFFSETS[-1], 4
    zarr.create_array(store=str(tmp_path / "traces"), shape=(t, n), dtype="float32",
                      dimension_names=["t", "f"], zarr_format=3)[...] = 0.1
    zarr.create_array(store=str(tmp_path / "stimuli_features"), shape=(t, 26), dtype="float32", zarr_format=2)
    raw = zarr.create_array(store=str(tmp_path / "raw"), shape=(3, 2, 2, t), dtype="uint16", chunks=(3, 2, 1, 1),
                            dimension_names=["x", "y", "z", "t"], zarr_format=3)   # zarr-python's default codecs
    vol = np.arange(12, dtype=np.uint16).reshape(3, 2, 2)
    raw[:, :, :, 7] = vol
    rec = Recording.open(tmp_path)
    assert rec.condition_offsets == ZAPBENCH_CONDITION_OFFSETS and rec.condition_names == CONDITION_NAMES
    assert rec.frame_period_s == FRAME_PERIOD_S and (rec.n_frames, rec.n_neurons) == (t, n)
    assert rec.traces().shape == (t, n) and rec.volume_shape == (3, 2, 2) and not rec.has("segmentation")
    np.testing.assert_array_equal(rec.read_volume(7), vol)
    with pytest.raises(RecordingError, match="segmentation: array missing"):
        rec.segmentation()
