"""Ingest: validate each incoming volume against the wire contract and the rig, track sequence numbers.

A bad message (malformed header, wrong shape/dtype, truncated payload, duplicate or out-of-order seq)
is counted in `loopcast_frames_invalid_total{reason}` (one of REASONS), logged once with the reason, and
dropped; the next good frame goes through. Gaps in seq are frames lost upstream: counted as dropped, the
frame is kept. A frame whose header names another `session` than the last one starts a new session: the
seq order starts over (its seq may restart at 0), it is counted in `loopcast_session_changes_total` and
logged, and `Ingest.new_session` tells the pipeline to reset its preprocessing.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from loopcast.realtime.metrics import Metrics
from loopcast.realtime.wire.codec import Frame, FrameHeader, WireError, decode_frame, encode_frame
from loopcast.realtime.wire.shm import ShmReader

log = logging.getLogger(__name__)
LOG_INTERVAL_S = 5.0   # per kind of problem: log the first at once, then at most one line per interval
MAX_SEQ_JUMP = 8  # frames: a longer jump must be confirmed by the next frame (docs/architecture.md, "seq")
# Every label of loopcast_frames_invalid_total{reason} a frame can get (docs/architecture.md lists them).
REASONS = frozenset({
    "bad_parts", "bad_topic", "malformed_header", "bad_version", "bad_kind", "missing_field", "bad_shape",
    "bad_dtype", "bad_order", "truncated_payload", "oversized_payload", "bad_stimulus", "bad_session",
    "duplicate_seq", "out_of_order_seq", "seq_jump", "bad_shm", "shm_unsupported", "shm_overrun", "undecodable"})


class LogThrottle:
    """Log the first occurrence of each kind of problem at once, later ones at most once per interval,
    with how many were not logged in between (the metrics count every one)."""

    def __init__(self, interval_s: float = LOG_INTERVAL_S) -> None:
        self.interval_s = interval_s
        self._last: dict[str, float] = {}
        self._held: dict[str, int] = {}

    def warning(self, key: str, msg: str, *args: Any) -> None:
        now = time.monotonic()
        if now - self._last.get(key, -float("inf")) < self.interval_s:
            self._held[key] = self._held.get(key, 0) + 1
            return
        held = self._held.pop(key, 0)
        self._last[key] = now
        suffix = f" (+{held} more like it in the last {self.interval_s:.0f} s, counted)" if held else ""
        log.warning(msg + suffix, *args)


@dataclass(frozen=True)
class RigConfig:
    """What the microscope sends: volume shape (x, y, z), dtype, frame period, covariate count."""

    name: str = "rig0"
    shape: tuple[int, int, int] = (128, 96, 16)
    dtype: str = "uint16"
    frame_period_s: float = 0.9141
    n_covariates: int = 26

    def __post_init__(self) -> None:
        if any(s <= 0 for s in self.shape) or self.frame_period_s <= 0:
            raise ValueError("rig shape entries and frame_period_s must be positive")
        if not self.name or "/" in self.name or "+" in self.name or "#" in self.name:
            raise ValueError(f"rig name {self.name!r} must be non-empty and free of '/', '+', '#'")


@dataclass(frozen=True)
class Rejection:
    """Why ingest dropped the last message: the counted reason, and its seq / source time where the
    header could be read."""

    reason: str
    seq: int | None = None
    t_src_ns: int | None = None


class Ingest:
    """Stage 1: raw multipart message -> validated `Frame` (or None, counted; `rejected` says why)."""

    def __init__(self, rig: RigConfig, metrics: Metrics, shm_dir: str = "/dev/shm") -> None:
        self.rig = rig
        self.metrics = metrics
        self.shm = ShmReader(shm_dir)   # volumes sent through the shm transport are viewed in place
        self.throttle = LogThrottle()
        self.last_seq: int | None = None
        self.session: str | None = None          # the current session (None until a frame names one)
        self.new_session = False                 # the last accepted frame started a new session
        self.rejected: Rejection | None = None   # the last message's rejection (None when it was accepted)
        self._jumped_to: int | None = None       # the seq of the last frame rejected as a jump
        self._latency = metrics.latency("ingest")

    def setup(self) -> None:
        self.last_seq = None
        self.session = None

    def warm_up(self) -> None:
        """Decode one synthetic frame message of the rig's shape and dtype in each memory order (the
        header codec and the payload view), as `process` would, without counting it or recording its seq."""
        rig = self.rig
        for order in ("F", "C"):
            volume = np.zeros(rig.shape, rig.dtype, order=order)
            header = FrameHeader(seq=0, t_src_ns=time.time_ns(), shape=rig.shape, dtype=rig.dtype, order=order,
                                 rig=rig.name, stimulus=(0.0,) * rig.n_covariates)
            decode_frame(encode_frame(header, volume), rig.shape, rig.dtype, self.shm)

    def process(self, parts: Sequence[Any]) -> Frame | None:
        """The validated frame, or None (counted under its reason in `rejected`); `new_session` says whether
        it started a new session."""
        frame = self.rejected = None
        self.new_session = False
        try:
            frame = self._decode(parts)
            self._check_stimulus(frame)
            self._check_session(frame.header)
            self._check_seq(frame.header.seq)
        except WireError as exc:
            self.metrics.frames_invalid.labels(reason=exc.reason).inc()
            self.throttle.warning(exc.reason, "dropped invalid frame (last good seq %s): %s", self.last_seq, exc)
            h = frame.header if frame is not None else None
            self.rejected = Rejection(exc.reason, h.seq if h else None, h.t_src_ns if h else None)
            return None
        self.metrics.frames_received.inc()
        self._latency.observe_since_ns(frame.header.t_src_ns, time.time_ns())
        return frame

    def close(self) -> None:
        self.shm.close()

    def _decode(self, parts: Sequence[Any]) -> Frame:
        """decode_frame; any other exception on the way (a hostile header reaching a library) is a rejection too."""
        try:
            return decode_frame(parts, self.rig.shape, self.rig.dtype, self.shm)
        except WireError:
            raise
        except Exception as exc:
            raise WireError("undecodable", f"{type(exc).__name__}: {str(exc)[:200]}") from None

    def _check_stimulus(self, frame: Frame) -> None:
        n = len(frame.header.stimulus)
        if n not in (0, self.rig.n_covariates):
            raise WireError("bad_stimulus", f"{n} stimulus covariates, rig has {self.rig.n_covariates}")

    def _check_session(self, header: FrameHeader) -> None:
        """A frame naming another session than the current one (after frames were accepted) starts a new
        session: the seq order starts over. A frame without one belongs to the current session. Nothing
        after this check can reject the frame, so a rejected frame never changes the session."""
        session = header.session
        if not session or session == self.session:
            return
        previous, self.session = self.session, session
        if self.last_seq is None:
            return   # the first frames of a run: nothing to start over
        self.new_session = True
        self.last_seq = self._jumped_to = None
        self.metrics.session_changes.inc()
        self.throttle.warning("new_session", "new session %s (was %s) at seq %s: seq order and preprocessing "
                              "start over", session, previous or "none", header.seq)

    def _check_seq(self, seq: int) -> None:
        """Duplicates and older seqs are rejected; a gap counts the frames lost. A jump of more than
        `MAX_SEQ_JUMP` is rejected too, unless the next frame follows it (seq + 1): a bad header locks out at
        most MAX_SEQ_JUMP - 1 frames after it, and a source that really jumped is followed from its second
        frame (a real gap of more than MAX_SEQ_JUMP frames costs the frame after it)."""
        last = self.last_seq
        if last is not None and seq > last + MAX_SEQ_JUMP:
            confirmed, self._jumped_to = self._jumped_to == seq - 1, seq
            if not confirmed:
                raise WireError("seq_jump", f"seq {seq} is {seq - last} past {last} (max {MAX_SEQ_JUMP}; "
                                f"followed when the next frame is {seq + 1})")
            log.warning("seq jumped from %d to %d and the next frame followed: following it", last, seq)
            self.last_seq = last = seq - 1
        if last is not None:
            if seq == last:
                raise WireError("duplicate_seq", f"seq {seq} repeated")
            if seq < last:
                raise WireError("out_of_order_seq", f"seq {seq} after {last}")
            if seq > last + 1:
                lost = seq - last - 1
                self.metrics.frames_dropped.labels(reason="seq_gap").inc(lost)
                self.throttle.warning("seq_gap", "seq gap: %d frame(s) lost upstream between %d and %d",
                                      lost, last, seq)
        self.last_seq = seq
