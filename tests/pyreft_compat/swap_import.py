"""Run a pyreft 0.1.0 pattern script with its one pyreft import pointed at ``reftkit.pyreft``.

The scripts under ``scripts/`` are real pyreft programs: they run unchanged in pyreft 0.1.0's venv (that is
how they were checked). Each has exactly one statement that imports pyreft (``import pyreft`` or
``from pyreft import ...``). ``swap_import`` rewrites that single line and nothing else, so "one changed
import" is literal: the test diffs the two texts and finds exactly one changed line.
"""
from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

SCRIPTS = Path(__file__).parent / "scripts"


def pyreft_imports(text: str) -> list[ast.stmt]:
    """The statements of ``text`` that import pyreft or a submodule of it."""
    found: list[ast.stmt] = []
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.Import) and any(a.name.split(".")[0] == "pyreft" for a in node.names):
            found.append(node)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "pyreft":
            found.append(node)
    return found


def swap_import(text: str) -> str:
    """Return ``text`` with its one pyreft import rewritten for reftkit.pyreft.

    ``import pyreft`` -> ``import reftkit.pyreft as pyreft``; ``from pyreft import X`` ->
    ``from reftkit.pyreft import X``. Raises ValueError unless there is exactly one such statement.
    """
    nodes = pyreft_imports(text)
    if len(nodes) != 1:
        raise ValueError(f"expected exactly one pyreft import, found {len(nodes)} (lines "
                         f"{[n.lineno for n in nodes]}); a pattern script imports pyreft once")
    node = nodes[0]
    lines = text.splitlines(keepends=True)
    line = lines[node.lineno - 1]
    if isinstance(node, ast.Import):
        if [(a.name, a.asname) for a in node.names] != [("pyreft", None)]:
            raise ValueError(f"line {node.lineno}: write the import as plain `import pyreft`, got {line.strip()!r}")
        new = line.replace("import pyreft", "import reftkit.pyreft as pyreft", 1)
    else:
        new = line.replace("from pyreft", "from reftkit.pyreft", 1)
    if new == line:
        raise ValueError(f"line {node.lineno}: could not rewrite {line.strip()!r}")
    lines[node.lineno - 1] = new
    return "".join(lines)


def run_script(script: Path, workdir: Path, result: Path | None = None, swap: bool = True,
               python: str = sys.executable, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run ``script`` (with its import swapped unless ``swap`` is False) in a subprocess from ``workdir``."""
    text = script.read_text()
    target = workdir / script.name
    target.write_text(swap_import(text) if swap else text)
    env = dict(os.environ, PYTHONPATH=str(SCRIPTS), OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
               TOKENIZERS_PARALLELISM="false")
    args = [python, str(target)] + ([str(result)] if result is not None else [])
    return subprocess.run(args, cwd=workdir, env=env, capture_output=True, text=True, timeout=timeout)


if __name__ == "__main__":  # python tests/pyreft_compat/swap_import.py [--real] [--seed S] [N ...]: run, print status
    import argparse
    import tempfile

    parser = argparse.ArgumentParser(description="run the pattern scripts under reftkit.pyreft (or --real pyreft)")
    parser.add_argument("--real", action="store_true", help="run unchanged in pyreft's venv ($PYREFT_PYTHON)")
    parser.add_argument("--seed", type=int, default=0, help="offset of the tiny models' seeds (robustness check)")
    parser.add_argument("patterns", nargs="*", help="pattern numbers (default: all)")
    options = parser.parse_args()
    real, wanted = options.real, options.patterns
    os.environ["PYREFT_COMPAT_SEED"] = str(options.seed)
    python = os.environ.get("PYREFT_PYTHON", "/tmp/pyreft_golden_venv/bin/python") if real else sys.executable
    for script in sorted(SCRIPTS.glob("pattern_*.py")):
        if wanted and script.name.split("_")[1] not in wanted:
            continue
        with tempfile.TemporaryDirectory() as tmp:
            done = run_script(script, Path(tmp), swap=not real, python=python)
        number = script.name.split("_")[1]
        if done.returncode == 0 and f"pattern {number} OK" in done.stdout:
            print(f"{script.name}: OK")
        else:
            print(f"{script.name}: FAILED (rc={done.returncode})", *done.stderr.strip().splitlines()[-6:], sep="\n  ")
