"""ZeroMQ transport: a publisher that knows its subscribers, and a subscriber that never falls behind.

`Publisher` binds an XPUB socket (it behaves as PUB for sending, and also reports subscriptions, so a
source can wait until its consumer is really listening instead of losing the first frames to the
slow-joiner effect). `Subscriber` connects a SUB socket with a small high-water mark and returns
everything queued at once, oldest first, so the caller can keep the newest frame and count the rest.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import zmq

from loopcast.realtime.wire.codec import FrameHeader, Order, encode_frame, volume_order
from loopcast.realtime.wire.shm import ShmRing

log = logging.getLogger(__name__)


class Publisher:
    """XPUB bound at `endpoint`; `send` never blocks (a slow subscriber loses messages, not us). Safe to
    share between threads (forecast stages running side by side): a ZeroMQ socket is not, so every use
    of it holds one lock."""

    def __init__(self, endpoint: str, sndhwm: int = 4, ctx: zmq.Context[zmq.Socket[bytes]] | None = None) -> None:
        self.ctx = ctx or zmq.Context.instance()
        self.sock = self.ctx.socket(zmq.XPUB)
        # Report every (un)subscription, not only the first per topic, so subscribers can be counted.
        self.sock.setsockopt(zmq.XPUB_VERBOSE, 1)
        self.sock.setsockopt(zmq.XPUB_VERBOSER, 1)
        self.sock.setsockopt(zmq.SNDHWM, sndhwm)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind(endpoint)
        self.endpoint = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.subscribers = 0
        self._lock = threading.Lock()

    def poll_subscriptions(self, timeout_ms: int = 0) -> int:
        """Read pending (un)subscription notices; returns the current subscriber count."""
        with self._lock:
            while self.sock.poll(timeout_ms, zmq.POLLIN):
                msg = self.sock.recv()
                self.subscribers += 1 if msg[:1] == b"\x01" else -1
                timeout_ms = 0
            return self.subscribers

    def wait_for_subscribers(self, n: int, timeout_s: float) -> bool:
        """Block until `n` subscriptions arrived (True) or the timeout passed (False)."""
        deadline = time.monotonic() + timeout_s
        while self.poll_subscriptions(0) < n:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self.poll_subscriptions(int(min(left, 0.1) * 1000))
        return True

    def send(self, parts: Sequence[Any], track: bool = False) -> Any:
        """Send a multipart message without copying the payload; dropped silently at the HWM.
        With `track`, returns a zmq.MessageTracker that is done once ZeroMQ released the buffers."""
        with self._lock:
            return self.sock.send_multipart(parts, copy=False, track=track)

    def close(self, linger_ms: int = 0) -> None:
        """Close the socket; an ipc:// endpoint's socket file goes too (libzmq >= 4.2 leaves it behind).
        `linger_ms` > 0: messages still queued may leave for that long, once the context is terminated
        (`flush_and_exit_context`); 0 drops them."""
        with self._lock:
            self.sock.close(linger=linger_ms)
        path = self.endpoint.removeprefix("ipc://")
        if path != self.endpoint and not path.startswith("@"):   # "@": Linux's abstract namespace, no file
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)


class Subscriber:
    """SUB connected to `endpoint` for `topic` prefixes; receives without copying payloads."""

    def __init__(self, endpoint: str, topics: Sequence[bytes] = (b"",), rcvhwm: int = 4,
                 ctx: zmq.Context[zmq.Socket[bytes]] | None = None) -> None:
        self.ctx = ctx or zmq.Context.instance()
        self.sock = self.ctx.socket(zmq.SUB)
        self.sock.setsockopt(zmq.RCVHWM, rcvhwm)
        self.sock.setsockopt(zmq.LINGER, 0)
        for t in topics:
            self.sock.setsockopt(zmq.SUBSCRIBE, t)
        self.sock.connect(endpoint)
        self.endpoint = endpoint

    @property
    def finished(self) -> bool:
        """A live stream never finishes; recorded sources do."""
        return False

    def recv_all(self, timeout_ms: int, limit: int = 64) -> list[list[zmq.Frame]]:
        """Wait up to `timeout_ms` for one message, then drain what else is queued (oldest first)."""
        if not self.sock.poll(timeout_ms, zmq.POLLIN):
            return []
        out = [self.sock.recv_multipart(copy=False)]
        while len(out) < limit and self.sock.poll(0, zmq.POLLIN):
            out.append(self.sock.recv_multipart(copy=False))
        return out

    def close(self) -> None:
        self.sock.close(linger=0)


@dataclass(frozen=True)
class TransportConfig:
    """How volumes travel: `zmq` carries the payload in the message (tcp:// or ipc://); `shm` writes it
    into a ring of `shm_slots` slots in `shm_dir` and sends only the header (same host only)."""

    kind: Literal["zmq", "shm"] = "zmq"
    shm_dir: str = "/dev/shm"
    shm_slots: int = 4

    def __post_init__(self) -> None:
        if self.shm_slots < 2:
            raise ValueError(f"shm_slots must be >= 2, got {self.shm_slots}")


_LENT = object()   # pool state of a buffer handed out by `buffer()` and not yet sent


class VolumeSender:
    """A source's outbox: `buffer(seq)` gives memory to render frame `seq` into, `send` publishes it.
    zmq: buffers are pooled and reused only once ZeroMQ is done with them; shm: the buffer IS the slot."""

    POOL = 6

    def __init__(self, publisher: Publisher, cfg: TransportConfig) -> None:
        self.publisher = publisher
        self.cfg = cfg
        self.ring: ShmRing | None = None
        self._pool: list[tuple[np.ndarray, Any]] = []   # (buffer, tracker of its last send or None)

    def buffer(self, seq: int, shape: tuple[int, ...], dtype: str, order: Order = "F") -> np.ndarray:
        """A writable (shape) array in `order` that frame `seq` may be written into before `send`."""
        if self.cfg.kind == "shm":
            return self._ring(shape, dtype, order).acquire(seq)
        for k, (buf, tracker) in enumerate(self._pool):
            if buf.shape == tuple(shape) and buf.dtype == np.dtype(dtype) and volume_order(buf) == order \
                    and (tracker is None or (tracker is not _LENT and tracker.done)):
                self._pool[k] = (buf, _LENT)
                return buf
        buf = np.empty(shape, dtype, order=order)
        if len(self._pool) < self.POOL:
            self._pool.append((buf, _LENT))
        return buf

    def prepare(self, shape: tuple[int, ...], dtype: str, order: Order = "F") -> None:
        """What `send` needs for volumes of this shape, dtype and order, set up before the first is sent:
        shm makes its ring (every page written); zmq needs nothing. Sends nothing."""
        if self.cfg.kind == "shm":
            self._ring(shape, dtype, order)

    def warm_up(self, shape: tuple[int, ...], dtype: str, order: Order = "F") -> np.ndarray:
        """`prepare`, and for a source that renders into `buffer`: returns memory it may write a throwaway
        volume into to warm itself up, the buffer frame 0 will get: the shm slot of frame 0 (marked as
        being written; frame 0 overwrites and commits it) or a new pooled zmq buffer (pages written,
        free). Sends nothing."""
        if self.cfg.kind == "shm":
            return self._ring(shape, dtype, order).acquire(0)
        buf = np.empty(shape, dtype, order=order)
        buf.fill(0)
        if len(self._pool) < self.POOL:
            self._pool.append((buf, None))
        return buf

    def send(self, header: FrameHeader, volume: np.ndarray) -> None:
        """Publish frame `header.seq` (header.order is taken from the volume's memory layout)."""
        header = dataclasses.replace(header, order=volume_order(volume))
        if self.cfg.kind == "shm":
            ring = self._ring(volume.shape, str(volume.dtype), header.order)
            in_slot = np.shares_memory(volume, ring.slot_view(header.seq))
            ref = ring.commit(header.seq) if in_slot else ring.write(header.seq, volume)
            self.publisher.send(encode_frame(dataclasses.replace(header, shm=ref), None))
            return
        tracker = self.publisher.send(encode_frame(header, volume), track=True)
        for k, (buf, _) in enumerate(self._pool):
            if buf is volume:
                self._pool[k] = (buf, tracker)

    def _ring(self, shape: tuple[int, ...], dtype: str, order: Order) -> ShmRing:
        r = self.ring
        if r is None or r.shape != tuple(shape) or r.dtype != np.dtype(dtype) or r.order != order:
            if r is not None:
                r.close()
            self.ring = r = ShmRing(tuple(shape), dtype, order, self.cfg.shm_slots, self.cfg.shm_dir)
        return r

    def close(self) -> None:
        if self.ring is not None:
            self.ring.close()
            self.ring = None
        self._pool.clear()


def flush_and_exit_context(timeout_ms: int) -> None:
    """A source process's last step (`loopcast replay`, `loopcast sim`): terminate its ZeroMQ context, giving the
    messages its closed publishers still queue up to their linger, and any socket left open `timeout_ms`, to
    leave. Without it the last frames of a run were lost when the process exited. Only where nothing else
    in the process uses the shared context afterwards."""
    zmq.Context.instance().destroy(linger=timeout_ms)

