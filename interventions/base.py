"""The base every intervention shares: hyper-parameters as plain data, weights built from a width.

An intervention is a map ``h -> h'`` on the rows a hook selected (shape ``[..., embed_dim]``).
Its width is the width of the representation it edits, which reftkit reads from the model at
attach time; a user never has to pass ``embed_dim``. Weights are kept in float32 whatever the
model's dtype: the edit is computed in float32 and cast back, so bf16 models keep an exact
orthogonal basis and a stable low-rank edit.
"""
from __future__ import annotations

import functools
import inspect
import math
import types
import typing
import weakref
from typing import Any, ClassVar, Mapping

import torch
from torch import nn


class InterventionError(ValueError):
    """Raised for an intervention built with an invalid argument; names the field and value."""


#: the scalar annotations :func:`argument_problem` checks; an argument typed otherwise (a sequence, a
#: mapping, ``Any``) is left to the class's own checks
_SCALARS = {type(None): "None", bool: "a bool (True or False)", int: "an int", float: "a finite number",
            str: "a string"}
#: ranges for arguments that mean the same in every class that takes them: (test, requirement)
_RANGES: dict[str, tuple[Any, str]] = {
    "dropout": (lambda v: 0.0 <= v < 1.0, "a number in [0, 1)"),
    "low_rank_dimension": (lambda v: v >= 1, "a positive int (the rank, e.g. 4)"),
}
_HINTS: weakref.WeakKeyDictionary[type, dict[str, tuple[type, ...] | None]] = weakref.WeakKeyDictionary()


