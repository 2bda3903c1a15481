"""The whole closed loop inside one process (threads + asyncio), for end-to-end tests and benchmarks.

The parts are the real ones — ZeroMQ sockets, the MQTT broker at [mqtt], the ONNX engine — only the
process boundaries are gone: the pipeline runs in a thread, the simulated fish, the controller and an
independent trigger listener (standing in for the stimulation hardware) share one event loop.
"""
from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiomqtt

from loopcast import app, cpu
from loopcast.realtime.control.controller import Controller
from loopcast.realtime.metrics import Metrics
from loopcast.realtime.pipeline import PipelineReport
from loopcast.realtime.wire.codec import Forecast, decode_forecast, mqtt_topic
from loopcast.realtime.wire.mqtt_security import client_options
from loopcast.realtime.wire.transport import Subscriber
from loopcast.replay.layout import Recording
from loopcast.replay.sim import SimReport
from loopcast.settings import LoopcastConfig


@dataclass
class LoopResult:
    """Everything the loop produced, from each side."""

    sim: SimReport
    pipeline: PipelineReport
    forecasts: list[Forecast]           # kind "forecast" messages, in arrival order
    triggers: list[dict[str, Any]]
    controller: Controller
    metrics: dict[str, Metrics] = field(default_factory=dict)
    activations: list[Forecast] = field(default_factory=list)   # kind "activation" messages


class MessageFeed:
    """A frame source for `Pipeline` that hands over one queued message per step (so every frame is
    forecast): messages made or captured beforehand, fed to a pipeline without sockets."""

    def __init__(self, messages: list[list[Any]]) -> None:
        self.messages = list(messages)

    @property
    def finished(self) -> bool:
        return not self.messages

    def recv_all(self, timeout_ms: int, limit: int = 64) -> list[Sequence[Any]]:
        return [self.messages.pop(0)] if self.messages else []

    def close(self) -> None:
        self.messages = []


class TriggerListener:
    """An MQTT subscriber on the trigger topic, as the stimulation hardware would be; arms the rig."""

    def __init__(self, cfg: LoopcastConfig) -> None:
        self.cfg = cfg
        self.triggers: list[dict[str, Any]] = []
        self.ready = asyncio.Event()

    async def run(self) -> None:
        rig = self.cfg.rig.name
        m = self.cfg.mqtt
        async with aiomqtt.Client(m.host, m.port, identifier=f"hw-{rig}", **client_options(m.security)) as c:
            await c.subscribe(mqtt_topic(rig, "trigger"), qos=1)
            await c.publish(mqtt_topic(rig, "control"), b"arm", qos=1)
            self.ready.set()
            async for msg in c.messages:
                if msg.topic.matches(mqtt_topic(rig, "trigger")):
                    self.triggers.append(json.loads(msg.payload))


def run_loop(cfg: LoopcastConfig, timeout_s: float = 120.0, run_dir: Path | None = None) -> LoopResult:
    """Run sim -> pipeline -> controller -> broker until the sim has sent sim.n_frames frames; with a
    `run_dir`, the session record and the controller's audit log are written there."""
    if not cfg.sim.n_frames:
        raise ValueError("run_loop needs a finite sim.n_frames")
    app.configure_process(cfg)
    return asyncio.run(_closed_loop(cfg, timeout_s, run_dir))


async def _closed_loop(cfg: LoopcastConfig, timeout_s: float, run_dir: Path | None) -> LoopResult:
    rec = app.open_recording(cfg)
    metrics = {name: Metrics(name) for name in ("sim", "run", "controller")}
    # one subscription to everything on the forecasts endpoint (forecast/ and activation/ topics): a
    # publisher's wait_subscribers counts subscriptions, so one per consumer keeps it counting consumers
    forecasts = Subscriber(cfg.endpoints.forecasts, topics=(b"",), rcvhwm=100_000)
    controller = app.build_controller(cfg, metrics["controller"], rec, run_dir)
    stop_ctl = asyncio.Event()
    ctl_task = asyncio.create_task(controller.run(stop_ctl))
    await asyncio.wait_for(controller.ready.wait(), 10)   # subscribed to control: an arm now counts
    listener = TriggerListener(cfg)
    hw_task = asyncio.create_task(listener.run())
    await asyncio.wait_for(listener.ready.wait(), 10)
    await asyncio.wait_for(_until(lambda: controller.interlocks.armed), 10)
    holder: dict[str, Any] = {}
    thread = threading.Thread(target=_pipeline_thread, args=(cfg, metrics["run"], rec, holder, run_dir))
    thread.start()
    sim = app.build_sim(cfg, metrics["sim"])
    try:
        report = await asyncio.wait_for(sim.run(asyncio.Event()), timeout_s)
        await asyncio.to_thread(thread.join, 30)
        if thread.is_alive():  # e.g. a frame lost upstream: max_frames is never reached
            if "pipeline" in holder:
                holder["pipeline"].stop()
            await asyncio.to_thread(thread.join, 10)
            raise TimeoutError(f"the pipeline did not finish within 30 s of the sim's last frame "
                               f"({report.frames} sent, pipeline.max_frames={cfg.pipeline.max_frames})")
        received = await asyncio.to_thread(_drain, forecasts)
        await asyncio.sleep(0.3)   # last triggers in flight
    finally:
        stop_ctl.set()
        await asyncio.wait_for(ctl_task, 10)
        hw_task.cancel()
        sim.close()
        forecasts.close()
    if "error" in holder:
        raise holder["error"]
    return LoopResult(report, holder["report"], [f for f in received if f.header.kind == "forecast"],
                      listener.triggers, controller, metrics,
                      [f for f in received if f.header.kind == "activation"])


def _pipeline_thread(cfg: LoopcastConfig, metrics: Metrics, rec: Recording, out: dict[str, Any],
                     run_dir: Path | None) -> None:
    try:
        cpu.numba_threads(cfg.runtime.numba_threads)   # numba's count is per thread: this one runs the loop
        pipeline = out["pipeline"] = app.build_pipeline(cfg, metrics, rec.segmentation(), run_dir,
                                                        app.neuron_groups(rec))
        try:
            out["report"] = pipeline.run()
        finally:
            pipeline.close()
    except Exception as exc:  # re-raised in the event loop's thread
        out["error"] = exc


def _drain(sub: Subscriber) -> list[Forecast]:
    out: list[Forecast] = []
    while batch := sub.recv_all(200, limit=10_000):
        out += [decode_forecast(m) for m in batch]
    return out


async def _until(cond: Any, period: float = 0.05) -> None:
    while not cond():
        await asyncio.sleep(period)
