"""Fault drills on real processes (loopcast/drill.py), briefly; bench/drills.py runs them longer for the figures
of docs/reliability.md. Each drill checks what must hold and what was lost."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from loopcast.broker import find_mosquitto
from loopcast.drill import DrillRig, broker_drill, run_killed_drill, slow_stage_drill, source_restart_drill
from loopcast.settings import LoopcastConfig, load_settings

pytestmark = [pytest.mark.timeout(240),
              pytest.mark.skipif(find_mosquitto() is None, reason="the drills kill and restart Mosquitto")]


def drill_config(loop_setup: tuple[Path, list[str]], *more: str) -> LoopcastConfig:
    """The tiny rig at 10x: a trigger on every forecast the interlocks allow, a 1.5 s watchdog."""
    return load_settings(overrides=[
        *loop_setup[1], 'mqtt.broker="external"', 'rig.name="drill"', "sim.speed=10", "sim.n_frames=0",
        "sim.fault_every=0", "sim.wait_timeout_s=60", "replay.speed=10", "pipeline.forecast.wait_subscribers=1",
        "pipeline.forecast.wait_timeout_s=60", "pipeline.forecast.watch=false", 'controller.policy.mode="above"',
        "controller.policy.level=-1.0", "controller.policy.duration_ms=100.0",
        "controller.interlocks.min_interval_s=0.3", "controller.interlocks.max_forecast_age_s=2.0",
        "controller.interlocks.max_per_minute=1000", "controller.watchdog_s=1.5", "controller.mqtt.reconnect_s=0.2",
        "pipeline.record.flush_s=0.2", *more])


@pytest.fixture
def rig(loop_setup: tuple[Path, list[str]], tmp_path: Path) -> Any:
    r = DrillRig(drill_config(loop_setup), tmp_path)
    yield r
    r.close()


def test_broker_killed_and_restarted(rig: DrillRig) -> None:
    out = broker_drill(rig, outage_s=1.5, after_s=1.0)
    assert out["disarmed_on_loss"], out
    assert out["sent_before_rearm"] == 0 and out["stale_sent"] == 0, out
    assert out["reconnect_after_restart_s"] < 10, out
    assert out["records_lost"] == 0 and all(out["processes_alive"].values()), out


def test_pipeline_killed_and_restarted(rig: DrillRig) -> None:
    out = run_killed_drill(rig, down_s=2.0)
    assert 0.5 <= out["watchdog_disarm_s"] < 4.0, out   # 1.5 s after the last forecast, which came before the kill
    assert out["sent_while_down_or_unarmed"] == 0 and out["stale_sent"] == 0, out
    assert out["records_lost"] == 0, out
    assert out["processes_alive"]["controller"] and out["processes_alive"]["sim"], out


def test_a_stage_three_times_slower_than_the_frame_period(rig: DrillRig) -> None:
    out = slow_stage_drill(rig, slowdown=3.0, frames=60)
    assert out["frames_lost"] == 0 and out["frames"] == 60, out
    assert out["skipped"] > 0 and out["forecasts"] > 0, out
    assert out["skipped"] + out["forecasts"] <= 60, out
    assert out["latency_max_ms"] < out["latency_bound_ms"], out
    first, last = out["latency_first_last_third_p50_ms"]
    assert last < first + 200, out   # no drift: a queue of 3x-slow forecasts would add ~180 ms per frame
    assert out["dff_frames_compared"] == 60 and out["dff_max_abs_error"] < 1e-5, out


def test_the_source_restarts_with_a_new_session(rig: DrillRig) -> None:
    out = source_restart_drill(rig)
    assert out["session_changes"] == 1 and out["pipeline_alive"], out
    assert out["frames_refused_since"] == 0, out
    assert out["frames_accepted_since"] >= out["frames_sent_new_session"] - 2 > 0, out   # in flight: 1-2
    assert out["kill_to_first_forecast_s"] is not None, out
