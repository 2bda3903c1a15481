#!/usr/bin/env python3
"""Type-check the import package `loopcast` as installed, plus tests/, bench/ and tools/, with mypy.

mypy cannot follow the setuptools package-dir mapping of pyproject.toml (loopcast.realtime lives in
realtime/, loopcast.models in models/, ...), so this script lays the package out under .typecheck/ as
symlinks (.typecheck/loopcast/*.py -> loopcast/*.py, .typecheck/loopcast/realtime -> realtime/, ...; tests/,
bench/ and tools/ linked beside it), runs mypy there with [tool.mypy] of pyproject.toml and prints every path
relative to the repository again (loopcast/realtime/pipeline.py -> realtime/pipeline.py).

    python tools/typecheck.py [extra mypy arguments]

The mapping is read from [tool.setuptools.package-dir], so a new mapped folder needs no change here.
Exit status: mypy's.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TREE = ROOT / ".typecheck"
PACKAGE = "loopcast"
# Checked beside the package: folders of scripts and tests without __init__.py (module names come from
# explicit_package_bases: tests.realtime.conftest, ...; bench's scripts import each other as top-level
# modules, so bench/ is also a base).
EXTRA = ("tests", "bench", "tools")
PATH_RE = re.compile(r"^([^\s:][^:]*\.pyi?)(?=:)")


def package_dirs() -> dict[str, str]:
    """{package: folder} of [tool.setuptools.package-dir]."""
    with open(ROOT / "pyproject.toml", "rb") as f:
        mapping: dict[str, str] = tomllib.load(f)["tool"]["setuptools"]["package-dir"]
    return mapping


def link(target: Path, at: Path) -> None:
    at.parent.mkdir(parents=True, exist_ok=True)
    at.symlink_to(os.path.relpath(target, at.parent), target_is_directory=target.is_dir())


def build_tree() -> None:
    """(Re)build .typecheck/: real folders for the package's own level, symlinks for everything else."""
    top = TREE / PACKAGE
    if top.exists():
        shutil.rmtree(top)  # removes the links, never what they point to
    for name in EXTRA:
        (TREE / name).unlink(missing_ok=True)
    mapping = package_dirs()
    top.mkdir(parents=True)
    for src in sorted((ROOT / mapping[PACKAGE]).glob("*.py*")):
        if src.suffix in (".py", ".pyi") or src.name == "py.typed":
            link(src, top / src.name)
    for sub in sorted((ROOT / mapping[PACKAGE]).iterdir()):   # sub-packages in the package's own folder
        if (sub / "__init__.py").is_file():
            link(sub, top / sub.name)
    for pkg, folder in sorted(mapping.items()):
        if pkg != PACKAGE:
            link(ROOT / folder, TREE.joinpath(*pkg.split(".")))
    for name in EXTRA:
        link(ROOT / name, TREE / name)
    (TREE / ".gitignore").write_text("*\n")


def repo_path(path: str) -> str:
    """A path as mypy printed it (relative to .typecheck/) -> the real file, relative to the repository."""
    real = Path(os.path.realpath(TREE / path))
    try:
        return str(real.relative_to(ROOT))
    except ValueError:
        return path  # outside the repository (site-packages, typeshed): as printed


def main(argv: list[str]) -> int:
    build_tree()
    # The package as a folder argument, not -p: mypy takes either packages or files, and tests/ and bench/
    # are files. Under explicit_package_bases the folder's modules are named loopcast.* all the same.
    cmd = [sys.executable, "-m", "mypy", "--config-file", str(ROOT / "pyproject.toml"), PACKAGE, *EXTRA, *argv]
    env = {**os.environ, "MYPYPATH": str(TREE / "bench")}
    proc = subprocess.Popen(cmd, cwd=TREE, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    for line in proc.stdout:
        sys.stdout.write(PATH_RE.sub(lambda m: repo_path(m.group(1)), line))
    return proc.wait()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
