"""TensorStore layer: kvstore specs, the ZAPBench array layout, writer -> two readers, volume lookup,
asynchronous writes and reads, a real-ZAPBench-shaped copy, the live bucket, and broken stores."""
from __future__ import annotations

import json
import shutil
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pytest
import tensorstore as ts
import zarr

from loopcast.replay.layout import (
    CONDITION_NAMES,
    FRAME_PERIOD_S,
    ZAPBENCH_CONDITION_OFFSETS,
    Recording,
    RecordingError,
)
from loopcast.replay.store import (
    BloscCodec,
    WriteQueue,
    create_array,
    join,
    kvstore_spec,
    normalize,
    open_array,
    read_ahead,
)
from loopcast.replay.writer import RecordingWriter, VolumeSpec

T, N, SHAPE, S2 = 24, 5, (40, 20, 6), (10, 5, 6)
ZAPBENCH_CODECS = [{"name": "transpose", "configuration": {"order": [3, 2, 1, 0]}},
                   {"name": "bytes", "configuration": {"endian": "little"}},
                   {"name": "blosc", "configuration": {"cname": "zstd", "clevel": 4, "shuffle": "shuffle",
                                                       "typesize": 2, "blocksize": 0}}]


def _data(seed: int = 0) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    return {"raw": rng.integers(0, 65535, (T, *SHAPE), dtype=np.uint16),
            "s2": rng.random((T, *S2), dtype=np.float32),
            "seg": rng.integers(0, N + 1, SHAPE).astype(np.uint32),
            "pos": rng.random((N, 3)).astype(np.float32), "ens": np.arange(N, dtype=np.int32),
            "stim": rng.random((T, 26)).astype(np.float32), "traces": rng.random((T, N)).astype(np.float32),
            "spikes": rng.random((T, N)).astype(np.float32), "calcium": rng.random((T, N)).astype(np.float32),
            "stimulated": rng.random((T, N)) > 0.7, "behaviour": rng.random(T).astype(np.float32)}


def _write(root: Path, d: dict[str, Any], **kw: Any) -> Recording:
    w = RecordingWriter(root, T, N, SHAPE, volumes={"df_over_f_xyz_chunked/s2": VolumeSpec(S2)},
                        voxel_size_nm=(406.0, 406.0, 4000.0), **kw)
    w.write_static(d["seg"], d["pos"], d["ens"], d["stim"])
    for t in range(T):   # C and F order sources alternate
        w.write_volume(t, d["raw"][t] if t % 2 else np.asfortranarray(d["raw"][t]))
        w.write_volume(t, d["s2"][t], name="df_over_f_xyz_chunked/s2")
    for t0 in range(0, T, 16):
        sl = slice(t0, t0 + 16)
        w.write_ground_truth_block(t0, d["spikes"][sl], d["calcium"][sl], d["stimulated"][sl], d["behaviour"][sl])
    w.write_traces(d["traces"])
    return w.finish({"condition_offsets": [0, 10, T], "condition_names": ["a", "b"], "frame_period_s": 0.5})


@pytest.fixture(scope="module")
def data() -> dict[str, Any]:
    return _data()


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory, data: dict[str, Any]) -> Path:
    """A small complete recording written by RecordingWriter (read-only; copy it to break it)."""
    root = tmp_path_factory.mktemp("store") / "rec"
    _write(root, data)
    return root


def _zarr_json(path: Path) -> dict[str, Any]:
    return json.loads((path / "zarr.json").read_text())


# ---------------------------------------------------------------- locations

