"""Replay: stream a recording's volumes over ZeroMQ as a rig would, at the recorded rate or faster."""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from tqdm import tqdm

from loopcast.realtime.wire.codec import FrameHeader, encode_frame, new_session_id, volume_order
from loopcast.realtime.wire.transport import Publisher, TransportConfig, VolumeSender
from loopcast.replay.layout import Recording

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReplayConfig:
    """`speed` 1 = the recorded rate, 2 = twice as fast, 0 = as fast as possible. `array`/`level` pick
    the volumes to stream: raw (level 0) as the microscope recorded them, or e.g. df_over_f at level 2."""

    speed: float = 1.0
    array: str = "raw"
    level: int = 0
    start: int = 0
    stop: int = 0              # exclusive; 0 = to the end
    sndhwm: int = 4
    wait_subscribers: int = 1
    wait_timeout_s: float = 30.0
    read_ahead: int = 2

    def __post_init__(self) -> None:
        if self.speed < 0 or self.start < 0 or self.stop < 0 or self.read_ahead < 1:
            raise ValueError("speed, start, stop must be >= 0 and read_ahead >= 1")


@dataclass
class ReplayReport:
    """Frames sent and the achieved rate."""

    frames: int = 0
    seconds: float = 0.0

    @property
    def volumes_per_s(self) -> float:
        return self.frames / self.seconds if self.seconds > 0 else 0.0


class Player:
    """Reads volumes ahead in a worker thread and publishes them on schedule."""

    def __init__(self, recording: Recording, endpoint: str, cfg: ReplayConfig, rig: str,
                 metrics: Any, transport: TransportConfig = TransportConfig()) -> None:
        self.rec = recording
        self.cfg = cfg
        self.rig = rig
        self.metrics = metrics
        self.volumes = recording.volume(cfg.array, cfg.level)
        self.publisher = Publisher(endpoint, sndhwm=cfg.sndhwm)
        self.sender = VolumeSender(self.publisher, transport)
        self.endpoint = self.publisher.endpoint
        self.stimuli = recording.stimuli()
        self.offsets = np.asarray(recording.condition_offsets)
        self.stop_event = threading.Event()
        self.session = new_session_id()   # the frames' `session`: a new one at every `run`

    def frame_range(self) -> range:
        end = self.cfg.stop or self.rec.n_frames
        if not 0 <= self.cfg.start < end <= self.rec.n_frames:
            raise ValueError(f"replay range [{self.cfg.start}, {end}) outside the recording's "
                             f"{self.rec.n_frames} frames")
        return range(self.cfg.start, end)

    def warm_up(self) -> dict[str, float]:
        """Before the first volume is published: one read of the first frame to be sent (the store's
        threads, codecs and first chunks; discarded) and what the sender needs for volumes like it (shm:
        its ring). Returns seconds per part ('read', 'sender'), also logged."""
        t0 = time.perf_counter()
        volume = self.volumes.read(self.frame_range()[0])
        t1 = time.perf_counter()
        self.sender.prepare(volume.shape, str(volume.dtype), volume_order(volume))
        times = {"read": t1 - t0, "sender": time.perf_counter() - t1}
        log.info("replay warm-up before publishing: %s", ", ".join(f"{k} {v * 1e3:.0f} ms" for k, v in times.items()))
        return times

    def run(self, progress: bool = True) -> ReplayReport:
        """Warm up, wait for the subscribers, then send the frames on schedule."""
        frames = self.frame_range()
        self.warm_up()
        if self.cfg.wait_subscribers and not self.publisher.wait_for_subscribers(
                self.cfg.wait_subscribers, self.cfg.wait_timeout_s):
            raise TimeoutError(f"no subscriber on {self.endpoint} after {self.cfg.wait_timeout_s} s")
        period = self.rec.frame_period_s / self.cfg.speed if self.cfg.speed > 0 else 0.0
        self.session = new_session_id()
        log.info("replay session %s: frames %d..%d", self.session, frames.start, frames.stop - 1)
        report = ReplayReport()
        t0 = time.monotonic()
        # frame k is sent while frames k+1 .. k+read_ahead are being read (TensorStore futures)
        stream = self.volumes.stream(frames, read_ahead_frames=self.cfg.read_ahead + 1)
        with tqdm(total=len(frames), unit="vol", disable=not progress, desc="replay") as bar:
            for k, (t, volume) in enumerate(stream):
                if self.stop_event.is_set():
                    break
                staged = self._stage(t, volume)
                delay = t0 + k * period - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                self._send(t, staged)
                report.frames += 1
                bar.update(1)
        report.seconds = time.monotonic() - t0
        return report

    def _stage(self, t: int, volume: np.ndarray) -> np.ndarray:
        """Before frame t is due: with shm, copy it into its ring slot now (392 MB at ZAPBench scale, tens
        of ms), so that at its time only the header goes out, as when a camera has written the volume
        into memory. The source timestamp is taken when it is sent, after this copy, as the simulated
        fish stamps a volume once it is rendered: at replay's 1 volume/s the copy used to sit between
        the stamp and the send, inside every frame's source -> ingest latency."""
        if self.sender.cfg.kind != "shm":
            return volume
        slot = self.sender.buffer(t, volume.shape, str(volume.dtype), volume_order(volume))
        np.copyto(slot, volume)
        return slot

    def _send(self, t: int, volume: np.ndarray) -> None:
        self.sender.send(frame_header(t, volume, self.stimuli, self.offsets, self.rig, self.session), volume)
        self.metrics.frames_sent.inc()

    def stop(self) -> None:
        self.stop_event.set()

    def close(self, linger_ms: int = 0) -> None:
        """Close the sender and the publisher; `linger_ms`: how long queued frames may still leave (see
        `realtime.wire.transport.flush_and_exit_context`)."""
        self.publisher.close(linger_ms)
        self.sender.close()


