"""The video model's data: preparing the downsampled dF/F volume and reading training windows from it.

`prepare_video` writes ZAPBench's multiscale dF/F array `df_over_f_xyz_chunked/s<level>` (x, y, z, t)
float32 from a recording's `raw` volumes: each frame is mean-downsampled by 2**level in x and y
(realtime.preprocess.voxel_dff.downsample_xy) and turned into per-voxel dF/F, either
  - "centered": ZAPBench's non-causal percentile baseline (realtime.preprocess.dff.centered_dff with its `stride`
    approximation). Each voxel needs its whole time series, so the downsampled frames go through a
    temporary on-disk (T, V) float32 memmap (T * V * 4 bytes of disk under the output root, removed
    afterwards), processed in blocks of `block_voxels` voxels; or
  - "causal": realtime.preprocess.voxel_dff.VoxelDff frame by frame, what the live loop computes (a single pass).
How the array was made is stored in its zarr.json attributes (key "loopcast_video"), read back by
`video_attrs` (empty for a real ZAPBench array).

`VideoData` serves (B, C, X, Ycrop, Z) input windows through a bounded LRU frame cache and (B, N)
trace targets, with the output grid and the VolumeReducer the loss and the engine use.
"""
from __future__ import annotations

import functools
import json
import os
import shutil
import tempfile
from collections import OrderedDict
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from loopcast.realtime.forecast.video_reduce import VideoGrid, VolumeReducer, centre_crop, crop_y
from loopcast.realtime.preprocess.dff import DffConfig, centered_dff
from loopcast.realtime.preprocess.voxel_dff import VoxelDff, VoxelDffConfig, downsample_xy
from loopcast.replay.layout import XYZT, Recording, Volume, level_candidates
from loopcast.replay.store import (
    BloscCodec,
    Expect,
    Location,
    RecordingError,
    WriteQueue,
    create_array,
    exists,
    is_remote,
    join,
    normalize,
    open_array,
    read_key,
)

BASELINES = ("centered", "causal")
ATTRS_KEY = "loopcast_video"
VIDEO_CHUNKS = (512, 512, 1, 1)                 # ZAPBench's volume chunks (clipped to the extent)
VIDEO_CODEC = BloscCodec("lz4", 1, "shuffle")   # fast: the array is rewritten whenever the baseline changes
READS_IN_FLIGHT = 8


@dataclass(frozen=True)
class VideoPrepConfig:
    """How `prepare_video` makes the level-`level` dF/F volume (factor 2**level in x and y)."""

    level: int = 2
    baseline: str = "centered"      # "centered" (ZAPBench, non-causal) | "causal" (the live loop's VoxelDff)
    window: int = 400
    percentile: float = 8.0
    stride: int = 8                 # centered: F0 every `stride` frames, linear in between
    decimate: int = 8               # causal: VoxelDff's decimated window
    warmup: int = 10                # causal
    min_baseline: float = 1.0
    clip_min: float = -0.25
    clip_max: float = 1.5
    block_voxels: int = 4096        # centered: voxels per block (memory ~ 30 * T * block_voxels bytes)
    overwrite: bool = False

    def __post_init__(self) -> None:
        if self.baseline not in BASELINES:
            raise ValueError(f"unknown baseline {self.baseline!r}; available: {list(BASELINES)}")
        if not 0 <= self.level <= 4 or self.stride < 1 or self.block_voxels < 1:
            raise ValueError(f"need level in [0, 4], stride >= 1, block_voxels >= 1, got {self.level}, "
                             f"{self.stride}, {self.block_voxels}")
        self.dff_config()                        # validates window / percentile / clip
        if self.baseline == "causal":
            self.voxel_config()

    @property
    def factor(self) -> int:
        return 2 ** self.level

    def dff_config(self) -> DffConfig:
        return DffConfig(window=self.window, percentile=self.percentile, warmup=min(self.warmup, self.window),
                         min_baseline=self.min_baseline, clip_min=self.clip_min, clip_max=self.clip_max)

    def voxel_config(self) -> VoxelDffConfig:
        return VoxelDffConfig(window=self.window, percentile=self.percentile, warmup=self.warmup,
                              decimate=self.decimate, min_baseline=self.min_baseline,
                              clip_min=self.clip_min, clip_max=self.clip_max)

    def attrs(self) -> dict[str, Any]:
        """What describes the written array (the baseline's own parameters only)."""
        keys = ["baseline", "level", "window", "percentile", "min_baseline", "clip_min", "clip_max"]
        keys += ["stride"] if self.baseline == "centered" else ["decimate", "warmup"]
        return {"factor": self.factor, **{k: v for k, v in asdict(self).items() if k in keys}}


