"""The NWB export: round trip of triggers, frames, dF/F, forecasts and metadata; pynwb's validator and
nwbinspector on the file; the no-segmentation path; overwrite refusal and no half-written file."""
from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from nwbinspector import Importance, inspect_nwbfile  # type: ignore[import-untyped]
from pynwb import NWBHDF5IO, NWBFile, validate  # type: ignore[import-untyped]

from loopcast.session import nwb as nwb_module
from loopcast.session.data import SessionData
from loopcast.session.nwb import export_nwb
from loopcast.session.nwb_ophys import voxel_masks
from loopcast.session.nwb_tables import flatten, read_metadata, unflatten

# hdmf's build warnings (e.g. a missing required attribute) are UserWarnings: a clean export has none
pytestmark = pytest.mark.filterwarnings("error::UserWarning")
SERIOUS = (Importance.ERROR, Importance.PYNWB_VALIDATION, Importance.CRITICAL, Importance.BEST_PRACTICE_VIOLATION)


@pytest.fixture(scope="module")
def nwb_path(tmp_path_factory: pytest.TempPathFactory, session_data: SessionData, segmentation: np.ndarray) -> Path:
    return export_nwb(session_data, tmp_path_factory.mktemp("nwb") / "session.nwb", segmentation)


@pytest.fixture(scope="module")
def nwbfile(nwb_path: Path) -> Iterator[NWBFile]:
    with NWBHDF5IO(str(nwb_path), "r") as io:
        yield io.read()


def _serious(path: Path) -> list[str]:
    return [f"{m.importance.name} {m.check_function_name} {m.location}: {m.message}"
            for m in inspect_nwbfile(nwbfile_path=str(path)) if m.importance in SERIOUS]


def test_triggers_round_trip(nwbfile: NWBFile, session_data: SessionData) -> None:
    sent = sorted((r for r in session_data.records("forecast") if r["decision"] == "sent"),
                  key=lambda r: r["t_puback_ns"])
    table = nwbfile.intervals["triggers"]
    assert len(table) == len(sent) == 4
    for i, r in enumerate(sent):
        cmd = r["trigger"]
        assert table["trigger_id"][i] == cmd["trigger_id"]
        assert table["start_time"][i] == pytest.approx(session_data.seconds(r["t_puback_ns"]), abs=1e-9)
        assert table["stop_time"][i] == pytest.approx(table["start_time"][i] + cmd["duration_ms"] / 1e3)
        assert list(table["targets"][i]) == cmd["targets"]
        assert (table["seq"][i], table["model"][i], table["lead"][i]) == (r["seq"], r["model"], r["lead"])
        assert table["value"][i] == pytest.approx(r["value"])
        assert table["source_time"][i] == pytest.approx(session_data.seconds(r["t_src_ns"]), abs=1e-9)
        assert table["decision_time"][i] == pytest.approx(session_data.seconds(r["t_decision_ns"]), abs=1e-9)
        assert (table["power_mw"][i], table["pattern"][i], table["policy"][i]) == (5.0, "ensemble-3", "ens-above")


def test_frames_round_trip(nwbfile: NWBFile, session_data: SessionData) -> None:
    f = session_data.frames
    assert f is not None
    assert nwbfile.session_start_time.timestamp() == session_data.t0_ns / 1e9
    frames = nwbfile.processing["loopcast"]["frames"]
    np.testing.assert_array_equal(frames["seq"].data[:], f.seq)
    np.testing.assert_array_equal(frames["valid"].data[:], f.valid)
    src = frames["source_time"].data[:]
    np.testing.assert_array_equal(src[f.t_src_ns > 0], session_data.seconds(f.t_src_ns[f.t_src_ns > 0]))
    assert np.isnan(src[f.t_src_ns == 0]).all()
    assert sorted(r for r in frames["reason"].data[:] if r) == ["malformed", "malformed", "wrong_shape"]
    np.testing.assert_array_equal(frames["recv_time"].data[:], session_data.seconds(f.t_recv_ns))
    np.testing.assert_array_equal(frames["forecast_latency_ms"].data[:], f.latency_ms[:, 2])
    times = nwbfile.processing["loopcast"]["frame_times"]
    np.testing.assert_array_equal(times.data[:], f.seq[f.valid])
    np.testing.assert_array_equal(times.timestamps[:], session_data.seconds(f.t_src_ns[f.valid]))


def test_dff_and_rois_round_trip(nwbfile: NWBFile, session_data: SessionData, segmentation: np.ndarray) -> None:
    assert session_data.dff is not None
    dff = nwbfile.processing["ophys"]["DfOverF"]["dff"]
    np.testing.assert_array_equal(dff.data[:], session_data.dff.data)
    np.testing.assert_array_equal(dff.timestamps[:], session_data.seconds(session_data.dff.t_src_ns))
    np.testing.assert_array_equal(nwbfile.processing["ophys"]["dff_frame_seq"].data[:], session_data.dff.seq)
    rois = nwbfile.processing["ophys"]["ImageSegmentation"]["neurons"]
    assert dff.rois.table is rois
    np.testing.assert_array_equal(rois["neuron"].data[:], session_data.neurons)
    for k, neuron in enumerate(session_data.neurons):
        mask = np.array([tuple(v)[:3] for v in rois["voxel_mask"][k]])
        assert len(mask) == np.count_nonzero(segmentation == neuron + 1)
        assert (segmentation[mask[:, 0], mask[:, 1], mask[:, 2]] == neuron + 1).all()


