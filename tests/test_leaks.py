"""The closed loop leaks nothing: bench/soak.py's leak checks, without its drift checks, on a short run.

The tiny fish of tests/conftest.py's `loop_setup`, FRAMES frames at SPEED x the rig's rate (~20 s), as real
processes (a broker, `loopcast controller` firing on every forecast, `loopcast run`, `loopcast sim` over the
shared-memory transport), run, sampled every PERIOD_S and stopped by bench/soak.py's own functions, so the
bench and this test check the same things:
- after every process exited, no loopcast-* file in /dev/shm that this run's processes made (the fish's
  ring), no file left in the folder of the ipc:// endpoints, and no process of the run alive (the session
  record's writer included);
- while frames flow, after WARMUP_S, the number of open fds of `loopcast run` does not grow by more than
  FD_SLACK (the least of the first 3 samples vs the least of the last 3).

What it catches: a ring that is not closed or unlinked (a crash, a missing `ShmRing.close()`), a socket or
file opened per frame, per forecast or per trigger (one a frame is ~200 fds over the window), an
endpoint's socket file left behind, a writer child orphaned by the pipeline. Checked by leaking on purpose
(not committed): a sitecustomize.py on PYTHONPATH that opens /dev/null every 0.5 s in the `run` process
failed the fd test (+25 fds over the window), and a SIGKILLed fish failed the shm and socket file tests.
"""
from __future__ import annotations

import importlib
import tempfile
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from loopcast.broker import start_broker
from loopcast.settings import load_settings

BENCH = Path(__file__).resolve().parents[1] / "bench"
FRAMES, SPEED = 220, 10.0    # ~20 s of frames at the tiny rig's 0.9141 s period / 10
PERIOD_S = 0.5               # between /proc samples
WARMUP_S = 6.0               # from the first frame: OASIS and dF/F warm-up, the first triggers, the first flush
# Descriptors `loopcast run` may hold more at the end than after warm-up. The least of 3 samples already drops
# a descriptor open for a moment (the /metrics connection the sampler itself makes, the engine registry poll);
# 2 more allow for what opens once, late, and stays (the session writer's chunk files are per write, not kept).
FD_SLACK = 2
@pytest.fixture(scope="module")
def soak() -> Iterator[ModuleType]:
    """bench/soak.py, imported as bench scripts import each other (bench/ first on sys.path)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(BENCH))
        yield importlib.import_module("soak")


@pytest.fixture(scope="module")
def loop_run(soak: ModuleType, loop_setup: tuple[Path, list[str]], tmp_path_factory: pytest.TempPathFactory) -> Any:
    """One short run of the loop (bench/soak.py's LoopRun): exit codes, samples, what was left behind."""
    _, overrides = loop_setup
    work = tmp_path_factory.mktemp("leaks")
    cfg = load_settings(overrides=[*overrides, f'paths.runs="{work}/runs"'])
    extra = [*soak.EVERY_FORECAST_TRIGGERS, 'transport.kind="shm"', 'rig.name="leaktest"']
    with start_broker("auto") as broker, tempfile.TemporaryDirectory(prefix="lc-leaks-") as sockets:
        cfg = soak.loop_config(cfg, broker.port, Path(sockets), FRAMES, SPEED, extra)
        return soak.run_loop(cfg, work / "run", Path(sockets), PERIOD_S)


@pytest.mark.timeout(120)    # the first test builds the run (and loop_setup, when no test before it did)
def test_the_loop_ran_every_process_to_a_clean_exit(soak: ModuleType, loop_run: Any) -> None:
    """Else the leak checks below would check nothing."""
    assert loop_run.codes == {"sim": 0, "run": 0, "controller": 0}, loop_run.codes
    frames = soak.frames_lost(loop_run.run_dir)
    assert frames["sent"] == FRAMES and frames["received"] > FRAMES * 0.9, frames
    assert {"run", "run/writer", "sim", "controller"} <= set(loop_run.sampler.tracks), loop_run.sampler.tracks.keys()


@pytest.mark.timeout(10)
def test_no_shm_ring_file_is_left(loop_run: Any) -> None:
    assert loop_run.leftovers["shm_files"] == []


@pytest.mark.timeout(10)
def test_no_process_of_the_run_is_left(loop_run: Any) -> None:
    assert loop_run.leftovers["processes"] == []


@pytest.mark.timeout(10)
def test_no_ipc_socket_file_is_left(loop_run: Any) -> None:
    """libzmq >= 4.2 leaves an ipc:// endpoint's file when the socket closes: Publisher.close() removes it."""
    assert loop_run.leftovers["socket_files"] == []


@pytest.mark.timeout(10)
def test_run_open_fds_do_not_grow_after_warmup(soak: ModuleType, loop_run: Any) -> None:
    track = loop_run.sampler.tracks["run"]
    g = soak.process_growth(track, loop_run.t_first + WARMUP_S, float("inf"))
    assert g["samples"] >= 10, f"too few samples after warm-up: {g}"
    assert g["fds_end"] - g["fds_settled"] <= FD_SLACK, ([s.fds for s in track], g)
