"""A session's record (`SessionData`) as one NWB file: `export_nwb(data, out, segmentation)`.

Times: `session_start_time` is `data.t0_ns` as an aware UTC datetime, truncated to the microsecond (all NWB keeps;
the exact t0_ns is in the metadata, source "export"); every time in the file is float64 seconds from `data.t0_ns`
(`data.seconds`), so all tables share one origin. `identifier` is a fresh UUID per file; `session_id` is the run
directory's name.

Layout (S recorded neurons, R stored dF/F frames, F forecasts per stage; tables without rows are left out):

    /general/subject                               from the config's [subject] table, else "unknown" (see _subject)
    /general/devices/<rig>, /general/optophysiology/volume   the light-sheet rig and its imaged volume
    /processing/ophys/ImageSegmentation/neurons    PlaneSegmentation: S rows, `neuron` + `voxel_mask`
    /processing/ophys/neurons                      (instead, without a segmentation) DynamicTable: `neuron` only
    /processing/ophys/DfOverF/dff                  RoiResponseSeries (R, S): the causal dF/F the loop computed
    /processing/ophys/dff_frame_seq                TimeSeries (R,): the frame seq of each dF/F row
    /processing/loopcast/frames                    DynamicTable: every handled frame (valid or not, with reason)
    /processing/loopcast/frame_times               TimeSeries: seq of the valid frames at their source times
    /processing/loopcast/metadata                  DynamicTable: config, session attrs, engine manifests, audit
                                                   start/stop, export info as key/value rows (nwb_tables)
    /processing/forecasts/<kind>.<model>           TimeSeries (F, H, S) at the source frames' times
    /processing/forecasts/<kind>.<model>.messages  DynamicTable: seq, publish time, engine version, latency
    /processing/forecasts/skill.<model>            DynamicTable: the live skill rows
    /intervals/triggers, /events/*                 the audit log (nwb_audit)

ROIs: neuron i of the recording is label i + 1 of the segmentation (realtime/preprocess/traces.py). With a
segmentation, each recorded neuron's voxels become a binary `voxel_mask` (x, y, z, weight 1.0), built in one
vectorised pass (no per-neuron loop: 2.0 s for a 2048 x 1328 x 72 volume). At ZAPBench scale (71,721 neurons,
8.1 M labelled voxels) that is 8.1 M rows of 16 bytes = 130 MB before gzip (~20 MB after, measured on a synthetic
segmentation of that size), plus a 0.6 MB index; hdmf then converts the compound rows one by one in Python, which
adds ~12 s to the export (no progress bar can hook into that loop).
Without a segmentation pynwb refuses a PlaneSegmentation (it requires a mask column) and an empty mask makes
nwbinspector's table checks fail, so the ROIs are a plain DynamicTable `neurons` (S rows, 8 bytes each: 0.6 MB
at 71,721) that the RoiResponseSeries points to; nwbinspector reports that once as a BEST_PRACTICE_VIOLATION
(rois not a PlaneSegmentation), the price of not guessing masks.

Events: pynwb 4.2 writes NWB 2.11, whose core holds `EventsTable` under /events, so no extension is needed (and
the file passes pynwb's validator and nwbinspector); ndx-events 0.4.0 defines the same type names and, imported,
makes hdmf warn that its specs conflict with the core ones (it falls back to the core), hence core. Triggers:
core `TimeIntervals` (start, stop and the command's columns), which every NWB reader knows. ndx-optogenetics
(not installed; it also pulls in ndx-ophys-devices) describes stimulation through excitation-source, fiber,
virus/effector and site metadata that loopcast does not record, and a trigger's neuron set is not a site: using
it would mean inventing required metadata. The rig's light path, if known, belongs in a later extension.

Large arrays (dF/F, forecasts: up to GBs at full scale) are gzip-compressed and, above PROGRESS_BYTES, written in
blocks of rows behind a tqdm bar (shown on a terminal only).
"""
from __future__ import annotations

