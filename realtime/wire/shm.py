"""Shared-memory volume transport: payloads in a ring of slots on the same host, headers over ZeroMQ.

A full ZAPBench volume is 392 MB; carrying it through a socket costs copies (sender, kernel, receiver).
With `shm`, the producer renders or copies each volume straight into slot `seq % slots` of a file in
/dev/shm and sends only the header (with an `ShmRef`) over ZeroMQ; the consumer maps the file
read-only and views the slot in place. No copy on either side.

Every slot starts with a 64-byte guard [begin, end] (two int64) used as a sequence lock:
  writer: begin = -1; write payload; end = seq; begin = seq
  reader: before and after using the payload, begin == end == seq  (else the slot was reused: a
          consumer that fell `slots` frames behind sees it, counts it and drops the frame).
The guard after use is what makes in-place reading safe: `ShmLease.intact()` is checked once the
volume has been reduced to traces, before anything derived from it is kept.
"""
from __future__ import annotations

import mmap
import os
import secrets
from collections import OrderedDict
from pathlib import Path

import numpy as np

from loopcast.realtime.wire.codec import Order, ShmRef, WireError

GUARD_BYTES = 64          # slot guard; keeps payloads 64-byte aligned
FILE_PREFIX = "loopcast-"
MAX_MAPPINGS = 4          # producers a reader keeps mapped at once (old ones are unmapped)


def _slot_bytes(nbytes: int) -> int:
    return GUARD_BYTES + (nbytes + GUARD_BYTES - 1) // GUARD_BYTES * GUARD_BYTES


class ShmRing:
    """Writer side: `slots` slots for volumes of one shape/dtype/order in one /dev/shm file."""

    def __init__(self, shape: tuple[int, ...], dtype: str, order: Order = "C", slots: int = 4,
                 directory: str = "/dev/shm", tag: str = "frames") -> None:
        if slots < 2:
            raise ValueError(f"an shm ring needs >= 2 slots, got {slots}")
        if order not in ("C", "F"):
            raise ValueError(f"order must be 'C' or 'F', got {order!r}")
        self.shape, self.dtype, self.order, self.slots = tuple(shape), np.dtype(dtype), order, slots
        self.nbytes = int(np.prod(self.shape)) * self.dtype.itemsize
        self.slot_bytes = _slot_bytes(self.nbytes)
        self.path = str(Path(directory) / f"{FILE_PREFIX}{tag}-{os.getpid()}-{secrets.token_hex(4)}")
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, self.slot_bytes * slots)
            self._mm = mmap.mmap(fd, self.slot_bytes * slots)
        finally:
            os.close(fd)
        np.frombuffer(self._mm, np.uint8)[:] = 0   # fault every page in now, not during the first frames
        self._guards = [np.ndarray((2,), np.int64, self._mm, k * self.slot_bytes) for k in range(slots)]
        for g in self._guards:
            g[:] = -1

    def slot_view(self, seq: int) -> np.ndarray:
        """The slot for `seq` as a writable array (no guard change)."""
        k = seq % self.slots
        return np.ndarray(self.shape, self.dtype, self._mm, k * self.slot_bytes + GUARD_BYTES, order=self.order)

    def acquire(self, seq: int) -> np.ndarray:
        """The writable slot for `seq`, marked as being written; fill it, then `commit(seq)`."""
        self._guards[seq % self.slots][0] = -1
        return self.slot_view(seq)

    def commit(self, seq: int) -> ShmRef:
        """Publish slot `seq % slots` as holding frame `seq`; returns the reference for the header."""
        k = seq % self.slots
        self._guards[k][1] = seq
        self._guards[k][0] = seq
        return ShmRef(path=self.path, slot=k, offset=k * self.slot_bytes + GUARD_BYTES, nbytes=self.nbytes,
                      seq=seq)

    def write(self, seq: int, volume: np.ndarray) -> ShmRef:
        """Copy `volume` into the slot for `seq` and commit it."""
        if tuple(volume.shape) != self.shape or volume.dtype != self.dtype:
            raise ValueError(f"volume {volume.shape} {volume.dtype} does not fit ring {self.shape} {self.dtype}")
        np.copyto(self.acquire(seq), volume)
        return self.commit(seq)

    def close(self) -> None:
        """Unmap and remove the file (readers that still map it keep their view until they unmap)."""
        self._guards = []
        try:
            self._mm.close()
        except BufferError:  # a view still exported (e.g. a frame in flight): the OS frees it later
            pass
        Path(self.path).unlink(missing_ok=True)


class ShmLease:
    """A reader's claim on one slot; `intact()` says whether the producer has not reused it since."""

    def __init__(self, guard: np.ndarray, seq: int) -> None:
        self._guard = guard
        self.seq = seq

    def intact(self) -> bool:
        return int(self._guard[0]) == self.seq and int(self._guard[1]) == self.seq


class ShmReader:
    """Reader side: maps producers' ring files read-only (only under `directory`) and views slots."""

    def __init__(self, directory: str = "/dev/shm") -> None:
        self.directory = Path(directory).resolve()
        self._maps: OrderedDict[str, mmap.mmap] = OrderedDict()

    def view(self, ref: ShmRef, shape: tuple[int, ...], dtype: str, order: Order) -> tuple[np.ndarray, ShmLease]:
        """Read-only array on the referenced slot plus its lease; WireError('bad_shm'/'shm_overrun')."""
        dt = np.dtype(dtype)
        want = int(np.prod(shape)) * dt.itemsize
        if ref.nbytes != want:
            raise WireError("bad_shm", f"shm payload {ref.nbytes} B but header says {list(shape)} {dtype}")
        mm = self._map(ref.path)
        if ref.offset < GUARD_BYTES or ref.offset % GUARD_BYTES or ref.offset + ref.nbytes > len(mm):
            raise WireError("bad_shm", f"shm slot at {ref.offset}+{ref.nbytes} B outside {ref.path} ({len(mm)} B)")
        guard = np.ndarray((2,), np.int64, mm, ref.offset - GUARD_BYTES)
        lease = ShmLease(guard, ref.seq)
        if not lease.intact():
            raise WireError("shm_overrun", f"slot {ref.slot} of {ref.path} no longer holds seq {ref.seq}")
        arr = np.ndarray(shape, dt, mm, ref.offset, order=order)
        return arr, lease

    def _map(self, path: str) -> mmap.mmap:
        if path in self._maps:
            self._maps.move_to_end(path)
            return self._maps[path]
        p = Path(path)
        if not p.name.startswith(FILE_PREFIX) or p.resolve().parent != self.directory:
            raise WireError("bad_shm", f"shm path {path!r} is not a loopcast ring in {self.directory}")
        try:
            with open(p, "rb") as fh:
                mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        except (OSError, ValueError) as exc:
            raise WireError("bad_shm", f"cannot map {path}: {exc}") from None
        self._maps[path] = mm
        while len(self._maps) > MAX_MAPPINGS:
            _, old = self._maps.popitem(last=False)
            _close_quietly(old)
        return mm

    def close(self) -> None:
        for mm in self._maps.values():
            _close_quietly(mm)
        self._maps.clear()


def _close_quietly(mm: mmap.mmap) -> None:
    try:
        mm.close()
    except BufferError:  # arrays still view it; the mapping goes when they do
        pass
