"""`loopcast session report RUN_DIR` and `loopcast session export-nwb RUN_DIR`: a run directory's record
(docs/record.md), summarised with a figure, or written as one NWB file."""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np

from loopcast.session.data import RecordError, SessionData, read_session

log = logging.getLogger("loopcast.session")
ACTIONS = ("report", "export-nwb")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=ACTIONS, help="report: summary and figure; export-nwb: one NWB file")
    p.add_argument("session_dir", metavar="RUN_DIR", help="the run directory of `loopcast run` / `demo`")
    p.add_argument("--audit", help="the controller's audit log, when it ran with another run directory")
    p.add_argument("--out", help="report: the figure (default RUN_DIR/session.png); "
                                 "export-nwb: the file (default RUN_DIR/session.nwb)")
    p.add_argument("--overwrite", action="store_true", help="export-nwb: replace an existing file")
    p.add_argument("--recording", help="export-nwb: the recording whose segmentation gives the ROIs "
                                       "(default: paths.recording of the run's config)")


def run(args: argparse.Namespace) -> int:
    """Read the record, then report or export; a RecordError is raised for the CLI to print."""
    data = read_session(args.session_dir, args.audit)
    for problem in data.problems:
        log.warning("%s", problem)
    if args.action == "report":
        return _report(data, Path(args.out) if args.out else data.run_dir / "session.png")
    return _export(data, Path(args.out) if args.out else data.run_dir / "session.nwb", args)


def _report(data: SessionData, figure: Path) -> int:
    from loopcast.session.report import plot_session, summarise
    print(summarise(data))
    print(f"figure {plot_session(data, figure)}")
    return 0


def _export(data: SessionData, out: Path, args: argparse.Namespace) -> int:
    from loopcast.session.nwb import export_nwb
    try:
        path = export_nwb(data, out, _segmentation(data, args.recording), overwrite=args.overwrite)
    except ValueError as exc:
        raise RecordError(str(exc)) from exc
    print(f"NWB file {path}")
    return 0


def _segmentation(data: SessionData, recording: str | None) -> np.ndarray | None:
    """The recording's label volume, or None (the NWB file then has ROIs without voxel masks)."""
    from loopcast.replay.layout import Recording, RecordingError
    location = recording or data.attrs.get("recording") or data.config.get("paths", {}).get("recording")
    if not location:
        log.warning("no recording named in the record: ROIs are written without voxel masks (--recording)")
        return None
    try:
        return Recording.open(str(location)).segmentation()
    except (RecordingError, OSError, ValueError) as exc:
        log.warning("recording %s unreadable (%s): ROIs are written without voxel masks (--recording)",
                    location, exc)
        return None