def video_array_name(level: int) -> str:
    """ZAPBench's name of the dF/F volume at multiscale `level`: df_over_f_xyz_chunked/s<level>."""
    return f"df_over_f_xyz_chunked/s{int(level)}"


def prepare_video(rec_or_path: Recording | Location, cfg: VideoPrepConfig = VideoPrepConfig(),
                  out_root: Location | None = None, progress: bool = True) -> Volume:
    """Write the level-`cfg.level` dF/F volume of a recording's raw frames under `out_root` (default: the
    recording root, local only) and return it opened; an existing array is replaced only with overwrite."""
    rec = rec_or_path if isinstance(rec_or_path, Recording) else Recording.open(rec_or_path)
    root = normalize(rec.root if out_root is None else out_root)
    if is_remote(root):
        raise RecordingError(f"{root}: prepare_video writes to local paths only; copy the recording first")
    raw = rec.volume("raw")
    f = cfg.factor
    shape = (raw.shape[0] // f, raw.shape[1] // f, raw.shape[2])
    if min(shape) < 1:
        raise ValueError(f"raw volumes {raw.shape} are smaller than the downsampling factor {f}")
    loc = join(root, video_array_name(cfg.level))
    _make_room(root, cfg)
    arr = create_array(loc, (*shape, rec.n_frames), "float32", VIDEO_CHUNKS, labels=XYZT, codec=VIDEO_CODEC,
                       fortran=True)
    try:
        write = _write_causal if cfg.baseline == "causal" else _write_centered
        write(raw, arr, shape, cfg, root, progress)
        attrs = {**cfg.attrs(), "source": "raw", "source_fingerprint": rec.fingerprint(),
                 "created": datetime.now(UTC).isoformat(timespec="seconds")}
        _set_attrs(loc, attrs)
    except BaseException:
        shutil.rmtree(loc, ignore_errors=True)          # never leave a half-written array behind
        raise
    return Volume("df_over_f", cfg.level, loc,
                  open_array(loc, Expect((*shape, rec.n_frames), ("float32",), XYZT)))


def _make_room(root: str, cfg: VideoPrepConfig) -> None:
    """Refuse (or with overwrite, remove) an existing dF/F array at this level."""
    found = [c for c in level_candidates("df_over_f", cfg.level) if exists(join(root, c))]
    if found and not cfg.overwrite:
        raise RecordingError(f"{root}: dF/F volume at level {cfg.level} already exists ({', '.join(found)}); "
                             f"pass overwrite=True (--overwrite) to replace it")
    target = Path(join(root, video_array_name(cfg.level)))
    if target.exists():
        shutil.rmtree(target)


def _frames(raw: Volume, f: int, progress: bool, desc: str) -> Any:
    """(t, downsampled (X/f, Y/f, Z) float32 C order) for every raw frame, with a progress bar."""
    bar = tqdm(total=raw.n_frames, desc=desc, unit="vol", disable=not progress)
    try:
        for t, vol in raw.stream(range(raw.n_frames)):
            yield t, downsample_xy(vol, f)
            bar.update(1)
    finally:
        bar.close()


def _write_causal(raw: Volume, arr: Any, shape: tuple[int, int, int], cfg: VideoPrepConfig,
                  root: str, progress: bool) -> None:
    """One pass: downsample, VoxelDff, write each frame."""
    dff = VoxelDff(shape, cfg.voxel_config())
    queue, free = WriteQueue(3), list[np.ndarray]()
    for t, ds in _frames(raw, cfg.factor, progress, "video dF/F (causal)"):
        out = free.pop() if free else np.empty(shape, np.float32)
        dff.process(ds, out=out)
        queue.submit(arr[:, :, :, t], out, f"{join(root, video_array_name(cfg.level))} frame {t}",
                     on_done=functools.partial(free.append, out))
    queue.drain()


def _write_centered(raw: Volume, arr: Any, shape: tuple[int, int, int], cfg: VideoPrepConfig,
                    root: str, progress: bool) -> None:
    """Downsampled frames -> (T, V) memmap on disk -> centered dF/F per voxel block, in place -> frames."""
    n_t, n_v = raw.n_frames, int(np.prod(shape))
    tmp = tempfile.mkdtemp(prefix=".video-prep-", dir=root)
    try:
        mm = np.lib.format.open_memmap(os.path.join(tmp, "series.npy"), mode="w+", dtype=np.float32,
                                       shape=(n_t, n_v))                              # (T, V)
        for t, ds in _frames(raw, cfg.factor, progress, "video downsample"):
            mm[t] = ds.reshape(-1)
        _centered_blocks(mm, cfg, progress)
        queue, what = WriteQueue(3), join(root, video_array_name(cfg.level))
        for t in tqdm(range(n_t), desc="video write", unit="vol", disable=not progress):
            queue.submit(arr[:, :, :, t], np.array(mm[t]).reshape(shape), f"{what} frame {t}")
        queue.drain()
        del mm
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _centered_blocks(mm: np.memmap, cfg: VideoPrepConfig, progress: bool) -> None:
    """mm (T, V) fluorescence -> centered dF/F in place, `block_voxels` columns at a time."""
    n_v, b = mm.shape[1], cfg.block_voxels
    dff_cfg = cfg.dff_config()
    for v0 in tqdm(range(0, n_v, b), desc="video dF/F (centered)", unit="block", disable=not progress):
        block = np.array(mm[:, v0:v0 + b])                                            # (T, b)
        mm[:, v0:v0 + b] = centered_dff(block, dff_cfg, stride=cfg.stride)
    mm.flush()


def _set_attrs(loc: str, attrs: dict[str, Any]) -> None:
    """Add attributes[ATTRS_KEY] to the array's zarr.json (atomically replaced)."""
    path = Path(loc) / "zarr.json"
    meta = json.loads(path.read_text())
    meta.setdefault("attributes", {})[ATTRS_KEY] = attrs
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(meta, indent=2))
    os.replace(tmp, path)


