"""The session record of a live closed loop: what the pipeline stored is what it published, the live skill
matches an offline recomputation, and a pipeline killed with SIGKILL leaves a readable store."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zarr

from loopcast.broker import free_port
from loopcast.inprocess import run_loop
from loopcast.session.data import read_session
from loopcast.session.rescore import rescore
from loopcast.settings import load_settings

N_FRAMES = 60


@pytest.fixture(scope="module")
def recorded(loop_setup: tuple[Path, list[str]], mqtt_broker: Any, tmp_path_factory: pytest.TempPathFactory) -> Any:
    run = tmp_path_factory.mktemp("recorded")
    cfg = load_settings(overrides=[
        *loop_setup[1], f"mqtt.port={mqtt_broker.port}", f'mqtt.host="{mqtt_broker.host}"',
        f'endpoints.frames="tcp://127.0.0.1:{free_port()}"', f'endpoints.forecasts="tcp://127.0.0.1:{free_port()}"',
        f"sim.n_frames={N_FRAMES}", "sim.speed=25", "sim.fault_every=20", "pipeline.forecast.wait_subscribers=2",
        "pipeline.forecast.wait_timeout_s=20", 'controller.policy.mode="above"', "controller.policy.level=-1.0",
        "controller.interlocks.min_interval_s=0.3", "controller.interlocks.max_forecast_age_s=2.0",
        f"pipeline.max_frames={N_FRAMES}", 'rig.name="rec"', "pipeline.record.skill_window=10"])
    out = run_loop(cfg, timeout_s=60, run_dir=run)
    return out, read_session(run), cfg


def test_frames_table_holds_every_message_with_its_fate(recorded: Any) -> None:
    out, data, _ = recorded
    f = data.frames
    assert len(f) == N_FRAMES + out.sim.faults and f.valid.sum() == N_FRAMES
    assert set(f.reasons) and (f.status[~f.valid] > 0).all()
    codes = np.array(["not_ready", "forecast", "skipped", "failed", "invalid"])[f.forecast]
    assert (codes[~f.valid] == "invalid").all() and (codes == "forecast").sum() == out.pipeline.forecasts
    valid_lat = f.latency_ms[f.valid]
    assert np.all(valid_lat[:, 0] <= valid_lat[:, 1]) and np.isfinite(valid_lat[codes[f.valid] == "forecast", 2]).all()
    assert np.all(f.t_recv_ns[f.valid] >= f.t_src_ns[f.valid])


def test_stored_forecasts_are_the_published_ones(recorded: Any) -> None:
    out, data, _ = recorded
    series = data.forecasts["forecast.nlinear"]
    assert series.seq.tolist() == [m.header.seq for m in out.forecasts]
    sent = np.stack([m.data[:, data.neurons] for m in out.forecasts])
    np.testing.assert_array_equal(series.data, sent)
    assert set(series.engine_version) == {out.forecasts[0].header.engine_version}
    assert series.engine_version[0] in data.manifests
    assert data.dff is not None and data.dff.data.shape == (N_FRAMES, data.neurons.size)


def test_live_skill_matches_offline_recomputation(recorded: Any) -> None:
    out, data, cfg = recorded
    live = data.skill["nlinear"]
    assert len(live.lead) > 0.8 * cfg.train.horizon * len(out.forecasts) - cfg.train.horizon ** 2
    again = rescore(data, "nlinear")
    for col in ("mae", "baseline_mae", "rolling_mae", "rolling_baseline_mae"):
        np.testing.assert_allclose(getattr(live, col), getattr(again, col), rtol=2e-6, atol=1e-7)
    gauges = out.metrics["run"].registry
    for lead in range(1, cfg.train.horizon + 1):
        last = live.rolling_mae[live.lead == lead][-1]
        assert gauges.get_sample_value("loopcast_forecast_mae", {"model": "nlinear", "lead": str(lead)}) == \
            pytest.approx(float(last))
        base = gauges.get_sample_value("loopcast_forecast_baseline_mae", {"model": "nlinear", "lead": str(lead)})
        assert base == pytest.approx(float(live.rolling_baseline_mae[live.lead == lead][-1]))


def _cli(command: str, args: list[str], log: Path) -> subprocess.Popen[bytes]:
    argv = [sys.executable, "-P", "-m", "loopcast.cli", command, *args]
    return subprocess.Popen(argv, stdout=log.open("wb"), stderr=subprocess.STDOUT)


@pytest.mark.timeout(120)
def test_a_killed_pipeline_leaves_a_readable_store(loop_setup: tuple[Path, list[str]], tmp_path: Path) -> None:
    frames, forecasts = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
    sets = [*loop_setup[1], f'endpoints.frames="{frames}"', f'endpoints.forecasts="{forecasts}"',
            "metrics.run=0", "metrics.sim=0", "pipeline.record.flush_s=0.2", "sim.speed=20", "sim.n_frames=2000"]
    args = [a for s in sets for a in ("-s", s)]
    run_dir = tmp_path / "run"
    pipe = _cli("run", [*args, "--run-dir", str(run_dir)], tmp_path / "run.log")
    sim = _cli("sim", [*args, "--no-mqtt", "--run-dir", str(tmp_path / "sim")], tmp_path / "sim.log")
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and _rows(run_dir / "session.zarr", "frames") < 40:
            assert pipe.poll() is None, (tmp_path / "run.log").read_text()[-2000:]
            time.sleep(0.1)
        os.kill(pipe.pid, signal.SIGKILL)
        pipe.wait(10)
    finally:
        for p in (pipe, sim):
            if p.poll() is None:
                p.kill()
    data = read_session(run_dir)
    assert any("did not end cleanly" in p for p in data.problems)
    assert data.frames is not None and len(data.frames) >= 40
    assert np.all(np.diff(data.frames.seq) == 1)                      # consecutive, nothing torn
    assert data.dff is not None
    n = min(len(data.dff.seq), len(data.frames))   # a frame's row follows its dF/F's (after its batch's forecast)
    assert n >= 40 and data.dff.seq[:n].tolist() == data.frames.seq[:n].tolist()


def _rows(store: Path, table: str) -> int:
    try:
        return int(zarr.open_group(str(store / table), mode="r").attrs.get("rows", 0))  # type: ignore[arg-type]
    except Exception:   # not created yet
        return 0
