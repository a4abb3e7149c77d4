"""The base every intervention shares: hyper-parameters as plain data, weights built from a width.

An intervention is a map ``h -> h'`` on the rows a hook selected (shape ``[..., embed_dim]``).
Its width is the width of the representation it edits, which reftkit reads from the model at
attach time; a user never has to pass ``embed_dim``. Weights are kept in float32 whatever the
model's dtype: the edit is computed in float32 and cast back, so bf16 models keep an exact
orthogonal basis and a stable low-rank edit.
"""
from __future__ import annotations

import inspect
from typing import Any, ClassVar

import torch
from torch import nn


class InterventionError(ValueError):
    """Raised for an intervention built with an invalid argument; names the field and value."""


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