def test_kvstore_specs(tmp_path: Path) -> None:
    assert kvstore_spec("gs://zapbench-release/volumes/20240930/traces") == \
        {"driver": "gcs", "bucket": "zapbench-release", "path": "volumes/20240930/traces/"}
    assert kvstore_spec("gs://bucket/") == {"driver": "gcs", "bucket": "bucket", "path": ""}
    assert kvstore_spec(tmp_path / "a") == {"driver": "file", "path": f"{tmp_path}/a/"}
    assert kvstore_spec(f"file://{tmp_path}/a/") == {"driver": "file", "path": f"{tmp_path}/a/"}
    assert kvstore_spec("rel/dir")["path"] == str(Path("rel/dir").absolute()) + "/"
    assert join("gs://b/volumes/", "traces") == "gs://b/volumes/traces" and normalize("gs://b//x/") == "gs://b/x"
    assert join(tmp_path, "ground_truth/spikes") == str(tmp_path / "ground_truth" / "spikes")
    ts.KvStore.open(kvstore_spec("gs://zapbench-release/volumes/20240930/traces")).result()  # valid offline
    for bad in ("s3://bucket/x", "gs://"):
        with pytest.raises(RecordingError, match="s3://bucket/x|gs://"):
            kvstore_spec(bad)


# ---------------------------------------------------------------- writer -> two readers

def test_round_trip_tensorstore_and_zarr_python(store: Path, data: dict[str, Any]) -> None:
    rec = Recording.open(store)
    raw = zarr.open_array(str(store / "raw"), mode="r")
    for t in (0, 1, 7, T - 1):
        vol = rec.read_volume(t)
        assert vol.dtype == np.uint16 and vol.flags.f_contiguous and vol.shape == SHAPE
        np.testing.assert_array_equal(vol, data["raw"][t])
        np.testing.assert_array_equal(raw[:, :, :, t], data["raw"][t])
    for name, key in (("traces", "traces"), ("stimuli_features", "stim"), ("segmentation", "seg"),
                      ("positions", "pos"), ("ground_truth/behaviour", "behaviour"),
                      ("ground_truth/stimulated", "stimulated"), ("ground_truth/ensemble", "ens")):
        np.testing.assert_array_equal(zarr.open_array(str(store / name), mode="r")[...], data[key])
    np.testing.assert_array_equal(rec.traces(), data["traces"])
    np.testing.assert_array_equal(rec.stimuli(), data["stim"])
    np.testing.assert_array_equal(rec.segmentation(), data["seg"])
    np.testing.assert_array_equal(rec.positions(), data["pos"])
    for g in ("spikes", "calcium", "stimulated", "behaviour"):
        np.testing.assert_array_equal(rec.ground_truth(g), data[g])
    assert rec.ground_truth("behaviour").dtype == np.float32 and rec.has("ground_truth/behaviour")
    assert (rec.n_frames, rec.n_neurons, rec.volume_shape, rec.root) == (T, N, SHAPE, str(store))
    assert rec.condition_offsets == (0, 10, T) and rec.frame_period_s == 0.5
    with pytest.raises(IndexError):
        rec.read_volume(T)


def test_zapbench_array_layout(store: Path) -> None:
    raw = _zarr_json(store / "raw")
    assert raw["shape"] == [*SHAPE, T] and raw["data_type"] == "uint16"
    assert raw["chunk_grid"]["configuration"]["chunk_shape"] == [*SHAPE[:2], 1, 1]   # clipped to the extent
    assert raw["codecs"] == ZAPBENCH_CODECS and raw["dimension_names"] == ["x", "y", "z", "t"]
    assert raw["attributes"]["dimension_units"] == ["406 nm", "406 nm", "4000 nm", "0.9141 s"]
    traces = _zarr_json(store / "traces")
    assert traces["dimension_names"] == ["t", "f"]
    assert traces["chunk_grid"]["configuration"]["chunk_shape"] == [T, N]
    assert traces["codecs"] == [{"name": "bytes", "configuration": {"endian": "little"}}]
    s2 = _zarr_json(store / "df_over_f_xyz_chunked" / "s2")
    assert s2["data_type"] == "float32" and s2["codecs"][2]["configuration"]["typesize"] == 4
    stim = json.loads((store / "stimuli_features" / ".zarray").read_text())
    assert stim["zarr_format"] == 2 and stim["shape"] == [T, 26] and stim["dtype"] == "<f4"
    assert not (store / "stimuli_features" / "zarr.json").exists()


