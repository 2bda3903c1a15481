"""Prometheus metrics, one registry and one /metrics endpoint per process.

Stage latencies go to the histogram `loopcast_stage_latency_seconds{stage=...}` and, exactly, into a
bounded ring of samples so that a process can print and save p50/p99/max at exit (histogram buckets
only give approximate quantiles).
"""
from __future__ import annotations

import json
import threading
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, start_http_server

STAGES = ("ingest", "preprocess", "forecast", "activation", "trigger")
LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                   0.25, 0.5, 1.0, 2.5, 5.0)


@dataclass(frozen=True)
class MetricsConfig:
    """Where the process serves /metrics; port 0 picks a free port."""

    host: str = "127.0.0.1"
    port: int = 0
    enabled: bool = True
    keep_samples: int = 100_000


class LatencyRecorder:
    """Observe one stage's latency into its histogram child and an exact sample ring."""

    def __init__(self, child: Any, keep: int) -> None:
        self._child = child
        self._samples: deque[float] = deque(maxlen=keep)
        self._lock = threading.Lock()

    def observe(self, seconds: float) -> None:
        self._child.observe(seconds)
        with self._lock:
            self._samples.append(seconds)

    def observe_since_ns(self, t0_ns: int, t1_ns: int) -> float:
        s = max(0.0, (t1_ns - t0_ns) / 1e9)
        self.observe(s)
        return s

    def samples(self) -> np.ndarray:
        """The kept samples in seconds, oldest first."""
        with self._lock:
            return np.fromiter(self._samples, dtype=np.float64)

    def summary(self) -> dict[str, float]:
        a = self.samples()
        if a.size == 0:
            return {"count": 0}
        p50, p99 = np.percentile(a, [50, 99])
        return {"count": int(a.size), "p50_ms": p50 * 1e3, "p99_ms": p99 * 1e3,
                "max_ms": float(a.max()) * 1e3, "mean_ms": float(a.mean()) * 1e3}


