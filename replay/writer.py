"""Write a recording in the ZAPBench layout of replay.layout with TensorStore, volumes asynchronously."""
from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tensorstore as ts

from loopcast.replay.layout import (
    FORMAT,
    FRAME_PERIOD_S,
    GT_DTYPES,
    INCOMPLETE_MARKER,
    META_FILE,
    N_COVARIATES,
    VERSION,
    XYZT,
    Recording,
)
from loopcast.replay.store import (
    ZAPBENCH_CODEC,
    BloscCodec,
    BufferPool,
    Location,
    RecordingError,
    WriteQueue,
    create_array,
    is_remote,
    join,
    normalize,
)

VOLUME_CHUNKS = (512, 512, 1, 1)     # ZAPBench's raw / aligned / df_over_f chunks (clipped to the extent)
TRACE_CHUNKS = (512, 512)            # ZAPBench's traces chunks
GT_CHUNKS = (64, 512)                # ground truth (t, f), written in blocks of 64 frames


@dataclass(frozen=True)
class VolumeSpec:
    """An extra named volume array to write next to raw, e.g. 'df_over_f_xyz_chunked/s2' float32."""

    shape: tuple[int, int, int]
    dtype: str = "float32"


class RecordingWriter:
    """Writes a recording in the layout of replay.layout: arrays first, metadata last (then it is complete).
    Volumes are written asynchronously, at most `max_in_flight` frames pending; a failed write raises
    RecordingError on the next call or at finish()."""

    def __init__(self, root: Location, n_frames: int, n_neurons: int, volume_shape: tuple[int, int, int],
                 write_raw: bool = True, overwrite: bool = False, *, codec: BloscCodec = ZAPBENCH_CODEC,
                 voxel_size_nm: tuple[float, float, float] | None = None, frame_period_s: float = FRAME_PERIOD_S,
                 volumes: Mapping[str, VolumeSpec] | None = None, max_in_flight: int = 3) -> None:
        self.root = normalize(root)
        if is_remote(self.root):
            raise RecordingError(f"{self.root}: writing is supported to local paths only")
        self.n_frames, self.n_neurons = int(n_frames), int(n_neurons)
        x, y, z = (int(s) for s in volume_shape)
        self.volume_shape = (x, y, z)
        self.codec = codec
        _prepare_root(Path(self.root), overwrite)
        (Path(self.root) / INCOMPLETE_MARKER).touch()
        self.arrays: list[str] = ["traces", "stimuli_features", "segmentation", "positions"]
        self._queue = WriteQueue(max_in_flight)
        self._pool = BufferPool()
        self._units = None if voxel_size_nm is None else \
            (*((float(v), "nm") for v in voxel_size_nm), (float(frame_period_s), "s"))
        self._volumes: dict[str, ts.TensorStore] = {}
        specs = dict(volumes or {})
        if write_raw:
            specs = {"raw": VolumeSpec(self.volume_shape, "uint16"), **specs}
        for name, spec in specs.items():
            self._volumes[name] = self._create(name, (*spec.shape, self.n_frames), spec.dtype, VOLUME_CHUNKS,
                                               XYZT, codec=codec, fortran=True, units=self._units)
        self._gt = {g: self._create(f"ground_truth/{g}", (self.n_frames, self.n_neurons), GT_DTYPES[g],
                                    GT_CHUNKS, ("t", "f"))
                    for g in ("spikes", "calcium", "stimulated")}

    def _create(self, name: str, shape: tuple[int, ...], dtype: str, chunks: tuple[int, ...],
                labels: tuple[str, ...] | None, **kw: Any) -> ts.TensorStore:
        if name not in self.arrays:
            self.arrays.append(name)
        return create_array(join(self.root, name), shape, dtype, chunks, labels=labels, **kw)

    def write_volume(self, t: int, volume: np.ndarray, name: str = "raw", copy: bool = True) -> None:
        """Frame t's (x, y, z) volume, C or F order, into volume array `name` ('raw' by default). Returns once
        the write is queued; encoding runs in the background. copy=False hands the array over (saves a copy):
        the caller must not modify it afterwards."""
        arr = self._volumes.get(name)
        if arr is None:
            why = "write_raw=False" if name == "raw" else f"volumes={sorted(set(self._volumes) - {'raw'})}"
            raise RecordingError(f"{join(self.root, name)}: writer was created with {why}")
        shape, dtype = tuple(arr.shape[:3]), np.dtype(arr.dtype.numpy_dtype)
        if not 0 <= t < self.n_frames or volume.shape != shape or volume.dtype != dtype:
            raise RecordingError(f"{join(self.root, name)}: expected a frame in [0, {self.n_frames}) of shape "
                                 f"{shape} {dtype}, got frame {t} of shape {volume.shape} {volume.dtype}")
        self._queue.make_room()           # recycles the buffers of finished writes before copying
        data = self._pool.copy(volume) if copy else volume
        done = (lambda: self._pool.release(data)) if copy else None
        self._queue.submit(arr[:, :, :, t], data, f"{join(self.root, name)} frame {t}", on_done=done)

    def write_ground_truth_block(self, t0: int, spikes: np.ndarray, calcium: np.ndarray, stimulated: np.ndarray,
                                 behaviour: np.ndarray | None = None, shifts: np.ndarray | None = None) -> None:
        """Frames t0 .. t0+B of ground truth, each (B, N); behaviour (B,) swim vigor and shifts (B, 3) the
        fish's true rigid shift (x, y, z voxels), when given."""
        for name, arr in (("spikes", spikes), ("calcium", calcium), ("stimulated", stimulated)):
            self._submit(self._gt[name][t0:t0 + len(arr)], arr, GT_DTYPES[name], f"ground_truth/{name}")
        if behaviour is not None:
            if "behaviour" not in self._gt:
                self._gt["behaviour"] = self._create("ground_truth/behaviour", (self.n_frames,), "float32",
                                                     (self.n_frames,), ("t",))
            self._submit(self._gt["behaviour"][t0:t0 + len(behaviour)], behaviour, "float32",
                         "ground_truth/behaviour")
        if shifts is not None:
            if "shifts" not in self._gt:
                self._gt["shifts"] = self._create("ground_truth/shifts", (self.n_frames, 3), GT_DTYPES["shifts"],
                                                  (GT_CHUNKS[0], 3), ("t", "xyz"))
            self._submit(self._gt["shifts"][t0:t0 + len(shifts)], shifts, GT_DTYPES["shifts"],
                         "ground_truth/shifts")

    def _submit(self, target: ts.TensorStore, data: np.ndarray, dtype: str, name: str) -> None:
        if tuple(target.shape) != tuple(np.shape(data)):
            raise RecordingError(f"{join(self.root, name)}: expected a block of shape {tuple(target.shape)}, "
                                 f"got {np.shape(data)}")
        self._queue.submit(target, np.array(data, dtype=dtype, copy=True), join(self.root, name))

    def write_static(self, segmentation: np.ndarray, positions: np.ndarray, ensemble: np.ndarray,
                     stimuli: np.ndarray) -> None:
        """Anatomy (x, y, z) / (N, 3) / (N,) and stimulus covariates (T, 26)."""
        n, vs = self.n_neurons, self.volume_shape
        seg = self._create("segmentation", vs, "uint32", VOLUME_CHUNKS[:3], XYZT[:3], codec=self.codec,
                           fortran=True, units=None if self._units is None else self._units[:3])
        self._submit(seg, segmentation, "uint32", "segmentation")
        self._submit(self._create("positions", (n, 3), "float32", (n, 3), ("f", "xyz")), positions,
                     "float32", "positions")
        self._submit(self._create("ground_truth/ensemble", (n,), "int32", (n,), ("f",)), ensemble, "int32",
                     "ground_truth/ensemble")
        stim = self._create("stimuli_features", (self.n_frames, N_COVARIATES), "float32",
                            (self.n_frames, N_COVARIATES), None, zarr_format=2)
        self._submit(stim, stimuli, "float32", "stimuli_features")

    def write_traces(self, traces: np.ndarray, raw: np.ndarray | None = None) -> None:
        """(T, N) float32 dF/F, chunks (512, 512), plain bytes codec as in ZAPBench; optionally the
        (T, N) segment means before dF/F as `traces_raw` (same layout)."""
        for name, data in (("traces", traces), ("traces_raw", raw)):
            if data is None:
                continue
            arr = self._create(name, (self.n_frames, self.n_neurons), "float32", TRACE_CHUNKS, ("t", "f"),
                               codec=None)
            self._submit(arr, data, "float32", name)

    def flush(self) -> None:
        """Wait for every pending write; raises RecordingError for the first that failed."""
        self._queue.drain()

    def finish(self, meta: dict[str, Any]) -> Recording:
        """Wait for the writes, write loopcast.json (extra keys from `meta`), mark complete and reopen."""
        self.flush()
        full = {"format": FORMAT, "version": VERSION, "n_frames": self.n_frames, "n_neurons": self.n_neurons,
                "volume_shape": list(self.volume_shape), "arrays": sorted(self.arrays), **meta}
        (Path(self.root) / META_FILE).write_text(json.dumps(full, indent=2, sort_keys=True))
        (Path(self.root) / INCOMPLETE_MARKER).unlink()
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
