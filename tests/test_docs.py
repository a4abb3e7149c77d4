"""The documentation site: ``bash scripts/docs.sh`` builds it strictly (warnings are errors, every
cross-reference resolves), with every public name in the API reference, every tutorial with its stored
pictures, and the positions picture; and a broken cross-reference fails the build."""
from __future__ import annotations

import importlib
import json
import os
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest
from test_public_api import PACKAGES, TOP_LEVEL

ROOT = Path(__file__).resolve().parents[1]
PAGES = ("index", "getting_started", "concepts", "migrating_from_pyreft", "architecture", "api", "tutorials")

pytestmark = pytest.mark.slow


def build(src: Path, out: Path) -> subprocess.CompletedProcess:
    """``bash scripts/docs.sh`` on a copy of docs/ (``-s``) into ``out`` (``-o``), with this interpreter's venv."""
    env = {**os.environ, "REFTKIT_VENV": sys.prefix, "OMP_NUM_THREADS": "1"}
    return subprocess.run(["bash", str(ROOT / "scripts" / "docs.sh"), "-s", str(src), "-o", str(out), "--",
                           "-D", f"reftkit_root={ROOT}"], capture_output=True, text=True, env=env, timeout=900)


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> tuple[Path, Path]:
    """(source copy, site) of one strict build; the copy keeps docs/ itself untouched."""
    base = tmp_path_factory.mktemp("docs")
    src = base / "docs"
    shutil.copytree(ROOT / "docs", src, ignore=shutil.ignore_patterns("_generated", "_build"))
    shutil.copyfile(ROOT / "README.md", base / "README.md")   # getting started includes its set-up and quickstart
    done = build(src, base / "site")
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-8000:]
    return src, base / "site"


def test_the_strict_build_succeeds_with_every_page(site):
    _, out = site
    for page in PAGES:
        assert (out / f"{page}.html").is_file(), page
    started = _text((out / "getting_started.html").read_text())
    assert "bash scripts/demo.sh" in started and "get_reft_model" in started   # README's parts, included


def _ids(html: Path) -> set[str]:
    class Ids(HTMLParser):
        def __init__(self):
            super().__init__()
            self.found: set[str] = set()

        def handle_starttag(self, tag, attrs):
            self.found.update(value for key, value in attrs if key == "id" and value)
    parser = Ids()
    parser.feed(html.read_text())
    return parser.found


def _public(package: str) -> set[str]:
    """``__all__`` (the definition ``tests/test_public_api.py`` checks), plus the intervention catalogue that
    ``reftkit.interventions`` lends through its module ``__getattr__``."""
    module = importlib.import_module(package)
    names = set(module.__all__)
    if package == "reftkit.interventions":
        names |= {cls.__name__ for cls in module.INTERVENTIONS.values()} | set(module.ALIASES)
    return names


def test_every_public_name_has_an_entry_in_the_api_reference(site):
    _, out = site
    missing = []
    for package in ("reftkit", *PACKAGES):
        page = out / "_generated" / "api" / f"{package}.html"
        assert page.is_file(), package
        ids = _ids(page)
        names = _public(package) | (TOP_LEVEL if package == "reftkit" else set())
        missing += [f"{package}.{name}" for name in sorted(names) if f"{package}.{name}" not in ids]
    assert missing == []
    assert "reftkit.interventions.IA3" in _ids(out / "_generated" / "api" / "reftkit.interventions.html")


class _OutputImages(HTMLParser):
    """``<img>`` tags inside the notebook cells' output areas of a myst-nb page."""

    def __init__(self):
        super().__init__()
        self.depth = 0  # > 0 while inside a cell_output div
        self.images = 0

    def handle_starttag(self, tag, attrs):
        if tag == "div":
            if self.depth:
                self.depth += 1
            elif "cell_output" in (dict(attrs).get("class") or "").split():
                self.depth = 1
        elif tag == "img" and self.depth:
            self.images += 1

    def handle_endtag(self, tag):
        if tag == "div" and self.depth:
            self.depth -= 1


def test_every_tutorial_is_rendered_with_its_stored_pictures(site):
    _, out = site
    notebooks = sorted((ROOT / "tutorials").glob("*.ipynb"))
    assert notebooks
    for notebook in notebooks:
        cells = json.loads(notebook.read_text())["cells"]
        stored = sum(any(kind.startswith("image/") for kind in output.get("data", {}))
                     for cell in cells for output in cell.get("outputs", []))
        page = out / "_generated" / "tutorials" / f"{notebook.stem}.html"
        assert page.is_file(), notebook.name
        parser = _OutputImages()
        parser.feed(page.read_text())
        assert parser.images == stored, f"{notebook.name}: {parser.images} pictures shown, {stored} stored"
        assert notebook.stem in (out / "tutorials.html").read_text(), f"{notebook.name} is not in the tutorial list"


def test_the_positions_picture_is_on_the_concepts_page(site):
    _, out = site
    concepts = (out / "concepts.html").read_text()
    assert "_images/positions_f3_l3.png" in concepts
    picture = out / "_images" / "positions_f3_l3.png"
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # every class of the catalogue is on the page with its docstring's formula: every ``literal`` of the
    # docstring's first paragraph (LowRankRotatedSpace's formula is the third)
    from reftkit.interventions import INTERVENTIONS
    text = _text(concepts)
    for cls in set(INTERVENTIONS.values()):
        assert f"reftkit.interventions.{cls.__name__}" in concepts, cls.__name__
        for literal in cls.__doc__.strip().split("\n\n")[0].split("``")[1::2]:
            formula = " ".join(literal.split())
            assert formula in text, f"{cls.__name__}: {formula!r} is not on the concepts page"


def _text(html: str) -> str:
    """The visible text of a page, whitespace collapsed (Sphinx splits a literal into one span per word)."""
    class Text(HTMLParser):
        def __init__(self):
            super().__init__()
            self.parts: list[str] = []

        def handle_data(self, data):
            self.parts.append(data)
    parser = Text()
    parser.feed(html)
    return " ".join("".join(parser.parts).split())


def test_a_broken_cross_reference_fails_the_build(site, tmp_path):
    src, out = site
    # rebuild the fixture's source copy incrementally (only the changed page is re-read) into a copy of its site
    broken = tmp_path / "site"
    shutil.copytree(out, broken)
    index = src / "index.md"
    original = index.read_text()
    index.write_text(original + "\nSee {class}`reftkit.NoSuchThing`.\n")
    try:
        done = build(src, broken)
    finally:
        index.write_text(original)
    assert done.returncode != 0
    assert "reference target not found: reftkit.NoSuchThing" in done.stderr + done.stdout
