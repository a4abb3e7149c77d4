"""The registry of intervention classes: the names a config can give (``"intervention": "loreft"``),
the peer class names reftkit answers to, and the lookup that resolves either.

It holds no classes of its own: ``reftkit.interventions`` registers the catalogue's families when it
is imported, and :func:`register_intervention` adds a user's class, so a module of the catalogue
(the :class:`~reftkit.interventions.mixture.Mixture`, which builds its members by name) can look
names up without importing the package that imports it.
"""
from __future__ import annotations

from typing import Iterable

from .base import Intervention, InterventionError

__all__ = ["INTERVENTIONS", "ALIASES", "get_intervention_class", "register_intervention", "register_family"]

#: registry name -> class (a config's ``"intervention"``)
INTERVENTIONS: dict[str, type[Intervention]] = {}
#: every peer class name reftkit answers to (pyreft's, pyvene's, adapters' ...) -> class
ALIASES: dict[str, type[Intervention]] = {}


def register_intervention(cls: type[Intervention]) -> type[Intervention]:
    """Class decorator: make a user-defined intervention addressable by ``cls.name`` in configs."""
    if not cls.name:
        raise InterventionError(f"{cls.__name__}.name must be a non-empty string to register it")
    INTERVENTIONS[cls.name] = cls
    return cls


def register_family(classes: Iterable[type[Intervention]],
                    aliases: dict[str, type[Intervention]] | None = None) -> None:
    """Register a family of the catalogue: its classes by name and its peer class names."""
    for cls in classes:
        register_intervention(cls)
    ALIASES.update(aliases or {})


def get_intervention_class(name: str | type[Intervention]) -> type[Intervention]:
    """Look an intervention up by registry name (case-insensitive), class name or peer alias."""
    if isinstance(name, type) and issubclass(name, Intervention):
        return name
    if isinstance(name, str):
        by_class = {cls.__name__: cls for cls in INTERVENTIONS.values()} | ALIASES
        if name in by_class:
            return by_class[name]
        if name.lower() in INTERVENTIONS:
            return INTERVENTIONS[name.lower()]
    raise InterventionError(
        f"intervention={name!r} is not known; choose one of {sorted(INTERVENTIONS)} "
        "or pass an Intervention subclass or instance")