def test_chunks_never_pass_the_extent_and_codec_is_configurable(tmp_path: Path) -> None:
    codec = BloscCodec("lz4", 1, "bitshuffle")
    w = RecordingWriter(tmp_path / "r", 3, 2, (600, 7, 2), codec=codec, max_in_flight=1)
    vol = np.arange(600 * 7 * 2, dtype=np.uint16).reshape(600, 7, 2)
    for t in range(3):
        w.write_volume(t, vol + t, copy=False)
    w.flush()
    meta = _zarr_json(tmp_path / "r" / "raw")
    assert meta["chunk_grid"]["configuration"]["chunk_shape"] == [512, 7, 1, 1]
    assert meta["codecs"][2]["configuration"] == {"cname": "lz4", "clevel": 1, "shuffle": "bitshuffle",
                                                  "typesize": 2, "blocksize": 0}
    arr = open_array(tmp_path / "r" / "raw")
    np.testing.assert_array_equal(arr[:, :, :, 2].read().result(), vol + 2)
    with pytest.raises(ValueError, match="cname"):
        BloscCodec("gzip")


def test_write_volume_refuses_bad_frames(tmp_path: Path) -> None:
    w = RecordingWriter(tmp_path / "r", 3, 2, (4, 3, 2), volumes={"df_over_f/s1": VolumeSpec((2, 2, 2))})
    ok = np.zeros((4, 3, 2), np.uint16)
    for t, vol, name, match in ((3, ok, "raw", "frame 3"), (0, ok[:2], "raw", r"shape \(2, 3, 2\)"),
                                (0, ok.astype(np.float32), "raw", "float32"),
                                (0, ok, "aligned", r"volumes=\['df_over_f/s1'\]")):
        with pytest.raises(RecordingError, match=match):
            w.write_volume(t, vol, name=name)
    w2 = RecordingWriter(tmp_path / "r2", 3, 2, (4, 3, 2), write_raw=False)
    with pytest.raises(RecordingError, match=f"{tmp_path / 'r2' / 'raw'}: .*write_raw=False"):
        w2.write_volume(0, ok)


def test_failed_write_surfaces_on_the_next_call(tmp_path: Path) -> None:
    arr = create_array(tmp_path / "a", (4, 3, 2, 5), "uint16", (512, 512, 1, 1), fortran=True)
    (tmp_path / "a" / "c").write_text("not a directory")       # every chunk write now fails
    queue = WriteQueue(max_in_flight=1)
    queue.submit(arr[:, :, :, 0], np.ones((4, 3, 2), np.uint16), "frame 0")
    with pytest.raises(RecordingError, match="frame 0: write failed"):
        queue.submit(arr[:, :, :, 1], np.ones((4, 3, 2), np.uint16), "frame 1")
    queue.submit(arr[:, :, :, 2], np.ones((4, 3, 2), np.uint16), "frame 2")
    with pytest.raises(RecordingError, match="frame 2: write failed"):
        queue.drain()


# ---------------------------------------------------------------- volumes by name and level

def test_volume_lookup_by_name_and_level(store: Path, data: dict[str, Any], tmp_path: Path) -> None:
    rec = Recording.open(store)
    s2 = rec.volume("df_over_f", level=2)
    assert (s2.shape, s2.dtype, s2.n_frames) == (S2, np.float32, T)
    assert s2.location == str(store / "df_over_f_xyz_chunked" / "s2")
    out = s2.read(5)
    assert out.flags.f_contiguous
    np.testing.assert_array_equal(out, data["s2"][5])
    np.testing.assert_array_equal(s2.read_async(6).result(), data["s2"][6])
    np.testing.assert_array_equal(rec.read_volume(3, "df_over_f", 2), data["s2"][3])
    assert rec.volume() is rec.volume("raw", 0) and rec.volumes() == {"raw": (0,), "df_over_f": (2,)}
    with pytest.raises(RecordingError, match=r"no volume 'df_over_f' at level 1 .*present: raw \(levels 0\); "
                                             r"df_over_f \(levels 2\)") as err:
        rec.volume("df_over_f", level=1)
    assert str(store) in str(err.value)
    root = tmp_path / "copy"                      # the <name>/s<k> spelling
    shutil.copytree(store, root)
    create_array(root / "aligned" / "s1", (20, 10, 6, T), "uint16", (512, 512, 1, 1),
                 labels=("x", "y", "z", "t"), fortran=True)
    assert Recording.open(root).volume("aligned", 1).shape == (20, 10, 6)


