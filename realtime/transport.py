"""ZeroMQ transport: a publisher that knows its subscribers, and a subscriber that never falls behind.

`Publisher` binds an XPUB socket (it behaves as PUB for sending, and also reports subscriptions, so a
source can wait until its consumer is really listening instead of losing the first frames to the
slow-joiner effect). `Subscriber` connects a SUB socket with a small high-water mark and returns
everything queued at once, oldest first, so the caller can keep the newest frame and count the rest.
"""
from __future__ import annotations

import logging
import time
from typing import Any, Sequence

import zmq

log = logging.getLogger(__name__)


class Publisher:
    """XPUB bound at `endpoint`; `send` never blocks (a slow subscriber loses messages, not us)."""

    def __init__(self, endpoint: str, sndhwm: int = 4, ctx: zmq.Context | None = None) -> None:
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

    def poll_subscriptions(self, timeout_ms: int = 0) -> int:
        """Read pending (un)subscription notices; returns the current subscriber count."""
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

    def send(self, parts: Sequence[Any]) -> None:
        """Send a multipart message without copying the payload; dropped silently at the HWM."""
        self.sock.send_multipart(parts, copy=False)

    def close(self) -> None:
        self.sock.close(linger=0)


class Subscriber:
    """SUB connected to `endpoint` for `topic` prefixes; receives without copying payloads."""

    def __init__(self, endpoint: str, topics: Sequence[bytes] = (b"",), rcvhwm: int = 4,
                 ctx: zmq.Context | None = None) -> None:
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
