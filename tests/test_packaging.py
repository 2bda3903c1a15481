"""The one import package `loopcast`, as pyproject.toml maps the folders at the top of the repository
into it (loopcast/ -> loopcast, realtime/ -> loopcast.realtime, ...): the package list, the wheel
built from it, an environment that holds only that wheel, and no code left on the old top-level names.

The wheel is built once per session (`pip wheel --no-build-isolation`, a few seconds), into a tmp
directory (build/ included: setuptools would otherwise reuse stale files from the repository's build/).
"""
from __future__ import annotations

import ast
import json
import os
import re
import site
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SETUPTOOLS = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
PACKAGE_DIRS: dict[str, Path] = {name: ROOT / folder for name, folder in SETUPTOOLS["package-dir"].items()}
OLD_NAMES = ("realtime", "models", "replay", "offline_training")   # top-level packages before the cut


def package_folders() -> dict[str, Path]:
    """{dotted package: folder} for every folder with an __init__.py under the mapped folders."""
    out: dict[str, Path] = {}
    for prefix, folder in PACKAGE_DIRS.items():
        for init in sorted(folder.rglob("__init__.py")):
            out[".".join((prefix, *init.parent.relative_to(folder).parts))] = init.parent
    return out


def package_files(suffix: str = ".py") -> dict[str, Path]:
    """{path inside the wheel: repository file} for every `suffix` file directly in a package folder."""
    return {"/".join(pkg.split(".")) + "/" + f.name: f
            for pkg, folder in package_folders().items() for f in sorted(folder.glob("*" + suffix))}


# ------------------------------------------------------------------------------------- package list
def test_the_package_list_is_every_folder_with_an_init() -> None:
    assert sorted(SETUPTOOLS["packages"]) == sorted(package_folders()), \
        "pyproject.toml [tool.setuptools] packages must list every folder with an __init__.py, no more"


def test_every_module_lies_in_a_package_folder() -> None:
    """A .py file in a folder without __init__.py would be left out of the wheel."""
    folders = set(package_folders().values())
    stray = [str(p.relative_to(ROOT)) for d in PACKAGE_DIRS.values() for p in d.rglob("*.py")
             if p.parent not in folders]
    assert not stray, f"modules outside any package (add an __init__.py and list the package): {stray}"


def test_the_package_dir_table_covers_every_package() -> None:
    folders = package_folders()
    for pkg in SETUPTOOLS["packages"]:
        mapped = max((p for p in PACKAGE_DIRS if pkg == p or pkg.startswith(p + ".")), key=len, default=None)
        assert mapped is not None, f"{pkg} lies under no package-dir entry"
        folder = PACKAGE_DIRS[mapped].joinpath(*pkg[len(mapped):].split(".")[1:])
        assert folder == folders[pkg] and (folder / "__init__.py").is_file(), (pkg, folder)
    assert set(PACKAGE_DIRS) <= set(SETUPTOOLS["packages"])
    assert all(name == "loopcast" or name.startswith("loopcast.") for name in PACKAGE_DIRS)


# ------------------------------------------------------------------------------------------ wheel
@pytest.fixture(scope="session")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    (out / "build.cfg").write_text(f"[build]\nbuild_base = {out / 'build'}\n")
    env = {**os.environ, "DIST_EXTRA_CONFIG": str(out / "build.cfg")}
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", ".", "--no-deps", "--no-build-isolation", "-q",
                          "-w", str(out / "dist")], cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    (whl,) = (out / "dist").glob("loopcast-*.whl")
    return whl


def test_the_wheel_holds_one_package_loopcast_with_every_module(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"loopcast"}, f"top-level entries besides the .dist-info: {sorted(tops)}"
    shipped = {n for n in names if n.endswith(".py")}
    expected = set(package_files(".py"))
    assert shipped == expected, (f"missing from the wheel: {sorted(expected - shipped)}; "
                                 f"in the wheel but not in the repository: {sorted(shipped - expected)}")
    top_level = [n for n in names if n.endswith(".dist-info/top_level.txt")]
    for n in top_level:
        assert zipfile.ZipFile(wheel).read(n).decode().split() == ["loopcast"]


