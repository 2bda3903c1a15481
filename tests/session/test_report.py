"""The session report: summarise()'s counts and latencies, and plot_session's figure."""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import numpy as np

from loopcast.session.data import SessionData
from loopcast.session.report import plot_session, seq_gaps, summarise

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _value(text: str, label: str) -> str:
    """The rest of the line that starts (after indentation) with `label`."""
    m = re.search(rf"^[ ]+{re.escape(label)}[ ]+(.*)$", text, re.MULTILINE)
    assert m, f"no line {label!r} in\n{text}"
    return m.group(1).strip()


def test_summarise_counts(session_data: SessionData) -> None:
    text = summarise(session_data)
    assert _value(text, "handled") == "60"
    assert _value(text, "valid") == "57"
    assert _value(text, "invalid") == "3 (malformed 2, wrong_shape 1)"
    assert _value(text, "drops (seq gaps)") == "1 gaps, 1 frames missing"
    assert _value(text, "forecast.nlinear") == "53 published"
    assert _value(text, "triggers sent") == "4"
    assert _value(text, "suppressed") == "3 (disarmed 1, min_interval 2)"
    assert _value(text, "unusable forecasts") == "1"
    assert _value(text, "control commands") == "3 (2 accepted, 1 refused)"
    assert "1 chunk not flushed" in text


def test_summarise_latency_and_skill(session_data: SessionData) -> None:
    text = summarise(session_data)
    n, p50, p99, peak = _value(text, "trigger").split()
    assert (n, p50, peak) == ("4", "1.10", "1.10")
    assert _value(text, "ingest").split()[0] == "57"            # the rejected frames' NaN rows are skipped
    assert _value(text, "forecast").split()[0] == "53"
    sk = session_data.skill["nlinear"]
    last = np.flatnonzero(sk.lead == 4)[-1]
    lead4 = re.search(r"^\s+4\s+(\S+)\s+(\S+)\s+(\S+)\s+(\S+)$", text, re.MULTILINE)
    assert lead4 is not None
    assert float(lead4.group(1)) == round(float(sk.rolling_mae[last]), 4)
    assert float(lead4.group(3)) == round(float(sk.mae[sk.lead == 4].mean()), 4)


def test_seq_gaps(session_data: SessionData) -> None:
    assert seq_gaps(session_data) == (1, 1)
    assert seq_gaps(dataclasses.replace(session_data, frames=None)) == (0, 0)


def test_plot_session_writes_png(tmp_path: Path, session_data: SessionData) -> None:
    out = plot_session(session_data, tmp_path / "session.png")
    data = out.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 10_000


def test_plot_and_summary_without_audit_or_skill(tmp_path: Path, session_data: SessionData) -> None:
    bare = dataclasses.replace(session_data, audit=[], skill={}, forecasts={})
    out = plot_session(bare, tmp_path / "bare.png")
    assert out.read_bytes().startswith(PNG_MAGIC)
    assert _value(summarise(bare), "triggers sent") == "0"


def test_controller_only_session(tmp_path: Path, session_data: SessionData) -> None:
    """No session store (frames, dF/F, forecasts absent) and an activation policy: report, figure and NWB."""
    from pynwb import validate  # type: ignore[import-untyped]

    from loopcast.session.nwb import export_nwb
    audit = [r | {"policy": r["policy"] | {"kind": "activation_threshold", "level": 0.5}} if r["kind"] == "start"
             else r for r in session_data.audit]
    bare = dataclasses.replace(session_data, frames=None, dff=None, forecasts={}, skill={}, attrs={},
                               neurons=np.zeros(0, np.int64), audit=audit)
    text = summarise(bare)
    assert _value(text, "handled") == "0 (no session store)" and _value(text, "triggers sent") == "4"
    assert plot_session(bare, tmp_path / "c.png").read_bytes().startswith(PNG_MAGIC)
    out = export_nwb(bare, tmp_path / "c.nwb")
    assert validate(path=str(out)) == []
