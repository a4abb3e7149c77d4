"""Pages generated at build time, so they cannot drift from the code they describe.

The Sphinx extension ``docs/conf.py`` names. At ``builder-inited`` it writes, under ``docs/_generated/``
(git-ignored):

* ``api/<package>.rst`` and ``modules/<module>.rst`` — the API reference (``reftkit_docs_api``), whose
  reference and base-class hooks it also connects.
* ``interventions.rst`` and ``positions_f3_l3.png`` — the intervention catalogue and the positions picture
  (``reftkit_docs_catalogue``).
* ``tutorials/*.ipynb`` — copies of ``tutorials/*.ipynb`` (``reftkit_docs_tutorials``), rendered by myst-nb
  from their stored outputs.
"""
from __future__ import annotations

import io
from pathlib import Path

from reftkit_docs_api import api_pages, public_bases, readable_defaults, resolve_internal
from reftkit_docs_catalogue import interventions_page, positions_figure
from reftkit_docs_tutorials import keep_notebook_outputs_in_the_build, stage_tutorials
from sphinx.application import Sphinx


def _write(path: Path, text: str) -> None:
    # only when changed: an untouched file keeps its mtime, so Sphinx does not re-read it
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists() or path.read_text() != text:
        path.write_text(text)


def generate(app: Sphinx) -> None:
    root = Path(app.config.reftkit_root)
    out = Path(app.srcdir) / "_generated"
    pages, documented = api_pages(root)
    app.env.reftkit_documented = documented  # read by resolve_internal and public_bases
    for name, text in pages.items():
        _write(out / name, text)
    for folder in ("api", "modules"):
        for stale in (out / folder).glob("*.rst"):
            if f"{folder}/{stale.name}" not in pages:
                stale.unlink()
    _write(out / "interventions.rst", interventions_page())
    buffer = io.BytesIO()
    positions_figure(buffer)
    figure = out / "positions_f3_l3.png"
    if not figure.exists() or figure.read_bytes() != buffer.getvalue():
        figure.write_bytes(buffer.getvalue())
    stage_tutorials(root, out / "tutorials")


def setup(app: Sphinx) -> dict:
    # the repository whose tests/ and tutorials/ the pages read (a copy of docs/ elsewhere passes it)
    app.add_config_value("reftkit_root", str(Path(__file__).resolve().parents[2]), "env", str)
    app.connect("builder-inited", generate)
    app.connect("builder-inited", keep_notebook_outputs_in_the_build)  # after myst-nb's own handler
    app.connect("missing-reference", resolve_internal)
    app.connect("autodoc-process-bases", public_bases)
    app.connect("autodoc-process-signature", readable_defaults)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
