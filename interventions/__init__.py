"""reftkit's intervention catalogue (installed as ``reftkit.interventions``).

Each intervention is a small ``nn.Module`` mapping the selected rows ``h`` of a representation
to ``h'``; its docstring gives the formula and its source. Names are registered in
``INTERVENTIONS`` so a config can say ``"intervention": "loreft"``. pyreft's and pyvene's class
names are aliases of the same classes, so their code ports by changing imports.

Families, one module each: ``reft`` (LoReFT and relatives), ``interpret`` (interchange, steering,
ablation, collection, DAS, noise), ``scaling`` (IA3), ``adapters`` (bottleneck adapters,
AdapterFusion), ``mixture`` (output mixing of experts). A module lists its classes in ``FAMILY`` and its peer names in ``ALIASES``.
"""
from __future__ import annotations

from . import adapters as _adapters
from . import interpret as _interpret
from . import mixture as _mixture
from . import scaling as _scaling
from .base import Intervention, InterventionError
from .reft import REFT_FAMILY, ConsReFT, DiReFT, LobiReFT, LoReFT, NodiReFT, NoReFT, Orthonormal

INTERVENTIONS: dict[str, type[Intervention]] = {
    cls.name: cls for family in (REFT_FAMILY, _interpret.FAMILY, _scaling.FAMILY, _adapters.FAMILY, _mixture.FAMILY)
    for cls in family}

# pyreft 0.1.0 names
LoreftIntervention = LoReFT
NoreftIntervention = NoReFT
DireftIntervention = DiReFT
NodireftIntervention = NodiReFT
ConsreftIntervention = ConsReFT
LobireftIntervention = LobiReFT

PYREFT_NAMES: dict[str, type[Intervention]] = {
    "LoreftIntervention": LoReFT, "NoreftIntervention": NoReFT, "DireftIntervention": DiReFT,
    "NodireftIntervention": NodiReFT, "ConsreftIntervention": ConsReFT, "LobireftIntervention": LobiReFT,
}
#: every peer class name reftkit answers to (pyreft's, pyvene's, ...)
ALIASES: dict[str, type[Intervention]] = {**PYREFT_NAMES, **_interpret.ALIASES, **_scaling.ALIASES,
                                          **_adapters.ALIASES}


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


def register_intervention(cls: type[Intervention]) -> type[Intervention]:
    """Class decorator: make a user-defined intervention addressable by ``cls.name`` in configs."""
    if not cls.name:
        raise InterventionError(f"{cls.__name__}.name must be a non-empty string to register it")
    INTERVENTIONS[cls.name] = cls
    return cls


def __getattr__(name: str) -> type[Intervention]:
    # every registered class (and alias) is importable from here: ``from reftkit.interventions import IA3``
    for cls in INTERVENTIONS.values():
        if cls.__name__ == name:
            return cls
    if name in ALIASES:
        return ALIASES[name]
    raise AttributeError(f"module 'reftkit.interventions' has no attribute {name!r}")


__all__ = [
    "Intervention", "InterventionError", "Orthonormal", "INTERVENTIONS", "ALIASES", "get_intervention_class",
    "register_intervention", "LoReFT", "NoReFT", "DiReFT", "NodiReFT", "ConsReFT", "LobiReFT",
    "LoreftIntervention", "NoreftIntervention", "DireftIntervention", "NodireftIntervention",
    "ConsreftIntervention", "LobireftIntervention",
]
