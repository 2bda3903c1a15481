"""End to end with QuantFormer and the SBM: live simulated fish -> pipeline serving a trace forecaster,
a QuantFormer activation engine and a Sparse Brain Model -> controller with an activation policy ->
MQTT -> back into the fish.

QuantFormer and the SBM are trained and exported here, on the `loop_setup` recording, with the real
training code (tiny configurations); everything else is the real loop of tests/test_e2e.py.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from loopcast.broker import free_port
from loopcast.inprocess import run_loop
from loopcast.settings import load_settings, new_run_dir
from loopcast.workflows import train_quantformer_on_recording, train_sbm_on_recording
from replay.layout import Recording

N_FRAMES = 70
QF = ["train_quantformer.context=8", "train_quantformer.horizon=4", "train_quantformer.model_options.patch=4",
      "train_quantformer.model_options.d_model=16", "train_quantformer.model_options.n_heads=2",
      "train_quantformer.model_options.n_layers=1", "train_quantformer.model_options.codebook_size=16",
      "train_quantformer.model_options.code_dim=8",
      "train_quantformer.pretrain_epochs=1", "train_quantformer.finetune_epochs=1",
      "train_quantformer.max_train_windows=64", "train_quantformer.neurons_per_batch=32",
      "train_quantformer.max_eval_windows=32", "train_quantformer.export_forecaster=false",
      "train_quantformer.max_context=8", "train_quantformer.threads=1"]
SPIKE_WARMUP = 20   # OASIS warm-up frames: the SBM's input starts after them (live and in training)
SBM = ["train_sbm.context=4", "train_sbm.max_steps=3", 'train_sbm.optimizer="adamw"', "train_sbm.threads=1",
       "train_sbm.eval.rollout_steps=2", "train_sbm.model_options.d_model=8", "train_sbm.model_options.n_layers=1",
       "train_sbm.model_options.cluster_size=64", f"pipeline.preprocess.spikes.oasis.warmup={SPIKE_WARMUP}"]


@pytest.fixture(scope="module")
def engines(loop_setup: tuple[Path, list[str]]) -> tuple[Path, Path, list[str]]:
    """(QuantFormer activation engine, SBM engine, overrides) trained on the loop_setup recording."""
    _, overrides = loop_setup
    cfg = load_settings(overrides=[*overrides, *QF, *SBM])
    rec = Recording.open(cfg.paths.recording)
    qf = train_quantformer_on_recording(cfg, rec, new_run_dir(cfg, "train-quantformer"), progress=False)
    sbm = train_sbm_on_recording(cfg, rec, new_run_dir(cfg, "train-sbm"), progress=False)
    assert qf.engine is not None and sbm.engine is not None
    return qf.engine, sbm.engine, [*overrides, *QF, *SBM]


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
