"""The house keeps its shape: rooms import only downward, no module imports one that imports it back
(lazy imports inside functions and lazy package exports included), no module past 400 lines, at most
12 core modules at the top of ``reftkit/``, and ruff finds nothing.

The import graph is read from the source with ``ast`` (nothing is imported), so a lazy
``from .x import y`` inside a function counts as much as one at the top of a module.
"""
from __future__ import annotations

import ast
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: installed package name -> source folder (pyproject's package-dir)
PACKAGES = {"reftkit": ROOT / "reftkit", "reftkit.interventions": ROOT / "interventions",
            "reftkit.analysis": ROOT / "analysis", "reftkit.experts": ROOT / "experts"}
ROOMS = ("data", "training", "models", "cli", "pyreft", "serve")
#: room -> the rooms its modules may import ("facade": ``reftkit/__init__``, which lends names of
#: data, training and models, so only the rooms above those may import it)
ALLOWED = {
    "core": {"core", "interventions"},
    "interventions": {"interventions", "core"},
    "data": {"data", "core", "interventions"},
    "models": {"models", "core"},
    "training": {"training", "data", "core", "interventions"},
    # pyreft's API on reftkit: maps onto the core, the data modules and the trainer, and nothing imports it
    "pyreft": {"pyreft", "training", "data", "core", "interventions"},
    "facade": {"core", "interventions", "data", "models", "training"},
    "analysis": {"analysis", "facade", "training", "data", "models", "core", "interventions"},
    "experts": {"experts", "analysis", "facade", "training", "data", "models", "core", "interventions"},
    # the OpenAI-compatible server: serves what the rest of the house trains and saves
    "serve": {"serve", "experts", "analysis", "facade", "training", "data", "models", "core", "interventions"},
    "cli": {"cli", "serve", "experts", "analysis", "facade", "training", "data", "models", "core", "interventions"},
}
MAX_LINES = 400
MAX_CORE_MODULES = 12
LINE_CHECKED = ("reftkit", "interventions", "analysis", "experts", "benchmarks", "tutorials/_make", "docs/_ext")


# ----------------------------------------------------------------------------- the graph

def module_files(packages: dict[str, Path]) -> dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` under each package folder (``pkg`` for its
    ``__init__.py``)."""
    modules: dict[str, Path] = {}
    for package, folder in packages.items():
        for path in sorted(folder.rglob("*.py")):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join([package, *parts])] = path
    return modules


def _lazy_export_targets(tree: ast.Module) -> list[str]:
    """Submodules named by a package's ``_EXPORTS = {"submodule": (...)}`` table (see lazy_exports)."""
    out = []
    for node in tree.body:
        target = node.target if isinstance(node, ast.AnnAssign) else (
            node.targets[0] if isinstance(node, ast.Assign) and len(node.targets) == 1 else None)
        if isinstance(target, ast.Name) and target.id == "_EXPORTS" and isinstance(node.value, ast.Dict):
            out += [k.value for k in node.value.keys if isinstance(k, ast.Constant) and isinstance(k.value, str)]
    return out


def import_graph(packages: dict[str, Path]) -> dict[str, set[str]]:
    """``graph[a]`` = the project modules ``a`` imports anywhere in its source, lazily or not."""
    modules = module_files(packages)
    graph: dict[str, set[str]] = defaultdict(set)

    def resolve(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    for name, path in modules.items():
        tree = ast.parse(path.read_text(), str(path))
        is_package = path.name == "__init__.py"
        here = name if is_package else name.rpartition(".")[0]
        targets: list[str] = [f"{here}.{sub}" for sub in _lazy_export_targets(tree)] if is_package else []
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets += [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = here.split(".")
                    anchor = anchor[:len(anchor) - (node.level - 1)]
                    base = ".".join(anchor + ([node.module] if node.module else []))
                for alias in node.names:
                    targets.append(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
            elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) == \
                    "import_module" and node.args and isinstance(node.args[0], ast.Constant):
                targets.append(str(node.args[0].value))
        for target in targets:
            found = resolve(target) if target.startswith("reftkit") else None
            if found is not None and found != name:
                graph[name].add(found)
        graph.setdefault(name, set())
    return dict(graph)


def room(module: str) -> str:
    parts = module.split(".")
    if module == "reftkit":
        return "facade"
    if parts[1] in ("interventions", "analysis", "experts") or parts[1] in ROOMS:
        return parts[1]
    return "cli" if parts[1] == "__main__" else "core"


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
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
            if len(component) > 1:
                found.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def forbidden_imports(graph: dict[str, set[str]]) -> list[str]:
    return sorted(f"{a} ({room(a)}) imports {b} ({room(b)})" for a, targets in graph.items() for b in targets
                  if room(b) not in ALLOWED[room(a)])


# ----------------------------------------------------------------------------- the rules

def test_rooms_import_only_downward():
    assert forbidden_imports(import_graph(PACKAGES)) == []


def test_no_import_circles():
    assert cycles(import_graph(PACKAGES)) == []


def test_the_graph_sees_lazy_imports_exports_and_circles(tmp_path):
    # a control: a small tree with a circle through a lazy import and a core -> training import
    pkg = tmp_path / "reftkit"
    (pkg / "training").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "model.py").write_text("def f():\n    from .training.trainer import T\n")
    (pkg / "training" / "__init__.py").write_text('_EXPORTS = {"trainer": ("T",)}\n')
    (pkg / "training" / "trainer.py").write_text("from reftkit.model import f\nT = 1\n")
    graph = import_graph({"reftkit": pkg})
    assert graph["reftkit.training"] == {"reftkit.training.trainer"}
    assert cycles(graph) == [["reftkit.model", "reftkit.training.trainer"]]
    assert forbidden_imports(graph) == ["reftkit.model (core) imports reftkit.training.trainer (training)"]


def test_core_has_at_most_twelve_modules():
    core = sorted(p.name for p in (ROOT / "reftkit").glob("*.py") if p.name not in ("__init__.py", "__main__.py"))
    assert len(core) <= MAX_CORE_MODULES, core
    rooms = sorted(p.name for p in (ROOT / "reftkit").iterdir() if p.is_dir() and (p / "__init__.py").exists())
    assert rooms == sorted(ROOMS)


def test_no_module_past_400_lines():
    long = {str(p.relative_to(ROOT)): n for folder in LINE_CHECKED for p in (ROOT / folder).rglob("*.py")
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}


def test_ruff_finds_nothing():
    # ruff is a test extra: where it is missing this fails rather than skips
    result = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", str(ROOT)], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