import os
import uuid
from datetime import UTC, datetime, timedelta
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np
from hdmf.backends.hdf5 import H5DataIO  # type: ignore[import-untyped]
from hdmf.common import DynamicTable  # type: ignore[import-untyped]
from hdmf.data_utils import DataChunkIterator  # type: ignore[import-untyped]
from pynwb import NWBHDF5IO, NWBFile, TimeSeries  # type: ignore[import-untyped]
from pynwb.file import Subject  # type: ignore[import-untyped]
from tqdm import tqdm

from loopcast.session.data import FORECAST_CODES, LATENCY_COLUMNS, REGISTRATION_COLUMNS, SessionData, SkillTable
from loopcast.session.nwb_audit import add_audit
from loopcast.session.nwb_ophys import add_ophys
from loopcast.session.nwb_tables import Col, metadata_table, vector_columns
from loopcast.session.report import frame_times

PROGRESS_BYTES = 256 << 20     # arrays above this are written in blocks of rows with a progress bar
BLOCK_BYTES = 32 << 20
SUBJECT_FIELDS = ("subject_id", "species", "sex", "age", "description", "genotype", "strain")


def export_nwb(data: SessionData, out: Path, segmentation: np.ndarray | None = None,
               overwrite: bool = False) -> Path:
    """Write the session as one NWB file at `out` (through a temporary file and a rename: a failed export
    leaves nothing). ValueError if `out` exists and not `overwrite`, or the segmentation does not fit."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise ValueError(f"{out} exists: pass overwrite=True to replace it")
    nwbfile = build_nwbfile(data, segmentation)
    tmp = out.with_name(f".{out.stem}.{os.getpid()}.tmp.nwb")   # pynwb warns without .nwb
    try:
        with NWBHDF5IO(str(tmp), "w") as io:
            io.write(nwbfile)
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return out


def build_nwbfile(data: SessionData, segmentation: np.ndarray | None = None) -> NWBFile:
    """The in-memory NWBFile of `export_nwb`."""
    nwbfile = _new_file(data)
    add_ophys(nwbfile, data, segmentation, compressed)
    _add_loop(nwbfile, data)
    _add_forecasts(nwbfile, data)
    add_audit(nwbfile, data)
    return nwbfile


def _rig(data: SessionData) -> str:
    return str(data.attrs.get("rig") or data.config.get("rig", {}).get("name") or "rig")


def _new_file(data: SessionData) -> NWBFile:
    seconds, ns = divmod(int(data.t0_ns), 1_000_000_000)
    start = datetime.fromtimestamp(seconds, tz=UTC) + timedelta(microseconds=ns // 1000)   # NWB keeps us
    name, rig = data.run_dir.name, _rig(data)
    exp = data.config.get("experiment") or {}
    return NWBFile(
        session_description=f"loopcast closed-loop session {name} on rig {rig}: light-sheet whole-brain imaging, "
        "online dF/F, activity forecasts and forecast-triggered optogenetic stimulation",
        identifier=str(uuid.uuid4()),     # one per file; session_id names the session
        session_start_time=start, timestamps_reference_time=start, session_id=name,
        experiment_description=str(exp.get("description") or "Real-time closed loop: volumes -> per-neuron dF/F "
                                   "-> forecasts -> threshold policy -> interlocks -> optogenetic triggers over MQTT "
                                   "(loopcast)."),
        experimenter=list(exp.get("experimenter") or []) or None, institution=exp.get("institution") or None,
        lab=exp.get("lab") or None,
        keywords=["zebrafish", "light-sheet", "closed-loop", "forecasting", "optogenetics"],
        notes="\n".join(data.problems) or None, subject=_subject(data),
        source_script=f"loopcast {_version()} (loopcast session export-nwb)",
        source_script_file_name="loopcast/session/nwb.py")


def _subject(data: SessionData) -> Subject:
    """The config's [subject] table (fields of pynwb's Subject) over defaults that say what is unknown: loopcast
    records no subject, and nwbinspector wants id, species, sex and age (a larval zebrafish: sex 'U')."""
    given = {k: str(v) for k, v in (data.config.get("subject") or {}).items() if k in SUBJECT_FIELDS and v}
    fields = {"subject_id": "unknown", "species": "Danio rerio", "sex": "U", "age": "P0D/",
              "description": "not recorded by loopcast: set a [subject] table in the config"} | given
    return Subject(**fields)


def _version() -> str:
    try:
        return version("loopcast")
    except PackageNotFoundError:
        return "unknown"


def compressed(array: np.ndarray, label: str) -> H5DataIO:
    """gzip-compressed dataset; above PROGRESS_BYTES written in blocks of rows behind a tqdm bar."""
    array = np.asarray(array)
    if array.nbytes <= PROGRESS_BYTES or array.shape[0] == 0:
        return H5DataIO(data=array, compression="gzip", compression_opts=4)
    row_bytes = max(1, array.nbytes // array.shape[0])
    rows = (array[i] for i in tqdm(range(array.shape[0]), desc=f"nwb {label}", unit="row", disable=None))
    chunks = DataChunkIterator(data=rows, maxshape=array.shape, dtype=array.dtype,
                               buffer_size=max(1, BLOCK_BYTES // row_bytes))
    return H5DataIO(data=chunks, compression="gzip", compression_opts=4)


def _add_loop(nwbfile: NWBFile, data: SessionData) -> None:
    """/processing/loopcast: the frames table, the valid frames' times and the metadata."""
    module = nwbfile.create_processing_module("loopcast", "The loop's own record: every frame the pipeline "
                                              "handled, and the session's configuration and provenance.")
    f = data.frames
    if f is not None and len(f):
        module.add(_frames_table(data))
        valid = f.valid & (f.t_src_ns > 0)
        if valid.any():
            module.add(TimeSeries(name="frame_times", data=f.seq[valid].astype(np.int64), unit="frame",
                                  timestamps=data.seconds(f.t_src_ns[valid]),
                                  description="seq of every valid frame at its source time (s)"))
    module.add(metadata_table(_metadata(data)))


