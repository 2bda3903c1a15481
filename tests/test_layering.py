"""Package boundaries: the import rules of docs/architecture.md ("Packages"), checked per sub-package.

One scanner (`scan`) reads every .py file's AST: `import` and `from ... import` at module level and
inside functions, relative ones resolved, and the literal module names of run-time imports:
`importlib.import_module("loopcast.x")`, a `"loopcast.x:Attr"` string, or a module's name in a tuple
or dict (a table such as the engine loader's runtimes; a bare string elsewhere, e.g. a logger's name
or `-m loopcast.cli`, is not an import). Every test below asks that one scanner;
`test_planted_violations_are_reported` plants violations in a tmp tree and expects the same scanner and
rule check to report them, so a rule cannot pass by seeing nothing.
"""
from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
import tomllib
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# dotted package -> folder, as pyproject.toml maps them (loopcast.realtime -> realtime/, ...)
SETUPTOOLS = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
PACKAGE_DIRS: dict[str, Path] = {name: ROOT / folder for name, folder in SETUPTOOLS["package-dir"].items()}


@dataclass(frozen=True, order=True)
class Import:
    importer: str       # dotted name of the importing module
    target: str         # dotted name imported: the deepest module of the tree it names, else as written
    path: Path
    line: int
    deferred: bool      # inside a function: runs when called, not when the importer is imported
    typing_only: bool   # under `if TYPE_CHECKING:`: never runs
    dynamic: bool       # a literal module name given to importlib (or a "module:attr" table entry)

    def where(self) -> str:
        return f"{self.path.relative_to(ROOT) if self.path.is_relative_to(ROOT) else self.path}:{self.line}"


def module_files(dirs: Mapping[str, Path]) -> dict[str, Path]:
    """{dotted module name: file} for every .py file under the mapped folders."""
    out: dict[str, Path] = {}
    for prefix, folder in dirs.items():
        for path in sorted(folder.rglob("*.py")):
            parts = path.relative_to(folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join((prefix, *parts))] = path
    return out


MODULE_STRING = re.compile(r"[A-Za-z_]\w*(?:\.\w+)+(?::\w+)?")


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _resolve(name: str, known: Collection[str]) -> str:
    """The deepest known module that `name` names or lies in; `name` itself when none does."""
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        if ".".join(parts[:i]) in known:
            return ".".join(parts[:i])
    return name


def scan_file(module: str, path: Path, known: Collection[str]) -> set[Import]:
    """Every import of one file (see the module docstring)."""
    is_package = path.name == "__init__.py"
    found: set[Import] = set()

    def add(target: str, line: int, deferred: bool, typing_only: bool, dynamic: bool = False) -> None:
        found.add(Import(module, _resolve(target, known), path, line, deferred, typing_only, dynamic))

    def visit(node: ast.AST, deferred: bool, typing_only: bool) -> None:
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name, node.lineno, deferred, typing_only)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")[: len(module.split(".")) - node.level + (1 if is_package else 0)]
                source = ".".join([*base, *([node.module] if node.module else [])])
            else:
                source = node.module or ""
            for alias in node.names:
                sub = f"{source}.{alias.name}"
                add(sub if sub in known else source, node.lineno, deferred, typing_only)
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str) and (
                    (isinstance(node.func, ast.Attribute) and node.func.attr == "import_module")
                    or (isinstance(node.func, ast.Name) and node.func.id in ("import_module", "__import__"))):
            add(node.args[0].value, node.lineno, True, typing_only, dynamic=True)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and ":" in node.value \
                and MODULE_STRING.fullmatch(node.value) and node.value.partition(":")[0] in known:
            add(node.value.partition(":")[0], node.lineno, True, typing_only, dynamic=True)
        elif isinstance(node, (ast.Tuple, ast.Dict)):
            for item in (node.elts if isinstance(node, ast.Tuple) else [*node.keys, *node.values]):
                if isinstance(item, ast.Constant) and isinstance(item.value, str) and item.value in known:
                    add(item.value, item.lineno, True, typing_only, dynamic=True)
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for stmt in node.body:
                visit(stmt, deferred, True)
            for stmt in node.orelse:
                visit(stmt, deferred, typing_only)
            return
        inner = deferred or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        for child in ast.iter_child_nodes(node):
            visit(child, inner, typing_only)

    visit(ast.parse(path.read_text(), filename=str(path)), False, False)
    return found


