"""Shared helpers for bench/ scripts: machine description, quantile tables, result files."""
from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
DEVICES = ("cpu", "cuda")


def parse_devices(text: str) -> frozenset[str]:
    """A `--devices` value ("cpu,cuda", "cuda", ...) -> the set of device kinds whose rows are timed."""
    devices = frozenset(filter(None, (d.strip() for d in text.split(","))))
    unknown = sorted(devices - set(DEVICES))
    if unknown or not devices:
        raise ValueError(f"--devices must be a comma list of {list(DEVICES)}, got {text!r}")
    return devices


def device_skip(device: str, devices: frozenset[str]) -> str:
    """Why a row on `device` is not timed ("" when it is): the run's --devices leaves it out."""
    return "" if device in devices else f"{device} not selected (--devices {','.join(sorted(devices))})"


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    cpu = ""
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        cpu = platform.processor()
    versions = {}
    for pkg in ("numpy", "pyzmq", "onnxruntime", "torch", "aiomqtt", "zarr"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return {"host": platform.node(), "cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "platform": platform.platform(), "gpu": _gpu(), "packages": versions}


def _gpu() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or "none"
    except (OSError, subprocess.SubprocessError):
        return "none"


def quantiles(seconds: np.ndarray) -> dict[str, float]:
    """p50/p99/max in ms over the given samples."""
    if seconds.size == 0:
        return {"n": 0}
    p50, p99 = np.percentile(seconds, [50, 99]) * 1e3
    return {"n": int(seconds.size), "p50_ms": float(p50), "p99_ms": float(p99),
            "max_ms": float(seconds.max() * 1e3), "mean_ms": float(seconds.mean() * 1e3)}


def print_table(title: str, rows: dict[str, dict[str, float]]) -> None:
    print(f"\n{title}\n{'stage':<18}{'p50 ms':>10}{'p99 ms':>10}{'max ms':>10}{'n':>8}")
    for name, q in rows.items():
        if q.get("n"):
            print(f"{name:<18}{q['p50_ms']:>10.2f}{q['p99_ms']:>10.2f}{q['max_ms']:>10.2f}{q['n']:>8}")


def write_result(name: str, payload: dict[str, Any]) -> Path:
    """bench/results/<name>-<date>-<host>.json with the machine and the date."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y-%m-%d")
    path = RESULTS / f"{name}-{stamp}-{platform.node() or 'host'}.json"
    body = {"benchmark": name, "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "machine": machine(), **payload}
    path.write_text(json.dumps(body, indent=2) + "\n")
    return path
