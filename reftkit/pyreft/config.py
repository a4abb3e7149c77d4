"""pyreft's ``ReftConfig`` and ``TaskType``: pyvene's representation dicts, read into reftkit's config.

A pyreft representation is pyvene's ``RepresentationConfig``: ``layer``, ``component`` (a pyvene name
such as ``"block_output"``, or a module path such as ``"roberta.encoder.layer[1].output"``), ``unit``,
``max_number_of_units``, ``low_rank_dimension``, and the intervention as an instance
(``"intervention": LoreftIntervention(...)``) or a class (``"intervention_type"``). It carries no
positions: pyreft passes them with every call (``unit_locations``) or through its data modules, so
every entry here gets ``positions=None`` and reftkit refuses a call that brings none, rather than
guessing. Fields pyvene has and reftkit.pyreft does not support raise, naming the field.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

from reftkit.config import ConfigError
from reftkit.pyreft_import import PYVENE_REPRESENTATION, pyvene_component

from .interventions import PYREFT_CLASSES, PyreftSurface, pyreft_base_class

#: pyvene's RepresentationConfig fields, in its order (a list-form representation is read in this order)
REPRESENTATION_FIELDS = PYVENE_REPRESENTATION
_UNSUPPORTED = {
    "subspace_partition": "pass subspaces=... per call instead",
    "group_key": "reftkit.pyreft runs every intervention in one forward; use reftkit.ReftModel with sources= for "
                 "grouped interchange interventions",
    "intervention_link_key": "weight sharing across entries: pass the same intervention instance in each "
                             "entry (pyvene shares it), or use reftkit.ReftConfig with tie='name'",
    "moe_key": "mixture-of-experts components are not resolved by reftkit.pyreft",
    "source_representation": "pyreft's interventions are sourceless",
    "hidden_source_representation": "pyreft's interventions are sourceless",
    "latent_dim": "no pyreft intervention uses it",
}


class TaskType(str, enum.Enum):
    """pyreft's task types (informational in pyreft too: the model's head decides)."""

    SEQ_CLS = "SEQ_CLS"
    CAUSAL_LM = "CAUSAL_LM"


@dataclass
class PyreftRepresentation:
    """One pyvene representation, checked: what reftkit needs of it."""

    layer: int
    component: str
    unit: str
    max_number_of_units: int
    intervention: PyreftSurface

    @property
    def key(self) -> str:
        """pyvene's key stem for this representation (a ``#n`` collision counter is appended by the model)."""
        unit = self.unit.replace(".", "_")
        if "." in self.component:
            return f"comp_{self.component.replace('.', '_')}_unit_{unit}_nunit_{self.max_number_of_units}"
        return f"layer_{self.layer}_comp_{self.component}_unit_{unit}_nunit_{self.max_number_of_units}"

    def reftkit_entry(self) -> dict[str, Any]:
        """The entry of a :class:`reftkit.ReftConfig`: positions come with each call."""
        return {"layer": self.layer, "component": pyvene_component(self.component), "positions": None,
                "intervention": self.intervention}


def _as_dict(rep: Any, index: int) -> dict[str, Any]:
    if isinstance(rep, Mapping):
        unknown = sorted(set(rep) - set(REPRESENTATION_FIELDS))
        if unknown:
            raise ConfigError(f"representations[{index}].{unknown[0]}: not a field of pyvene's RepresentationConfig "
                              f"(fields: {list(REPRESENTATION_FIELDS)})")
        return dict(rep)
    if hasattr(rep, "_asdict"):  # pyvene's namedtuple
        return dict(rep._asdict())
    if isinstance(rep, (list, tuple)):
        if len(rep) > len(REPRESENTATION_FIELDS):
            raise ConfigError(f"representations[{index}] has {len(rep)} fields; pyvene's RepresentationConfig has "
                              f"{len(REPRESENTATION_FIELDS)}")
        return dict(zip(REPRESENTATION_FIELDS, rep))
    raise ConfigError(f"representations[{index}]={rep!r:.80} must be a dict (pyreft's form), a list or a "
                      "RepresentationConfig")


