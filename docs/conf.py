"""Sphinx configuration of reftkit's documentation site; ``bash scripts/docs.sh`` builds it into ``site/``.

Offline by design: no intersphinx, notebooks rendered from their stored outputs (never executed), and
the pages that describe code (API reference, intervention catalogue, positions picture) generated from
the code at build time by ``_ext/reftkit_docs.py``.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "_ext"))

project = "reftkit"
author = "reftkit contributors"
copyright = "reftkit contributors"
release = "0.1.0"

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.mathjax",
    "myst_nb",
    "reftkit_docs",
]

source_suffix = {".rst": "restructuredtext", ".md": "myst-nb", ".ipynb": "myst-nb"}
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store", "**.ipynb_checkpoints"]

# notebooks are stored with the outputs of a full-size run; the docs show those, never re-run them
nb_execution_mode = "off"
myst_enable_extensions = ["colon_fence"]
myst_heading_anchors = 3

autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_default_options: dict[str, str] = {}
autoclass_content = "class"
# an undocumented override (every ``forward``) would show torch's ``nn.Module.forward`` text otherwise
autodoc_inherit_docstrings = False
# annotations name these aliases; show them as links to where they are defined
autodoc_type_aliases = {"RewardFn": "reftkit.experts.policy_gradient.RewardFn"}
add_module_names = False

# nitpicky: every cross-reference must resolve. External libraries are not documented here (no
# intersphinx: the build is offline), so their type names are the only ones allowed to stay unresolved.
nitpicky = True
nitpick_ignore_regex = [
    (r"py:.*", r"(torch|nn|transformers|numpy|np|pandas|pd|matplotlib|peft|safetensors|nnsight|accelerate|fastapi|"
               r"starlette|uvicorn)(\..*)?"),
    (r"py:class", r"Tensor"),  # an annotation string autodoc cannot evaluate keeps torch's bare name
    (r"py:.*", r"(typing|collections\.abc|types|pathlib|os|enum|dataclasses|argparse|io|random|importlib|json|re|"
               r"threading|concurrent\.futures|asyncio)\..*"),
]

html_theme = "furo"
html_title = "reftkit"
html_static_path: list[str] = []
