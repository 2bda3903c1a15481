"""Engine registry writes: `<registry>/<name>/<version>/`, versions v0001, v0002, ...

A version is built in a hidden temp directory beside the versions and renamed into place, so a
reader (realtime.engines.base.resolve_engine) never sees a half-written version. Directory renames do
not overwrite an existing version: a concurrent writer that loses the race takes the next number.
"""
from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from loopcast.realtime.engines.manifest import VERSION_RE

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def engine_name(model: str, context: int, horizon: int) -> str:
    """Registry name of an engine, e.g. 'nlinear-c4-h8'."""
    return f"{model}-c{context}-h{horizon}"


def versions(name_dir: str | Path) -> list[str]:
    """Published versions under a registry name directory, oldest first."""
    p = Path(name_dir)
    if not p.is_dir():
        return []
    found = [(int(m.group(1)), d.name) for d in p.iterdir()
             if d.is_dir() and (m := VERSION_RE.match(d.name))]
    return [name for _, name in sorted(found)]


def next_version(name_dir: str | Path) -> str:
    """The version label after the highest one present ('v0001' for an empty name)."""
    vs = versions(name_dir)
    n = int(VERSION_RE.match(vs[-1]).group(1)) + 1 if vs else 1  # type: ignore[union-attr]
    return f"v{n:04d}"


def list_engines(registry_dir: str | Path) -> dict[str, list[str]]:
    """Every engine name in a registry with its versions."""
    root = Path(registry_dir)
    if not root.is_dir():
        return {}
    return {d.name: versions(d) for d in sorted(root.iterdir())
            if d.is_dir() and not d.name.startswith(".") and versions(d)}


def staging_dir(registry_dir: str | Path, name: str) -> Path:
    """A fresh hidden directory to build a version in (same filesystem as its destination)."""
    if not NAME_RE.match(name):
        raise ValueError(f"invalid engine name {name!r}")
    parent = Path(registry_dir) / name
    parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=".staging-", dir=parent))


def publish(staged: Path, finalize: Callable[[Path, str], None] | None = None,
            max_tries: int = 100) -> tuple[str, Path]:
    """Rename a staged directory to the next free version; returns (version, path).

    `finalize(staged, version)` runs before each rename attempt (e.g. to write the manifest, which
    names its own version), so a writer that loses a race rewrites it for the next number.
    """
    parent = staged.parent
    for _ in range(max_tries):
        version = next_version(parent)
        if finalize is not None:
            finalize(staged, version)
        target = parent / version
        try:
            os.rename(staged, target)  # atomic; fails if target exists and is not empty
        except OSError:
            if target.exists():
                continue  # another writer took this number
            raise
        return version, target
    shutil.rmtree(staged, ignore_errors=True)
    raise RuntimeError(f"could not publish {staged}: no free version after {max_tries} tries")
