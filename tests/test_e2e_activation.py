"""End to end with QuantFormer and the SBM: live simulated fish -> pipeline serving a trace forecaster,
a QuantFormer activation engine and a Sparse Brain Model -> controller with an activation policy ->
MQTT -> back into the fish.

QuantFormer and the SBM are trained and exported on the `loop_setup` recording by the real training
commands (tiny configurations, the session fixture `qf_sbm_engines`); everything else is the real loop of
tests/test_e2e.py.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from loopcast.broker import free_port
from loopcast.inprocess import run_loop
from loopcast.replay.layout import Recording
from loopcast.settings import load_settings

N_FRAMES = 70
SPIKE_WARMUP = 20   # OASIS warm-up frames: the SBM's input starts after them (live and in training)


@pytest.fixture(scope="module")
def engines(qf_sbm_engines: Any) -> tuple[Path, Path, list[str]]:
    """(QuantFormer activation engine, SBM engine, overrides): the session's `loopcast train-quantformer`
    and `loopcast train-sbm` runs on the loop_setup recording (tests/conftest.py, shared with test_cli.py)."""
    overrides = qf_sbm_engines.overrides
    assert f"pipeline.preprocess.spikes.oasis.warmup={SPIKE_WARMUP}" in overrides
    return qf_sbm_engines.quantformer / "v0001", qf_sbm_engines.sbm / "v0001", overrides


@pytest.mark.timeout(300)
def test_quantformer_policy_closes_the_loop(engines: tuple[Path, Path, list[str]], mqtt_broker: Any) -> None:
    engine, sbm, overrides = engines
    cfg = load_settings(overrides=[
        *overrides, f"mqtt.port={mqtt_broker.port}", f'mqtt.host="{mqtt_broker.host}"',
        f'endpoints.frames="tcp://127.0.0.1:{free_port()}"', f'endpoints.forecasts="tcp://127.0.0.1:{free_port()}"',
        f'pipeline.forecast.also=["{engine.parent}", "{sbm.parent}"]', f"sim.n_frames={N_FRAMES}", "sim.speed=25",
        "pipeline.forecast.wait_subscribers=2", "pipeline.forecast.wait_timeout_s=20",
        f"pipeline.max_frames={N_FRAMES}", 'rig.name="e2e-qf"',
        # stimulate ensemble 1 whenever QuantFormer gives ensemble 0 any chance of activation in 4 frames
        'controller.policy.kind="activation_threshold"', 'controller.policy.model="quantformer"',
        "controller.policy.lead=4", "controller.policy.level=0.0", 'controller.policy.mode="above"',
        'controller.policy.reduce="mean"', 'controller.policy.monitor="ensemble:0"',
        'controller.policy.targets="ensemble:1"', "controller.policy.duration_ms=3000",
        "controller.interlocks.min_interval_s=0.3", "controller.interlocks.max_forecast_age_s=2.0"])
    out = run_loop(cfg, timeout_s=90)
    assert out.sim.frames == N_FRAMES and out.pipeline.frames == N_FRAMES

    # every engine published: trace forecasts on forecast/nlinear, SBM spike-probability forecasts on
    # forecast/sbm (once the spike estimator is past its warm-up), activations on activation/quantformer
    acts = out.activations
    by_model = {m: [f for f in out.forecasts if f.header.model == m] for m in ("nlinear", "sbm")}
    assert by_model["nlinear"] and len(acts) >= 0.5 * (N_FRAMES - cfg.train_quantformer.context)
    spikes = by_model["sbm"]
    assert len(spikes) >= 0.5 * (N_FRAMES - SPIKE_WARMUP - cfg.train_sbm.context)
    assert min(f.header.seq for f in spikes) >= SPIKE_WARMUP + cfg.train_sbm.context - 1
    for f in spikes:
        assert f.header.engine_version.startswith(f"{sbm.parent.name}/v") and f.header.lead_times == (1,)
        assert f.data.shape == (1, 300) and ((f.data >= 0) & (f.data <= 1)).all()
    for a in acts:
        assert a.header.model == "quantformer" and a.header.lead_times == (4,)
        assert a.header.engine_version.startswith(f"{engine.parent.name}/v")
        assert a.data.shape == (1, 300) and ((a.data >= 0) & (a.data <= 1)).all()

    # the activation policy fired; each trigger carries the probability it saw, from a real message
    ctl = out.controller
    assert len(out.triggers) >= 2 and len(out.triggers) == len(ctl.sent)
    by_seq = {a.header.seq: a for a in acts}
    ensemble0 = np.flatnonzero(Recording.open(cfg.paths.recording).ground_truth("ensemble") == 0)
    for t in out.triggers:
        assert t["model"] == "quantformer" and t["policy"] == cfg.controller.policy.name and t["lead"] == 4
        assert t["value"] == pytest.approx(float(np.mean(by_seq[t["seq"]].data[0, ensemble0])), rel=1e-5)

    # ... and the fish responded to the triggers it got over MQTT
    assert out.sim.triggers_received == len(out.triggers)
    assert out.sim.response["stimulated_neurons"] > 0 and out.sim.response["rate_ratio"] > 3.0