def _frames_table(data: SessionData) -> DynamicTable:
    f = data.frames
    assert f is not None
    status = f.status.astype(np.int64)
    reasons = ["" if k == 0 else (f.reasons[k - 1] if k - 1 < len(f.reasons) else f"status {k}") for k in status]
    src = np.where(f.t_src_ns > 0, data.seconds(f.t_src_ns), np.nan)
    codes = [FORECAST_CODES[k] if 0 <= k < len(FORECAST_CODES) else str(k) for k in f.forecast.astype(int)]
    lat = np.asarray(f.latency_ms, dtype=np.float32).reshape(len(f), len(LATENCY_COLUMNS))
    cols = [Col("seq", "frame sequence number (-1: unreadable)", f.seq.astype(np.int64)),
            Col("source_time", "frame source time t_src (s; NaN: unknown)", src),
            Col("recv_time", "when the pipeline received it (s)", data.seconds(f.t_recv_ns)),
            Col("valid", "passed validation", f.valid.copy()),
            Col("status", "0 valid, k > 0 rejected for reasons[k - 1]", f.status.astype(np.int8)),
            Col("reason", "why it was rejected ('' when valid)", reasons),
            Col("forecast", f"what the first forecast stage did: one of {', '.join(FORECAST_CODES)}", codes),
            *[Col(f"{name}_latency_ms", f"{name} latency from t_src (ms; NaN: stage did not run)", lat[:, i])
              for i, name in enumerate(LATENCY_COLUMNS)]]
    if f.registration is not None:
        reg = np.asarray(f.registration, dtype=np.float32).reshape(len(f), len(REGISTRATION_COLUMNS))
        cols += [Col(f"registration_{name}", f"registration {name} of the volume against the reference ("
                     f"{'voxels' if name != 'confidence' else 'peak over its surroundings, in std'}; NaN: not "
                     "registered)", reg[:, i]) for i, name in enumerate(REGISTRATION_COLUMNS)]
    return DynamicTable(name="frames", description="Every message the pipeline handled, in arrival order.",
                        columns=vector_columns(cols))


