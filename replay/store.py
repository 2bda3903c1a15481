"""TensorStore access to zarr arrays at a local path, a file:// URL or a gs://bucket/path URL.

One code path for all three: `kvstore_spec` turns a location into a TensorStore kvstore spec (the gcs driver
streams the public ZAPBench release, gs://zapbench-release/volumes/20240930/..., with no download step),
`open_array` opens an array read-only with the driver its metadata names (zarr3 for zarr.json, zarr v2 for
.zarray) and validates it, and every failure becomes a RecordingError naming the full path or URL.
Writing: `create_array` with ZAPBench's codec chain (`BloscCodec`), `WriteQueue` bounds the writes in flight
and `BufferPool` recycles their source buffers; reading: `read_ahead` bounds the reads in flight.
"""
from __future__ import annotations

import json
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tensorstore as ts

from loopcast.realtime.wire.codec import volume_order

Location = str | Path
ZARR3, ZARR2 = "zarr3", "zarr"
# Public-bucket reads retry transient failures a few times (TensorStore's default, 32 retries with up to 32 s
# between them, leaves an unreachable network hanging for many minutes before it reports).
CONTEXT_SPEC: dict[str, Any] = {
    "gcs_request_retries": {"max_retries": 5, "initial_delay": "1s", "max_delay": "4s"}}
_CONTEXT: ts.Context | None = None


class RecordingError(ValueError):
    """A recording or array that is missing, incomplete or not in the expected layout; names the path."""


def context() -> ts.Context:
    """The TensorStore context shared by every array opened here (one gcs/file I/O pool, no chunk cache)."""
    global _CONTEXT
    if _CONTEXT is None:
        _CONTEXT = ts.Context(CONTEXT_SPEC)
    return _CONTEXT


def set_threads(threads: int) -> None:
    """Bound TensorStore's data-copy pool (chunk decoding and encoding: its CPU work) to `threads` for the
    arrays opened from now on (the process's [runtime] tensorstore_threads, set at its start)."""
    global _CONTEXT
    if threads < 1:
        raise ValueError(f"TensorStore threads must be >= 1, got {threads}")
    CONTEXT_SPEC["data_copy_concurrency"] = {"limit": threads}
    _CONTEXT = None


# ---------------------------------------------------------------- locations

def normalize(location: Location) -> str:
    """A location as a string: gs:// URLs kept, file:// URLs and paths become plain local paths."""
    loc = str(location)
    if loc.startswith("file://"):
        loc = loc[len("file://"):]
    if loc.startswith("gs://"):
        return "gs://" + "/".join(p for p in loc[len("gs://"):].split("/") if p)
    if "://" in loc:
        raise RecordingError(f"{loc}: unsupported location (expected a local path, file:// or gs:// URL)")
    return loc.rstrip("/") or loc


def is_remote(location: Location) -> bool:
    """Whether the location is a gs:// URL (no local directory to check or write)."""
    return normalize(location).startswith("gs://")


def join(location: Location, *names: str) -> str:
    """`location/name/...` for paths and URLs alike."""
    parts = [normalize(location), *(n.strip("/") for n in names if n.strip("/"))]
    return "/".join(parts)


def kvstore_spec(location: Location) -> dict[str, Any]:
    """TensorStore kvstore spec of a directory-like location (the path ends in '/')."""
    loc = normalize(location)
    if loc.startswith("gs://"):
        bucket, _, path = loc[len("gs://"):].partition("/")
        if not bucket:
            raise RecordingError(f"{loc}: gs:// URL without a bucket")
        return {"driver": "gcs", "bucket": bucket, "path": f"{path}/" if path else ""}
    return {"driver": "file", "path": os.path.abspath(loc) + "/"}


def read_key(location: Location, key: str) -> bytes | None:
    """Bytes stored under `location/key`, or None when the key is absent."""
    try:
        kv = ts.KvStore.open(kvstore_spec(location), context=context()).result()
        res = kv.read(key).result()
    except Exception as exc:  # I/O, permissions, network
        raise RecordingError(f"{join(location, key)}: cannot read: {exc}") from exc
    return bytes(res.value) if res.state == "value" else None


