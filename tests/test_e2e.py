"""End to end: live simulated fish -> pipeline -> controller -> MQTT broker -> back into the fish.

All parts are real and in one process: ZeroMQ sockets on 127.0.0.1, the broker of the `mqtt_broker`
fixture, an ONNX Runtime engine trained and exported from a small synthetic recording.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from loopcast.broker import free_port
from loopcast.inprocess import run_loop
from loopcast.settings import LoopcastConfig, load_settings

N_FRAMES = 80


def loop_config(loop_setup: tuple[Path, list[str]], broker: Any, transport: list[str] | None = None,
                extra: tuple[str, ...] = ()) -> LoopcastConfig:
    _, overrides = loop_setup
    frames = [f'endpoints.frames="tcp://127.0.0.1:{free_port()}"'] if transport is None else transport
    return load_settings(overrides=[
        *overrides, f"mqtt.port={broker.port}", f'mqtt.host="{broker.host}"', *frames,
        f'endpoints.forecasts="tcp://127.0.0.1:{free_port()}"',
        f"sim.n_frames={N_FRAMES}", "sim.speed=25", "sim.fault_every=20",
        "pipeline.forecast.wait_subscribers=2", "pipeline.forecast.wait_timeout_s=20",
        # every forecast asks for a trigger; the interlocks decide
        'controller.policy.mode="above"', "controller.policy.level=-1.0",
        'controller.policy.targets="ensemble:1"', "controller.policy.duration_ms=3000",
        "controller.interlocks.min_interval_s=0.3", "controller.interlocks.max_forecast_age_s=2.0",
        f"pipeline.max_frames={N_FRAMES}", 'rig.name="e2e"', *extra])


@pytest.mark.timeout(180)
@pytest.mark.parametrize("transport", ["tcp", "shm"])
def test_closed_loop_end_to_end(loop_setup: tuple[Path, list[str]], mqtt_broker: Any, transport: str,
                                tmp_path: Path) -> None:
    shm = [f'endpoints.frames="ipc://{tmp_path}/frames.sock"', 'transport.kind="shm"',
           f'transport.shm_dir="{tmp_path}"']
    cfg = loop_config(loop_setup, mqtt_broker, shm if transport == "shm" else None)
    out = run_loop(cfg, timeout_s=60)
    assert not list(tmp_path.glob("loopcast-*")), "the simulator removed its shared-memory ring"
    sim, pipe, fc = out.sim, out.pipeline, out.forecasts

    # every good frame reached the pipeline; every injected fault was counted, none crashed it
    assert sim.frames == N_FRAMES and pipe.frames == N_FRAMES
    run_m = out.metrics["run"]
    invalid = sum(v for k, v in run_m.counters().items() if k.startswith("loopcast_frames_invalid_total"))
    assert invalid == sim.faults == (N_FRAMES - 1) // 20

    # forecasts arrive for the frames sent: from the first frame with a full context and finished
    # dF/F warm-up, every frame was forecast, or (when two arrived at once) counted as skipped
    seqs = [f.header.seq for f in fc]
    first = max(cfg.pipeline.preprocess.dff.warmup, cfg.train.context) - 1
    skipped = run_m.count("loopcast_frames_dropped_total", reason="forecast_skipped")
    assert seqs == sorted(seqs) and len(seqs) == pipe.forecasts and seqs[0] == first
    assert len(seqs) + skipped == N_FRAMES - first
    assert len(seqs) >= 0.9 * (N_FRAMES - first)
    for f in fc:
        assert f.header.frame["seq"] == f.header.seq and f.header.frame["t_src_ns"] == f.header.t_src_ns
        assert f.data.shape == (cfg.train.horizon, 300) and np.isfinite(f.data).all()
        assert f.header.engine_version.startswith("nlinear-c4-h4/v")

    # the policy fired, interlocks limited it, and the triggers reached an independent MQTT subscriber
    ctl = out.controller
    assert len(out.triggers) >= 2 and len(out.triggers) == len(ctl.sent)
    assert {t["trigger_id"] for t in out.triggers} == {c.trigger_id for c in ctl.sent}
    assert out.metrics["controller"].count("loopcast_triggers_suppressed_total", interlock="min_interval") > 0
    assert all(t["seq"] in set(seqs) for t in out.triggers)

    # ... and the fish, which got them over MQTT, responded: stimulated neurons fire far more
    assert sim.triggers_received == len(out.triggers)
    assert sim.response["stimulated_neurons"] > 0
    assert sim.response["rate_ratio"] > 3.0
    assert sim.response["fluorescence_ratio"] > 1.1



@pytest.mark.timeout(180)
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (runs on a GPU machine: docs/gpu.md)")
def test_closed_loop_on_cuda_in_bf16(loop_setup: tuple[Path, list[str]], mqtt_broker: Any) -> None:
    """The loop as a GPU rig runs it: the engine's torch program on CUDA in bf16; forecasts and triggers flow."""
    cfg = loop_config(loop_setup, mqtt_broker, extra=('pipeline.forecast.runtime="torch"',
                                                      'pipeline.forecast.device="cuda"',
                                                      'pipeline.forecast.precision="bf16"'))
    out = run_loop(cfg, timeout_s=60)
    first = max(cfg.pipeline.preprocess.dff.warmup, cfg.train.context) - 1
    assert out.pipeline.frames == N_FRAMES and len(out.forecasts) >= 0.9 * (N_FRAMES - first)
    assert all(np.isfinite(f.data).all() for f in out.forecasts)
    assert len(out.triggers) >= 2 and out.sim.triggers_received == len(out.triggers)
