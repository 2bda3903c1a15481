"""A live closed loop on a moving fish (configs/motion.toml): every registered frame's shift is in the session
record, the report and the NWB frames table; every forecast carries it to the controller, whose drift
interlock disarms it (audited) once the fish leaves the allowed distance."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pynwb import NWBHDF5IO  # type: ignore[import-untyped]

from loopcast.broker import free_port
from loopcast.inprocess import run_loop
from loopcast.session.data import read_session
from loopcast.session.nwb import export_nwb
from loopcast.session.report import summarise
from loopcast.settings import DEFAULT_CONFIG, load_settings

N_FRAMES = 60
WARMUP = 10   # registration.warmup_frames here


@pytest.fixture(scope="module")
def moving_loop(loop_setup: tuple[Path, list[str]], mqtt_broker: Any, tmp_path_factory: pytest.TempPathFactory) -> Any:
    run = tmp_path_factory.mktemp("moving-loop")
    cfg = load_settings([DEFAULT_CONFIG, DEFAULT_CONFIG.parent / "motion.toml"], overrides=[
        *loop_setup[1], f"mqtt.port={mqtt_broker.port}", f'mqtt.host="{mqtt_broker.host}"',
        f'endpoints.frames="tcp://127.0.0.1:{free_port()}"', f'endpoints.forecasts="tcp://127.0.0.1:{free_port()}"',
        f"sim.n_frames={N_FRAMES}", "sim.speed=25", "pipeline.forecast.wait_subscribers=2",
        "pipeline.forecast.wait_timeout_s=20", 'controller.policy.mode="above"', "controller.policy.level=-1.0",
        "controller.interlocks.min_interval_s=0.3", "controller.interlocks.max_forecast_age_s=2.0",
        f"pipeline.max_frames={N_FRAMES}", 'rig.name="moving"',
        f"pipeline.preprocess.registration.warmup_frames={WARMUP}",
        "synth.fish.motion.drift_speed=[0.1, 0.1, 0.02]", "synth.fish.motion.jump_rate=0.0",
        "controller.drift.max_shift=[0.3, 0.3, 1.0]", "controller.watchdog_s=0"])
    out = run_loop(cfg, timeout_s=60, run_dir=run)
    return out, read_session(run), run


def test_every_registered_frame_is_recorded_and_reported(moving_loop: Any, tmp_path: Path) -> None:
    out, data, _ = moving_loop
    reg = data.frames.registration
    assert reg is not None and reg.shape == (len(data.frames), 4)
    done = np.isfinite(reg[:, 3])
    assert done.sum() >= N_FRAMES - WARMUP - 2 and not done[:WARMUP].any()
    assert (reg[done, 3] > 7).all()                                   # a confident match on the demo fish
    assert "registered" in summarise(data)
    path = export_nwb(data, tmp_path / "moving.nwb")
    with NWBHDF5IO(str(path), "r") as io:
        frames = io.read().processing["loopcast"]["frames"].to_dataframe()
    np.testing.assert_allclose(frames["registration_dx"].to_numpy(), reg[:, 0], equal_nan=True)


def test_forecasts_carry_the_shift_and_the_drift_interlock_disarms(moving_loop: Any) -> None:
    out, data, _ = moving_loop
    carried = [f.header.registration for f in out.forecasts]
    assert carried and all(len(r) == 4 for r in carried)
    recs = data.records("forecast")
    assert all(r["registration"] is not None for r in recs)
    drifted = [r for r in recs if max(abs(v) for v in r["registration"][:2]) > 0.3]
    disarms = [r for r in data.records("state") if r["event"] == "disarmed" and r["cause"].startswith("drift")]
    if not drifted:
        pytest.fail("the fish never left 0.3 voxels in x/y: raise drift_speed")
    assert disarms and out.controller.last_disarm is not None and out.controller.last_disarm.startswith("drift")
    assert out.metrics["controller"].registry.get_sample_value("loopcast_errors_total", {"kind": "drift"}) >= 1
    first = min(r["t_decision_ns"] for r in drifted)
    assert not [r for r in recs if r["decision"] == "sent" and r["t_decision_ns"] > first]   # none after it
