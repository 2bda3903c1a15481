"""The session record's settings and layout, shared by the pipeline's side (realtime.record.session) and the
writer process (realtime.record.writer): `[pipeline.record]`, what the record needs of a stage, and the names of
the packed columns (docs/record.md)."""
from __future__ import annotations

from dataclasses import dataclass

FORMAT, VERSION = "loopcast-session", 1
FORECAST_CODES = ("not_ready", "forecast", "skipped", "failed", "invalid")
LATENCY_COLUMNS = ("ingest", "preprocess", "forecast")
# Each table keeps its integer columns side by side in one int64 array `index` (one zarr write per flush instead
# of one per column: each costs ~1 ms of Python, GIL held); attrs `index_columns` names them.
FRAME_INDEX = ("seq", "t_src_ns", "t_recv_ns", "status", "forecast")
REGISTRATION_COLUMNS = ("dx", "dy", "dz", "confidence")   # voxels; NaN when the frame was not registered
NO_REGISTRATION = (float("nan"),) * len(REGISTRATION_COLUMNS)
DFF_INDEX = ("seq", "t_src_ns")
FORECAST_INDEX = ("seq", "t_src_ns", "t_pub_ns", "engine")
SKILL_INDEX = ("source_seq", "target_seq", "lead")
SKILL_VALUES = ("mae", "baseline_mae", "rolling_mae", "rolling_baseline_mae")


@dataclass(frozen=True)
class RecordConfig:
    """`[pipeline.record]`: what the session store keeps (docs/record.md, with its disk rates)."""

    enabled: bool = True
    path: str = "session.zarr"      # inside the run directory
    neurons: str = "all"            # "all", "stride:k" (every k-th neuron) or "indices:i,j,..."; the
    #                                 controller policy's monitored and target neurons are always added
    frame_every: int = 1            # keep the dF/F of every k-th valid frame and every k-th forecast per stage
    forecasts: bool = True          # keep the published forecasts and activation predictions
    skill_window: int = 100         # live forecast skill: rolling mean over this many scored forecasts per lead
    flush_s: float = 5.0            # a killed session loses at most this much
    chunk_mb: float = 1.0           # target chunk size of each array (at most 1024 rows)
    max_queue: int = 512            # items waiting for the writer before new ones are dropped (counted)
    writer_nice: int = 10           # the writer process's nice increment: the loop's processes take the CPU first
    writer_idle: bool = True        # the writer process under SCHED_IDLE (Linux): it runs only on CPU time that
    #                                 nothing else wants, so it never delays the loop's processes on a busy machine

    def __post_init__(self) -> None:
        if self.frame_every < 1 or self.skill_window < 1 or self.max_queue < 1:
            raise ValueError("frame_every, skill_window and max_queue must be >= 1")
        if not 0 <= self.writer_nice <= 19:
            raise ValueError(f"writer_nice must be in 0..19, got {self.writer_nice}")
        if self.flush_s <= 0 or self.chunk_mb <= 0:
            raise ValueError(f"flush_s and chunk_mb must be > 0, got {self.flush_s}, {self.chunk_mb}")


@dataclass(frozen=True)
class StageInfo:
    """What the record needs of a forecast stage."""

    name: str                    # its topic, '<kind>/<model>'
    kind: str                    # "forecast" or "activation"
    model: str
    signal: str                  # "dff" or "spike_prob"
    lead_times: tuple[int, ...]
    context: int