# ---------------------------------------------------------------- opening and checking

@dataclass(frozen=True)
class Expect:
    """What an array must look like: shape (None = any size on that axis; its length is the rank), allowed
    dtypes ('integer' = any integer dtype, 'any' = anything) and, when the store has labels, the labels."""

    shape: tuple[int | None, ...]
    dtypes: tuple[str, ...]
    labels: tuple[str, ...] | None = None

    def describe(self) -> str:
        dims = ["?" if s is None else str(s) for s in self.shape]
        shape = f"({dims[0]},)" if len(dims) == 1 else "(" + ", ".join(dims) + ")"
        return f"{shape} {'|'.join(self.dtypes)}"


def detect_driver(location: Location) -> str:
    """'zarr3' when location/zarr.json holds an array, 'zarr' (v2) when location/.zarray exists."""
    loc = normalize(location)
    blob = read_key(loc, "zarr.json")
    if blob is not None:
        try:
            meta = json.loads(blob)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise RecordingError(f"{join(loc, 'zarr.json')}: corrupt zarr.json: {exc}") from exc
        if not isinstance(meta, dict) or meta.get("node_type") != "array":
            kind = meta.get("node_type") if isinstance(meta, dict) else type(meta).__name__
            raise RecordingError(f"{loc}: expected a zarr array, found node_type {kind!r}")
        return ZARR3
    if read_key(loc, ".zarray") is not None:
        return ZARR2
    raise RecordingError(f"{loc}: array missing (no zarr.json or .zarray)")


def exists(location: Location) -> bool:
    """Whether an array's metadata (zarr.json or .zarray) is present at `location`."""
    return read_key(location, "zarr.json") is not None or read_key(location, ".zarray") is not None


def open_array(location: Location, expect: Expect | None = None) -> ts.TensorStore:
    """Open the zarr array at `location` read-only (driver autodetected) and check it against `expect`."""
    loc = normalize(location)
    driver = detect_driver(loc)
    try:
        arr = ts.open({"driver": driver, "kvstore": kvstore_spec(loc)}, read=True, open=True,
                      context=context()).result()
    except Exception as exc:  # metadata that parses as JSON but is not valid zarr
        raise RecordingError(f"{loc}: unreadable {driver} array: {exc}") from exc
    if expect is not None:
        check(arr, loc, expect)
    return arr


def dtype_of(arr: ts.TensorStore) -> np.dtype:
    """The numpy dtype of a TensorStore array."""
    return np.dtype(arr.dtype.numpy_dtype)


def labels_of(arr: ts.TensorStore) -> tuple[str, ...] | None:
    """Dimension labels, or None when the store has none (zarr v2, or zarr v3 without dimension_names)."""
    labels = tuple(arr.domain.labels)
    return labels if any(labels) else None


def check(arr: ts.TensorStore, location: str, expect: Expect) -> None:
    """Raise RecordingError naming `location` unless arr matches `expect`."""
    shape, dtype = tuple(arr.shape), dtype_of(arr)
    ok_shape = len(shape) == len(expect.shape) and all(w is None or w == s for w, s in zip(expect.shape, shape))
    ok_dtype = any(d == "any" or (np.issubdtype(dtype, np.integer) if d == "integer" else dtype == np.dtype(d))
                   for d in expect.dtypes)
    if not (ok_shape and ok_dtype):
        raise RecordingError(f"{location}: expected shape {expect.describe()}, found {shape} {dtype}")
    labels = labels_of(arr)
    if expect.labels is not None and labels is not None and labels != expect.labels:
        raise RecordingError(f"{location}: expected dimension labels {list(expect.labels)}, found {list(labels)}")


# ---------------------------------------------------------------- creating