class Metrics:
    """All loopcast metrics of one process, on a private registry."""

    def __init__(self, process: str, config: MetricsConfig | None = None) -> None:
        self.process = process
        self.config = config or MetricsConfig()
        r = self.registry = CollectorRegistry()
        self.stage_latency = Histogram("loopcast_stage_latency_seconds", "Latency per stage, from the "
                                       "source timestamp unless noted", ["stage"], registry=r,
                                       buckets=LATENCY_BUCKETS)
        self.frames_received = Counter("loopcast_frames_received_total", "Valid frames accepted", registry=r)
        self.frames_dropped = Counter("loopcast_frames_dropped_total", "Frames lost (seq gaps) or skipped "
                                      "to keep latency bounded", ["reason"], registry=r)
        self.frames_invalid = Counter("loopcast_frames_invalid_total", "Frames rejected at validation",
                                      ["reason"], registry=r)
        self.session_changes = Counter("loopcast_session_changes_total", "New sessions of the source (the frame "
                                       "header's `session` changed): seq order and preprocessing start over",
                                       registry=r)
        self.frames_sent = Counter("loopcast_frames_sent_total", "Frames published by a source", registry=r)
        self.forecasts = Counter("loopcast_forecasts_published_total", "Forecasts published", ["model"], registry=r)
        self.activations = Counter("loopcast_activations_published_total", "Activation predictions published",
                                   ["model"], registry=r)
        self.values_invalid = Counter("loopcast_values_invalid_total", "Non-finite or clamped values "
                                      "handled in preprocessing", ["kind"], registry=r)
        self.triggers_sent = Counter("loopcast_triggers_sent_total", "Triggers acknowledged by the broker",
                                     registry=r)
        self.triggers_suppressed = Counter("loopcast_triggers_suppressed_total", "Triggers the policy wanted "
                                           "but an interlock blocked", ["interlock"], registry=r)
        self.stimulations = Counter("loopcast_stimulations_total", "Trigger commands applied by a "
                                    "(simulated) stimulator", registry=r)
        self.errors = Counter("loopcast_errors_total", "Failures that escalated", ["kind"], registry=r)
        self.stage_skipped = Counter("loopcast_stage_frames_skipped_total", "Frames a forecast stage served "
                                     "beside the first did not run on: it was busy with an earlier frame and "
                                     "ran on the newest next (stage = its topic)", ["stage"], registry=r)
        self.engine_swaps = Counter("loopcast_engine_swaps_total", "Engine versions switched to at a "
                                    "frame boundary (hot swap)", registry=r)
        self.engine_load_failures = Counter("loopcast_engine_load_failures_total", "Newer engine versions "
                                            "refused: failed to load or validate", ["reason"], registry=r)
        self.engine_info = Info("loopcast_engine", "The engine serving forecasts", registry=r)
        self.stage_engine = Info("loopcast_stage_engine", "The engine serving each forecast or activation "
                                 "stage (stage = its topic, e.g. activation/quantformer)", ["stage"], registry=r)
        self.armed = Gauge("loopcast_controller_armed", "1 when the controller is armed", registry=r)
        self.forecast_mae = Gauge("loopcast_forecast_mae", "Live forecast skill: rolling mean absolute error of "
                                  "the forecasts at one lead time against the signal that came (recorded "
                                  "neurons; window pipeline.record.skill_window)", ["model", "lead"], registry=r)
        self.forecast_baseline_mae = Gauge("loopcast_forecast_baseline_mae", "The same for the mean-of-context "
                                           "baseline", ["model", "lead"], registry=r)
        self.registration_shift = Gauge("loopcast_registration_shift_voxels", "The newest volume's rigid shift "
                                        "from the registration reference (voxels)", ["axis"], registry=r)
        self.registration_confidence = Gauge("loopcast_registration_confidence", "The newest volume's "
                                             "registration confidence (correlation peak over its surroundings "
                                             "in standard deviations; noise ~4-6)", registry=r)
        self.record_dropped = Counter("loopcast_record_dropped_total", "Items the session record's writer "
                                      "could not keep up with", ["item"], registry=r)
        self._latency = {s: LatencyRecorder(self.stage_latency.labels(stage=s), self.config.keep_samples)
                         for s in STAGES}
        self._latency_lock = threading.Lock()
        self._server: Any = None
        self.port: int | None = None

    def latency(self, stage: str) -> LatencyRecorder:
        """The recorder of a stage label: one of STAGES, or another made on first use (e.g. a second
        forecast stage's topic, 'forecast/sbm')."""
        with self._latency_lock:
            if stage not in self._latency:
                self._latency[stage] = LatencyRecorder(self.stage_latency.labels(stage=stage),
                                                       self.config.keep_samples)
            return self._latency[stage]

    def serve(self) -> int | None:
        """Start the /metrics endpoint (if enabled); returns the bound port."""
        if not self.config.enabled or self._server is not None:
            return self.port
        server, _thread = start_http_server(self.config.port, addr=self.config.host, registry=self.registry)
        self._server, self.port = server, server.server_port
        return self.port

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def counters(self) -> dict[str, float]:
        """Flat {metric{labels}: value} of every counter, for summaries and tests."""
        out: dict[str, float] = {}
        for metric in self.registry.collect():
            if metric.type != "counter":
                continue
            for s in metric.samples:
                if s.name.endswith("_total"):
                    labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
                    out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
        return out

    def count(self, name: str, **labels: str) -> float:
        """Value of one counter sample, 0 if it was never incremented."""
        value = self.registry.get_sample_value(name, labels or None)
        return float(value or 0.0)

    def summary(self) -> dict[str, Any]:
        with self._latency_lock:
            recorders = dict(self._latency)
        latency = {s: r.summary() for s, r in recorders.items()}
        return {"process": self.process, "latency": {s: q for s, q in latency.items() if q["count"]},
                "counters": self.counters()}

    def write_summary(self, path: str | Path, extra: dict[str, Any] | None = None, samples: bool = False) -> Path:
        """The summary as JSON at `path`; with `samples`, also every kept latency sample (seconds, in the
        order observed) per stage at `<path without .summary.json>.latency.json`, for pooled tails and
        drift over a long run (bench/loop_fullscale.py)."""
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps({**self.summary(), **(extra or {})}, indent=2))
        if samples:
            with self._latency_lock:
                recorders = dict(self._latency)
            out = {s: r.samples().tolist() for s, r in recorders.items()}
            name = p.name.removesuffix(".summary.json").removesuffix(".json")
            p.with_name(f"{name}.latency.json").write_text(json.dumps({k: v for k, v in out.items() if v}))
        return p
