"""Recordings in the ZAPBench layout on zarr v3 (gs://zapbench-release/volumes/20240930/... names).

    root/raw                      zarr3 uint16 (x, y, z, t), chunks (X, Y, Z, 1), dims x,y,z,t
    root/segmentation             zarr3 uint32 (x, y, z), 0 = background, label i+1 = neuron i
    root/traces                   zarr3 float32 (t, f) dF/F clipped to [-0.25, 1.5]
    root/stimuli_features         zarr2 float32 (t, 26)
    root/positions                zarr3 float32 (f, 3) x, y, z voxel centroids
    root/ground_truth/{spikes,calcium,stimulated}  (t, f);  root/ground_truth/ensemble  (f,)
    root/loopcast.json, root/synth.toml            metadata and the resolved synthesis config
A real ZAPBench copy has no loopcast.json: the ZAPBench constants fill in offsets, names and period.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from replay.fish import (CONDITION_NAMES, FRAME_PERIOD_S, N_COVARIATES,  # noqa: F401  (re-exported)
                         ZAPBENCH_CONDITION_OFFSETS)

TRAIN_CONDITIONS: tuple[int, ...] = (0, 1, 2, 4, 5, 6, 7, 8)
HOLDOUT_CONDITIONS: tuple[int, ...] = (3,)
FORMAT = "loopcast-recording"
VERSION = 1
META_FILE = "loopcast.json"
CONFIG_FILE = "synth.toml"
INCOMPLETE_MARKER = ".loopcast-incomplete"
GROUND_TRUTH = {"spikes": ("t", "f"), "calcium": ("t", "f"), "stimulated": ("t", "f"), "ensemble": ("f",)}
GT_DTYPES = {"spikes": "float32", "calcium": "float32", "stimulated": "bool", "ensemble": "int32"}


class RecordingError(ValueError):
    """A recording that is missing, incomplete or not in the expected layout; names the path."""


def _exists(path: Path) -> bool:
    return (path / "zarr.json").is_file() or (path / ".zarray").is_file()


def _open(path: Path) -> zarr.Array:
    if not _exists(path):
        raise RecordingError(f"{path}: array missing (no zarr.json or .zarray)")
    try:
        node = zarr.open(store=str(path), mode="r")
    except Exception as exc:  # corrupt metadata of any kind
        raise RecordingError(f"{path}: unreadable zarr array: {exc}") from exc
    if not isinstance(node, zarr.Array):
        raise RecordingError(f"{path}: expected a zarr array, found a group")
    return node


def _check(arr: zarr.Array, path: Path, shape: tuple[int | None, ...], dtype: str) -> None:
    """Raise RecordingError unless arr has `dtype` and `shape` (None = any size on that axis)."""
    want = "(" + ", ".join("?" if s is None else str(s) for s in shape) + ")"
    ok = len(arr.shape) == len(shape) and all(w is None or w == s for w, s in zip(shape, arr.shape))
    if not ok or np.dtype(arr.dtype) != np.dtype(dtype):
        raise RecordingError(f"{path}: expected shape {want} {dtype}, found {tuple(arr.shape)} {arr.dtype}")


class Recording:
    """A recording opened read-only: validated metadata plus lazy access to its arrays."""

    def __init__(self, root: Path, meta: dict[str, Any], arrays: dict[str, zarr.Array]) -> None:
        self.root = root
        self.meta = meta
        self._arrays = arrays
        self.n_frames: int = int(meta["n_frames"])
        self.n_neurons: int = int(meta["n_neurons"])
        self.volume_shape: tuple[int, int, int] = tuple(meta["volume_shape"])  # type: ignore[assignment]
        self.frame_period_s: float = float(meta["frame_period_s"])
        self.condition_offsets: tuple[int, ...] = tuple(int(o) for o in meta["condition_offsets"])
        self.condition_names: tuple[str, ...] = tuple(meta["condition_names"])

    @classmethod
    def open(cls, root: str | Path) -> "Recording":
        """Open and validate the store at `root`; any layout problem raises RecordingError naming the path."""
        root = Path(root)
        if not root.is_dir():
            raise RecordingError(f"{root}: recording directory not found")
        if (root / INCOMPLETE_MARKER).exists():
            raise RecordingError(f"{root}: incomplete recording (writing was interrupted); synthesize it again")
        meta = _read_meta(root)
        traces = _open(root / "traces")
        _check(traces, root / "traces", (None, None), "float32")
        t, n = traces.shape
        arrays = {"traces": traces}
        stim = _open(root / "stimuli_features")
        _check(stim, root / "stimuli_features", (t, N_COVARIATES), "float32")
        arrays["stimuli_features"] = stim
        required = set(meta.get("arrays", ()))
        for name in ("raw", "segmentation", "positions", *(f"ground_truth/{g}" for g in GROUND_TRUTH)):
            if name in required or _exists(root / name):
                arrays[name] = _open(root / name)
        vshape = _volume_shape(arrays, meta)
        _check_optional(root, arrays, t, n, vshape)
        meta = _complete_meta(root, meta, t, n, vshape)
        return cls(root, meta, arrays)

    def _get(self, name: str) -> zarr.Array:
        if name not in self._arrays:
            raise RecordingError(f"{self.root / name}: array missing from this recording")
        return self._arrays[name]

    def traces(self) -> np.ndarray:
        """(T, N) float32 dF/F."""
        return np.asarray(self._get("traces")[...], dtype=np.float32)

    def stimuli(self) -> np.ndarray:
        """(T, 26) float32 stimulus covariates."""
        return np.asarray(self._get("stimuli_features")[...], dtype=np.float32)

    def segmentation(self) -> np.ndarray:
        """(x, y, z) uint32 label volume."""
        return np.asarray(self._get("segmentation")[...], dtype=np.uint32)

    def positions(self) -> np.ndarray:
        """(N, 3) float32 centroids x, y, z in voxels."""
        return np.asarray(self._get("positions")[...], dtype=np.float32)

    def read_volume(self, t: int) -> np.ndarray:
        """(x, y, z) uint16 C-contiguous raw volume at frame t."""
        if not 0 <= t < self.n_frames:
            raise IndexError(f"frame {t} out of range [0, {self.n_frames})")
        return np.ascontiguousarray(self._get("raw")[:, :, :, t])

    def ground_truth(self, name: str) -> np.ndarray:
        """Simulation ground truth: spikes/calcium/stimulated (T, N) or ensemble (N,)."""
        if name not in GROUND_TRUTH:
            raise RecordingError(f"unknown ground truth {name!r}; expected one of {sorted(GROUND_TRUTH)}")
        return np.asarray(self._get(f"ground_truth/{name}")[...])

    def has(self, name: str) -> bool:
        """Whether array `name` (e.g. 'raw', 'ground_truth/spikes') is present."""
        return name in self._arrays

    def fingerprint(self) -> str:
        """Short stable hash of the metadata (minus creation time) and all array shapes and dtypes."""
        meta = {k: v for k, v in self.meta.items() if k != "created"}
        shapes = {k: [list(a.shape), str(a.dtype)] for k, a in sorted(self._arrays.items())}
        blob = json.dumps({"meta": meta, "arrays": shapes}, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _read_meta(root: Path) -> dict[str, Any]:
    path = root / META_FILE
    if not path.is_file():
        return {}
    try:
        meta = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise RecordingError(f"{path}: unreadable metadata: {exc}") from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise RecordingError(f"{path}: expected format {FORMAT!r} version {VERSION}, found "
                             f"{meta.get('format') if isinstance(meta, dict) else meta!r}")
    return meta


def _volume_shape(arrays: dict[str, zarr.Array], meta: dict[str, Any]) -> tuple[int, ...]:
    if "volume_shape" in meta:
        return tuple(int(s) for s in meta["volume_shape"])
    for name, nd in (("raw", 4), ("segmentation", 3)):
        if name in arrays and len(arrays[name].shape) == nd:
            return tuple(arrays[name].shape[:3])
    return (2048, 1328, 72)


def _check_optional(root: Path, arrays: dict[str, zarr.Array], t: int, n: int, vshape: tuple[int, ...]) -> None:
    """Shapes and dtypes of every present array against traces (t, n) and the volume shape."""
    expect: dict[str, tuple[tuple[int | None, ...], str]] = {
        "raw": ((*vshape, t), "uint16"), "segmentation": (vshape, "uint32"), "positions": ((n, 3), "float32")}
    for g, dims in GROUND_TRUTH.items():
        expect[f"ground_truth/{g}"] = (tuple(t if d == "t" else n for d in dims), GT_DTYPES[g])
    for name, (shape, dtype) in expect.items():
        if name in arrays:
            _check(arrays[name], root / name, shape, dtype)


def _complete_meta(root: Path, meta: dict[str, Any], t: int, n: int, vshape: tuple[int, ...]) -> dict[str, Any]:
    """Check loopcast.json against the arrays, or fill in ZAPBench defaults for a real ZAPBench copy."""
    if meta:
        if meta.get("n_frames") != t or meta.get("n_neurons") != n:
            raise RecordingError(f"{root / META_FILE}: says {meta.get('n_frames')} frames x "
                                 f"{meta.get('n_neurons')} neurons, but traces hold {t} x {n}")
        offs, names = meta.get("condition_offsets", []), meta.get("condition_names", [])
        if len(offs) != len(names) + 1 or offs[0] != 0 or offs[-1] != t or "frame_period_s" not in meta:
            raise RecordingError(f"{root / META_FILE}: expected frame_period_s and condition_offsets from 0 to "
                                 f"{t} (one more than condition_names), found {offs} / {names}")
        return meta
    if ZAPBENCH_CONDITION_OFFSETS[-1] != t:
        raise RecordingError(f"{root}: no {META_FILE} and {t} frames (ZAPBench has "
                             f"{ZAPBENCH_CONDITION_OFFSETS[-1]}): condition offsets unknown")
    return {"format": FORMAT, "version": VERSION, "condition_offsets": list(ZAPBENCH_CONDITION_OFFSETS),
            "condition_names": list(CONDITION_NAMES), "frame_period_s": FRAME_PERIOD_S, "n_frames": t,
            "n_neurons": n, "volume_shape": list(vshape), "source": "zapbench"}


class RecordingWriter:
    """Writes a recording in the layout above: arrays first, metadata last (then the store is complete)."""

    def __init__(self, root: str | Path, n_frames: int, n_neurons: int, volume_shape: tuple[int, int, int],
                 write_raw: bool = True, overwrite: bool = False, block_frames: int = 16) -> None:
        self.root = Path(root)
        self.n_frames, self.n_neurons, self.volume_shape = n_frames, n_neurons, tuple(volume_shape)
        _prepare_root(self.root, overwrite)
        (self.root / INCOMPLETE_MARKER).touch()
        self.arrays = ["traces", "stimuli_features", "segmentation", "positions"]
        t_chunk = min(n_frames, 64)
        self._raw: zarr.Array | None = None
        if write_raw:
            self._raw = self._create("raw", (*self.volume_shape, n_frames), "uint16",
                                     (*self.volume_shape, 1), ["x", "y", "z", "t"])
            self._buf = np.empty((*self.volume_shape, max(1, block_frames)), np.uint16)   # (x, y, z, block)
            self._buf_start, self._buf_n = 0, 0
        self._gt = {g: self._create(f"ground_truth/{g}", (n_frames, n_neurons), GT_DTYPES[g],
                                    (t_chunk, min(n_neurons, 16384)), ["t", "f"])
                    for g in ("spikes", "calcium", "stimulated")}

    def _create(self, name: str, shape: tuple[int, ...], dtype: str, chunks: tuple[int, ...],
                dims: list[str] | None, zarr_format: int = 3) -> zarr.Array:
        if name not in self.arrays:
            self.arrays.append(name)
        kw: dict[str, Any] = {"dimension_names": dims} if zarr_format == 3 else {}
        return zarr.create_array(store=str(self.root / name), shape=shape, dtype=dtype, chunks=chunks,
                                 zarr_format=zarr_format, **kw)

    def write_volume(self, t: int, volume: np.ndarray) -> None:
        """Frame t's (x, y, z) uint16 volume; frames must arrive in order (buffered, written in blocks)."""
        if self._raw is None:
            raise RecordingError(f"{self.root / 'raw'}: writer was created with write_raw=False")
        if t != self._buf_start + self._buf_n or volume.shape != self.volume_shape:
            raise RecordingError(f"{self.root / 'raw'}: expected frame {self._buf_start + self._buf_n} of shape "
                                 f"{self.volume_shape}, got frame {t} of shape {volume.shape}")
        self._buf[..., self._buf_n] = volume
        self._buf_n += 1
        if self._buf_n == self._buf.shape[-1]:
            self._flush_raw()

    def _flush_raw(self) -> None:
        if self._raw is not None and self._buf_n:
            self._raw[..., self._buf_start:self._buf_start + self._buf_n] = self._buf[..., :self._buf_n]
            self._buf_start, self._buf_n = self._buf_start + self._buf_n, 0

    def write_ground_truth_block(self, t0: int, spikes: np.ndarray, calcium: np.ndarray,
                                 stimulated: np.ndarray) -> None:
        """Frames t0 .. t0+B of ground truth, each (B, N)."""
        for name, arr in (("spikes", spikes), ("calcium", calcium), ("stimulated", stimulated)):
            self._gt[name][t0:t0 + len(arr)] = arr

    def write_static(self, segmentation: np.ndarray, positions: np.ndarray, ensemble: np.ndarray,
                     stimuli: np.ndarray) -> None:
        """Anatomy (x, y, z) / (N, 3) / (N,) and stimulus covariates (T, 26)."""
        self._create("segmentation", self.volume_shape, "uint32", self.volume_shape, ["x", "y", "z"])[...] = \
            segmentation.astype(np.uint32)
        self._create("positions", (self.n_neurons, 3), "float32", (self.n_neurons, 3), ["f", "xyz"])[...] = \
            positions.astype(np.float32)
        self._create("ground_truth/ensemble", (self.n_neurons,), "int32", (self.n_neurons,), ["f"])[...] = \
            ensemble.astype(np.int32)
        self._create("stimuli_features", (self.n_frames, N_COVARIATES), "float32",
                     (self.n_frames, N_COVARIATES), None, zarr_format=2)[...] = stimuli.astype(np.float32)

    def write_traces(self, traces: np.ndarray) -> None:
        """(T, N) float32 dF/F."""
        self._create("traces", (self.n_frames, self.n_neurons), "float32",
                     (min(self.n_frames, 64), min(self.n_neurons, 16384)), ["t", "f"])[...] = traces

    def finish(self, meta: dict[str, Any]) -> Recording:
        """Flush, write loopcast.json (extra keys from `meta`), mark the store complete and reopen it."""
        self._flush_raw()
        full = {"format": FORMAT, "version": VERSION, "n_frames": self.n_frames, "n_neurons": self.n_neurons,
                "volume_shape": list(self.volume_shape), "arrays": sorted(self.arrays), **meta}
        (self.root / META_FILE).write_text(json.dumps(full, indent=2, sort_keys=True))
        (self.root / INCOMPLETE_MARKER).unlink()
        return Recording.open(self.root)


def _prepare_root(root: Path, overwrite: bool) -> None:
    """Create root; an existing non-empty root is replaced only with overwrite=True and only if it is ours."""
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        if not overwrite:
            raise RecordingError(f"{root}: already exists; pass overwrite=True to replace it")
        ours = (root / META_FILE).is_file() or (root / INCOMPLETE_MARKER).exists()
        if not root.is_dir() or not ours:
            raise RecordingError(f"{root}: exists and is not a loopcast recording; refusing to delete it")
        shutil.rmtree(root)
    root.mkdir(parents=True, exist_ok=True)