@dataclass(frozen=True)
class BloscCodec:
    """Blosc settings of the codec chain (ZAPBench's by default: zstd level 4, byte shuffle).
    E.g. BloscCodec('lz4', 1, 'bitshuffle') writes several times faster at a somewhat larger size."""

    cname: str = "zstd"
    clevel: int = 4
    shuffle: str = "shuffle"      # noshuffle | shuffle | bitshuffle
    blocksize: int = 0

    def __post_init__(self) -> None:
        if self.cname not in ("blosclz", "lz4", "lz4hc", "snappy", "zlib", "zstd") or not 0 <= self.clevel <= 9:
            raise ValueError(f"bad blosc codec: cname {self.cname!r}, clevel {self.clevel}")
        if self.shuffle not in ("noshuffle", "shuffle", "bitshuffle"):
            raise ValueError(f"bad blosc shuffle {self.shuffle!r}")

    def config(self, itemsize: int) -> dict[str, Any]:
        """The zarr3 blosc codec entry."""
        return {"name": "blosc", "configuration": {"cname": self.cname, "clevel": self.clevel,
                                                   "shuffle": self.shuffle, "typesize": itemsize,
                                                   "blocksize": self.blocksize}}

    def zarr2_config(self) -> dict[str, Any]:
        """The zarr v2 (numcodecs) compressor entry."""
        shuffle = {"noshuffle": 0, "shuffle": 1, "bitshuffle": 2}[self.shuffle]
        return {"id": "blosc", "cname": self.cname, "clevel": self.clevel, "shuffle": shuffle,
                "blocksize": self.blocksize}


ZAPBENCH_CODEC = BloscCodec()


def clip_chunks(chunks: tuple[int, ...], shape: tuple[int, ...]) -> tuple[int, ...]:
    """Chunk shape no larger than the array on any axis (never chunk past the extent)."""
    return tuple(max(1, min(c, s)) for c, s in zip(chunks, shape))


def codec_chain(dtype: str, rank: int, codec: BloscCodec | None, fortran: bool) -> list[dict[str, Any]]:
    """zarr3 codecs: [transpose to x-fastest] + little-endian bytes [+ blosc]."""
    chain: list[dict[str, Any]] = []
    if fortran and rank > 1:
        chain.append({"name": "transpose", "configuration": {"order": list(range(rank))[::-1]}})
    if np.dtype(dtype).itemsize > 1:
        chain.append({"name": "bytes", "configuration": {"endian": "little"}})
    else:
        chain.append({"name": "bytes", "configuration": {}})
    if codec is not None:
        chain.append(codec.config(np.dtype(dtype).itemsize))
    return chain


def zarr3_metadata(shape: tuple[int, ...], dtype: str, chunks: tuple[int, ...], labels: tuple[str, ...] | None,
                   codec: BloscCodec | None, fortran: bool) -> dict[str, Any]:
    """zarr.json contents (less node_type / zarr_format) of a new zarr3 array; chunks clipped to the shape."""
    meta: dict[str, Any] = {
        "shape": list(shape), "data_type": np.dtype(dtype).name,
        "fill_value": False if np.dtype(dtype) == np.bool_ else 0,
        "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": list(clip_chunks(chunks, shape))}},
        "codecs": codec_chain(dtype, len(shape), codec, fortran)}
    if labels is not None:
        meta["dimension_names"] = list(labels)
    return meta


def zarr2_metadata(shape: tuple[int, ...], dtype: str, chunks: tuple[int, ...],
                   codec: BloscCodec | None) -> dict[str, Any]:
    """.zarray contents of a new zarr v2 array (C order); chunks clipped to the shape."""
    return {"shape": list(shape), "chunks": list(clip_chunks(chunks, shape)), "dtype": np.dtype(dtype).str,
            "compressor": None if codec is None else codec.zarr2_config(), "order": "C", "fill_value": 0}


def create_array(location: Location, shape: tuple[int, ...], dtype: str, chunks: tuple[int, ...], *,
                 labels: tuple[str, ...] | None = None, codec: BloscCodec | None = ZAPBENCH_CODEC,
                 fortran: bool = False, units: tuple[tuple[float, str], ...] | None = None,
                 zarr_format: int = 3) -> ts.TensorStore:
    """Create a new zarr array at `location` and open it for writing: zarr3 (x-fastest storage with
    fortran=True, optional dimension units) or zarr v2 (stimuli_features)."""
    loc, shape = normalize(location), tuple(int(s) for s in shape)
    if zarr_format == 2:
        spec: dict[str, Any] = {"driver": ZARR2, "metadata": zarr2_metadata(shape, dtype, chunks, codec)}
    else:
        spec = {"driver": ZARR3, "metadata": zarr3_metadata(shape, dtype, chunks, labels, codec, fortran)}
        if units is not None:
            spec["schema"] = {"dimension_units": [list(u) for u in units]}
    spec["kvstore"] = kvstore_spec(loc)
    try:
        return ts.open(spec, create=True, open=False, context=context()).result()
    except Exception as exc:
        raise RecordingError(f"{loc}: cannot create array: {exc}") from exc