def scan(dirs: Mapping[str, Path] = PACKAGE_DIRS, known: Collection[str] = ()) -> list[Import]:
    """Every import of every module under `dirs`. `known` adds module names (beyond those found under
    `dirs`) that `from pkg import name` and dotted names resolve to."""
    files = module_files(dirs)
    names = set(files) | set(known)
    return sorted(imp for module, path in files.items() for imp in scan_file(module, path, names))


MODULES = module_files(PACKAGE_DIRS)
IMPORTS = scan()

# ---------------------------------------------------------------------------------------------- rules
CONFIG = "loopcast.config"   # the generic TOML -> dataclass loader
# The app: every module directly in loopcast/ but the loader. They may import anything; no package may
# import them.
APP = frozenset(m for m, p in MODULES.items()
                if p.parent == PACKAGE_DIRS["loopcast"] and p.name != "__init__.py" and m != CONFIG)
RT = "loopcast.realtime"
WIRE, METRICS, CONTROL, ENGINES = f"{RT}.wire", f"{RT}.metrics", f"{RT}.control", f"{RT}.engines"
SPIKES, PREPROCESS, FORECAST, INGEST, PIPELINE = (f"{RT}.spikes", f"{RT}.preprocess", f"{RT}.forecast",
                                                  f"{RT}.ingest", f"{RT}.pipeline")
JIT = f"{RT}.jit"   # the numba decorator and its kernel cache
RECORD = f"{RT}.record"   # the experiment record's writers (audit log, session store)
SESSION = "loopcast.session"   # after a session: reading, reporting, exporting the record (part of the app)
REPLAY, MODELS, OFFLINE = "loopcast.replay", "loopcast.models", "loopcast.offline_training"

# importer (a module or a package's prefix; the longest one that matches applies) -> the loopcast
# modules it may import (prefixes). The root package `loopcast` (it imports nothing) is always allowed.
MAY_IMPORT: dict[str, tuple[str, ...]] = {
    "loopcast": (),   # loopcast/__init__.py; a new folder mapped into loopcast must get its own row
    CONFIG: (),
    WIRE: (WIRE,),
    METRICS: (),
    JIT: (),
    CONTROL: (CONFIG, CONTROL, WIRE, METRICS, f"{RECORD}.audit"),
    RECORD: (CONFIG, RECORD, METRICS),
    ENGINES: (CONFIG, ENGINES, WIRE, METRICS),
    SPIKES: (CONFIG, SPIKES, ENGINES, WIRE, METRICS, JIT),
    PREPROCESS: (CONFIG, PREPROCESS, SPIKES, WIRE, METRICS, JIT),
    FORECAST: (CONFIG, FORECAST, ENGINES, PREPROCESS, WIRE, METRICS),
    INGEST: (CONFIG, WIRE, METRICS),
    PIPELINE: (CONFIG, RT),
    RT: (),   # realtime/__init__.py; a new module in realtime/ must get its own row too
    REPLAY: (CONFIG, REPLAY, WIRE, f"{PREPROCESS}.dff", f"{PREPROCESS}.traces", f"{PREPROCESS}.registration",
             f"{PREPROCESS}.shifted_traces", METRICS),
    MODELS: (CONFIG, MODELS),
    OFFLINE: (CONFIG, RT, REPLAY, MODELS, OFFLINE),
    "loopcast.configs": (),
    **{app: ("loopcast",) for app in APP},
    SESSION: ("loopcast",),
}
# realtime modules that may import torch when they are imported (their callers import them lazily)
TORCH_AT_IMPORT = frozenset({f"{PREPROCESS}.dff_torch", f"{PREPROCESS}.traces_torch", f"{SPIKES}.oasis_torch"})
# ... and those that may import torch inside functions too (all others, realtime/ included, may)
NEVER_TORCH = (REPLAY,)
NEVER_IMPORTED_BY_REALTIME = (OFFLINE, MODELS, REPLAY)
CATCH_ALL = ("loopcast", RT)   # rows for the package itself only, not for the modules under it


