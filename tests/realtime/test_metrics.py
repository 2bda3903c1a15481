"""Per-process metrics: the summary a process writes at exit, with its latency samples when asked."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from loopcast.realtime.metrics import Metrics, MetricsConfig


def test_summary_has_quantiles_and_the_samples_file_every_sample_in_order(tmp_path: Path) -> None:
    m = Metrics("run", MetricsConfig(enabled=False))
    for ms in (3.0, 1.0, 2.0):
        m.latency("forecast").observe(ms / 1e3)
    m.latency("forecast/tsmixer").observe(0.05)
    m.write_summary(tmp_path / "run.summary.json", {"pipeline": {"frames": 3}}, samples=True)
    summary = json.loads((tmp_path / "run.summary.json").read_text())
    assert summary["latency"]["forecast"]["count"] == 3
    assert summary["latency"]["forecast"]["max_ms"] == pytest.approx(3.0)
    assert summary["pipeline"] == {"frames": 3}
    samples = json.loads((tmp_path / "run.latency.json").read_text())
    assert samples == {"forecast": pytest.approx([0.003, 0.001, 0.002]), "forecast/tsmixer": [0.05]}


def test_no_samples_file_unless_asked(tmp_path: Path) -> None:
    m = Metrics("controller", MetricsConfig(enabled=False))
    m.latency("trigger").observe(0.001)
    m.write_summary(tmp_path / "controller.summary.json")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["controller.summary.json"]