def test_forecasts_skill_and_metadata_round_trip(nwbfile: NWBFile, session_data: SessionData) -> None:
    series = session_data.forecasts["forecast.nlinear"]
    module = nwbfile.processing["forecasts"]
    ts = module["forecast.nlinear"]
    np.testing.assert_array_equal(ts.data[:], series.data)
    np.testing.assert_array_equal(ts.timestamps[:], session_data.seconds(series.t_src_ns))
    assert "[1, 2, 3, 4]" in ts.description
    messages = module["forecast.nlinear.messages"]
    np.testing.assert_array_equal(messages["seq"].data[:], series.seq)
    np.testing.assert_array_equal(messages["publish_time"].data[:], session_data.seconds(series.t_pub_ns))
    assert list(messages["engine_version"].data[:]) == list(series.engine_version)
    skill = module["skill.nlinear"]
    np.testing.assert_array_equal(skill["mae"].data[:], session_data.skill["nlinear"].mae)
    assert not np.isnan(skill["target_time"].data[:]).any()
    meta = read_metadata(nwbfile.processing["loopcast"]["metadata"])
    assert meta["config"] == session_data.config
    assert meta["engine/v0001"] == session_data.manifests["v0001"]
    assert meta["audit_start"] == session_data.records("start")[0]
    assert meta["export"]["t0_ns"] == session_data.t0_ns


def test_audit_events(nwbfile: NWBFile, session_data: SessionData) -> None:
    ev = nwbfile.events
    assert sorted(ev["suppressions"]["interlock"].data[:]) == ["disarmed", "min_interval", "min_interval"]
    assert len(ev["policy_decisions"]) == len(session_data.records("forecast"))
    control = ev["control_commands"]
    assert list(control["command"].data[:]) == ["arm", "", "estop"]
    assert list(control["accepted"].data[:]) == [True, False, True]
    assert list(ev["state_changes"]["event"].data[:]) == ["broker_connected", "armed", "estop"]
    t_ns = [r["t_ns"] for r in session_data.records("state")]
    np.testing.assert_array_equal(ev["state_changes"]["timestamp"].data[:], session_data.seconds(np.array(t_ns)))
    assert "publish_failures" not in ev      # no rows: left out


def test_pynwb_validator_passes(nwb_path: Path) -> None:
    assert validate(path=str(nwb_path)) == []


def test_nwbinspector_no_serious_messages(nwb_path: Path) -> None:
    assert _serious(nwb_path) == []


def test_without_segmentation(tmp_path: Path, session_data: SessionData) -> None:
    out = export_nwb(session_data, tmp_path / "plain.nwb")
    assert validate(path=str(out)) == []
    with NWBHDF5IO(str(out), "r") as io:
        f = io.read()
        rois = f.processing["ophys"]["neurons"]
        assert rois.colnames == ("neuron",)
        np.testing.assert_array_equal(rois["neuron"].data[:], session_data.neurons)
        assert f.processing["ophys"]["DfOverF"]["dff"].rois.table is rois
    # the one documented price: the rois of the RoiResponseSeries are not a PlaneSegmentation
    assert [m.split(" ")[1] for m in _serious(out)] == ["check_roi_response_series_link_to_plane_segmentation"]


def test_overwrite_refused_and_no_half_file(tmp_path: Path, session_data: SessionData,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    out = export_nwb(session_data, tmp_path / "s.nwb")
    with pytest.raises(ValueError, match="s.nwb exists"):
        export_nwb(session_data, out)
    export_nwb(session_data, out, overwrite=True)

    def broken_write(self: Any, *args: Any, **kwargs: Any) -> None:
        raise OSError("disk full")
    monkeypatch.setattr(nwb_module.NWBHDF5IO, "write", broken_write)
    with pytest.raises(OSError, match="disk full"):
        export_nwb(session_data, tmp_path / "t.nwb")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.nwb"]


def test_segmentation_must_fit(tmp_path: Path, session_data: SessionData, segmentation: np.ndarray) -> None:
    small = np.where(segmentation > 30, 0, segmentation)
    with pytest.raises(ValueError, match="no label in the segmentation"):
        export_nwb(session_data, tmp_path / "x.nwb", small)
    holes = np.where(segmentation == 5, 0, segmentation)     # neuron 4 is recorded
    with pytest.raises(ValueError, match=r"\[4\] have no voxels"):
        voxel_masks(holes, session_data.neurons)
    assert not (tmp_path / "x.nwb").exists()


def test_blockwise_write_round_trips(tmp_path: Path, session_data: SessionData, monkeypatch: pytest.MonkeyPatch
                                     ) -> None:
    monkeypatch.setattr(nwb_module, "PROGRESS_BYTES", 0)
    monkeypatch.setattr(nwb_module, "BLOCK_BYTES", 1000)
    out = export_nwb(dataclasses.replace(session_data, audit=[]), tmp_path / "b.nwb")
    assert session_data.dff is not None
    with NWBHDF5IO(str(out), "r") as io:
        f = io.read()
        np.testing.assert_array_equal(f.processing["ophys"]["DfOverF"]["dff"].data[:], session_data.dff.data)
        np.testing.assert_array_equal(f.processing["forecasts"]["forecast.nlinear"].data[:],
                                      session_data.forecasts["forecast.nlinear"].data)
        assert "triggers" not in f.intervals and len(f.events) == 0


def test_flatten_round_trip() -> None:
    tree = {"a": {"b": [1, 2], "c": [{"d": None}, {"e": {}}], "f.g": []}, "0": [[1], [2, [3]]], "s": "x/y"}
    rows = list(flatten(tree))
    assert ["a", "c", 0, "d"] in [p for p, _ in rows]
    assert unflatten(rows) == tree
    assert unflatten(list(flatten({}))) == {}
