"""The tutorials on the site: copies of ``tutorials/*.ipynb`` (by glob), which myst-nb renders from their
stored outputs, and where the pictures of those outputs go."""
from __future__ import annotations

import shutil
from pathlib import Path

from sphinx.application import Sphinx


def stage_tutorials(root: Path, target: Path) -> None:
    """Copy ``root/tutorials/*.ipynb`` into ``target``, dropping copies whose notebook is gone."""
    target.mkdir(parents=True, exist_ok=True)
    wanted = {p.name: p for p in sorted((root / "tutorials").glob("*.ipynb"))}
    for old in target.glob("*.ipynb"):
        if old.name not in wanted:
            old.unlink()
    for name, source in wanted.items():
        copy = target / name
        if not copy.exists() or copy.read_bytes() != source.read_bytes():
            shutil.copyfile(source, copy)


def keep_notebook_outputs_in_the_build(app: Sphinx) -> None:
    """myst-nb writes the notebooks' pictures to ``<output>/../jupyter_execute`` — the repository root for
    ``site/``; keep them beside the doctrees instead, inside the output folder."""
    config = app.env.mystnb_config
    app.env.mystnb_config = config.copy(output_folder=str(Path(app.doctreedir).resolve() / "jupyter_execute"))