def frame_header(t: int, volume: np.ndarray, stimuli: np.ndarray, offsets: np.ndarray, rig: str,
                 session: str = "") -> FrameHeader:
    """The header of frame t of a recording, stamped now (seq = t), in `session` ("" = none)."""
    condition = int(np.searchsorted(offsets, t, side="right") - 1)
    return FrameHeader(seq=t, t_src_ns=time.time_ns(), shape=tuple(volume.shape), dtype=str(volume.dtype),
                       order=volume_order(volume), rig=rig, stimulus=tuple(float(x) for x in stimuli[t]),
                       condition=condition, session=session)


def frame_message(t: int, volume: np.ndarray, stimuli: np.ndarray, offsets: np.ndarray, rig: str,
                  session: str = "") -> list[Any]:
    """The wire message for frame t of a recording (payload in the message)."""
    return encode_frame(frame_header(t, volume, stimuli, offsets, rig, session), volume)


class RecordingSource:
    """A recording as a pipeline frame source, in process and without sockets (the recorded twin of
    realtime.wire.transport.Subscriber): the same messages a replay would send, one per call, as fast as
    the pipeline takes them. For offline runs of the real-time code on recorded data."""

    def __init__(self, recording: Recording, rig: str, start: int = 0, stop: int = 0) -> None:
        self.rec = recording
        self.rig = rig
        self.stimuli = recording.stimuli()
        self.offsets = np.asarray(recording.condition_offsets)
        self._next = start
        self._stop = stop or recording.n_frames
        self.session = new_session_id()

    @property
    def finished(self) -> bool:
        return self._next >= self._stop

    def recv_all(self, timeout_ms: int, limit: int = 64) -> list[list[Any]]:
        if self.finished:
            return []
        t = self._next
        self._next += 1
        return [frame_message(t, self.rec.read_volume(t), self.stimuli, self.offsets, self.rig, self.session)]

    def close(self) -> None:
        pass
