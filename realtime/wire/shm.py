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

Faults of the file itself. Touching a mapped page beyond the end of a file that shrank raises SIGBUS, which
kills the process; a copy of each volume to avoid that would cost ~100 ms at 392 MB. So the reader checks the
file's current size (fstat of the mapping, ~1 us) against the slot's offset + nbytes before each access: when
it views a slot (before the guard is read), `ShmLease.mapped()` before the volume is used (the pipeline asks
just before preprocessing) and `ShmLease.intact()` after. A slot the file no longer covers is a counted
rejection (`bad_shm`; after use, `shm_overrun`). The name is looked up again (lstat) at every view: a file
replaced under it (another inode) is mapped anew, one unlinked is still read through its mapping (unlinking
frees nothing while it is mapped, so it cannot fault). Only regular files are opened, with O_NOFOLLOW and
O_NONBLOCK, and only after lstat of the directory entry (relative to the shm directory's descriptor) said
it is one: a FIFO, directory, device or symlink named `loopcast-*` is refused without blocking, and so is a
file of another user (only the pipeline's own user, or root, can then truncate a mapped ring).

Residual race: a file truncated *while* a volume is being read (between the last size check and the end of
the trace reduction: one volume's reduction, milliseconds at ZAPBench scale) still raises SIGBUS. Closing it
takes a copy or a SIGBUS handler around the read (not possible from Python). Only rings of the pipeline's own
user (or root) are mapped, so only that user can cause it.
"""
from __future__ import annotations

import math
import mmap
import os
import secrets
import stat
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


class _Mapped:
    """One ring file a reader maps: its name in the shm directory, its identity (device, inode) and the
    read-only mapping of the size it had when opened (the mapping keeps its own descriptor of the file)."""

    def __init__(self, fd: int, name: str, st: os.stat_result) -> None:
        self.name, self.ident, self.size = name, (st.st_dev, st.st_ino), st.st_size
        self.mm = mmap.mmap(fd, st.st_size, access=mmap.ACCESS_READ)   # ValueError on an empty file

    def size_now(self) -> int:
        """The file's size now (fstat, ~1 us); -1 once unmapped."""
        try:
            return self.mm.size()
        except (OSError, ValueError):
            return -1

    def covers(self, end: int) -> bool:
        """Both the mapping and the file as it is now reach byte `end`: reading below it cannot fault."""
        return end <= self.size and self.size_now() >= end

    def close(self) -> None:
        """Unmap (while arrays still view the mapping, it stays until they go)."""
        _close_quietly(self.mm)


class ShmLease:
    """A reader's claim on one slot: `mapped()` says whether the file still covers the slot (reading it
    cannot fault), `intact()` also whether the producer has not reused the slot since."""

    def __init__(self, ring: _Mapped, guard: np.ndarray, seq: int, end: int) -> None:
        self._ring, self._guard, self._end = ring, guard, end
        self.seq = seq

    def mapped(self) -> bool:
        return self._ring.covers(self._end)

    def intact(self) -> bool:
        return self.mapped() and int(self._guard[0]) == self.seq and int(self._guard[1]) == self.seq


class ShmReader:
    """Reader side: maps producers' ring files read-only (only regular files named `loopcast-*` directly in
    `directory`, never through a symlink) and views slots, each checked against the file's current size."""

    def __init__(self, directory: str = "/dev/shm") -> None:
        self.directory = Path(directory).resolve()
        self._dir_fd: int | None = None
        self._maps: OrderedDict[str, _Mapped] = OrderedDict()

    def view(self, ref: ShmRef, shape: tuple[int, ...], dtype: str, order: Order) -> tuple[np.ndarray, ShmLease]:
        """Read-only array on the referenced slot plus its lease; WireError('bad_shm'/'shm_overrun')."""
        dt = np.dtype(dtype)
        want = math.prod(shape) * dt.itemsize
        if ref.nbytes != want:
            raise WireError("bad_shm", f"shm payload {ref.nbytes} B but header says {list(shape)} {dtype}")
        if ref.offset < GUARD_BYTES or ref.offset % GUARD_BYTES:
            raise WireError("bad_shm", f"shm slot offset {ref.offset} is not a slot's (>= {GUARD_BYTES}, aligned)")
        ring = self._ring(ref.path)
        end = ref.offset + ref.nbytes
        if not ring.covers(end):
            raise WireError("bad_shm", f"shm slot at {ref.offset}+{ref.nbytes} B outside {ref.path} "
                            f"({ring.size} B mapped, {ring.size_now()} B now)")
        guard = np.ndarray((2,), np.int64, ring.mm, ref.offset - GUARD_BYTES)
        lease = ShmLease(ring, guard, ref.seq, end)
        if not lease.intact():
            raise WireError("shm_overrun", f"slot {ref.slot} of {ref.path} no longer holds seq {ref.seq}")
        arr = np.ndarray(shape, dt, ring.mm, ref.offset, order=order)
        return arr, lease

    def _ring(self, path: str) -> _Mapped:
        """The mapping of `path`: the cached one while the name still leads to the same file (or to none: a
        mapping outlives its name), else the file opened and mapped anew."""
        ring = self._maps.get(path)
        name = ring.name if ring is not None else self._name(path)
        st = self._lstat(name)
        if ring is not None and (st is None or (st.st_dev, st.st_ino) == ring.ident):
            self._maps.move_to_end(path)
            return ring
        if ring is not None:   # replaced by another file of the same name
            self._maps.pop(path).close()
        if st is None:
            raise WireError("bad_shm", f"cannot map {path}: no such ring file")
        ring = self._open(name, st)
        self._maps[path] = ring
        while len(self._maps) > MAX_MAPPINGS:
            self._maps.popitem(last=False)[1].close()
        return ring

    def _name(self, path: str) -> str:
        """The file name of a loopcast ring directly in the shm directory, else WireError('bad_shm')."""
        p = Path(path)
        try:
            inside = p.name.startswith(FILE_PREFIX) and p.parent.resolve() == self.directory
        except (OSError, RuntimeError, ValueError):   # a symlink loop, a NUL byte
            inside = False
        if not inside:
            raise WireError("bad_shm", f"shm path {path[:200]!r} is not a loopcast ring in {self.directory}")
        return p.name

    def _dir(self) -> int:
        if self._dir_fd is None:
            try:
                self._dir_fd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            except OSError as exc:
                raise WireError("bad_shm", f"cannot open the shm directory {self.directory}: {exc}") from None
        return self._dir_fd

    def _lstat(self, name: str) -> os.stat_result | None:
        """The directory entry itself (a symlink is not followed); None when there is none."""
        try:
            return os.stat(name, dir_fd=self._dir(), follow_symlinks=False)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise WireError("bad_shm", f"cannot map {name}: {exc}") from None

    def _open(self, name: str, st: os.stat_result) -> _Mapped:
        """Open and map a regular file without blocking (a FIFO, directory, device or symlink is refused
        before it is opened, and again by fstat after, should the entry change in between)."""
        _check_regular(name, st)
        try:
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=self._dir())
        except OSError as exc:
            raise WireError("bad_shm", f"cannot map {name}: {exc}") from None
        try:
            fst = os.fstat(fd)
            _check_regular(name, fst)
            return _Mapped(fd, name, fst)
        except (OSError, ValueError) as exc:
            raise WireError("bad_shm", f"cannot map {name}: {exc}") from None
        finally:
            os.close(fd)   # the mapping holds a descriptor of its own

    def close(self) -> None:
        for ring in self._maps.values():
            ring.close()
        self._maps.clear()
        if self._dir_fd is not None:
            os.close(self._dir_fd)
            self._dir_fd = None


def _check_regular(name: str, st: os.stat_result) -> None:
    """A regular file of this process's user (or root): no one else can truncate a ring under the reader."""
    if not stat.S_ISREG(st.st_mode):
        raise WireError("bad_shm", f"{name} is not a regular file (mode {stat.filemode(st.st_mode)})")
    if st.st_uid not in (os.geteuid(), 0):
        raise WireError("bad_shm", f"{name} belongs to uid {st.st_uid}, not to this process's ({os.geteuid()})")


def _close_quietly(mm: mmap.mmap) -> None:
    try:
        mm.close()
    except BufferError:  # arrays still view it; the mapping goes when they do
        pass