def test_read_ahead_keeps_a_bounded_number_in_flight(store: Path, data: dict[str, Any]) -> None:
    vol = Recording.open(store).volume()
    started: list[int] = []

    def start(t: int) -> Any:
        started.append(t)
        return vol.read_async(t)

    for k, (t, v) in enumerate(read_ahead(start, range(2, 9), depth=3)):
        assert t == 2 + k and len(started) == min(k + 3, 7)
        np.testing.assert_array_equal(v, data["raw"][t])
    assert [t for t, _ in vol.stream([5, 1, 4], read_ahead_frames=2)] == [5, 1, 4]


# ---------------------------------------------------------------- a real ZAPBench copy

def test_zapbench_layout_without_metadata_opens_with_zapbench_constants(tmp_path: Path) -> None:
    t, xyz = ZAPBENCH_CONDITION_OFFSETS[-1], (4, 3, 2)
    units = ((406.0, "nm"), (406.0, "nm"), (4000.0, "nm"), (FRAME_PERIOD_S, "s"))
    traces = create_array(tmp_path / "traces", (t, 3), "float32", (512, 512), labels=("t", "f"), codec=None)
    traces.write(np.full((t, 3), 0.25, np.float32)).result()
    create_array(tmp_path / "stimuli_features", (t, 26), "float32", (t, 26), zarr_format=2)
    raw = create_array(tmp_path / "raw", (*xyz, t), "uint16", (512, 512, 1, 1), labels=("x", "y", "z", "t"),
                       fortran=True, units=units)
    vol = np.arange(24, dtype=np.uint16).reshape(xyz)
    raw[:, :, :, 5000].write(vol).result()
    seg = create_array(tmp_path / "segmentation", xyz, "uint64", (512, 512, 1), labels=("x", "y", "z"))
    seg.write(np.arange(24, dtype=np.uint64).reshape(xyz) % 4).result()
    rec = Recording.open(f"file://{tmp_path}")
    assert rec.condition_offsets == ZAPBENCH_CONDITION_OFFSETS and rec.condition_names == CONDITION_NAMES
    assert (rec.frame_period_s, rec.n_frames, rec.n_neurons, rec.volume_shape) == (FRAME_PERIOD_S, t, 3, xyz)
    assert rec.meta["source"] == "zapbench" and not rec.has("positions") and not rec.has("ground_truth/spikes")
    np.testing.assert_array_equal(rec.read_volume(5000), vol)
    assert not rec.read_volume(0).any()
    assert rec.segmentation().dtype == np.uint32 and rec.segmentation().max() == 3
    assert rec.traces().shape == (t, 3)
    with pytest.raises(RecordingError, match="positions: array missing"):
        rec.positions()
    with pytest.raises(RecordingError, match=r"present: raw \(levels 0\)"):
        rec.volume("df_over_f", 2)


def _reachable(host: str = "storage.googleapis.com", port: int = 443) -> bool:
    try:
        socket.create_connection((host, port), timeout=3).close()
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _reachable(), reason="storage.googleapis.com:443 unreachable (no network)")
def test_live_zapbench_release_traces() -> None:
    url = "gs://zapbench-release/volumes/20240930/traces"
    arr = open_array(url)
    assert tuple(arr.shape) == (7879, 71721) and tuple(arr.domain.labels) == ("t", "f")
    row = arr[0, :16].read().result()
    assert row.dtype == np.float32 and np.isfinite(row).all()


