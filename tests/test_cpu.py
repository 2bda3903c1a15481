"""[runtime]: one place for the threads of numba, ONNX Runtime, torch and TensorStore and each real-time
process's CPUs (loopcast/cpu.py, applied by loopcast.app.configure_process at a command's start)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from loopcast.config import ConfigError
from loopcast.settings import from_config, load_settings

pytestmark = pytest.mark.timeout(120)


def test_engine_threads_come_from_runtime() -> None:
    cfg = load_settings(overrides=["runtime.onnxruntime_threads=3", "runtime.torch_threads=2"])
    assert cfg.pipeline.forecast.threads == 3 and cfg.pipeline.preprocess.spikes.engine_threads == 3
    torch_cfg = load_settings(overrides=["runtime.torch_threads=2", 'pipeline.forecast.runtime="torch"'])
    assert torch_cfg.pipeline.forecast.threads == 2 and torch_cfg.pipeline.preprocess.spikes.engine_threads == 1
    saved = from_config(cfg)       # a run directory's config.toml leaves the derived keys out
    assert "threads" not in saved["pipeline"]["forecast"] and saved["runtime"]["onnxruntime_threads"] == 3


@pytest.mark.parametrize("key", ["pipeline.forecast.threads", "pipeline.preprocess.spikes.engine_threads"])
def test_the_old_thread_keys_say_where_they_went(key: str) -> None:
    with pytest.raises(ConfigError, match=rf"'{key}' moved to \[runtime\]: set runtime.onnxruntime_threads"):
        load_settings(overrides=[f"{key}=2"])


@pytest.mark.parametrize("override, match", [("runtime.numba_threads=-1", "numba_threads must be >= 0"),
                                             ("runtime.onnxruntime_threads=0", "onnxruntime_threads must be >= 1"),
                                             ("runtime.affinity.run=[0, 0]", "CPUs must be distinct"),
                                             ("runtime.priority.controller=100", "priority must be 0"),
                                             ("runtime.priority.sim=-1", "priority must be 0")])
def test_bad_runtime_values_are_refused(override: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        load_settings(overrides=[override])


PROBE = r'''
import json, os, sys, threading
from loopcast import app
from loopcast.replay import store
from loopcast.settings import load_settings
threading.Thread(target=threading.Event().wait, args=(30,), daemon=True).start()   # a thread made before
cfg = load_settings(overrides={overrides!r})
done = app.configure_process(cfg, {process!r})
import numba
tids = [int(t) for t in os.listdir("/proc/self/task")]
print(json.dumps({{"done": done, "affinity": sorted(os.sched_getaffinity(0)),
                  "threads": sorted({{tuple(sorted(os.sched_getaffinity(t))) for t in tids}}),
                  "numba": numba.get_num_threads(), "store": store.CONTEXT_SPEC.get("data_copy_concurrency"),
                  "sched": sorted({{(os.sched_getscheduler(t), os.sched_getparam(t).sched_priority) for t in tids}}),
                  "torch": "torch" in sys.modules}}))
'''


def probe(process: str, overrides: list[str]) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE.format(process=process, overrides=overrides)],
                         capture_output=True, text=True, timeout=100)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.splitlines()[-1])


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity") or (os.cpu_count() or 1) < 2, reason="needs Linux, 2 CPUs")
def test_a_process_applies_its_affinity_and_thread_counts_at_start() -> None:
    overrides = ["runtime.affinity.run=[1]", "runtime.affinity.sim=[0]", "runtime.tensorstore_threads=0"]
    run = probe("run", overrides)
    assert run["affinity"] == [1] and run["threads"] == [[1]]        # every thread, the earlier one included
    assert run["numba"] == 1 and run["store"] == {"limit": 1}        # 0 = one per CPU it may run on
    assert run["done"]["affinity"] == [1] and run["done"]["onnxruntime_threads"] == 1 and not run["torch"]
    controller = probe("controller", [*overrides, "runtime.numba_threads=1", "runtime.tensorstore_threads=3"])
    assert controller["affinity"] == sorted(os.sched_getaffinity(0))   # no affinity of its own: unpinned
    assert controller["numba"] == 1 and controller["store"] == {"limit": 3} and not controller["torch"]


def may_use_fifo() -> bool:
    """Whether a process here may use SCHED_FIFO (root or CAP_SYS_NICE), asked of a child process."""
    ask = "import os; os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(1))"
    return subprocess.run([sys.executable, "-c", ask], capture_output=True).returncode == 0


@pytest.mark.skipif(not hasattr(os, "sched_setscheduler"), reason="needs Linux")
def test_a_real_time_priority_reaches_every_thread_or_says_what_to_grant() -> None:
    overrides = ["runtime.priority.controller=7", "runtime.priority.run=0"]
    if may_use_fifo():
        controller = probe("controller", overrides)
        assert controller["sched"] == [[os.SCHED_FIFO, 7]]            # every thread, the earlier one included
        assert controller["done"]["priority"] == "SCHED_FIFO 7"
    else:
        from loopcast import cpu
        with pytest.raises(ConfigError, match=r"runtime.priority.controller = 7: .* CAP_SYS_NICE"):
            cpu.apply(load_settings(overrides=overrides), "controller")
    run = probe("run", overrides)                                     # 0: as the OS started it
    assert run["sched"] == [[os.SCHED_OTHER, 0]] and "priority" not in run["done"]


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="needs Linux")
def test_an_affinity_beyond_the_machine_names_the_key() -> None:
    from loopcast import cpu
    cfg = load_settings(overrides=[f"runtime.affinity.controller=[{os.cpu_count()}]"])
    with pytest.raises(ConfigError, match=r"runtime.affinity.controller: CPUs \[\d+\] do not exist"):
        cpu.apply(cfg, "controller")


def test_numba_threads_are_set_per_thread_and_back() -> None:
    """A thread that runs the loop sets its own count; 0 brings it back to one per usable CPU."""
    import threading

    import numba

    from loopcast import cpu
    seen: list[int] = []

    def loop_thread() -> None:
        seen.append(cpu.numba_threads(1))
        seen.append(numba.get_num_threads())
        seen.append(cpu.numba_threads(0))
        seen.append(numba.get_num_threads())
    t = threading.Thread(target=loop_thread)
    t.start()
    t.join()
    full = min(cpu.usable_cpus(), int(vars(numba.config)["NUMBA_NUM_THREADS"]))
    assert seen == [1, 1, full, full]
