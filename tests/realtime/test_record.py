"""The session record's parts: the live skill tracker, the growing zarr tables and the recorder's thread."""
from __future__ import annotations

import multiprocessing as mp
import os
import threading
from pathlib import Path

import numpy as np
import pytest
import zarr

from loopcast.realtime.metrics import Metrics
from loopcast.realtime.record.config import RecordConfig, StageInfo
from loopcast.realtime.record.session import SessionRecorder, select_neurons
from loopcast.realtime.record.skill import SkillTracker
from loopcast.realtime.record.store import Column, GrowingTable, read_table
from loopcast.realtime.record.writer import leave_idle, tell
from loopcast.session.data import RecordError, read_session


def test_skill_scores_each_lead_against_the_frame_that_came() -> None:
    t = SkillTracker(lead_times=(1, 2), context=2, window=2)
    rows = {s: np.full(3, float(s), np.float32) for s in range(6)}
    for s in (0, 1):
        assert t.observe(s, rows[s]) == []
    pred = np.array([[2.5, 2.5, 2.5], [3.0, 3.0, 4.0]], np.float32)   # made from frame 1: leads 1, 2
    assert t.add(1, pred) == []
    (r1,) = t.observe(2, rows[2])
    assert (r1.source_seq, r1.target_seq, r1.lead) == (1, 2, 1)
    assert r1.mae == pytest.approx(0.5) and r1.baseline_mae == pytest.approx(1.5)   # baseline mean(0, 1) = 0.5
    (r2,) = t.observe(3, rows[3])
    assert r2.lead == 2 and r2.mae == pytest.approx(1 / 3) and r2.baseline_mae == pytest.approx(2.5)


def test_skill_scores_a_late_forecast_at_once_and_forgets_lost_targets() -> None:
    t = SkillTracker(lead_times=(1, 3), context=1, window=10)
    for s in range(4):
        t.observe(s, np.full(2, float(s), np.float32))
    late = t.add(1, np.array([[2.0, 2.0], [9.0, 9.0]], np.float32))   # targets 2 (came) and 4 (not yet)
    assert [(r.target_seq, r.mae) for r in late] == [(2, 0.0)]
    assert t.observe(5, np.zeros(2, np.float32)) == []                 # frame 4 was lost: its row is dropped
    assert t.observe(4, np.zeros(2, np.float32)) == []
    assert t.add(99, np.zeros((2, 2), np.float32)) == []               # no context rows for frame 99


def test_skill_rolling_window_per_lead() -> None:
    t = SkillTracker(lead_times=(1,), context=1, window=2)
    maes = []
    for s in range(5):
        got = t.observe(s, np.zeros(1, np.float32))
        maes += [(r.mae, r.rolling_mae) for r in got]
        t.add(s, np.full((1, 1), float(s + 1), np.float32))
    assert maes == [(1.0, 1.0), (2.0, 1.5), (3.0, 2.5), (4.0, 3.5)]


def test_growing_table_commits_rows_only_after_their_chunk_is_written(tmp_path: Path) -> None:
    root = zarr.open_group(str(tmp_path / "t.zarr"), mode="w")
    table = GrowingTable(root, "t", {"a": Column("int64"), "b": Column("float32", (3,))}, chunk_bytes=48)
    assert table.chunk_rows == 4
    for i in range(10):
        table.append(a=i, b=np.full(3, i, np.float32))
    assert table.group.attrs.asdict()["rows"] == 8    # two full chunks flushed on their own
    table.flush()
    cols = read_table(zarr.open_group(str(tmp_path / "t.zarr" / "t"), mode="r"))
    assert cols["a"].tolist() == list(range(10)) and cols["b"][9].tolist() == [9.0] * 3
    for i in range(10, 40):                           # past the initial capacity (4 chunks): it grows
        table.append(a=i, b=np.zeros(3, np.float32))
    table.close()
    done = zarr.open_group(str(tmp_path / "t.zarr" / "t"), mode="r")
    assert done.attrs["complete"] and read_table(done)["a"].tolist() == list(range(40))
    assert zarr.open_array(str(tmp_path / "t.zarr" / "t" / "a"), mode="r").shape == (40,)   # shrunk to the rows


def test_select_neurons() -> None:
    assert select_neurons("all", 5).tolist() == [0, 1, 2, 3, 4]
    assert select_neurons("stride:2", 5, np.array([3])).tolist() == [0, 2, 3, 4]
    assert select_neurons("indices:4,1", 5).tolist() == [1, 4]
    for bad in ("stride:0", "indices:7", "some", "stride:x"):
        with pytest.raises(ValueError, match="pipeline.record.neurons"):
            select_neurons(bad, 5)


def _recorder(path: Path, metrics: Metrics, **cfg: object) -> SessionRecorder:
    stage = StageInfo("forecast/toy", "forecast", "toy", "dff", (1, 2), 2)
    return SessionRecorder(RecordConfig(**cfg), path, np.array([0, 2]), [stage], metrics,  # type: ignore[arg-type]
                           {"rig": "r", "frame_period_s": 1.0})


