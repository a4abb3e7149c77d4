"""The API reference, generated from the code at build time, and the links into it.

* :func:`api_pages` writes ``api/<package>.rst`` — one page per package of ``tests/test_public_api.py``'s
  ``PACKAGES`` (plus ``reftkit`` itself) documenting every public name: ``__all__``, and for
  ``reftkit.interventions`` the catalogue its ``__getattr__`` lends (every registered class and alias) — and
  ``modules/<module>.rst`` for each module inside them. An object public under several names is documented
  once, where it is defined; its other names are short alias entries pointing there.
* :func:`resolve_internal` sends a reference to any of an object's paths to that one entry, and
  :func:`public_bases` shows a class's documented bases instead of private ones.
"""
from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil
import re
from pathlib import Path

from sphinx.application import Sphinx
from sphinx.pycode import ModuleAnalyzer

TOP = "reftkit"


def public_packages(root: Path) -> list[str]:
    """``PACKAGES`` of ``tests/test_public_api.py``, read with ``ast`` so the docs and the test share one list."""
    tree = ast.parse((root / "tests" / "test_public_api.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "PACKAGES" for t in node.targets):
            return list(ast.literal_eval(node.value))
    raise RuntimeError("tests/test_public_api.py defines no PACKAGES tuple; the API reference reads it")


def public_names(package: str) -> list[str]:
    """A package's public names: ``__all__``, plus the catalogue ``reftkit.interventions`` lends lazily."""
    module = importlib.import_module(package)
    names = list(module.__all__)
    if package == "reftkit.interventions":
        names += [cls.__name__ for cls in module.INTERVENTIONS.values()] + list(module.ALIASES)
    return list(dict.fromkeys(names))


def _real_module(package: str, name: str) -> str:
    """The submodule that defines ``package.name`` (from a lazy export table when there is one)."""
    module = importlib.import_module(package)
    for sub, names in getattr(module, "_EXPORTS", {}).items():
        if name in names:
            return f"{package}.{sub}" if package != TOP else f"{TOP}.{sub}"
    return package


def _canonical(packages: list[str]) -> dict[int, tuple[str, str]]:
    """For each class or function public under several names: the one (package, name) documented in full.

    Its own ``__name__`` in the package whose path is the longest prefix of its ``__module__``."""
    seen: dict[int, list[tuple[str, str]]] = {}
    objects: dict[int, object] = {}
    data: dict[int, tuple[str, str]] = {}
    for package in packages:
        module = importlib.import_module(package)
        for name in public_names(package):
            obj = getattr(module, name)
            if inspect.isclass(obj) or inspect.isfunction(obj):
                seen.setdefault(id(obj), []).append((package, name))
                objects[id(obj)] = obj
            elif isinstance(obj, (dict, list, tuple, set, frozenset)) and id(obj) not in data:
                data[id(obj)] = (package, name)  # a constant's first public name (ints and strings are shared)
    chosen = {}
    for key, places in seen.items():
        obj = objects[key]
        own = [p for p in places if p[1] == obj.__name__] or places

        def depth(place: tuple[str, str]) -> int:
            return len(place[0]) if (obj.__module__ + ".").startswith(place[0] + ".") else -1
        chosen[key] = max(own, key=depth)
    return {**data, **chosen}


def _ours(obj: object) -> bool:
    return getattr(obj, "__module__", "").split(".")[0] == TOP


def _data_entry(package: str, name: str, obj: object) -> list[str]:
    real = _real_module(package, name)
    try:
        docs = ModuleAnalyzer.for_module(real).find_attr_docs()
        doc = list(docs.get(("", name), []))
    except Exception:  # a module without source; the entry still names where it lives
        doc = []
    lines = [f".. py:data:: {name}", f"   :module: {package}", f"   :type: {type(obj).__name__}", ""]
    body = [line for line in doc if line.strip()] or [f"Defined in ``{real}``."]
    return lines + [f"   {line}" for line in body] + [""]


def submodules(package: str) -> list[str]:
    """The modules directly inside ``package`` (not its sub-packages, which have their own page)."""
    module = importlib.import_module(package)
    found = []
    for info in pkgutil.iter_modules(module.__path__):
        if not info.ispkg and not info.name.startswith("_"):
            found.append(f"{package}.{info.name}")
    return sorted(found)


def module_page(name: str, documented: dict[int, str]) -> str:
    """A module's docstring and its members, except those a package page documents already."""
    module = importlib.import_module(name)
    skip = [key for key, obj in vars(module).items() if not key.startswith("_") and (
        id(obj) in documented or ((inspect.isclass(obj) or inspect.isfunction(obj)) and obj.__module__ != name))]
    package, _, leaf = name.rpartition(".")
    title = f"``{name}``"
    # every name the module defines, not only its ``__all__``: docstrings cite module constants and helpers
    out = [title, "=" * len(title), "", f".. automodule:: {name}", "   :members:", "   :undoc-members:",
           "   :ignore-module-all:"]
    if leaf in getattr(importlib.import_module(package), "__all__", ()):
        # ``reftkit.cli.main`` is both this module and the function the package exports: the name is the function's
        out.append("   :no-index:")
    if skip:
        out.append(f"   :exclude-members: {', '.join(sorted(skip))}")
    # a private base of a public class (``_OriginalNorm``) is named in its methods' signatures: document it
    bases = sorted(key for key, obj in vars(module).items() if key.startswith("_") and inspect.isclass(obj)
                   and obj.__module__ == name and any(issubclass(other, obj) and not other.__name__.startswith("_")
                                                      for other in vars(module).values() if inspect.isclass(other)))
    if bases:
        out.append(f"   :private-members: {', '.join(bases)}")
    out.append("")
    # automodule leaves out module constants without a ``#:`` comment; docstrings cite them, so list them
    documented_attrs = {attr for (_, attr) in ModuleAnalyzer.for_module(name).find_attr_docs()}
    for constant in _assigned_names(module):
        if constant not in documented_attrs and constant not in skip and not constant.startswith("_"):
            # py:data, not autodata: autodata would show the docstring of the value's type (``dict``'s)
            obj = getattr(module, constant)
            value = repr(obj)
            if type(obj).__module__ in ("typing", "types", "collections.abc") and not isinstance(obj, type):
                # a type alias (``RewardFn = Callable[...]``): annotations link to it as to a class
                out += [f".. py:type:: {constant}", f"   :module: {name}", f"   :canonical: {value}", ""]
                continue
            out += [f".. py:data:: {constant}", f"   :module: {name}",
                    # a repr with a memory address (a dict of functions) changes every build: show the type
                    f"   :value: {value}" if len(value) <= 120 and "\n" not in value and " at 0x" not in value else
                    f"   :type: {type(obj).__name__}", ""]
    return "\n".join(out) + "\n"


def _assigned_names(module: object) -> list[str]:
    """Names a module assigns at its top level (``X = ...`` / ``X: T = ...``), in source order."""
    tree = ast.parse(inspect.getsource(module))
    names = []
    for node in tree.body:
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(
            node, ast.AnnAssign) and node.value is not None else []
        names += [t.id for t in targets if isinstance(t, ast.Name)]
    return list(dict.fromkeys(names))


def api_page(package: str, canonical: dict[int, tuple[str, str]]) -> str:
    module = importlib.import_module(package)
    title = f"``{package}``"
    out = [title, "=" * len(title), "", f".. automodule:: {package}", ""]
    for name in public_names(package):
        obj = getattr(module, name)
        place = canonical.get(id(obj))
        if place is not None and place != (package, name):
            kind = "class" if inspect.isclass(obj) else "function"
            role = "class" if kind == "class" else "func"
            out += [f".. py:{kind}:: {name}", f"   :module: {package}", "",
                    f"   Alias of :{role}:`{place[0]}.{place[1]}`.", ""]
        elif inspect.isclass(obj):
            out += [f".. autoclass:: {package}.{name}", "   :members:", "   :show-inheritance:"]
            # methods a private base (``_OriginalNorm``) provides are this class's public surface
            private = [base for base in obj.__mro__[1:] if base.__name__.startswith("_") and _ours(base)]
            if private:
                others = [base.__name__ for base in obj.__mro__[1:] if base not in private]
                out.append(f"   :inherited-members: {', '.join(dict.fromkeys(others))}")
            out.append("")
        elif inspect.isfunction(obj):
            out += [f".. autofunction:: {package}.{name}", ""]
        else:
            out += _data_entry(package, name, obj)
    subs = submodules(package)
    if subs:
        out += ["Modules", "-------", "", ".. toctree::", "   :maxdepth: 1", "",
                *(f"   ../modules/{sub}" for sub in subs), ""]
    return "\n".join(out) + "\n"


def api_pages(root: Path) -> tuple[dict[str, str], dict[int, str]]:
    """The reference's pages (path under ``_generated/`` -> text), and for each object they document (by
    ``id``) the dotted name of its one full entry, which :func:`resolve_internal` and :func:`public_bases` read."""
    packages = [TOP, *public_packages(root)]
    canonical = _canonical(packages)
    pages = {f"api/{package}.rst": api_page(package, canonical) for package in packages}
    documented = {key: ".".join(place) for key, place in canonical.items()}
    modules = [sub for package in packages for sub in submodules(package)]
    for sub in modules:
        pages[f"modules/{sub}.rst"] = module_page(sub, documented)
    for sub in modules:  # what the module pages document, so references to a re-export of it resolve too
        for key, obj in vars(importlib.import_module(sub)).items():
            if (inspect.isclass(obj) or inspect.isfunction(obj)) and obj.__module__ == sub and not key.startswith("_"):
                documented.setdefault(id(obj), f"{sub}.{key}")
    return pages, documented


def _import_path(path: str) -> object | None:
    """The object at a dotted ``reftkit...`` path, or None (import the longest module prefix, then getattr)."""
    parts = path.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for attr in parts[cut:]:
            obj = getattr(obj, attr, None)
            if obj is None:
                return None
        return obj
    return None


def resolve_internal(app: Sphinx, env, node, contnode):
    """A reference to where a public object is defined (``reftkit.training.objectives.multiple_choice_loss``)
    resolves to the one entry that documents it (``reftkit.training.multiple_choice_loss``).

    Only reftkit's own objects, and only by identity: a path that imports no documented object stays
    unresolved, so strict mode still reports it."""
    if node.get("refdomain") != "py":
        return None
    target = node["reftarget"]
    documented = getattr(env, "reftkit_documented", {})
    # a docstring's names are relative to where it is written, which a public page's module is not
    domain = env.get_domain("py")
    exact = node.deepcopy()  # the paths tried below are absolute: look them up by exact name
    exact["refspecific"] = False
    origin = node
    while origin is not None and not origin.source:
        origin = origin.parent
    source = re.search(r"docstring of (\S+)", origin.source if origin is not None else "")
    where = source.group(1).split(".") if source else []
    scopes = [node.get("py:class") and f"{node.get('py:module')}.{node.get('py:class')}", node.get("py:module"),
              *(".".join(where[:cut]) for cut in range(len(where), 0, -1))]
    for path in [target, *(f"{scope}.{target}" for scope in scopes if scope)]:
        if not path.startswith(f"{TOP}."):
            continue
        # an annotation links a type alias (``py:type``) with the class role; Sphinx < 9 finds it only as ``obj``
        for reftype in dict.fromkeys([node["reftype"], "obj" if node["reftype"] == "class" else node["reftype"]]):
            found = domain.resolve_xref(env, node["refdoc"], app.builder, reftype, path, exact, contnode)
            if found is not None:
                return found
        parts = path.split(".")
        for cut in range(len(parts), 1, -1):  # the object itself, else its class (for a method)
            obj = _import_path(".".join(parts[:cut]))
            if obj is not None and id(obj) in documented:
                new = ".".join([documented[id(obj)], *parts[cut:]])
                if new != path:
                    found = domain.resolve_xref(env, node["refdoc"], app.builder, node["reftype"], new, exact,
                                                contnode)
                    if found is not None:
                        return found
                break
    return None


def public_bases(app: Sphinx, name: str, obj: object, options: dict, bases: list) -> None:
    """Show a class's documented bases: a private or undocumented reftkit base is replaced by its own."""
    documented = getattr(app.env, "reftkit_documented", {})

    def expand(base: type) -> list[type]:
        if not base.__module__.startswith(TOP) or id(base) in documented or base.__module__ in _module_pages(app):
            if not base.__name__.startswith("_"):
                return [base]
        return [b for parent in base.__bases__ if parent is not object for b in expand(parent)]
    bases[:] = [b for b in dict.fromkeys(b for base in bases for b in expand(base)) if b is not object]


def _module_pages(app: Sphinx) -> set[str]:
    return {p.stem for p in (Path(app.srcdir) / "_generated" / "modules").glob("*.rst")}


def readable_defaults(app: Sphinx, what: str, name: str, obj: object, options: dict, signature: str | None,
                      return_annotation: str | None) -> tuple[str | None, str | None] | None:
    """A dataclass field's ``default_factory`` shows as ``=<factory>``, which is not Python, so Sphinx would
    split the signature at its commas; show ``...`` instead."""
    if signature and "<factory>" in signature:
        return signature.replace("<factory>", "..."), return_annotation
    return None
