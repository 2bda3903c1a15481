"""CPU and memory of running processes, sampled from /proc (Linux) on a background thread, for benches
that run the loop as separate processes (bench/loop_fullscale.py)."""
from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

TICKS = os.sysconf("SC_CLK_TCK")




def stat_cpu_s(stat: str) -> float:
    """CPU seconds (user + system) from the text of /proc/<pid>/stat."""
    fields = stat.rsplit(")", 1)[1].split()          # after the command name, which may hold spaces
    return (int(fields[11]) + int(fields[12])) / TICKS   # utime, stime


def cpu_seconds(pid: int) -> float:
    """CPU seconds (user + system) process `pid` has used so far."""
    return stat_cpu_s(Path(f"/proc/{pid}/stat").read_text())

@dataclass
class Track:
    """Samples of one process: (monotonic s, CPU s so far, RSS MB)."""

    pid: int
    t: list[float] = field(default_factory=list)
    cpu_s: list[float] = field(default_factory=list)
    rss_mb: list[float] = field(default_factory=list)

    def sample(self, now: float) -> bool:
        """One sample; False once the process is gone."""
        try:
            stat = Path(f"/proc/{self.pid}/stat").read_text()
            status = Path(f"/proc/{self.pid}/status").read_text()
        except OSError:
            return False
        cpu = stat_cpu_s(stat)
        rss = next((int(line.split()[1]) / 1024 for line in status.splitlines() if line.startswith("VmRSS:")), None)
        if rss is None:         # a zombie: exited, not yet reaped
            return False
        self.t.append(now)
        self.cpu_s.append(cpu)
        self.rss_mb.append(rss)
        return True

    def window(self, t0: float, t1: float, settle_s: float) -> dict[str, Any]:
        """Between t0 and t1: mean CPU (cores busy), RSS at t0 + settle_s (after warm-up), at the end and
        its peak, and the growth from the one to the other in percent."""
        t = np.asarray(self.t)
        sel = np.flatnonzero((t >= t0) & (t <= t1))
        if sel.size < 2:
            return {"samples": int(sel.size)}
        i0, i1 = sel[0], sel[-1]
        cores = (self.cpu_s[i1] - self.cpu_s[i0]) / max(t[i1] - t[i0], 1e-9)
        settled = sel[np.searchsorted(t[sel], t0 + settle_s)] if t[i1] > t0 + settle_s else i0
        rss = np.asarray(self.rss_mb)
        return {"samples": int(sel.size), "cpu_cores": round(float(cores), 3),
                "rss_mb_settled": round(float(rss[settled]), 1), "rss_mb_end": round(float(rss[i1]), 1),
                "rss_mb_max": round(float(rss[sel].max()), 1),
                "rss_growth_pct": round(100.0 * (rss[i1] - rss[settled]) / max(rss[settled], 1e-9), 2)}


class ProcSampler:
    """Samples every registered process every `period_s` until stopped."""

    def __init__(self, period_s: float = 1.0) -> None:
        self.period_s = period_s
        self.tracks: dict[str, Track] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="procstat", daemon=True)
        self._lock = threading.Lock()

    def add(self, name: str, pid: int) -> None:
        with self._lock:
            self.tracks[name] = Track(pid)

    def start(self) -> ProcSampler:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def _loop(self) -> None:
        while not self._stop.wait(self.period_s):
            now = time.monotonic()
            with self._lock:
                for track in self.tracks.values():
                    track.sample(now)
