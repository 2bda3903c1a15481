"""The live simulated fish over real sockets: frames on ZeroMQ, triggers over MQTT, bad triggers counted."""
from __future__ import annotations

import asyncio
from typing import Any

import aiomqtt
import pytest

from loopcast.realtime.ingest import Ingest, RigConfig
from loopcast.realtime.metrics import Metrics
from loopcast.realtime.wire.codec import TriggerCommand, mqtt_topic
from loopcast.realtime.wire.transport import Subscriber
from loopcast.replay.fish import FishConfig, FishModel
from loopcast.replay.sim import LiveSim, SimConfig


async def run_sim(fish_cfg: FishConfig, broker: Any, rig: str) -> tuple[LiveSim, list]:
    sim = LiveSim(FishModel(fish_cfg), SimConfig(speed=20, n_frames=40, wait_subscribers=1, fault_every=10),
                  rig, "tcp://127.0.0.1:*", Metrics("sim"), mqtt=(broker.host, broker.port))
    sub = Subscriber(sim.endpoint, topics=(b"frame",), rcvhwm=1000)
    task = asyncio.create_task(sim.run(asyncio.Event()))
    await asyncio.wait_for(sim.mqtt_ready.wait(), 10)
    async with aiomqtt.Client(broker.host, broker.port, identifier=f"test-{rig}") as c:
        await c.publish(mqtt_topic(rig, "trigger"), b"{not json", qos=1)
        cmd = TriggerCommand(trigger_id="t1", rig=rig, pattern="p", targets=tuple(range(20)), power_mw=5.0,
                             duration_ms=5000.0, seq=3, model="m", engine_version="m/v0001", decision_time_ns=0)
        await c.publish(mqtt_topic(rig, "trigger"), cmd.to_json(), qos=1)
    await asyncio.wait_for(task, 30)
    msgs = sub.recv_all(500, limit=1000)
    sub.close()
    sim.close()
    return sim, msgs


@pytest.mark.timeout(60)
def test_sim_streams_frames_applies_triggers_and_counts_bad_ones(tiny_fish: FishConfig, mqtt_broker: Any) -> None:
    sim, msgs = asyncio.run(run_sim(tiny_fish, mqtt_broker, "simtest"))
    rep = sim.report
    assert rep.frames == 40 and rep.faults == 3        # after frames 10, 20, 30; none after the last
    assert rep.triggers_invalid == 1 and sim.metrics.count("loopcast_errors_total", kind="invalid_trigger") == 1
    assert rep.triggers_received == 1 and rep.stimulations[0]["targets"] == 20
    assert rep.response["stimulated_neurons"] == 20 and rep.response["rate_ratio"] > 2

    ingest = Ingest(RigConfig(name="simtest", shape=tiny_fish.shape), Metrics("run"))
    good = [f for f in (ingest.process(m) for m in msgs) if f is not None]
    assert [f.header.seq for f in good] == list(range(40))
    assert all(len(f.header.stimulus) == 26 and f.header.rig == "simtest" for f in good)
    invalid = {k: v for k, v in ingest.metrics.counters().items() if k.startswith("loopcast_frames_invalid")}
    assert sum(invalid.values()) == 3
