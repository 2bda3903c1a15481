"""Engines computed in a child process (realtime/engines/process.py, pipeline.forecast.also_workers =
"processes"): the same outputs as in-process, errors and a dead child as EngineErrors, nothing left
behind. A pipeline whose `also` stages run that way: tests/realtime/test_parallel_stages.py. Real ONNX
toy engines (tests/conftest.py)."""
from __future__ import annotations

import os
import signal
from pathlib import Path

import numpy as np
import pytest

from loopcast.config import ConfigError
from loopcast.realtime.engines.manifest import EngineError
from loopcast.realtime.engines.onnx_runtime import OnnxEngine
from loopcast.realtime.engines.process import ProcessEngine
from loopcast.settings import load_settings

pytestmark = pytest.mark.timeout(120)


def window(engine: OnnxEngine | ProcessEngine, seed: int = 0) -> tuple[np.ndarray, np.ndarray | None]:
    m, rng = engine.manifest, np.random.default_rng(seed)
    context = rng.standard_normal((m.context, m.n_neurons)).astype(np.float32)
    cov = rng.standard_normal((m.context + m.horizon, m.n_covariates)).astype(np.float32) if m.n_covariates else None
    return context, cov


@pytest.mark.parametrize("kind", ["mean", "cov", "act"])
def test_a_child_process_gives_the_in_process_outputs(toy_engines: dict[str, Path], kind: str) -> None:
    here = OnnxEngine(toy_engines[kind])
    there = ProcessEngine(toy_engines[kind], nice=3)
    try:
        assert there.version == here.version and there.manifest.task == here.manifest.task
        assert os.getpriority(os.PRIO_PROCESS, there.pid or 0) == os.getpriority(os.PRIO_PROCESS, 0) + 3
        for seed in range(3):
            context, cov = window(here, seed)
            np.testing.assert_array_equal(there.run(context, cov), here.run(context, cov))
    finally:
        there.close()


def test_an_engine_that_cannot_load_in_its_process_says_why(toy_engines: dict[str, Path]) -> None:
    before = set(Path("/dev/shm").glob("loopcast-engine-*"))
    with pytest.raises(EngineError, match="cannot load it in its process: .*unknown engine runtime 'nope'"):
        ProcessEngine(toy_engines["mean"], runtime="nope")
    assert set(Path("/dev/shm").glob("loopcast-engine-*")) <= before       # its shared file is gone too


def test_a_child_error_and_a_dead_child_are_engine_errors_and_close_cleans_up(toy_engines: dict[str, Path]) -> None:
    engine = ProcessEngine(toy_engines["mean"])
    context, _ = window(engine)
    with pytest.raises(EngineError, match="context shape"):   # checked here, before the child
        engine.run(context[:, :-1])
    np.testing.assert_array_equal(engine.run(context), OnnxEngine(toy_engines["mean"]).run(context))
    os.kill(engine.pid or 0, signal.SIGKILL)
    with pytest.raises(EngineError, match=r"its process (died|is gone) \(exit code -9\)"):
        engine.run(context)
    shared = Path(engine._file)
    assert shared.exists()
    engine.close()
    engine.close()                                        # twice is fine
    assert not shared.exists()


@pytest.mark.parametrize("override, match", [
    ('pipeline.forecast.also_workers="fibers"', "also_workers must be one of"),
    ('pipeline.forecast.also_workers="processes"', "needs also_schedule"),
])
def test_bad_also_workers_are_refused(override: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        load_settings(overrides=[override, 'pipeline.forecast.also_schedule="serial"'])
