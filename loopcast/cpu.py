"""CPU use of a process, from [runtime] (loopcast.settings.RuntimeConfig): the threads of numba, ONNX
Runtime, torch and TensorStore, and the CPUs of each real-time process. `apply` runs once at a command's
start (loopcast.app.configure_process); docs/cpu.md gives the defaults for a 2-core and a 16-core rig.

- affinity: `[runtime.affinity] <process>` (run, controller, sim, replay) pins every thread the process
  has (os.sched_setaffinity per thread id: on Linux it is a thread's setting), and threads made later
  inherit it. Applied first, so that "0 threads = one per CPU the process may run on" counts those CPUs.
- priority: `[runtime.priority] <process>` 1-99 runs every thread of the process under SCHED_FIFO at that
  priority (threads made later inherit it), so a busy core cannot delay it: for the controller, whose
  forecast -> PUBACK time is on the stimulation path (docs/cpu.md). Without the privilege it is a
  config error that says what to grant; 0 leaves the process as the OS started it.
- numba: the kernels' thread count (numba.set_num_threads) of the calling thread, the one that runs the
  loop (numba's count is per thread: a thread made later starts with numba's pool size, so code that
  runs kernels on another thread calls `numba_threads` there, as loopcast.inprocess does). numba's pool
  is sized when numba is imported (NUMBA_NUM_THREADS, default every core); a larger count is capped.
- ONNX Runtime: per session, so per engine. The value reaches the engines as the derived keys
  pipeline.forecast.threads and pipeline.preprocess.spikes.engine_threads (loopcast.settings.resolve).
- torch: torch.set_num_threads, where the process uses torch (a "torch" engine runtime or preprocessing
  backend in `loopcast run`) or has imported it already; otherwise torch is not imported (the real-time
  processes stay light, tests/test_light_imports.py). Training commands set their own ([train] threads).
- TensorStore: the data-copy pool of every array opened afterwards (loopcast.replay.store.set_threads).
"""
from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from loopcast.config import ConfigError
from loopcast.settings import LoopcastConfig, RuntimeConfig

log = logging.getLogger("loopcast")
PROCESSES = ("run", "controller", "sim", "replay")   # the keys of [runtime.affinity] and [runtime.priority]


def usable_cpus() -> int:
    """How many CPUs this thread may run on (its affinity), at least 1."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


def pin(cpus: Sequence[int]) -> list[int]:
    """Pin every thread of this process to `cpus` (later threads inherit it); returns them sorted."""
    want = set(cpus)
    if not hasattr(os, "sched_setaffinity"):
        raise OSError("CPU affinity needs Linux (os.sched_setaffinity)")
    available = set(range(os.cpu_count() or 1))
    if not want <= available:
        raise ValueError(f"CPUs {sorted(want - available)} do not exist (this machine has {sorted(available)})")
    _each_thread(lambda tid: os.sched_setaffinity(tid, want))
    return sorted(want)


def _each_thread(call: Callable[[int], None]) -> None:
    """`call(tid)` for the calling thread first (it makes the later ones), then every other thread."""
    call(0)
    try:
        tids = [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:
        tids = []
    for tid in tids:
        try:
            call(tid)
        except ProcessLookupError:                # a thread that ended meanwhile
            pass


def realtime(priority: int) -> int:
    """Every thread of this process under SCHED_FIFO at `priority` (1-99); returns it. PermissionError
    when the process may not (needs root, CAP_SYS_NICE or an rtprio limit of at least `priority`)."""
    if not hasattr(os, "sched_setscheduler"):
        raise OSError("real-time priority needs Linux (os.sched_setscheduler)")
    param = os.sched_param(priority)
    _each_thread(lambda tid: os.sched_setscheduler(tid, os.SCHED_FIFO, param))
    return priority


def numba_threads(threads: int) -> int:
    """Set numba's thread count for the calling thread (0 = one per usable CPU, capped at numba's pool);
    returns it. Does not start numba's pool just to set the pool's own size."""
    import numba
    from numba.core import config as numba_config
    from numba.np.ufunc import parallel as numba_parallel
    pool = int(vars(numba_config)["NUMBA_NUM_THREADS"])   # a module global numba's stubs do not declare
    n = min(threads or usable_cpus(), pool)
    if threads > pool:
        log.warning("runtime.numba_threads = %d, but numba's pool has %d threads (NUMBA_NUM_THREADS): "
                    "using %d", threads, pool, pool)
    if n < pool or vars(numba_parallel).get("_is_initialized", True):
        numba.set_num_threads(n)
    return n


def uses_torch(cfg: LoopcastConfig, process: str) -> bool:
    """Whether the process will run torch: `loopcast run` with a "torch" engine runtime or preprocessing."""
    return process == "run" and (cfg.pipeline.forecast.runtime == "torch" or cfg.pipeline.preprocess.backend == "torch")


def apply(cfg: LoopcastConfig, process: str = "") -> dict[str, Any]:
    """Apply [runtime]'s CPU settings to this process (`process`: the command; only PROCESSES have an
    affinity). Returns what it set, also logged."""
    rt: RuntimeConfig = cfg.runtime
    done: dict[str, Any] = {}
    cpus: tuple[int, ...] = getattr(rt.affinity, process, ()) if process in PROCESSES else ()
    if cpus:
        try:
            done["affinity"] = pin(cpus)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"runtime.affinity.{process}: {exc}") from exc
    priority: int = getattr(rt.priority, process, 0) if process in PROCESSES else 0
    if priority:
        try:
            done["priority"] = f"SCHED_FIFO {realtime(priority)}"
        except PermissionError:
            raise ConfigError(
                f"runtime.priority.{process} = {priority}: this process may not use SCHED_FIFO; run it as "
                "root, grant CAP_SYS_NICE (setcap cap_sys_nice+ep on the python binary, or "
                "AmbientCapabilities=CAP_SYS_NICE in its systemd unit) or raise its rtprio limit "
                f"(limits.conf), or set runtime.priority.{process} = 0") from None
        except OSError as exc:
            raise ConfigError(f"runtime.priority.{process}: {exc}") from exc
    done["cpus"] = usable_cpus()
    if "numba" in sys.modules or process in PROCESSES:
        done["numba_threads"] = numba_threads(rt.numba_threads)
    done["onnxruntime_threads"] = rt.onnxruntime_threads
    if "torch" in sys.modules or uses_torch(cfg, process):
        import torch
        torch.set_num_threads(rt.torch_threads)
        done["torch_threads"] = rt.torch_threads
    from loopcast.replay.store import set_threads
    done["tensorstore_threads"] = rt.tensorstore_threads or done["cpus"]
    set_threads(done["tensorstore_threads"])
    log.info("cpu: %s", ", ".join(f"{k} {v}" for k, v in done.items()))
    return done
