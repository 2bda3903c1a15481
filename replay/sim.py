"""Live simulation: the synthetic fish imaged frame by frame at frame rate, listening for triggers.

Frames go out on ZeroMQ exactly as a microscope's would. Trigger commands arriving on MQTT
(`loopcast/<rig>/trigger`) stimulate the commanded neurons of the fish (after its opto latency);
a response tracker measures how much stimulated neurons fire compared with themselves unstimulated.
`fault_every` injects malformed messages between good frames to exercise a pipeline's defences.
With the fish's rigid motion on (replay/motion.py), the true shift of every frame sent is kept: in the report
(`shifts`, hence sim.summary.json) and, when `shifts_path` is given, in an .npy file rewritten every
SHIFTS_FLUSH_FRAMES frames and at close (a (frames, 3) float32 array, x, y, z voxels, row = frame seq).
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiomqtt
import numpy as np

from loopcast.realtime.wire.codec import (
    FrameHeader,
    TriggerCommand,
    WireError,
    encode_frame,
    mqtt_topic,
    new_session_id,
    volume_order,
)
from loopcast.realtime.wire.mqtt_security import MqttSecurity, MqttSecurityError, client_options, explain
from loopcast.realtime.wire.transport import Publisher, TransportConfig, VolumeSender
from loopcast.replay.fish import FishFrame, FishModel, stimulus_schedule

log = logging.getLogger(__name__)
FAULT_KINDS = ("duplicate_seq", "malformed_header", "truncated_payload", "bad_dtype")
RECONNECT_S = 0.2       # the trigger listener's first wait after losing the broker; doubles up to
RECONNECT_MAX_S = 5.0   # this
SHIFTS_FLUSH_FRAMES = 64  # the shifts file is rewritten this often (frames)


@dataclass(frozen=True)
class SimConfig:
    """Pacing and behaviour of the live simulated rig."""

    speed: float = 1.0             # 1 = the rig's frame rate, 10 = ten times faster, 0 = as fast as possible
    n_frames: int = 0              # 0 = until stopped
    schedule_frames: int = 1200    # length of the stimulus protocol, repeated
    sndhwm: int = 4
    wait_subscribers: int = 1      # frames start once this many subscribers listen
    wait_timeout_s: float = 30.0
    reference_power_mw: float = 5.0  # a trigger at this power gives the fish's configured opto response
    fault_every: int = 0           # inject one malformed message after every k-th frame (0 = never)

    def __post_init__(self) -> None:
        if self.speed < 0 or self.n_frames < 0 or self.schedule_frames < 1 or self.fault_every < 0:
            raise ValueError("speed, n_frames, fault_every must be >= 0 and schedule_frames >= 1")


class ResponseTracker:
    """Per-neuron spike and fluorescence sums split by 'under stimulation' or not."""

    def __init__(self, n: int) -> None:
        self.spk = np.zeros((2, n))
        self.flu = np.zeros((2, n))
        self.frames = np.zeros((2, n))

    def update(self, f: FishFrame) -> None:
        on = f.stimulated.astype(np.float64)
        for k, w in ((0, 1.0 - on), (1, on)):
            self.spk[k] += f.spikes * w
            self.flu[k] += f.fluorescence * w
            self.frames[k] += w

    def summary(self) -> dict[str, float]:
        """Rates of ever-stimulated neurons when stimulated vs not (the fish's response)."""
        sel = (self.frames[1] > 0) & (self.frames[0] > 0)
        if not sel.any():
            return {"stimulated_neurons": 0}
        rate = self.spk[:, sel].sum(axis=1) / self.frames[:, sel].sum(axis=1)
        flu = self.flu[:, sel].sum(axis=1) / self.frames[:, sel].sum(axis=1)
        return {"stimulated_neurons": int(sel.sum()), "stimulated_neuron_frames": float(self.frames[1].sum()),
                "rate_off": float(rate[0]), "rate_on": float(rate[1]),
                "rate_ratio": float(rate[1] / max(rate[0], 1e-9)),
                "fluorescence_ratio": float(flu[1] / max(flu[0], 1e-9))}


@dataclass
class SimReport:
    """What a simulation run did."""

    frames: int = 0
    faults: int = 0
    triggers_received: int = 0
    triggers_invalid: int = 0
    stimulations: list[dict[str, Any]] = field(default_factory=list)
    response: dict[str, float] = field(default_factory=dict)
    shifts: list[list[float]] = field(default_factory=list)   # true (x, y, z) shift per frame (motion on only)


class LiveSim:
    """Streams the fish at `speed` x frame rate on `endpoint`; applies MQTT triggers if `mqtt` is given
    (the broker's host and port; `security`: the login and TLS of [mqtt])."""

    def __init__(self, fish: FishModel, cfg: SimConfig, rig: str, endpoint: str, metrics: Any,
                 mqtt: tuple[str, int] | None = None, transport: TransportConfig = TransportConfig(),
                 security: MqttSecurity | None = None, shifts_path: str | Path | None = None) -> None:
        self.fish = fish
        self.shifts_path = Path(shifts_path) if shifts_path is not None and fish.cfg.motion.enabled else None
        self.cfg = cfg
        self.rig = rig
        self.metrics = metrics
        self.mqtt = mqtt
        self.security = security or MqttSecurity()
        self.publisher = Publisher(endpoint, sndhwm=cfg.sndhwm)
        self.sender = VolumeSender(self.publisher, transport)
        self.endpoint = self.publisher.endpoint
        self.schedule = stimulus_schedule(fish.cfg, cfg.schedule_frames)
        self.tracker = ResponseTracker(fish.cfg.n_neurons)
        self.report = SimReport()
        self.render_s: list[float] = []      # seconds per fish.step, for benchmarks
        self.session = new_session_id()      # the frames' `session`: a new one at every start of _stream
        self.mqtt_ready = asyncio.Event()

    def warm_up(self) -> dict[str, float]:
        """Before the first frame is published: the sender's buffers for the fish's volumes (zmq: a pooled
        buffer; shm: the ring) and one blank render into them (the renderer's threads, the pages), without
        advancing the fish or drawing from its random streams, so its frames are what an unwarmed sim sends.
        Returns seconds per part ('sender', 'render'), also logged."""
        t0 = time.perf_counter()
        out = self.sender.warm_up(self.fish.cfg.shape, "uint16", "F")
        t1 = time.perf_counter()
        self.fish.warm_up(out)
        times = {"sender": t1 - t0, "render": time.perf_counter() - t1}
        log.info("sim warm-up before publishing: %s", ", ".join(f"{k} {v * 1e3:.0f} ms" for k, v in times.items()))
        return times

    async def run(self, stop: asyncio.Event) -> SimReport:
        """Warm up, then stream until `stop` is set or n_frames were sent; returns the report."""
        await asyncio.to_thread(self.warm_up)
        if self.mqtt is None:
            await self._stream(stop)
        else:
            await self._stream_listening(self.mqtt, stop)
        self.report.response = self.tracker.summary()
        return self.report

    async def _stream_listening(self, broker: tuple[str, int], stop: asyncio.Event) -> None:
        """Stream while applying the triggers from MQTT. A refused first connection raises MqttError with one
        line naming the broker and the cause, before any frame; a connection lost later is retried with
        backoff while the fish streams on (triggers published meanwhile are lost: the controller, which
        loses the broker too, disarms)."""
        listener = asyncio.create_task(self._listen_forever(*broker))
        ready = asyncio.create_task(self.mqtt_ready.wait())
        await asyncio.wait({listener, ready}, return_when=asyncio.FIRST_COMPLETED)
        ready.cancel()
        if listener.done():
            listener.result()   # the first connection was refused: raise it
        try:
            await self._stream(stop)
        finally:
            listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await listener

    async def _listen_forever(self, host: str, port: int) -> None:
        """Subscribe to the trigger topic and apply what comes; reconnect after a loss (RECONNECT_S, doubling
        to RECONNECT_MAX_S), counted in loopcast_errors_total{kind="mqtt_connection"}."""
        delay, connected = RECONNECT_S, False
        while True:
            try:
                async with aiomqtt.Client(host, port, identifier=f"loopcast-sim-{self.rig}-{time.time_ns()}",
                                          **client_options(self.security)) as c:
                    await c.subscribe(mqtt_topic(self.rig, "trigger"), qos=1)
                    if connected:
                        log.warning("trigger listener: reconnected to the broker %s:%d", host, port)
                    connected, delay = True, RECONNECT_S
                    self.mqtt_ready.set()
                    await self._listen(c)
            except (aiomqtt.MqttError, MqttSecurityError) as exc:
                line = explain(exc, host, port, self.security)
                if not connected:
                    raise aiomqtt.MqttError(line) from exc
                self.metrics.errors.labels(kind="mqtt_connection").inc()
                log.error("trigger listener: lost the broker (%s); reconnecting in %.1f s", line, delay)
            await asyncio.sleep(delay)
            delay = min(2 * delay, RECONNECT_MAX_S)

    async def _stream(self, stop: asyncio.Event) -> None:
        cfg = self.cfg
        if cfg.wait_subscribers:
            ok = await asyncio.to_thread(self.publisher.wait_for_subscribers, cfg.wait_subscribers,
                                         cfg.wait_timeout_s)
            if not ok:
                raise TimeoutError(f"no subscriber on {self.endpoint} after {cfg.wait_timeout_s} s")
        period = self.fish.cfg.frame_period_s / cfg.speed if cfg.speed > 0 else 0.0
        self.session = new_session_id()
        log.info("sim session %s: frames from seq 0", self.session)
        t0 = time.monotonic()
        seq = 0
        while not stop.is_set() and not (cfg.n_frames and seq >= cfg.n_frames):
            self._send_frame(seq)
            last = bool(cfg.n_frames) and seq + 1 >= cfg.n_frames
            if cfg.fault_every and (seq + 1) % cfg.fault_every == 0 and not last:
                self._send_fault(seq)
            seq += 1
            delay = t0 + seq * period - time.monotonic()
            await asyncio.sleep(max(0.0, delay))

    def _send_frame(self, seq: int) -> None:
        i = seq % self.cfg.schedule_frames
        cov = self.schedule.covariates[i]
        t0 = time.perf_counter()
        frame = self.fish.step(cov, out=self.sender.buffer(seq, self.fish.cfg.shape, "uint16", "F"))
        self.render_s.append(time.perf_counter() - t0)
        header = FrameHeader(seq=seq, t_src_ns=time.time_ns(), shape=tuple(frame.volume.shape),
                             dtype=str(frame.volume.dtype), order=volume_order(frame.volume), rig=self.rig,
                             stimulus=tuple(float(x) for x in cov), condition=int(self.schedule.condition[i]),
                             session=self.session)
        self.sender.send(header, frame.volume)
        self._last = (header, frame.volume)
        self.tracker.update(frame)
        self._record_shift(frame.shift)
        self.metrics.frames_sent.inc()
        self.report.frames += 1

    def _send_fault(self, seq: int) -> None:
        """A malformed message between good frames; the next good frame must still get through."""
        kind = FAULT_KINDS[self.report.faults % len(FAULT_KINDS)]
        header, vol = self._last
        nxt = dataclasses.replace(header, seq=seq + 1)
        if kind == "duplicate_seq":
            parts: list[Any] = encode_frame(header, vol)
        elif kind == "malformed_header":
            parts = [b"frame", b"\xc1 not msgpack", b"\x00" * 64]
        elif kind == "truncated_payload":
            parts = encode_frame(nxt, vol)[:2] + [b"\x00" * (vol.nbytes // 2)]
        else:
            parts = encode_frame(dataclasses.replace(nxt, dtype="float32"), np.zeros(vol.shape, np.float32))
        self.publisher.send(parts)
        self.report.faults += 1

    async def _listen(self, client: aiomqtt.Client) -> None:
        async for msg in client.messages:
            try:
                cmd = TriggerCommand.from_json(msg.payload)
            except WireError as exc:
                self.report.triggers_invalid += 1
                self.metrics.errors.labels(kind="invalid_trigger").inc()
                log.warning("ignored malformed trigger: %s", exc)
                continue
            self._apply(cmd)

    def _apply(self, cmd: TriggerCommand) -> None:
        self.report.triggers_received += 1
        n = self.fish.cfg.n_neurons
        targets = np.asarray([t for t in cmd.targets if t < n], dtype=np.int64)
        frames = max(1, math.ceil(cmd.duration_ms / 1000.0 / self.fish.cfg.frame_period_s))
        gain = cmd.power_mw / self.cfg.reference_power_mw
        self.fish.stimulate(targets, gain=gain, duration_frames=frames)
        self.metrics.stimulations.inc()
        self.report.stimulations.append({"trigger_id": cmd.trigger_id, "at_frame": self.report.frames,
                                         "forecast_seq": cmd.seq, "targets": int(targets.size),
                                         "frames": frames, "gain": gain})
        log.info("stimulating %d neurons for %d frame(s) (trigger %s from forecast seq %d)",
                 targets.size, frames, cmd.trigger_id[:8], cmd.seq)

    def _record_shift(self, shift: np.ndarray) -> None:
        """Keep the frame's true shift (motion on only); flush the shifts file every SHIFTS_FLUSH_FRAMES."""
        if not self.fish.cfg.motion.enabled:
            return
        self.report.shifts.append([float(s) for s in shift])
        if self.shifts_path is not None and len(self.report.shifts) % SHIFTS_FLUSH_FRAMES == 0:
            self.write_shifts()

    def write_shifts(self) -> None:
        """Write the shifts so far to `shifts_path` ((frames, 3) float32 .npy), atomically (tmp + rename)."""
        if self.shifts_path is None:
            return
        tmp = self.shifts_path.with_name(self.shifts_path.name + ".tmp")
        with open(tmp, "wb") as f:
            np.save(f, np.asarray(self.report.shifts, np.float32).reshape(-1, 3))
        os.replace(tmp, self.shifts_path)

    def close(self, linger_ms: int = 0) -> None:
        """Write the true shifts, close the publisher (queued frames may leave for `linger_ms`) and the sender."""
        self.write_shifts()
        self.publisher.close(linger_ms)
        self.sender.close()
