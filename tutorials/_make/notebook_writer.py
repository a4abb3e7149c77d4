"""Shared tail of the make_*.py scripts: build the notebook, then one of

* ``--execute``: run it with the full parameters (in a scratch folder) and store the outputs;
* ``--reuse-outputs``: keep the stored notebook's outputs, which is allowed only when every code cell is
  unchanged (prose edits after a long run do not need a rerun; code edits do);
* ``--check``: write nothing; exit 1 if the stored notebook's cells differ from what this maker builds;
* nothing: write the notebook without outputs.

An executed notebook records the digest of the code it ran (``metadata.reftkit.executed_code``), so a
test can tell stored outputs made by today's code from stale ones.
"""
from __future__ import annotations

import hashlib
import shutil
import sys
import tempfile
from pathlib import Path

import nbformat as nbf

TUTORIALS = Path(__file__).resolve().parents[1]


def code_digest(nb: nbf.NotebookNode) -> str:
    """sha256 of the code cells' sources, in order: what the stored outputs depend on."""
    sources = [cell.source for cell in nb.cells if cell.cell_type == "code"]
    return hashlib.sha256("\n\x00\n".join(sources).encode()).hexdigest()


def _cells(nb: nbf.NotebookNode) -> list[tuple[str, str, list[str]]]:
    return [(c.cell_type, c.source, sorted(c.get("metadata", {}).get("tags", []))) for c in nb.cells]


def _check(nb: nbf.NotebookNode, path: Path) -> None:
    stored = nbf.read(path, as_version=4)
    if _cells(stored) != _cells(nb):
        changed = [i for i, (a, b) in enumerate(zip(_cells(stored), _cells(nb))) if a != b]
        sys.exit(f"{path.name}: stored cells differ from {Path(sys.argv[0]).name} (cells {changed or 'count'}); "
                 f"regenerate with `python {sys.argv[0]} --execute`")


def _reuse_outputs(nb: nbf.NotebookNode, path: Path) -> None:
    stored = nbf.read(path, as_version=4)
    if code_digest(stored) != code_digest(nb):
        sys.exit(f"--reuse-outputs: a code cell of {path.name} changed; its outputs must be regenerated with "
                 f"--execute")
    stored_code = [c for c in stored.cells if c.cell_type == "code"]
    for cell, old in zip([c for c in nb.cells if c.cell_type == "code"], stored_code):
        cell.outputs, cell.execution_count = old.outputs, old.execution_count
    if "reftkit" in stored.metadata:
        nb.metadata["reftkit"] = stored.metadata["reftkit"]


def write(nb: nbf.NotebookNode, name: str, keep: dict[str, str] | None = None) -> None:
    """``keep`` maps files the executed notebook writes (relative to its scratch folder) to paths in the
    repository (relative to its root) where they are stored beside the notebook, e.g. a run's metrics."""
    nb["metadata"]["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb["metadata"]["language_info"] = {"name": "python"}
    path = TUTORIALS / name
    if "--check" in sys.argv:
        _check(nb, path)
        return
    if "--execute" in sys.argv:
        from nbclient import NotebookClient

        with tempfile.TemporaryDirectory() as cwd:   # notebooks that write files write them there
            NotebookClient(nb, timeout=3600, kernel_name="python3", resources={"metadata": {"path": cwd}}).execute()
            for made, stored in (keep or {}).items():
                shutil.copyfile(Path(cwd) / made, TUTORIALS.parent / stored)
        for cell in nb.cells:
            cell.metadata.pop("execution", None)
        nb.metadata["reftkit"] = {"executed_code": code_digest(nb)}
    elif "--reuse-outputs" in sys.argv:
        _reuse_outputs(nb, path)
    nbf.write(nb, path)
