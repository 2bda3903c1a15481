"""A frame consumer in its own process, for transport benchmarks: SUB + Ingest, nothing else.

It records, per valid frame, source -> ingest latency (the header's source timestamp to the end of
validation, as realtime.ingest measures it) and reads one value per z-plane so that a shared-memory
payload is really touched. Results go back to the parent over a multiprocessing pipe.
"""
from __future__ import annotations

import multiprocessing as mp
import time
from dataclasses import dataclass, field
from typing import Any


@dataclass
class ConsumerResult:
    """What the consumer saw."""

    received: int = 0
    invalid: dict[str, float] = field(default_factory=dict)
    seq_gaps: float = 0.0
    latency_s: list[float] = field(default_factory=list)
    first_seq: int = -1
    last_seq: int = -1


def _consume(endpoint: str, shape: tuple[int, int, int], dtype: str, shm_dir: str, idle_s: float,
             ready: Any, conn: Any) -> None:
    from loopcast.realtime.ingest import Ingest, RigConfig
    from loopcast.realtime.metrics import Metrics
    from loopcast.realtime.wire.transport import Subscriber

    metrics = Metrics("bench-consumer")
    ingest = Ingest(RigConfig(name="bench", shape=shape, dtype=dtype), metrics, shm_dir)
    sub = Subscriber(endpoint, topics=(b"frame",), rcvhwm=4)
    res, last = ConsumerResult(), None
    ready.set()
    while True:
        msgs = sub.recv_all(200)
        now = time.monotonic()
        if not msgs:
            if last is not None and now - last > idle_s:
                break
            continue
        last = now
        for m in msgs:
            frame = ingest.process(m)
            if frame is None:
                continue
            _ = int(frame.data[0, 0, :].sum())       # touch every z-plane of the payload
            res.latency_s.append((time.time_ns() - frame.header.t_src_ns) / 1e9)
            res.first_seq = frame.header.seq if res.first_seq < 0 else res.first_seq
            res.last_seq = frame.header.seq
            res.received += 1
    counters = metrics.counters()
    res.invalid = {k: v for k, v in counters.items() if k.startswith("loopcast_frames_invalid")}
    res.seq_gaps = sum(v for k, v in counters.items() if "seq_gap" in k)
    sub.close()
    ingest.close()
    conn.send(res)


class Consumer:
    """Start with `start()` (returns once subscribed), collect with `result()` after the source stops."""

    def __init__(self, endpoint: str, shape: tuple[int, int, int], dtype: str, shm_dir: str = "/dev/shm",
                 idle_s: float = 5.0) -> None:
        ctx = mp.get_context("spawn")
        self._ready = ctx.Event()
        self._recv, send = ctx.Pipe(duplex=False)
        self.proc = ctx.Process(target=_consume, args=(endpoint, tuple(shape), dtype, shm_dir, idle_s,
                                                       self._ready, send), daemon=True)

    def start(self, timeout_s: float = 60.0) -> None:
        self.proc.start()
        if not self._ready.wait(timeout_s):
            raise TimeoutError("consumer did not start")

    def result(self, timeout_s: float = 120.0) -> ConsumerResult:
        if not self._recv.poll(timeout_s):
            self.proc.kill()
            raise TimeoutError("consumer did not report")
        res = self._recv.recv()
        self.proc.join(10)
        return res