def test_the_wheel_ships_the_default_configs(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    configs = PACKAGE_DIRS["loopcast.configs"]
    data = {"loopcast/configs/" + f.relative_to(configs).as_posix() for f in configs.rglob("*")
            if f.is_file() and f.suffix in (".toml", ".yml", ".json")}
    assert "loopcast/configs/loopcast.toml" in data and any("/monitoring/" in d for d in data)
    assert data <= names, f"configs missing from the wheel: {sorted(data - names)}"


# ------------------------------------------------------------------ an environment with only the wheel
@pytest.fixture(scope="session")
def wheel_venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A venv holding only the wheel; its dependencies come from this interpreter's site-packages
    through a .pth file of plain paths (such lines are appended to sys.path without processing the .pth
    files found there, so an editable install of the source tree stays inert)."""
    venv = tmp_path_factory.mktemp("venv") / "env"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=60)
    py = venv / "bin" / "python"
    res = subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "-q", "--no-deps", "--no-index",
                          str(wheel)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    purelib = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True, timeout=60).stdout.strip()
    deps = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]   # e.g. the GPU machine's /tmp/site
    deps += [*site.getsitepackages(), sysconfig.get_paths()["purelib"]]
    (Path(purelib) / "loopcast-test-deps.pth").write_text("\n".join(dict.fromkeys(deps)) + "\n")
    return venv


def _venv_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}


def test_the_installed_cli_runs_outside_the_repository(wheel_venv: Path, tmp_path: Path) -> None:
    res = subprocess.run([str(wheel_venv / "bin" / "loopcast"), "--help"], cwd=tmp_path, env=_venv_env(),
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "usage: loopcast" in res.stdout


def test_the_installed_package_imports_and_loads_its_default_config(wheel_venv: Path, tmp_path: Path) -> None:
    code = "\n".join([
        "import importlib, json, pkgutil, sys",
        "import loopcast",
        "from loopcast.settings import DEFAULT_CONFIG, load_settings",
        "cfg = load_settings([DEFAULT_CONFIG])",
        "mods = [m.name for m in pkgutil.walk_packages(loopcast.__path__, 'loopcast.')]",
        "for m in mods: importlib.import_module(m)",
        "files = sorted({loopcast.__file__} | {sys.modules[m].__file__ for m in mods})",
        "print(json.dumps({'loopcast': loopcast.__file__, 'config': str(DEFAULT_CONFIG), 'files': files,",
        "                  'rig': cfg.rig.name, 'editable': [k for k in sys.modules if '__editable__' in k]}))"])
    res = subprocess.run([str(wheel_venv / "bin" / "python"), "-c", code], cwd=tmp_path, env=_venv_env(),
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    venv = str(wheel_venv.resolve())
    assert out["loopcast"].startswith(venv), f"loopcast came from {out['loopcast']}, not the wheel's venv"
    assert out["config"].startswith(venv) and Path(out["config"]).name == "loopcast.toml"
    outside = [f for f in out["files"] if not f.startswith(venv)]
    assert not outside and not out["editable"], (outside, out["editable"])
    assert len(out["files"]) == len(package_files(".py")), "modules the installed package does not import"


# ------------------------------------------------------------------------ no old top-level names
SCANNED = [*PACKAGE_DIRS.values(), ROOT / "tests", ROOT / "bench", ROOT / "docs"]
OLD = "|".join(OLD_NAMES)
IMPORT_IN_TEXT = re.compile(
    rf"(?m)(?:^|;)\s*(?:from\s+(?:{OLD})(?:\.\w+)*\s+import\b|import\s+(?:[\w.]+\s*,\s*)*(?:{OLD})\b)")
DOTTED = re.compile(rf"(?:{OLD})(?:\.\w+)+")
PACKAGED = {"/".join(pkg.split(".")) for pkg in package_folders()} | {
    p.removesuffix(".py") for p in package_files(".py")}   # loopcast/realtime/wire, loopcast/replay/layout, ...


def _names_a_module(dotted: str) -> bool:
    """'realtime.forecast.stage.time' -> True: under loopcast it starts with a module below a top folder."""
    parts = ["loopcast", *dotted.split(".")]
    return any("/".join(parts[:i]) in PACKAGED for i in range(3, len(parts) + 1))


def python_files() -> list[Path]:
    return sorted({p for d in SCANNED for p in d.rglob("*.py") if ".venv" not in p.parts})


def old_name_uses(path: Path) -> list[str]:
    """Uses of the old top-level names in one file: `import realtime...`/`from models... import`, the
    same in code held in strings (subprocess scripts), and 'replay.layout.X'-style module paths
    (import_module, monkeypatch.setattr targets)."""
    where = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
    bad: list[str] = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            bad += [f"{where}:{node.lineno}: import {a.name}" for a in node.names if a.name.split(".")[0] in OLD_NAMES]
        elif isinstance(node, ast.ImportFrom) and not node.level and (node.module or "").split(".")[0] in OLD_NAMES:
            bad.append(f"{where}:{node.lineno}: from {node.module} import")
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            if IMPORT_IN_TEXT.search(node.value):
                bad.append(f"{where}:{node.lineno}: code in a string imports an old name: {node.value[:80]!r}")
            elif DOTTED.fullmatch(node.value) and _names_a_module(node.value):
                bad.append(f"{where}:{node.lineno}: module path on an old name: {node.value!r}")
    return bad


def test_nothing_uses_the_old_top_level_names() -> None:
    here = Path(__file__).resolve()   # holds the planted examples below
    bad = [line for path in python_files() if path != here for line in old_name_uses(path)]
    assert not bad, "\n".join(bad)


def test_the_old_name_scan_sees_every_form(tmp_path: Path) -> None:
    planted = tmp_path / "planted.py"
    planted.write_text("\n".join([
        "import realtime.pipeline",
        "from models.zoo import build_model",
        "import numpy, offline_training",
        "CODE = 'import sys, realtime.spikes.oasis; print(1)'",
        'SCRIPT = """',
        "    from replay.layout import Recording",
        '"""',
        "def test(monkeypatch):",
        "    monkeypatch.setattr('realtime.forecast.stage.time.monotonic', lambda: 0.0)",
        "    importlib.import_module('replay.layout')",
        "KEYS = ['replay.speed', 'replay.summary.json', 'models.items']   # config keys and file names: fine",
        "from loopcast.realtime import pipeline   # fine",
    ]) + "\n")
    found = sorted(line.split(": ", 1)[1].split(":")[0] for line in old_name_uses(planted))
    assert found == sorted(["import realtime.pipeline", "from models.zoo import", "import offline_training",
                            "code in a string imports an old name", "code in a string imports an old name",
                            "module path on an old name", "module path on an old name"]), found