def video_attrs(rec: Recording, level: int = 2) -> dict[str, Any]:
    """How the level-`level` dF/F volume was made (prepare_video's attributes); {} when it has none."""
    loc = rec.volume("df_over_f", level).location
    blob = read_key(loc, "zarr.json")
    if blob is None:                                   # zarr v2 array: attributes in .zattrs
        blob = read_key(loc, ".zattrs")
        return dict(json.loads(blob).get(ATTRS_KEY, {})) if blob else {}
    return dict(json.loads(blob).get("attributes", {}).get(ATTRS_KEY, {}))


@dataclass(frozen=True)
class VideoDataConfig:
    """Which prepared volume to read (level), the y centre crop (downsampled rows, 0 = none), cache size."""

    level: int = 2
    crop_y: int = 0
    cache_frames: int = 64

    def __post_init__(self) -> None:
        if not 0 <= self.level <= 4 or self.crop_y < 0 or self.cache_frames < 1:
            raise ValueError(f"need level in [0, 4], crop_y >= 0, cache_frames >= 1, got {self.level}, "
                             f"{self.crop_y}, {self.cache_frames}")


class VideoData:
    """Input windows (B, C, X, Ycrop, Z) of a prepared dF/F volume and (B, N) trace targets."""

    def __init__(self, rec: Recording | Location, cfg: VideoDataConfig = VideoDataConfig(),
                 super_resolution: int = 0) -> None:
        self.rec = rec if isinstance(rec, Recording) else Recording.open(rec)
        self.cfg = cfg
        self.volume = _open_prepared(self.rec, cfg.level)
        self.traces: np.ndarray = self.rec.traces()                                   # (T, N)
        self.volume_shape: tuple[int, int, int] = self.rec.volume_shape
        self.factor = 2 ** cfg.level
        _check_geometry(self.volume, self.volume_shape, self.factor, len(self.traces))
        self.crop = centre_crop(self.volume.shape[1], cfg.crop_y)
        x, z = self.volume.shape[0], self.volume.shape[2]
        self.input_shape: tuple[int, int, int] = (x, self.crop[1] - self.crop[0], z)
        k = 2 ** super_resolution
        self.output_shape: tuple[int, int, int] = (x * k, self.input_shape[1] * k, z)
        self.grid = VideoGrid(self.factor, self.crop, super_resolution, self.output_shape)
        self.reducer = VolumeReducer(self.rec.segmentation(), self.grid, n_neurons=self.traces.shape[1])
        self.offsets: tuple[int, ...] = tuple(int(o) for o in self.rec.meta["condition_offsets"])
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()
        self.cache_stats = {"hits": 0, "misses": 0}

    @property
    def n_frames(self) -> int:
        return int(self.traces.shape[0])

    @property
    def n_neurons(self) -> int:
        return int(self.traces.shape[1])

    @property
    def cached_frames(self) -> int:
        """Frames held in the LRU cache now (never more than cfg.cache_frames)."""
        return len(self._cache)

    def manifest_video(self) -> dict[str, Any]:
        """The engine manifest's "video" block."""
        return {"level": self.cfg.level, "factor": self.factor, "crop_y": list(self.crop),
                "super_resolution": self.grid.super_resolution, "input_shape": list(self.input_shape),
                "output_shape": list(self.output_shape), "volume_shape": list(self.volume_shape),
                "dff": video_attrs(self.rec, self.cfg.level)}

    def inputs(self, starts: np.ndarray, context: int) -> np.ndarray:
        """Frames starts .. starts+C-1 of each window -> (B, C, X, Ycrop, Z) float32, C-contiguous."""
        starts = self._check(starts, context, 0)
        frames = self._get(np.unique(starts[:, None] + np.arange(context)))
        out = np.empty((len(starts), context, *self.input_shape), np.float32)        # (B, C, X, Yc, Z)
        for b, s in enumerate(starts):
            for c in range(context):
                out[b, c] = frames[int(s) + c]
        return out

    def targets(self, starts: np.ndarray, context: int, leads: np.ndarray) -> np.ndarray:
        """traces[starts + C - 1 + leads] -> (B, N) float32; leads (B,) >= 1."""
        leads = np.asarray(leads, np.int64)
        if leads.shape != np.shape(starts) or leads.ndim != 1 or (leads < 1).any():
            raise ValueError(f"leads must be (B,) integers >= 1 matching starts {np.shape(starts)}, got "
                             f"{leads.shape} (min {leads.min() if leads.size else None})")
        starts = self._check(starts, context, leads)
        return self.traces[starts + context - 1 + leads]

    def all_targets(self, starts: np.ndarray, context: int, horizon: int) -> np.ndarray:
        """traces[starts + C - 1 + h] for h = 1..H -> (B, H, N) float32."""
        if horizon < 1:
            raise ValueError(f"horizon must be >= 1, got {horizon}")
        starts = self._check(starts, context, horizon)
        return self.traces[starts[:, None] + context - 1 + np.arange(1, horizon + 1)]

    def _check(self, starts: np.ndarray, context: int, reach: int | np.ndarray) -> np.ndarray:
        """starts (B,) as int64; every window [s, s + C + reach) (reach: int or (B,)) must lie inside
        the recording."""
        s = np.asarray(starts)
        if s.ndim != 1 or (s.size and s.dtype.kind not in "iu") or context < 1:
            raise ValueError(f"starts must be a (B,) integer array and context >= 1, got {s.shape} {s.dtype}, "
                             f"context {context}")
        s = s.astype(np.int64)
        end = s + context + reach
        if s.size and (s.min() < 0 or end.max() > self.n_frames):
            raise IndexError(f"windows starting at [{s.min()}, {s.max()}] with context {context} and up to "
                             f"{np.max(reach)} steps ahead leave the recording's {self.n_frames} frames")
        return s

    def _get(self, frames: np.ndarray) -> dict[int, np.ndarray]:
        """{t: cropped (X, Ycrop, Z) frame} for the given frames: cached, or read (several in flight)."""
        got: dict[int, np.ndarray] = {}
        missing = []
        for t in (int(t) for t in frames):
            if t in self._cache:
                self._cache.move_to_end(t)
                got[t] = self._cache[t]
                self.cache_stats["hits"] += 1
            else:
                missing.append(t)
        self.cache_stats["misses"] += len(missing)
        for t, vol in self.volume.stream(missing, READS_IN_FLIGHT):
            got[t] = np.ascontiguousarray(crop_y(vol, self.crop))
            self._remember(t, got[t])
        return got

    def _remember(self, t: int, frame: np.ndarray) -> None:
        self._cache[t] = frame
        while len(self._cache) > self.cfg.cache_frames:
            self._cache.popitem(last=False)


def _open_prepared(rec: Recording, level: int) -> Volume:
    """The level-`level` dF/F volume, or a RecordingError saying how to make it."""
    try:
        return rec.volume("df_over_f", level)
    except RecordingError as exc:
        raise RecordingError(f"{rec.root}: no prepared dF/F video at level {level}; run "
                             f"offline_training.video.data.prepare_video or `loopcast prepare-video "
                             f"{rec.root}` first ({exc})") from exc


def _check_geometry(volume: Volume, full: tuple[int, int, int], factor: int, n_frames: int) -> None:
    expect = (full[0] // factor, full[1] // factor, full[2])
    if volume.shape != expect or volume.n_frames != n_frames:
        raise RecordingError(f"{volume.location}: expected {expect} x {n_frames} frames (volume {full} / "
                             f"{factor} in x, y), found {volume.shape} x {volume.n_frames}")
