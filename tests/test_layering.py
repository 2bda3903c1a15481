"""Package boundaries of ARCHITECTURE.md: the real-time side loads artifacts, never training code."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def imported_modules(package: str) -> dict[str, set[str]]:
    """{file: top-level modules it imports} for every .py file of a package (static, AST)."""
    out: dict[str, set[str]] = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                names |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module.split(".")[0])
        out[str(path.relative_to(ROOT))] = names
    return out


def test_realtime_never_imports_offline_training_statically() -> None:
    bad = {f: m for f, m in imported_modules("realtime").items() if m & {"offline_training", "models"}}
    assert not bad, f"realtime/ imports training code: {bad}"


def test_realtime_never_imports_offline_training_at_runtime() -> None:
    modules = sorted(p.stem for p in (ROOT / "realtime").glob("*.py") if p.stem != "__init__")
    code = ("import sys\n" + "".join(f"import realtime.{m}\n" for m in modules)
            + "bad = sorted(k for k in sys.modules if k.split('.')[0] in ('offline_training', 'models'))\n"
            + "print(','.join(bad))\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "", f"importing realtime pulled in: {res.stdout.strip()}"


def test_replay_imports_only_the_wire_side_of_realtime() -> None:
    allowed = {"realtime.wire", "realtime.transport", "realtime.dff", "realtime.traces", "realtime.metrics",
               "loopcast.config"}
    for path in (ROOT / "replay").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith(("realtime", "loopcast")):
                assert node.module in allowed, f"{path.name} imports {node.module}"
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                mod = node.module if isinstance(node, ast.ImportFrom) else node.names[0].name
                assert not (mod or "").startswith(("offline_training", "models", "torch")), \
                    f"{path.name} imports {mod}"


def test_the_layering_test_detects_a_violation(tmp_path: Path) -> None:
    """The scanner itself must see both import forms (so the tests above can fail)."""
    pkg = tmp_path / "realtime"
    pkg.mkdir()
    (pkg / "bad.py").write_text("import numpy\nfrom offline_training.train import train\n")
    found: set[str] = set()
    for node in ast.walk(ast.parse((pkg / "bad.py").read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module.split(".")[0])
    assert "offline_training" in found
