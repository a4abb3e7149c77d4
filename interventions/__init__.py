"""reftkit's intervention catalogue (installed as ``reftkit.interventions``).

Each intervention is a small ``nn.Module`` mapping the selected rows ``h`` of a representation
to ``h'``; its docstring gives the formula and its source. Names are registered in
``INTERVENTIONS`` so a config can say ``"intervention": "loreft"``. pyreft's class names are
aliases of the same classes, so pyreft code ports by changing imports.
"""
from __future__ import annotations

from .base import Intervention, InterventionError
from .reft import REFT_FAMILY, ConsReFT, DiReFT, LobiReFT, LoReFT, NodiReFT, NoReFT, Orthonormal

INTERVENTIONS: dict[str, type[Intervention]] = {cls.name: cls for cls in REFT_FAMILY}

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


def get_intervention_class(name: str | type[Intervention]) -> type[Intervention]:
    """Look an intervention up by registry name (case-insensitive), class name or pyreft name."""
    if isinstance(name, type) and issubclass(name, Intervention):
        return name
    if isinstance(name, str):
        by_class = {cls.__name__: cls for cls in INTERVENTIONS.values()} | PYREFT_NAMES
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


__all__ = [
    "Intervention", "InterventionError", "Orthonormal", "INTERVENTIONS", "get_intervention_class",
    "register_intervention", "LoReFT", "NoReFT", "DiReFT", "NodiReFT", "ConsReFT", "LobiReFT",
    "LoreftIntervention", "NoreftIntervention", "DireftIntervention", "NodireftIntervention",
    "ConsreftIntervention", "LobireftIntervention",
]