def within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def rule_of(module: str) -> str | None:
    """The MAY_IMPORT row of a module: the longest key it lies in, None when only a catch-all row does."""
    matches = [key for key in MAY_IMPORT if within(module, key)]
    rule = max(matches, key=len) if matches else None
    return None if rule in CATCH_ALL and module != rule else rule


def violations(imports: Iterable[Import]) -> list[str]:
    """Every import that breaks a rule above, as 'file:line: importer -> target (rule)'."""
    out: list[str] = []
    for imp in imports:
        def bad(why: str, imp: Import = imp) -> None:
            out.append(f"{imp.where()}: {imp.importer} -> {imp.target} ({why})")
        rule = rule_of(imp.importer)
        top = imp.target.split(".")[0]
        if top == "loopcast" and imp.target != "loopcast":
            if rule is None:
                bad("no rule for this module: add it to MAY_IMPORT and docs/architecture.md")
            elif not any(within(imp.target, ok) for ok in MAY_IMPORT[rule]):
                bad(f"{rule} may import only {', '.join(MAY_IMPORT[rule]) or 'nothing of loopcast'}")
        if top == "torch" and not imp.typing_only:
            if any(within(imp.importer, p) for p in NEVER_TORCH):
                bad("never torch")
            elif within(imp.importer, RT) and not imp.deferred and imp.importer not in TORCH_AT_IMPORT:
                bad(f"torch at import time only in {sorted(TORCH_AT_IMPORT)}")
        if within(imp.importer, RT) and imp.importer not in TORCH_AT_IMPORT and imp.target in TORCH_AT_IMPORT \
                and not imp.deferred and not imp.typing_only:
            bad("a torch twin imported at import time pulls torch into the loop")
    return out


def cycles(imports: Iterable[Import]) -> list[list[str]]:
    """Import cycles among the scanned modules (Tarjan's strongly connected components), every import
    that runs counted: module level, inside functions and dynamic; `if TYPE_CHECKING:` ones do not run."""
    imports = list(imports)
    nodes = {imp.importer for imp in imports}
    graph: dict[str, set[str]] = {n: set() for n in nodes}
    for imp in imports:
        if not imp.typing_only and imp.target in nodes:
            graph[imp.importer].add(imp.target)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def strongconnect(v: str) -> None:   # recursion depth <= number of modules (~200)
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1 or v in graph[v]:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            strongconnect(v)
    return sorted(found)


# ---------------------------------------------------------------------------------------------- tests
def test_the_scanner_sees_the_tree() -> None:
    """A sanity floor: if parsing went wrong, every rule below would pass on nothing."""
    assert len(MODULES) > 100 and {CONFIG, f"{WIRE}.codec", PIPELINE, f"{MODELS}.zoo"} <= set(MODULES)
    seen = {(i.importer, i.target, i.deferred, i.dynamic) for i in IMPORTS}
    assert (PIPELINE, f"{FORECAST}.stage", False, False) in seen
    assert (f"{SPIKES}.stage", f"{SPIKES}.oasis_torch", True, False) in seen   # function level
    assert (f"{ENGINES}.loader", f"{ENGINES}.torch_runtime", True, True) in seen   # the runtime table


def test_every_module_has_a_rule() -> None:
    missing = sorted(m for m in MODULES if rule_of(m) is None)
    assert not missing, f"modules without an import rule (tests/test_layering.py MAY_IMPORT): {missing}"


@pytest.mark.parametrize("package", ["loopcast (config and app)", RT, REPLAY, MODELS, OFFLINE])
def test_package_follows_its_import_rules(package: str) -> None:
    prefix = package.split()[0]
    own = [i for i in IMPORTS if within(i.importer, prefix) and (
        prefix != "loopcast" or i.importer in APP | {CONFIG, "loopcast"})]
    assert own, f"scanned no imports of {package}"
    bad = violations(own)
    assert not bad, "\n".join(bad)