def _intervention(fields: dict[str, Any], index: int) -> PyreftSurface:
    instance, cls = fields.get("intervention"), fields.get("intervention_type")
    if instance is not None and cls is not None:
        raise ConfigError(f"representations[{index}]: give intervention (an instance) or intervention_type (a class), "
                          "not both (pyvene refuses this too)")
    rank = fields.get("low_rank_dimension")
    if instance is not None:
        if not isinstance(instance, PyreftSurface):
            raise ConfigError(f"representations[{index}].intervention={type(instance).__name__}: reftkit.pyreft builds "
                              f"pyreft's classes ({sorted(PYREFT_CLASSES)}) and their subclasses; build it from "
                              "reftkit.pyreft (import reftkit.pyreft as pyreft), or use reftkit.ReftConfig for "
                              "reftkit's own interventions")
        own = instance.hparams.get("low_rank_dimension")
        if rank is not None and own is not None and rank != own:
            raise ConfigError(f"representations[{index}].low_rank_dimension={rank} but the intervention was built "
                              f"with low_rank_dimension={own}")
        return instance
    if cls is None:
        raise ConfigError(f"representations[{index}]: no intervention; set 'intervention' to an instance such as "
                          "pyreft.LoreftIntervention(embed_dim=..., low_rank_dimension=4)")
    if isinstance(cls, str):
        cls = PYREFT_CLASSES.get(cls.rsplit(".", 1)[-1].strip("'>"))
    if not isinstance(cls, type) or not issubclass(cls, PyreftSurface):
        raise ConfigError(f"representations[{index}].intervention_type={fields.get('intervention_type')!r} is not "
                          f"one of pyreft's classes ({sorted(PYREFT_CLASSES)}) or a subclass")
    pyreft_base_class(cls)
    return cls(low_rank_dimension=rank)


def read_representation(rep: Any, index: int) -> PyreftRepresentation:
    """Check one pyvene representation and build (or take) its intervention."""
    fields = _as_dict(rep, index)
    for name, why in _UNSUPPORTED.items():
        if fields.get(name) not in (None, False):
            raise ConfigError(f"representations[{index}].{name}={fields[name]!r:.60} is not supported by "
                              f"reftkit.pyreft: {why}")
    layer = fields.get("layer", 0)
    if not isinstance(layer, int) or isinstance(layer, bool):
        raise ConfigError(f"representations[{index}].layer={layer!r} must be an int (pyvene's representations name "
                          "one layer each)")
    component = fields.get("component", "block_output")
    if not isinstance(component, str) or not component:
        raise ConfigError(f"representations[{index}].component={component!r} must be a non-empty string")
    try:
        pyvene_component(component)
    except ValueError as err:
        raise ConfigError(f"representations[{index}].component: {err}") from None
    unit = fields.get("unit", "pos") or "pos"
    if unit != "pos":
        raise ConfigError(f"representations[{index}].unit={unit!r}: reftkit.pyreft intervenes on token positions "
                          "(unit='pos'); for head-level sites use reftkit.ReftConfig's head_* components with "
                          "heads=[...]")
    units = fields.get("max_number_of_units", 1) or 1
    return PyreftRepresentation(layer=layer, component=component, unit=unit, max_number_of_units=int(units),
                                intervention=_intervention(fields, index))


class ReftConfig:
    """pyreft's ``ReftConfig(representations=...)``: one representation dict, or a list of them.

    ``mode`` must be ``"parallel"`` (pyvene's default, all pyreft uses); ``sorted_keys`` and the other
    fields pyvene writes into a saved config are accepted and ignored (they are recomputed).
    """

    def __init__(self, representations: Any = None, intervention_types: Any = None, mode: str = "parallel",
                 sorted_keys: list[str] | None = None, **saved_fields: Any) -> None:
        if representations is None:
            raise ConfigError("representations is missing; pass representations=[{'layer': ..., 'component': ..., "
                              "'low_rank_dimension': ..., 'intervention': ...}]")
        if mode != "parallel":
            raise ConfigError(f"mode={mode!r}: reftkit.pyreft runs interventions in parallel mode only (pyreft's)")
        if isinstance(representations, Mapping) or hasattr(representations, "_asdict"):
            representations = [representations]
        if not isinstance(representations, Iterable) or isinstance(representations, (str, bytes)):
            raise ConfigError(f"representations={representations!r:.80} must be a dict or a list of dicts")
        self.representations: list[PyreftRepresentation] = [
            read_representation(rep, i) for i, rep in enumerate(representations)]
        if not self.representations:
            raise ConfigError("representations=[] is empty; give at least one representation")
        self.mode = mode
        self.sorted_keys = sorted_keys

    @property
    def intervention_types(self) -> list[type]:
        return [type(rep.intervention) for rep in self.representations]

    def __repr__(self) -> str:
        reps = [{"layer": r.layer, "component": r.component, "intervention": type(r.intervention).__name__,
                 "low_rank_dimension": r.intervention.hparams.get("low_rank_dimension")} for r in self.representations]
        return f"ReftConfig(representations={reps!r})"