def test_no_script_edits_sys_path() -> None:
    """bench/ and docs/figures/ scripts import loopcast as installed; bench scripts find their sibling
    modules because `python bench/x.py` puts bench/ first on sys.path."""
    scripts = sorted([*(ROOT / "bench").rglob("*.py"), *(ROOT / "docs" / "figures").glob("*.py")])
    assert scripts
    bad = [f"{p.relative_to(ROOT)}:{n.lineno}" for p in scripts for n in ast.walk(ast.parse(p.read_text()))
           if isinstance(n, ast.Attribute) and n.attr == "path" and isinstance(n.value, ast.Name)
           and n.value.id == "sys"]
    assert not bad, f"sys.path edited in {bad}"


def test_no_shell_script_puts_the_repository_root_on_pythonpath() -> None:
    """The repository's loopcast/ folder lacks the mapped sub-packages: on sys.path it would shadow the
    installed package (bench/gpu/session.sh installs the project instead)."""
    root_like = {"$PWD", "${PWD}", "$(pwd)", ".", ""}
    bad = []
    for path in sorted((ROOT / "bench").rglob("*.sh")):
        for i, line in enumerate(path.read_text().splitlines(), 1):
            for m in re.finditer(r"PYTHONPATH=([^\s;]*)", line.split("#")[0]):
                entries = m.group(1).strip("\"'").split(":")
                if root_like & set(entries):
                    bad.append(f"{path.relative_to(ROOT)}:{i}: {line.strip()}")
    assert not bad, "\n".join(bad)