# ---------------------------------------------------------------- asynchronous I/O

class WriteQueue:
    """At most `max_in_flight` TensorStore writes pending; a failed write raises RecordingError on the
    next submit() or at drain(). Keeps each write's source array alive until the write is committed,
    then calls its `on_done` (e.g. to recycle the buffer)."""

    def __init__(self, max_in_flight: int = 3) -> None:
        if max_in_flight < 1:
            raise ValueError(f"max_in_flight must be >= 1, got {max_in_flight}")
        self.max_in_flight = max_in_flight
        self._pending: deque[tuple[ts.WriteFutures, str, np.ndarray, Callable[[], None] | None]] = deque()

    def make_room(self) -> None:
        """Collect finished writes and wait until fewer than max_in_flight are pending."""
        while self._pending and (self._pending[0][0].done() or len(self._pending) >= self.max_in_flight):
            self._wait_oldest()

    def submit(self, target: ts.TensorStore, data: np.ndarray, what: str,
               on_done: Callable[[], None] | None = None) -> None:
        """Start writing `data` (which must not change until on_done) into `target`; `what` names it in errors."""
        self.make_room()
        self._pending.append((target.write(data), what, data, on_done))

    def _wait_oldest(self) -> None:
        fut, what, _, on_done = self._pending.popleft()
        try:
            fut.result()
        except Exception as exc:
            self._pending.clear()
            raise RecordingError(f"{what}: write failed: {exc}") from exc
        if on_done is not None:
            on_done()

    def drain(self) -> None:
        """Wait for every pending write; raise the first failure."""
        while self._pending:
            self._wait_oldest()

    def __len__(self) -> int:
        return len(self._pending)


class BufferPool:
    """Reusable volume-sized arrays: fresh 400 MB allocations page-fault (~1 s per full ZAPBench volume
    on a small VM), while copying into a recycled buffer of the same memory order takes ~20 ms."""

    def __init__(self) -> None:
        self._free: dict[tuple[Any, ...], list[np.ndarray]] = {}

    @staticmethod
    def _key(arr: np.ndarray) -> tuple[Any, ...]:
        return arr.shape, arr.dtype.str, volume_order(arr)

    def copy(self, arr: np.ndarray) -> np.ndarray:
        """A copy of `arr` in the same memory order, in a recycled buffer when one is free."""
        key = self._key(arr)
        free = self._free.get(key)
        buf = free.pop() if free else np.empty(arr.shape, arr.dtype, order=key[2])
        np.copyto(buf, arr)
        return buf

    def release(self, buf: np.ndarray) -> None:
        """Give a buffer back once nothing reads it any more."""
        self._free.setdefault(self._key(buf), []).append(buf)


def read_ahead(start: Callable[[int], ts.Future], frames: Iterable[int], depth: int = 2,
               what: str = "") -> Iterator[tuple[int, np.ndarray]]:
    """Yield (t, array) for each frame in order with up to `depth` reads (TensorStore futures) in flight."""
    if depth < 1:
        raise ValueError(f"read-ahead depth must be >= 1, got {depth}")
    pending: deque[tuple[int, ts.Future]] = deque()
    for t in frames:
        pending.append((t, start(t)))
        if len(pending) >= depth:
            yield _result(*pending.popleft(), what)
    while pending:
        yield _result(*pending.popleft(), what)


def _result(t: int, fut: ts.Future, what: str) -> tuple[int, np.ndarray]:
    try:
        return t, fut.result()
    except Exception as exc:
        raise RecordingError(f"{what}: reading frame {t} failed: {exc}") from exc