def _metadata(data: SessionData) -> dict[str, Any]:
    trees: dict[str, Any] = {"config": data.config,
                             "session_attrs": {k: v for k, v in data.attrs.items() if k != "engines"}}
    trees |= {f"engine/{v}": m for v, m in data.manifests.items()}
    for kind in ("start", "stop"):
        recs = data.records(kind)
        if recs:
            trees[f"audit_{kind}"] = recs[0]
    trees["export"] = {"t0_ns": int(data.t0_ns), "run_dir": str(data.run_dir), "problems": list(data.problems),
                       "audit_path": None if data.audit_path is None else str(data.audit_path),
                       "loopcast": _version()}
    return trees


def _add_forecasts(nwbfile: NWBFile, data: SessionData) -> None:
    """/processing/forecasts: each stage's messages and the live skill tables."""
    if not data.forecasts and not data.skill:
        return
    module = nwbfile.create_processing_module("forecasts", "What the forecast stages published (restricted to the "
                                              "recorded neurons) and their live skill.")
    for s in data.forecasts.values():
        if len(s.seq) == 0:
            continue
        what = "activation probability over the next H frames" if s.kind == "activation" else f"predicted {s.signal}"
        module.add(TimeSeries(
            name=s.name, data=compressed(s.data, s.name), timestamps=data.seconds(s.t_src_ns),
            unit="probability" if s.kind == "activation" or s.signal == "spike_prob" else "n.a.",
            description=f"{s.kind} stage {s.model}: axes (forecast F, lead H, neuron S); {what}; axis 1 = lead "
            f"times {list(s.lead_times)} in frames (frame period {data.frame_period_s} s) after the source frame; "
            "axis 2 = the recorded neurons, in the order of the ROI table's `neuron` column; timestamps = the "
            "source frames' times; per-message metadata in the .messages table."))
        module.add(DynamicTable(name=f"{s.name}.messages", description=f"Per-message metadata of {s.name}.",
                                columns=vector_columns([
                                    Col("seq", "source frame", s.seq.astype(np.int64)),
                                    Col("source_time", "source frame time (s)", data.seconds(s.t_src_ns)),
                                    Col("publish_time", "when it was published (s)", data.seconds(s.t_pub_ns)),
                                    Col("engine_version", "engine that made it", list(s.engine_version)),
                                    Col("latency_ms", "t_src -> published (ms)", s.latency_ms.astype(np.float32))])))
    for sk in data.skill.values():
        if len(sk.lead):
            module.add(_skill_table(data, sk))


def _skill_table(data: SessionData, sk: SkillTable) -> DynamicTable:
    times = frame_times(data)
    target = np.array([times.get(int(q), np.nan) for q in sk.target_seq], dtype=np.float64)
    cols = [Col("source_seq", "frame the forecast was computed from", sk.source_seq.astype(np.int64)),
            Col("target_seq", "frame it was scored against", sk.target_seq.astype(np.int64)),
            Col("target_time", "that frame's source time (s; NaN: not in the frames table)", target),
            Col("lead", "lead time (frames)", sk.lead.astype(np.int16)),
            *[Col(name, desc, getattr(sk, name).astype(np.float32)) for name, desc in (
                ("mae", "mean |forecast - actual| over the recorded neurons"),
                ("baseline_mae", "the same for the mean-of-context baseline"),
                ("rolling_mae", f"mean of mae over the last {sk.window} rows of this lead"),
                ("rolling_baseline_mae", f"mean of baseline_mae over the last {sk.window} rows of this lead"))]]
    return DynamicTable(name=f"skill.{sk.model}", columns=vector_columns(cols),
                        description=f"Live forecast skill of {sk.model}: one row per (forecast, lead) scored; "
                        f"rolling window {sk.window}.")