def test_realtime_imports_no_training_model_or_replay_code_and_no_torch_at_import() -> None:
    """In a fresh interpreter: importing every realtime module (torch twins apart) loads no torch, and
    importing them all, twins included, loads nothing of offline_training, models, replay or the app."""
    realtime = sorted(m for m in MODULES if within(m, RT))
    first = [m for m in realtime if m not in TORCH_AT_IMPORT]
    code = "\n".join([
        "import importlib, json, sys",
        f"for m in {first!r}: importlib.import_module(m)",
        "torch = 'torch' in sys.modules",
        f"for m in {sorted(TORCH_AT_IMPORT)!r}: importlib.import_module(m)",
        f"bad = sorted(k for k in sys.modules if k.startswith({tuple(p + '.' for p in NEVER_IMPORTED_BY_REALTIME)!r})"
        f" or k in {sorted(APP)!r})",
        "print(json.dumps({'torch': torch, 'bad': bad}))"])
    res = subprocess.run([sys.executable, "-P", "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out == {"torch": False, "bad": []}, f"importing loopcast.realtime pulled in: {out}"


@pytest.mark.parametrize("package", ["loopcast (config and app)", RT, REPLAY, MODELS, OFFLINE])
def test_no_import_cycles(package: str) -> None:
    prefix = package.split()[0]
    def ours(m: str) -> bool:
        return m in APP | {CONFIG, "loopcast"} if prefix == "loopcast" else within(m, prefix)
    mine = [c for c in cycles(IMPORTS) if any(ours(m) for m in c)]
    detail = ["  " + " <-> ".join(c) + "\n" + "\n".join(
        f"      {i.where()}: {i.importer} -> {i.target}{' (in a function)' if i.deferred else ''}"
        for i in IMPORTS if i.importer in c and i.target in c and not i.typing_only) for c in mine]
    assert not mine, "import cycles:\n" + "\n".join(detail)


def test_planted_violations_are_reported(tmp_path: Path) -> None:
    """The same scanner and rule check, on a fake realtime/ tree with one violation per kind."""
    rt = tmp_path / "realtime"
    files = {
        "__init__.py": "",
        "control/__init__.py": "",
        "control/bad.py": "from loopcast.realtime.forecast.stage import ForecastStage\n",
        "control/lazy.py": "import numpy\n\ndef later():\n    from loopcast.offline_training.trace import train\n",
        "control/relative.py": "from ..forecast import stage\nfrom . import bad\n",
        "wire/__init__.py": "",
        "wire/typed.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from loopcast import app\n",
        "spikes/__init__.py": "",
        "spikes/gpu.py": "import torch\n",
        "spikes/twin.py": "from loopcast.realtime.preprocess import dff_torch\n",
        "engines/__init__.py": "",
        "engines/table.py": 'RUNTIMES = {"zoo": "loopcast.models.zoo:build_model"}\n',
        "engines/dyn.py": ('import importlib\n\ndef load():\n'
                           '    return importlib.import_module("loopcast.replay.sim")\n'),
        "newmodule.py": "from loopcast.realtime.wire import codec\n",
    }
    for name, text in files.items():
        (rt / name).parent.mkdir(parents=True, exist_ok=True)
        (rt / name).write_text(text)
    planted = scan({RT: rt}, known=MODULES)
    found = {line.split(": ", 1)[1].split(" (")[0] for line in violations(planted)}
    assert found == {
        f"{CONTROL}.bad -> {FORECAST}.stage",
        f"{CONTROL}.lazy -> {OFFLINE}.trace.train",
        f"{CONTROL}.relative -> {FORECAST}.stage",
        f"{WIRE}.typed -> loopcast.app",
        f"{SPIKES}.gpu -> torch",
        f"{SPIKES}.twin -> {PREPROCESS}.dff_torch",   # outside spikes' row, and a torch twin at import time
        f"{ENGINES}.table -> {MODELS}.zoo",
        f"{ENGINES}.dyn -> {REPLAY}.sim",
        f"{RT}.newmodule -> {WIRE}.codec",   # a module without its own rule
    }, violations(planted)
    # ... and the cycle check sees a cycle closed by a function-level import
    (rt / "control" / "bad.py").write_text("from loopcast.realtime.control import lazy\n")
    (rt / "control" / "lazy.py").write_text("def later():\n    from loopcast.realtime.control.bad import x\n")
    assert [f"{CONTROL}.bad", f"{CONTROL}.lazy"] in cycles(scan({RT: rt}, known=MODULES))