# ---------------------------------------------------------------- broken stores

def _rewrite_json(path: Path, **changes: Any) -> None:
    meta = json.loads(path.read_text())
    path.write_text(json.dumps({**meta, **changes}))


def _replace(name: str, shape: tuple[int, ...], dtype: str, fmt: Literal[2, 3] = 3) -> Callable[[Path], None]:
    def go(root: Path) -> None:
        shutil.rmtree(root / name)
        zarr.create_array(store=str(root / name), shape=shape, dtype=dtype, zarr_format=fmt)
    return go


BROKEN: dict[str, tuple[Callable[[Path], object], str, str]] = {
    "missing traces": (lambda r: shutil.rmtree(r / "traces"), "traces", "array missing"),
    "missing raw listed in metadata": (lambda r: shutil.rmtree(r / "raw"), "raw", "array missing"),
    "wrong dtype": (_replace("positions", (N, 3), "float64"), "positions",
                    r"expected shape \(5, 3\) float32, found \(5, 3\) float64"),
    "wrong shape": (_replace("stimuli_features", (T - 1, 26), "float32", fmt=2), "stimuli_features",
                    r"expected shape \(24, 26\) float32, found \(23, 26\)"),
    "wrong rank": (_replace("ground_truth/behaviour", (T, 1), "float32"), "ground_truth/behaviour",
                   r"expected shape \(24,\) float32"),
    "wrong dimension labels": (lambda r: _rewrite_json(r / "raw" / "zarr.json", dimension_names=list("yxzt")),
                               "raw", r"expected dimension labels \['x', 'y', 'z', 't'\], found \['y', 'x'"),
    "corrupt zarr.json": (lambda r: (r / "traces" / "zarr.json").write_text("{not json"), "traces/zarr.json",
                          "corrupt zarr.json"),
    "invalid zarr.json": (lambda r: _rewrite_json(r / "segmentation" / "zarr.json", data_type="complex9"),
                          "segmentation", "unreadable zarr3 array"),
    "group instead of array": (lambda r: (r / "positions" / "zarr.json").write_text(
        '{"zarr_format": 3, "node_type": "group"}'), "positions", "expected a zarr array, found node_type 'gr"),
    "incomplete marker": (lambda r: (r / ".loopcast-incomplete").touch(), "", "incomplete recording"),
    "metadata disagrees with traces": (lambda r: _rewrite_json(r / "loopcast.json", n_neurons=N + 1),
                                       "loopcast.json", r"says 24 frames x 6 neurons, but traces hold 24 x 5"),
    "metadata offsets wrong": (lambda r: _rewrite_json(r / "loopcast.json", condition_offsets=[0, 10, 99]),
                               "loopcast.json", "condition_offsets from 0 to 24"),
    "corrupt metadata": (lambda r: (r / "loopcast.json").write_text("]"), "loopcast.json", "unreadable metadata"),
    "no directory": (lambda r: shutil.rmtree(r), "", "recording directory not found"),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_broken_store(store: Path, tmp_path: Path, case: str) -> None:
    root = tmp_path / "broken"
    shutil.copytree(store, root)
    breaker, where, match = BROKEN[case]
    breaker(root)
    with pytest.raises(RecordingError, match=match) as err:
        Recording.open(root)
    assert (str(root / where) if where else str(root)) in str(err.value)


def test_corrupt_chunk_fails_the_read_naming_the_array(store: Path, tmp_path: Path) -> None:
    root = tmp_path / "broken"
    shutil.copytree(store, root)
    (root / "raw" / "c" / "0" / "0" / "3" / "7").write_bytes(b"garbage")
    rec = Recording.open(root)
    with pytest.raises(RecordingError, match=f"{root / 'raw'}: reading frame 7 failed"):
        rec.read_volume(7)
    with pytest.raises(RecordingError, match=f"{root / 'raw'}: reading frame 7 failed"):
        list(rec.volume().stream(range(6, 9)))
    np.testing.assert_array_equal(rec.read_volume(6).shape, SHAPE)
