"""`loopcast demo` as a newcomer runs it: the real console script, separate processes, a tiny fish."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from pynwb import NWBHDF5IO  # type: ignore[import-untyped]

from loopcast.realtime.record.audit import read_audit
from loopcast.session.data import read_session

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("loopcast", "realtime", "replay", "models", "offline_training")
# the loop's kernels: each must be compiled into the (empty) kernel cache, not loaded from anywhere else
LOOP_KERNELS = ("traces._csr_means", "percentile_kernels.push_chunk", "dff._nonfinite_seq", "oasis._run_block",
                "oasis._stream_step")


@pytest.mark.timeout(240)
def test_demo_runs_the_closed_loop_and_reports(tmp_path: Path) -> None:
    """From a fresh clone's state: no recording, no engine, an empty kernel cache. Every kernel compiles
    before the pipeline subscribes to frames, so no frame is lost, from the first on."""
    overrides = [f'paths.recording="{tmp_path}/rec"', f'paths.engines="{tmp_path}/engines"',
                 f'runtime.kernel_cache="{tmp_path}/kernels"',
                 f'paths.runs="{tmp_path}/runs"', "rig.shape=[48, 32, 8]", "synth.fish.n_neurons=300",
                 "synth.fish.n_ensembles=4", "synth.n_frames=500", "train.horizon=4", "train.max_epochs=3",
                 "demo.frames=60", "demo.speed=25", "demo.fault_every=25",
                 'controller.policy.mode="above"', "controller.policy.level=-1.0",
                 "controller.interlocks.min_interval_s=0.5", "controller.interlocks.max_forecast_age_s=2.0"]
    argv = [sys.executable, "-m", "loopcast.cli", "demo", *(a for o in overrides for a in ("-s", o))]
    start = time.time()
    res = subprocess.run(argv, capture_output=True, text=True, cwd=tmp_path, timeout=220)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]

    out = res.stdout
    assert "forecasts" in out and "triggers" in out
    for stage in ("ingest", "preprocess", "forecast", "trigger"):
        assert any(line.split()[:1] == [stage] for line in out.splitlines()), f"no {stage} latency line"

    run_dir = next((tmp_path / "runs").glob("demo-*"))
    summary = json.loads((run_dir / "demo.summary.json").read_text())
    # every frame received, from the first: nothing dropped before the pipeline (seq gaps) or in it
    # (shm_overrun would be invalid); the invalid ones are the injected faults
    assert summary["frames_sent"] == summary["frames_received"] == 60, summary
    assert "seq_gap" not in summary["dropped"], summary["dropped"]
    assert sum(summary["invalid"].values()) == summary["faults_injected"] == 2, summary["invalid"]
    assert summary["forecasts"] > 40 and summary["triggers_sent"] >= 1
    assert summary["stimulations"] == summary["triggers_sent"]
    assert summary["response"]["rate_ratio"] > 2.0
    for proc in ("sim", "run", "controller"):
        assert (run_dir / f"{proc}.summary.json").is_file() and (run_dir / f"{proc}.log").is_file()
    assert (run_dir / "config.toml").is_file()
    assert "warm-up before subscribing to frames" in (run_dir / "run.log").read_text()

    # the record: the demo names the two commands; they run on its run directory, and the NWB file holds each
    # trigger of the audit log with the forecast behind it
    for action in ("report", "export-nwb"):
        assert f"loopcast session {action} {run_dir}" in out
        cmd = subprocess.run([sys.executable, "-m", "loopcast.cli", "session", action, str(run_dir)],
                             capture_output=True, text=True, cwd=tmp_path, timeout=120)
        assert cmd.returncode == 0, cmd.stdout[-2000:] + cmd.stderr[-2000:]
    assert (run_dir / "session.png").stat().st_size > 10_000
    sent = {r["trigger"]["trigger_id"]: r for r in read_audit(run_dir / "controller.audit.jsonl").records
            if r["kind"] == "forecast" and r["decision"] == "sent"}
    assert len(sent) == summary["triggers_sent"]
    record = read_session(run_dir)
    with NWBHDF5IO(str(run_dir / "session.nwb"), "r") as io:
        nwb = io.read()
        triggers = nwb.intervals["triggers"].to_dataframe()
        dff_times = nwb.processing["ophys"]["DfOverF"]["dff"].timestamps[:]
    assert record.dff is not None and len(record.dff.seq) == 60
    np.testing.assert_allclose(dff_times, record.seconds(record.dff.t_src_ns), atol=1e-9)
    for row in triggers.itertuples():   # one clock: the trigger's PUBACK in seconds from the same start
        assert row.start_time == pytest.approx(record.seconds(sent[row.trigger_id]["t_puback_ns"]), abs=1e-6)
    assert sorted(triggers["trigger_id"]) == sorted(sent)
    for row in triggers.itertuples():
        cause = sent[row.trigger_id]
        assert (row.seq, row.model, row.engine_version) == (cause["seq"], cause["model"], cause["engine_version"])
        assert row.value == pytest.approx(cause["value"]) and row.lead == cause["lead"]

    # the kernels were compiled into the kernel cache, and numba wrote nothing next to the source
    cached = {p.name.split("-")[0] for p in (tmp_path / "kernels").rglob("*.nbi")}
    assert set(LOOP_KERNELS) <= cached, cached
    written = [p for d in SOURCES for p in (ROOT / d).rglob("*.nb[ic]") if p.stat().st_mtime >= start]
    assert not written, written
