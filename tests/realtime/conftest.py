"""Shared fixtures of the realtime tests."""
from __future__ import annotations

from collections.abc import Iterator

import pytest

from loopcast.realtime.wire.transport import Publisher, Subscriber


@pytest.fixture()
def link() -> Iterator[tuple[Publisher, Subscriber]]:
    """A connected XPUB/SUB pair on 127.0.0.1 (topic "frame", deep queues), subscription confirmed."""
    pub = Publisher("tcp://127.0.0.1:*", sndhwm=100)
    sub = Subscriber(pub.endpoint, topics=(b"frame",), rcvhwm=100)
    assert pub.wait_for_subscribers(1, 5.0)
    yield pub, sub
    sub.close()
    pub.close()