def _scalar_types(hint: Any) -> tuple[type, ...] | None:
    """The scalar types an annotation allows (``int | None`` -> (int, NoneType)), or None when it allows
    anything that is not a plain scalar (then only the class itself can check the value)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
    else:
        options = (hint,)
    return options if all(o in _SCALARS for o in options) else None


def _constructor_types(cls: type) -> dict[str, tuple[type, ...] | None]:
    if cls not in _HINTS:
        try:
            hints = typing.get_type_hints(cls.__init__)
        except Exception:  # an annotation that does not evaluate (a user's forward reference): no checks
            hints = {}
        _HINTS[cls] = {name: _scalar_types(hint) for name, hint in hints.items() if name != "return"}
    return _HINTS[cls]


def _matches(value: Any, allowed: tuple[type, ...]) -> bool:
    if isinstance(value, bool):  # bool is an int to Python: True is neither a rank nor a probability
        return bool in allowed
    if isinstance(value, int):
        return int in allowed or float in allowed
    if isinstance(value, float):
        return float in allowed
    if value is None:
        return type(None) in allowed
    return isinstance(value, str) and str in allowed


def argument_problem(cls: type, name: str, value: Any) -> str | None:
    """What is wrong with ``cls(name=value)`` judging by the constructor's annotations (a ``bool`` flag
    given ``"false"``, an ``int`` rank given ``4.0`` or ``True``, a ``float`` given ``"0.1"``) and the
    shared ranges (``dropout`` in [0, 1), ``low_rank_dimension`` >= 1): a phrase such as
    ``"must be a bool (True or False), not str"``, or None when nothing is."""
    allowed = _constructor_types(cls).get(name)
    if allowed is not None:
        if not _matches(value, allowed):
            if name in _RANGES and allowed in ((int,), (float,)):
                wanted = _RANGES[name][1]
            else:
                wanted = " or ".join(text for t, text in _SCALARS.items() if t in allowed)
            return f"must be {wanted}, not {type(value).__name__}"
        if isinstance(value, float) and not math.isfinite(value):
            return "must be a finite number"
    if name in _RANGES and isinstance(value, (int, float)) and not isinstance(value, bool):
        test, wanted = _RANGES[name]
        if not test(value):
            return f"must be {wanted}"
    return None


def _checked_init(cls: type, init: Any) -> Any:
    """``init`` preceded by :func:`check_arguments` on its bound arguments, so a class's own checks and
    conversions (``bool(add_bias)``, ``float(dropout)``) never see a value of the wrong type."""
    signature = inspect.signature(init)
    plain = [n for n, p in signature.parameters.items()  # *args / **kwargs hold collections, not one value
             if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and n not in ("self", "embed_dim")]

    @functools.wraps(init)
    def checked(self: Any, *args: Any, **kwargs: Any) -> None:
        try:
            bound = signature.bind(self, *args, **kwargs)
        except TypeError:  # a missing or unknown argument: the constructor's own error says it best
            bound = None
        if bound is not None:
            check_arguments(cls, {k: v for k, v in bound.arguments.items() if k in plain})
        init(self, *args, **kwargs)

    return checked


def check_arguments(cls: type, arguments: Mapping[str, Any]) -> None:
    """Raise :class:`InterventionError` naming the first argument :func:`argument_problem` refuses."""
    for name, value in arguments.items():
        problem = argument_problem(cls, name, value)
        if problem is not None:
            raise InterventionError(f"{cls.__name__}: {name}={value!r} {problem}")


class Intervention(nn.Module):
    """Base class: subclasses set ``name`` and implement ``build(embed_dim)`` and ``forward(h)``.

    ``hparams`` holds every constructor argument except ``embed_dim`` so a saved ``config.json``
    rebuilds the module exactly.
    """

    name: ClassVar[str] = ""
    #: ``forward(h, source=...)``: ``source`` holds the rows of the source run at the positions that
    #: pair with ``h``'s (same shape as ``h``); interchange-style interventions set this
    uses_source: ClassVar[bool] = False
    #: ``forward(h, subspaces=...)``: ``subspaces`` is a bool mask over the intervention's rank
    #: (``[..., r]``, broadcastable to ``h``'s leading dims; True = that coordinate is used), or None
    uses_subspaces: ClassVar[bool] = False
    #: the hook manager records the rows this intervention sees (``reftkit.interventions.Collect``)
    collects: ClassVar[bool] = False
    # Optional: a classmethod ``routed(members, h, which)`` applying ``members[which[b]]`` to row ``b`` of ``h`` in
    # one op (mixed-task batches; ``which[b] == len(members)``: unchanged). Looked up on the exact class only.
    #: how experts of this class combine (``reftkit.experts``): ``"outputs"`` mixes their edits,
    #: ``h + Σ α_k (f_k(h) − h)``, which is meaningful for any intervention; ``"parameters"`` averages
    #: the weights, ``θ = Σ α_k θ_k``, offered only where the output is linear in the parameters and the
    #: parameters of independently trained experts share one coordinate system (IA3's per-coordinate
    #: scales). Never for rotations: a weighted sum of orthonormal R is not orthonormal, and two experts'
    #: R span unrelated subspaces, so their average describes neither.
    mixing: ClassVar[str] = "outputs"
    #: the argument names ``__init__`` accepts besides ``embed_dim`` (filled by ``__init_subclass__``)
    arguments: ClassVar[tuple[str, ...]] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        params = inspect.signature(cls.__init__).parameters
        cls.arguments = tuple(p for p in params if p not in ("self", "embed_dim"))
        if "__init__" in cls.__dict__:
            cls.__init__ = _checked_init(cls, cls.__dict__["__init__"])

    def __init__(self, embed_dim: int | None = None, **hparams: Any) -> None:
        super().__init__()
        self.hparams: dict[str, Any] = dict(hparams)
        self.embed_dim: int | None = None
        if embed_dim is not None:
            self.materialize(embed_dim)

    # -- construction ---------------------------------------------------------------------
    def materialize(self, embed_dim: int) -> "Intervention":
        """Create the weights for a representation of width ``embed_dim`` (once)."""
        if self.embed_dim is not None:
            if self.embed_dim != embed_dim:
                raise InterventionError(
                    f"{type(self).__name__}: embed_dim={self.embed_dim} was given, but the "
                    f"representation it is attached to has width {embed_dim}")
            return self
        if not isinstance(embed_dim, int) or embed_dim <= 0:
            raise InterventionError(f"{type(self).__name__}: embed_dim={embed_dim!r} must be a positive int")
        self.check_width(embed_dim)
        self.embed_dim = embed_dim
        self.build(embed_dim)
        return self

    @property
    def is_materialized(self) -> bool:
        return self.embed_dim is not None

    def check_width(self, embed_dim: int) -> None:
        """Reject hyper-parameters impossible for this width (overridden by low-rank classes)."""

    @property
    def rank(self) -> int | None:
        """Size of the subspace a ``subspaces`` mask indexes (``uses_subspaces`` classes), else None."""
        return None

    def build(self, embed_dim: int) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def config(self) -> dict[str, Any]:
        """Every constructor argument, JSON-serialisable."""
        return {"embed_dim": self.embed_dim, **self.hparams}

    def forward(self, h: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def extra_repr(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items())
        return args
