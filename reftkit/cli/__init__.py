"""The command line (``reftkit ...`` / ``python -m reftkit``): the demo, and runs from config files.

* :mod:`~reftkit.cli.main` — argument parsing and dispatch (:func:`main`);
* :mod:`~reftkit.cli.recipe` — run configs: ``reftkit train CONFIG`` / ``reftkit eval CONFIG``;
* :mod:`~reftkit.cli.demo` — the README demo.
"""
from __future__ import annotations

from .main import main

__all__ = ["main"]