def test_recorder_writes_frames_rows_forecasts_and_skill(tmp_path: Path) -> None:
    metrics = Metrics("t")
    manifest = tmp_path / "manifest.json"
    manifest.write_text('{"name": "toy", "version": "v0001"}')
    rec = _recorder(tmp_path / "session.zarr", metrics, flush_s=0.05)
    rec.rejected(5, "malformed_header", None, None)
    for s in range(6):
        rec.rows(s, 100 + s, np.arange(3, dtype=np.float32) + s, None)
        rec.frame(s, 100 + s, 200 + s, "forecast" if s >= 1 else "not_ready", (1.0, 2.0, 3.0 if s else np.nan))
        if s >= 1:
            rec.forecast("forecast/toy", s, 100 + s, 300 + s, "toy/v0001", manifest,
                         np.full((2, 3), s + 1, np.float32))
    rec.close()
    rec.check()
    data = read_session(tmp_path)
    assert data.frames is not None and data.dff is not None
    assert data.frames.status.tolist() == [1, 0, 0, 0, 0, 0, 0] and data.frames.reasons == ("malformed_header",)
    assert data.frames.seq[0] == -1 and data.dff.data.shape == (6, 2)
    assert data.dff.data[3].tolist() == [3.0, 5.0]                     # neurons 0 and 2 of frame 3
    fc = data.forecasts["forecast.toy"]
    assert fc.data.shape == (5, 2, 2) and fc.engine_version == ("toy/v0001",) * 5
    assert data.manifests["toy/v0001"]["version"] == "v0001"
    skill = data.skill["toy"]
    assert len(skill.mae) == 2 * 5 - 3                                 # targets past frame 5 never came
    gauge = metrics.registry.get_sample_value("loopcast_forecast_mae", {"model": "toy", "lead": "1"})
    assert gauge == pytest.approx(float(skill.rolling_mae[skill.lead == 1][-1]))
    assert not [p for p in data.problems if "session" in p]


def test_an_existing_store_is_refused(tmp_path: Path) -> None:
    _recorder(tmp_path / "session.zarr", Metrics("t")).close()
    with pytest.raises(FileExistsError):
        _recorder(tmp_path / "session.zarr", Metrics("t"))


def test_recorder_failure_is_raised_in_the_callers_thread(tmp_path: Path) -> None:
    rec = _recorder(tmp_path / "session.zarr", Metrics("t"))
    rec.forecast("forecast/toy", 0, 0, 0, "toy/v1", tmp_path / "none.json", np.zeros((5, 3), np.float32))  # H != 2
    rec.close()
    with pytest.raises(RuntimeError, match="session record"):
        rec.check()


def test_a_dead_writer_process_is_raised_in_the_callers_thread(tmp_path: Path) -> None:
    rec = _recorder(tmp_path / "session.zarr", Metrics("t"))
    rec._proc.kill()
    rec._proc.join(60)
    assert rec._proc.exitcode is not None, "the killed writer was not reaped within 60 s"
    with pytest.raises(RuntimeError, match="session record"):
        rec.check()
    rec.close()


def test_full_queue_drops_and_counts(tmp_path: Path) -> None:
    metrics = Metrics("t")
    rec = _recorder(tmp_path / "session.zarr", metrics, max_queue=1, flush_s=10.0)
    for s in range(200):
        rec.frame(s, s, s, "not_ready", (1.0, 1.0, np.nan))
    rec.close()
    dropped = metrics.count("loopcast_record_dropped_total", item="frame")
    data = read_session(tmp_path)
    assert data.frames is not None and dropped > 0 and len(data.frames) + dropped == 200
    assert data.attrs["dropped"] == {"frame": int(dropped)}


@pytest.mark.parametrize("damage, error", [
    ("missing", "no such run directory"),
    ("empty", "holds neither a session store"),
    ("other_version", "written by another version"),
    ("not_zarr", "not a readable zarr group"),
])
def test_bad_run_directories_name_the_file(tmp_path: Path, damage: str, error: str) -> None:
    run = tmp_path / "run"
    if damage != "missing":
        run.mkdir()
    if damage == "other_version":
        zarr.open_group(str(run / "session.zarr"), mode="w").attrs.update({"format": "loopcast-session",
                                                                            "version": 99})
    elif damage == "not_zarr":
        (run / "session.zarr").mkdir()
        (run / "session.zarr" / "zarr.json").write_text("not json")
    with pytest.raises(RecordError, match=error) as info:
        read_session(run)
    assert str(run) in str(info.value)


@pytest.mark.skipif(not hasattr(os, "SCHED_IDLE"), reason="SCHED_IDLE is Linux only")
def test_the_writer_leaves_sched_idle_to_close_when_allowed() -> None:
    """On a saturated CPU a SCHED_IDLE writer barely runs, and a CI run's pipeline was killed mid-close.
    Checked in a thread of its own (Linux schedules threads: the test process keeps its policy)."""
    seen: list[tuple[bool, int]] = []

    def body() -> None:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
        left = leave_idle()
        seen.append((left, os.sched_getscheduler(0)))

    t = threading.Thread(target=body)
    t.start()
    t.join()
    left, policy = seen[0]
    assert left == (policy == os.SCHED_OTHER)
    if os.geteuid() == 0:
        assert left


def test_the_writer_outlives_a_gone_pipeline() -> None:
    """A killed pipeline closes the writer's way back: telling it anything is then False, not a crash that
    would lose what the writer received."""
    reader, writer = mp.Pipe(duplex=False)
    assert tell(writer, ("skill", []))
    reader.close()
    assert not tell(writer, ("skill", []))
