"""A fault for drills: an engine made slower on purpose (`pipeline.forecast.drill_delay_ms`, never set on a rig).

The delay is a sleep before each call, so it holds no lock and takes no CPU: like an engine that waits on a
busy accelerator. The pipeline must then skip to the newest frame, count what it skipped and keep the dF/F
state exact (tests/test_drills.py, bench/drills.py).
"""
from __future__ import annotations

import time
from typing import Any

import numpy as np

from loopcast.realtime.engines.base import Engine


class DelayedEngine:
    """`engine` with `delay_ms` added to every forecast call; everything else is the engine's own."""

    def __init__(self, engine: Engine, delay_ms: float) -> None:
        if not delay_ms > 0:
            raise ValueError(f"drill delay must be > 0 ms, got {delay_ms}")
        self.engine = engine
        self.delay_s = delay_ms / 1000

    def run(self, context: np.ndarray, covariates: np.ndarray | None = None) -> np.ndarray:
        time.sleep(self.delay_s)
        return self.engine.run(context, covariates)

    def run_batch(self, context: np.ndarray, covariates: np.ndarray | None = None) -> np.ndarray:
        time.sleep(self.delay_s)
        return self.engine.run_batch(context, covariates)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.engine, name)
