"""pyreft 0.1.0's six intervention classes, as thin subclasses of reftkit's own.

The math is reftkit's (``reftkit.interventions.reft``: the same formulas, float32 weights, an exact
orthonormal ``R``); what this module adds is pyreft's surface, so pyreft code that builds, reads or
subclasses these classes runs unchanged:

* the constructor takes pyreft's keywords (``embed_dim``, ``low_rank_dimension``, ``dtype``,
  ``device``, ``add_bias``, ``act_fn``, ``dropout``) and ignores the representation metadata pyvene
  passes along with them (``layer``, ``component``, ``unit``, ...);
* the attributes pyreft code reads: ``rotate_layer`` (``rotate_layer(h) = h R``, ``rotate_layer.weight``
  is ``R``, ``d x r``), ``learned_source`` (the ``W h + b`` linear layer, or the vector ``b`` of
  ConsReFT / LobiReFT), ``proj_layer`` (NoReFT's ``P``), ``act_fn`` and ``dropout``;
* ``forward(base, source=None, subspaces=None)`` with pyvene's arguments. As in pyreft, the six
  built-in classes ignore ``subspaces``; a subclass that overrides ``forward`` to use them (pyreft's
  composition example) receives pyvene's form, one list of rank indices per example.

Differences on purpose (see docs/migrating_from_pyreft.md): weights stay float32 whatever ``dtype``
says (pyreft defaults to bf16), ``device`` is where the model is (``set_device`` moves both), and
``dropout`` drops parts of the edit, never of ``h`` itself.
"""
from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from reftkit.interventions import ConsReFT, DiReFT, InterventionError, LobiReFT, LoReFT, NodiReFT, NoReFT

#: fields of pyvene's RepresentationConfig that pyvene passes to an intervention's constructor along
#: with its own arguments; they describe where it goes, which reftkit reads from the config instead
PYVENE_METADATA = frozenset({
    "layer", "component", "unit", "max_number_of_units", "intervention_type", "intervention",
    "subspace_partition", "group_key", "intervention_link_key", "moe_key", "source_representation",
    "hidden_source_representation", "latent_dim", "use_fast", "keep_last_dim"})


class RotateLayerView:
    """What pyreft code sees as ``intervention.rotate_layer``: ``weight`` is ``R`` (``d x r``, orthonormal
    columns, differentiable) and calling it projects rows onto the subspace, ``h R``."""

    def __init__(self, owner: nn.Module) -> None:
        self._owner = owner

    @property
    def weight(self) -> torch.Tensor:
        return self._owner.rotation()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight
        return x.to(weight.dtype) @ weight


class CastingLinear:
    """A linear layer as pyreft code calls it: inputs are cast to the float32 weights first (pyreft's
    rotate layer does the same), so a subclass's ``forward`` works on bf16 models too."""

    def __init__(self, linear: nn.Linear) -> None:
        self._linear = linear

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self._linear(x.to(self._linear.weight.dtype))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._linear, name)


def _pyreft_arguments(cls_name: str, given: dict[str, Any], allowed: tuple[str, ...]) -> dict[str, Any]:
    """Split pyreft's constructor keywords into reftkit's arguments; refuse unknown ones."""
    unknown = sorted(set(given) - set(allowed) - PYVENE_METADATA - {"dtype", "device"})
    if unknown:
        raise TypeError(f"{cls_name}() got an unexpected keyword argument {unknown[0]!r}; pyreft's arguments are "
                        f"{sorted(set(allowed) | {'embed_dim', 'dtype', 'device'})}")
    if given.get("low_rank_dimension") is None:
        raise InterventionError(f"{cls_name}: low_rank_dimension is missing (None); pass low_rank_dimension=r, "
                                "as pyreft requires")
    dtype = given.get("dtype")
    if dtype is not None and dtype != torch.float32:
        warnings.warn(f"{cls_name}(dtype={dtype}): reftkit keeps intervention weights in float32 and computes the edit "
                      "in float32, casting the result to the model's dtype (pyreft stores them in dtype); the "
                      "edit is the same or more precise", stacklevel=3)
    return {k: given[k] for k in allowed if k in given}


class PyreftSurface:
    """pyreft's call convention and attribute names on top of a reftkit intervention (mixin)."""

    #: subspaces reach ``forward`` (a subclass may use them); the built-in classes ignore them, as pyreft's do
    uses_subspaces = True

    def __call__(self, base: torch.Tensor, source: torch.Tensor | None = None,
                 subspaces: Any = None) -> torch.Tensor:
        # reftkit's hooks pass a bool mask over the rank ([B, 1, r]); pyvene passes index lists per example.
        # The built-in forwards ignore subspaces (as pyreft's): only a subclass's own forward gets the lists,
        # whose making reads the mask on the host, inside the hook.
        if type(self).forward in _BUILTIN_FORWARDS:
            subspaces = None
        elif isinstance(subspaces, torch.Tensor) and subspaces.dtype == torch.bool:
            rows = subspaces.reshape(subspaces.shape[0], -1, subspaces.shape[-1]).any(1)
            subspaces = [row.nonzero().flatten().tolist() for row in rows]
        return nn.Module.__call__(self, base, source=source, subspaces=subspaces)

    @property
    def rotate_layer(self) -> RotateLayerView:
        if not hasattr(self, "rotation"):
            raise AttributeError(f"{type(self).__name__} has no rotate_layer (no orthonormal basis)")
        return RotateLayerView(self)

    @property
    def act_fn(self) -> nn.Module:
        return self.act


