"""reftkit's intervention catalogue (installed as ``reftkit.interventions``).

Each intervention is a small ``nn.Module`` mapping the selected rows ``h`` of a representation
to ``h'``; its docstring gives the formula and its source. Names are registered in
``INTERVENTIONS`` (:mod:`~reftkit.interventions.registry`) so a config can say
``"intervention": "loreft"``. pyreft's and pyvene's class names are aliases of the same classes, so
their code ports by changing imports.

Families, one module each: ``reft`` (LoReFT and relatives), ``interpret`` (interchange, steering,
ablation, collection, DAS, noise), ``scaling`` (IA3), ``adapters`` (bottleneck adapters),
``adapter_fusion`` (AdapterFusion), ``mixture`` (output mixing of experts). A module lists its
classes in ``FAMILY`` and its peer names in ``ALIASES``; where adapters and IA3 go in a model is
``adapter_placement`` and ``scaling.ia3_representations``.
"""
from __future__ import annotations

from . import adapter_fusion as _adapter_fusion
from . import adapters as _adapters
from . import interpret as _interpret
from . import mixture as _mixture
from . import scaling as _scaling
from .base import Intervention, InterventionError
from .reft import REFT_FAMILY, ConsReFT, DiReFT, LobiReFT, LoReFT, NodiReFT, NoReFT, Orthonormal
from .registry import ALIASES, INTERVENTIONS, get_intervention_class, register_family, register_intervention

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

register_family(REFT_FAMILY, PYREFT_NAMES)
for _family in (_interpret, _scaling, _adapters, _adapter_fusion, _mixture):
    register_family(_family.FAMILY, getattr(_family, "ALIASES", None))


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
    "ConsreftIntervention", "LobireftIntervention", "PYREFT_NAMES",
]
