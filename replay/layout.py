"""Recordings in the ZAPBench layout (gs://zapbench-release/volumes/20240930/... names), read with TensorStore.

    root/raw                      zarr3 uint16 (x, y, z, t), chunks (512, 512, 1, 1), dims x,y,z,t,
                                  codecs transpose [3,2,1,0] + bytes + blosc zstd (also `aligned`)
    root/df_over_f                zarr3 float32 (x, y, z, t); multiscale copies at
                                  root/<name>_xyz_chunked/s<k> or root/<name>/s<k> (s2 = 4x smaller in x, y)
    root/segmentation             zarr3 integer (x, y, z), 0 = background, label i+1 = neuron i
    root/traces                   zarr3 float32 (t, f) dF/F clipped to [-0.25, 1.5], chunks (512, 512)
    root/traces_raw               zarr3 float32 (t, f) segment means before dF/F (synthetic recordings only:
                                  what the online pipeline sees, so causal dF/F can be recomputed); with
                                  motion, registered: read at voxel + the true shift (raw is unregistered)
    root/stimuli_features         zarr2 float32 (t, 26)
    root/positions                zarr3 float32 (f, 3) x, y, z voxel centroids
    root/ground_truth/{spikes,calcium,stimulated}  (t, f);  ground_truth/ensemble (f,);  behaviour (t,)
    root/ground_truth/shifts      float32 (t, 3) the fish's true rigid shift x, y, z in voxels per frame
                                  (only in recordings synthesized with motion on: replay/motion.py)
    root/loopcast.json, root/synth.toml            metadata and the resolved synthesis config
The root is a local path, a file:// URL or a gs:// URL. A real ZAPBench copy has no loopcast.json: the
ZAPBench constants fill in offsets, names and period, and the arrays it lacks are simply absent.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import tensorstore as ts

from loopcast.replay.fish import CONDITION_NAMES, FRAME_PERIOD_S, N_COVARIATES, ZAPBENCH_CONDITION_OFFSETS
from loopcast.replay.store import (
    Expect,
    Location,
    RecordingError,
    check,
    dtype_of,
    exists,
    is_remote,
    join,
    normalize,  # (RecordingError re-exported)
    open_array,
    read_ahead,
    read_key,
)

TRAIN_CONDITIONS: tuple[int, ...] = (0, 1, 2, 4, 5, 6, 7, 8)
HOLDOUT_CONDITIONS: tuple[int, ...] = (3,)
FORMAT = "loopcast-recording"
VERSION = 1
META_FILE = "loopcast.json"
CONFIG_FILE = "synth.toml"
INCOMPLETE_MARKER = ".loopcast-incomplete"
GROUND_TRUTH = {"spikes": ("t", "f"), "calcium": ("t", "f"), "stimulated": ("t", "f"), "ensemble": ("f",),
                "behaviour": ("t",), "shifts": ("t", "xyz")}
GT_DTYPES = {"spikes": "float32", "calcium": "float32", "stimulated": "bool", "ensemble": "int32",
             "behaviour": "float32", "shifts": "float32"}
VOLUME_DTYPES = {"raw": "uint16", "aligned": "uint16", "df_over_f": "float32"}
XYZT: tuple[str, ...] = ("x", "y", "z", "t")
MAX_LEVELS = 8


def level_candidates(name: str, level: int) -> list[str]:
    """Array names that may hold volume `name` at multiscale `level` (ZAPBench's spelling first)."""
    first = [name] if level == 0 else []
    return [*first, f"{name}_xyz_chunked/s{level}", f"{name}/s{level}"]


class Volume:
    """One (x, y, z, t) volume array of a recording (a name at one multiscale level); reads are F-ordered."""

    def __init__(self, name: str, level: int, location: str, array: ts.TensorStore) -> None:
        self.name, self.level, self.location, self.array = name, level, location, array
        x, y, z = (int(s) for s in array.shape[:3])
        self.shape = (x, y, z)
        self.n_frames: int = int(array.shape[3])
        self.dtype: np.dtype = dtype_of(array)

    def __repr__(self) -> str:
        return f"Volume({self.location!r}, shape={self.shape}, dtype={self.dtype}, frames={self.n_frames})"

    def _index(self, t: int) -> int:
        if not 0 <= t < self.n_frames:
            raise IndexError(f"frame {t} out of range [0, {self.n_frames}) of {self.location}")
        return int(t)

    def read_async(self, t: int) -> ts.Future:
        """Start reading frame t; the future's result is the (x, y, z) volume, F-contiguous."""
        return self.array[:, :, :, self._index(t)].read(order="F")

    def read(self, t: int) -> np.ndarray:
        """Frame t as an (x, y, z) F-contiguous array (the stored order: x fastest), bit-identical."""
        fut = self.read_async(t)
        try:
            return fut.result()
        except Exception as exc:  # missing or corrupt chunk, network
            raise RecordingError(f"{self.location}: reading frame {t} failed: {exc}") from exc

    def stream(self, frames: Iterable[int], read_ahead_frames: int = 2) -> Iterator[tuple[int, np.ndarray]]:
        """(t, volume) for each frame in order, with up to `read_ahead_frames` reads in flight."""
        return read_ahead(self.read_async, frames, read_ahead_frames, self.location)


class Recording:
    """A recording opened read-only through TensorStore: validated metadata plus lazy access to its arrays."""

    def __init__(self, root: str, meta: dict[str, Any], arrays: dict[str, ts.TensorStore]) -> None:
        self.root = root
        self.meta = meta
        self._arrays = arrays
        self._volumes: dict[tuple[str, int], Volume] = {}
        self.n_frames: int = int(meta["n_frames"])
        self.n_neurons: int = int(meta["n_neurons"])
        self.volume_shape: tuple[int, int, int] = tuple(meta["volume_shape"])
        self.frame_period_s: float = float(meta["frame_period_s"])
        self.condition_offsets: tuple[int, ...] = tuple(int(o) for o in meta["condition_offsets"])
        self.condition_names: tuple[str, ...] = tuple(meta["condition_names"])

    @classmethod
    def open(cls, root: Location) -> Recording:
        """Open and validate the recording at a path or URL; any problem raises RecordingError naming it."""
        root = normalize(root)
        if not is_remote(root) and not Path(root).is_dir():
            raise RecordingError(f"{root}: recording directory not found")
        if read_key(root, INCOMPLETE_MARKER) is not None:
            raise RecordingError(f"{root}: incomplete recording (writing was interrupted); synthesize it again")
        meta = _read_meta(root)
        traces = open_array(join(root, "traces"), Expect((None, None), ("float32",), ("t", "f")))
        t, n = (int(s) for s in traces.shape)
        arrays = {"traces": traces,
                  "stimuli_features": open_array(join(root, "stimuli_features"),
                                                 Expect((t, N_COVARIATES), ("float32",)))}
        required = set(meta.get("arrays", ()))
        for name in ("raw", "traces_raw", "segmentation", "positions",
                     *(f"ground_truth/{g}" for g in GROUND_TRUTH)):
            if name in required or exists(join(root, name)):
                arrays[name] = open_array(join(root, name))
        vshape = _volume_shape(arrays, meta)
        _check_optional(root, arrays, t, n, vshape)
        meta = _complete_meta(root, meta, t, n, vshape)
        return cls(root, meta, arrays)

    def _get(self, name: str) -> ts.TensorStore:
        if name not in self._arrays:
            raise RecordingError(f"{join(self.root, name)}: array missing from this recording")
        return self._arrays[name]

    def _read(self, name: str) -> np.ndarray:
        try:
            return self._get(name).read().result()
        except RecordingError:
            raise
        except Exception as exc:
            raise RecordingError(f"{join(self.root, name)}: read failed: {exc}") from exc

    def traces(self) -> np.ndarray:
        """(T, N) float32 dF/F."""
        return np.asarray(self._read("traces"), dtype=np.float32)

    def raw_traces(self) -> np.ndarray:
        """(T, N) float32 segment means before dF/F (synthetic recordings; RecordingError if absent)."""
        return np.asarray(self._read("traces_raw"), dtype=np.float32)

    def stimuli(self) -> np.ndarray:
        """(T, 26) float32 stimulus covariates."""
        return np.asarray(self._read("stimuli_features"), dtype=np.float32)

    def segmentation(self) -> np.ndarray:
        """(x, y, z) uint32 label volume (C-contiguous)."""
        return np.ascontiguousarray(self._read("segmentation"), dtype=np.uint32)

    def positions(self) -> np.ndarray:
        """(N, 3) float32 centroids x, y, z in voxels."""
        return np.asarray(self._read("positions"), dtype=np.float32)

    def volume(self, name: str = "raw", level: int = 0) -> Volume:
        """Volume array `name` ('raw', 'aligned', 'df_over_f', ...) at multiscale `level` (0 = full size)."""
        key = (name, int(level))
        if key not in self._volumes:
            self._volumes[key] = self._open_volume(name, int(level))
        return self._volumes[key]

    def _open_volume(self, name: str, level: int) -> Volume:
        if name == "raw" and level == 0 and "raw" in self._arrays:
            return Volume(name, 0, join(self.root, "raw"), self._arrays["raw"])
        tried = level_candidates(name, level)
        for cand in tried:
            if exists(join(self.root, cand)):
                dtype = VOLUME_DTYPES.get(name)
                expect = Expect((None, None, None, self.n_frames),
                                (dtype or "any",), XYZT)
                return Volume(name, level, join(self.root, cand), open_array(join(self.root, cand), expect))
        present = "; ".join(f"{v} (levels {', '.join(map(str, ls))})" for v, ls in self.volumes().items())
        raise RecordingError(f"{self.root}: no volume {name!r} at level {level} (tried "
                             f"{', '.join(tried)}); present: {present or 'none'}")

    def volumes(self) -> dict[str, tuple[int, ...]]:
        """The volume arrays present: name -> multiscale levels (probes the known names, a few key reads)."""
        found: dict[str, tuple[int, ...]] = {}
        for name in VOLUME_DTYPES:
            levels = [k for k in range(MAX_LEVELS)
                      if any(exists(join(self.root, c)) for c in level_candidates(name, k))]
            if levels:
                found[name] = tuple(levels)
        return found

    def read_volume(self, t: int, name: str = "raw", level: int = 0) -> np.ndarray:
        """(x, y, z) volume at frame t, F-contiguous, bit-identical to what was written (raw: uint16)."""
        if not 0 <= t < self.n_frames:
            raise IndexError(f"frame {t} out of range [0, {self.n_frames})")
        return self.volume(name, level).read(t)

    def ground_truth(self, name: str) -> np.ndarray:
        """Simulation ground truth: spikes/calcium/stimulated (T, N), ensemble (N,), behaviour (T,), shifts (T, 3)
        (the rigid motion, when synthesized with it; RecordingError when absent)."""
        if name not in GROUND_TRUTH:
            raise RecordingError(f"unknown ground truth {name!r}; expected one of {sorted(GROUND_TRUTH)}")
        return self._read(f"ground_truth/{name}")

    def has(self, name: str) -> bool:
        """Whether array `name` (e.g. 'raw', 'ground_truth/spikes') is present."""
        return name in self._arrays

    def fingerprint(self) -> str:
        """Short stable hash of the metadata (minus creation time) and all array shapes and dtypes."""
        meta = {k: v for k, v in self.meta.items() if k != "created"}
        shapes = {k: [list(a.shape), str(dtype_of(a))] for k, a in sorted(self._arrays.items())}
        blob = json.dumps({"meta": meta, "arrays": shapes}, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _read_meta(root: str) -> dict[str, Any]:
    blob = read_key(root, META_FILE)
    if blob is None:
        return {}
    path = join(root, META_FILE)
    try:
        meta = json.loads(blob)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RecordingError(f"{path}: unreadable metadata: {exc}") from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise RecordingError(f"{path}: expected format {FORMAT!r} version {VERSION}, found "
                             f"{meta.get('format') if isinstance(meta, dict) else meta!r}")
    return meta


def _volume_shape(arrays: dict[str, ts.TensorStore], meta: dict[str, Any]) -> tuple[int, ...]:
    if "volume_shape" in meta:
        return tuple(int(s) for s in meta["volume_shape"])
    for name, nd in (("raw", 4), ("segmentation", 3)):
        if name in arrays and len(arrays[name].shape) == nd:
            return tuple(int(s) for s in arrays[name].shape[:3])
    return (2048, 1328, 72)


def _check_optional(root: str, arrays: dict[str, ts.TensorStore], t: int, n: int, vshape: tuple[int, ...]) -> None:
    """Shapes, dtypes and labels of every present array against traces (t, n) and the volume shape."""
    expect = {"raw": Expect((*vshape, t), ("uint16",), XYZT),
              "traces_raw": Expect((t, n), ("float32",), ("t", "f")),
              "segmentation": Expect(vshape, ("integer",), XYZT[:3]),
              "positions": Expect((n, 3), ("float32",))}
    for g, dims in GROUND_TRUTH.items():
        sizes = {"t": t, "f": n, "xyz": 3}
        expect[f"ground_truth/{g}"] = Expect(tuple(sizes[d] for d in dims), (GT_DTYPES[g],), dims)
    for name, exp in expect.items():
        if name in arrays:
            check(arrays[name], join(root, name), exp)


def _complete_meta(root: str, meta: dict[str, Any], t: int, n: int, vshape: tuple[int, ...]) -> dict[str, Any]:
    """Check loopcast.json against the arrays, or fill in ZAPBench defaults for a real ZAPBench copy."""
    path = join(root, META_FILE)
    if meta:
        if meta.get("n_frames") != t or meta.get("n_neurons") != n:
            raise RecordingError(f"{path}: says {meta.get('n_frames')} frames x "
                                 f"{meta.get('n_neurons')} neurons, but traces hold {t} x {n}")
        offs, names = meta.get("condition_offsets", []), meta.get("condition_names", [])
        if len(offs) != len(names) + 1 or offs[0] != 0 or offs[-1] != t or "frame_period_s" not in meta:
            raise RecordingError(f"{path}: expected frame_period_s and condition_offsets from 0 to "
                                 f"{t} (one more than condition_names), found {offs} / {names}")
        return meta
    if ZAPBENCH_CONDITION_OFFSETS[-1] != t:
        raise RecordingError(f"{root}: no {META_FILE} and {t} frames (ZAPBench has "
                             f"{ZAPBENCH_CONDITION_OFFSETS[-1]}): condition offsets unknown")
    return {"format": FORMAT, "version": VERSION, "condition_offsets": list(ZAPBENCH_CONDITION_OFFSETS),
            "condition_names": list(CONDITION_NAMES), "frame_period_s": FRAME_PERIOD_S, "n_frames": t,
            "n_neurons": n, "volume_shape": list(vshape), "source": "zapbench"}