class LoreftIntervention(PyreftSurface, LoReFT):
    """pyreft's ``LoreftIntervention``: ``h + (act(h W^T + b) - h R) R^T`` (reftkit's :class:`LoReFT`)."""

    def __init__(self, embed_dim: int | None = None, low_rank_dimension: int | None = None,
                 dropout: float = 0.0, act_fn: str | None = None, **pyreft_kwargs: Any) -> None:
        # pyreft takes add_bias here and ignores it: W h + b always has its bias (add_bias is NoReFT's P)
        pyreft_kwargs.pop("add_bias", None)
        args = _pyreft_arguments(type(self).__name__, {"low_rank_dimension": low_rank_dimension, "dropout": dropout,
                                                      "act_fn": act_fn, **pyreft_kwargs},
                                 ("low_rank_dimension", "dropout", "act_fn"))
        LoReFT.__init__(self, embed_dim, **args)

    @property
    def learned_source(self) -> CastingLinear:
        return CastingLinear(self.source)

    def forward(self, base: torch.Tensor, source: torch.Tensor | None = None, subspaces: Any = None) -> torch.Tensor:
        return LoReFT.forward(self, base)


class DireftIntervention(PyreftSurface, DiReFT):
    """pyreft's ``DireftIntervention``: ``h + act(h W^T + b) R^T`` (reftkit's :class:`DiReFT`)."""

    __init__ = LoreftIntervention.__init__
    learned_source = LoreftIntervention.learned_source

    def forward(self, base: torch.Tensor, source: torch.Tensor | None = None, subspaces: Any = None) -> torch.Tensor:
        return DiReFT.forward(self, base)


class NoreftIntervention(PyreftSurface, NoReFT):
    """pyreft's ``NoreftIntervention``: ``h + (act(h W^T + b) - (h P^T + c)) P`` (reftkit's :class:`NoReFT`)."""

    def __init__(self, embed_dim: int | None = None, low_rank_dimension: int | None = None,
                 dropout: float = 0.0, act_fn: str | None = None, add_bias: bool = True,
                 **pyreft_kwargs: Any) -> None:
        args = _pyreft_arguments(type(self).__name__, {"low_rank_dimension": low_rank_dimension, "dropout": dropout,
                                                      "act_fn": act_fn, "add_bias": add_bias, **pyreft_kwargs},
                                 ("low_rank_dimension", "dropout", "act_fn", "add_bias"))
        NoReFT.__init__(self, embed_dim, **args)

    learned_source = LoreftIntervention.learned_source

    @property
    def proj_layer(self) -> CastingLinear:
        return CastingLinear(self.projection)

    def forward(self, base: torch.Tensor, source: torch.Tensor | None = None, subspaces: Any = None) -> torch.Tensor:
        return NoReFT.forward(self, base)


class NodireftIntervention(PyreftSurface, NodiReFT):
    """pyreft's ``NodireftIntervention``: ``h + act(h W^T + b) P`` (reftkit's :class:`NodiReFT`)."""

    __init__ = NoreftIntervention.__init__
    learned_source = LoreftIntervention.learned_source
    proj_layer = NoreftIntervention.proj_layer

    def forward(self, base: torch.Tensor, source: torch.Tensor | None = None, subspaces: Any = None) -> torch.Tensor:
        return NodiReFT.forward(self, base)


class ConsreftIntervention(PyreftSurface, ConsReFT):
    """pyreft's ``ConsreftIntervention``: ``h + (b - h R) R^T`` (reftkit's :class:`ConsReFT`)."""

    def __init__(self, embed_dim: int | None = None, low_rank_dimension: int | None = None,
                 dropout: float = 0.0, **pyreft_kwargs: Any) -> None:
        # pyreft accepts and ignores both here: the edit has no activation and its b is a plain vector
        pyreft_kwargs.pop("act_fn", None)
        pyreft_kwargs.pop("add_bias", None)
        args = _pyreft_arguments(type(self).__name__, {"low_rank_dimension": low_rank_dimension, "dropout": dropout,
                                                      **pyreft_kwargs}, ("low_rank_dimension", "dropout"))
        ConsReFT.__init__(self, embed_dim, **args)

    @property
    def learned_source(self) -> nn.Parameter:
        return self.bias

    def forward(self, base: torch.Tensor, source: torch.Tensor | None = None, subspaces: Any = None) -> torch.Tensor:
        return ConsReFT.forward(self, base)


class LobireftIntervention(PyreftSurface, LobiReFT):
    """pyreft's ``LobireftIntervention``: ``h + b R^T`` (reftkit's :class:`LobiReFT`)."""

    __init__ = ConsreftIntervention.__init__
    learned_source = ConsreftIntervention.learned_source

    def forward(self, base: torch.Tensor, source: torch.Tensor | None = None, subspaces: Any = None) -> torch.Tensor:
        return LobiReFT.forward(self, base)


#: the six classes' own forwards, which ignore ``subspaces`` as pyreft's do
_BUILTIN_FORWARDS = frozenset(cls.forward for cls in (
    LoreftIntervention, NoreftIntervention, DireftIntervention, NodireftIntervention, ConsreftIntervention,
    LobireftIntervention))

#: pyreft class name -> this module's class
PYREFT_CLASSES: dict[str, type[PyreftSurface]] = {cls.__name__: cls for cls in (
    LoreftIntervention, NoreftIntervention, DireftIntervention, NodireftIntervention, ConsreftIntervention,
    LobireftIntervention)}


def pyreft_base_class(cls: type) -> str:
    """The name of the pyreft class ``cls`` is (or derives from), e.g. for a user's LoReFT subclass."""
    for klass in cls.__mro__:
        if klass.__name__ in PYREFT_CLASSES and PYREFT_CLASSES[klass.__name__] is klass:
            return klass.__name__
    raise InterventionError(f"{cls.__name__} is not one of pyreft's six intervention classes nor a subclass of one "
                            f"({sorted(PYREFT_CLASSES)}); reftkit.pyreft builds only those")
