"""Shared tail of the make_*.py scripts: set the kernel, optionally execute with the full parameters
(``--execute``, in a scratch folder), drop execution timestamps, write the notebook next to the others."""
import sys
import tempfile
from pathlib import Path

import nbformat as nbf


def write(nb: nbf.NotebookNode, name: str) -> None:
    nb["metadata"]["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb["metadata"]["language_info"] = {"name": "python"}
    if "--execute" in sys.argv:
        from nbclient import NotebookClient

        with tempfile.TemporaryDirectory() as cwd:   # notebooks that write files write them there
            NotebookClient(nb, timeout=3600, kernel_name="python3", resources={"metadata": {"path": cwd}}).execute()
        for cell in nb.cells:
            cell.metadata.pop("execution", None)
    nbf.write(nb, Path(__file__).resolve().parents[1] / name)
