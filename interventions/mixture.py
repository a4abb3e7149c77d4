"""Output mixing: several interventions of one site acting as one, weighted.

Transformer² (Sun et al. 2025, "Transformer²: Self-adaptive LLMs", §3.2 few-shot adaptation) builds
a new expert as ``z' = Σ_k α_k z_k`` over SVF vectors — a sum of *parameters*, meaningful there
because every ``z_k`` scales the same singular directions. The LoReFT family has no such shared
coordinates: each expert's ``R`` spans its own subspace, and a weighted sum of matrices with
orthonormal rows is not orthonormal. What stays meaningful is the sum of the experts' *edits*,

    Mixture(h) = h + Σ_k α_k (f_k(h) − h) = (1 − Σ_k α_k) h + Σ_k α_k f_k(h),

computed in the second form: with ``α = e_j`` it is ``0·h + f_j(h) + Σ 0·f_k(h)``, bit-identical to
expert ``j`` (adding exact zeros changes nothing), and with ``α = 0`` it is the base model.
The weights ``α`` are a buffer saved with the members' tensors (a search may change them after
construction); ``config.json`` records them too, with the members' arguments.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import torch
from torch import nn

from .base import Intervention, InterventionError
from .registry import get_intervention_class


class Mixture(Intervention):
    """``h' = (1 − Σ_k α_k) h + Σ_k α_k f_k(h)`` over member interventions ``f_k`` of one site
    (output mixing; see the module docstring for why this, and not a sum of parameters, for ReFT).

    ``members``: one dict per member, ``{"intervention": <registered name>, **its arguments}``;
    ``weights``: ``α``, one float per member. ``set_weights`` changes ``α`` in place (few-shot search).
    """

    name = "mixture"

    def __init__(self, embed_dim: int | None = None, members: Sequence[dict[str, Any]] = (),
                 weights: Sequence[float] | None = None) -> None:
        members = [dict(m) for m in members] if isinstance(members, (list, tuple)) else members
        if not isinstance(members, list) or not members or not all(
                isinstance(m, dict) and isinstance(m.get("intervention"), str) for m in members):
            raise InterventionError(f"Mixture: members={members!r} must be a non-empty list of dicts, each with "
                                    "'intervention' (a registered name) and that intervention's arguments")
        weights = [1.0 / len(members)] * len(members) if weights is None else _check_weights(weights, len(members))
        for i, member in enumerate(members):
            cls = get_intervention_class(member["intervention"])
            if cls.uses_source or cls.collects or cls is Mixture:
                raise InterventionError(f"Mixture: members[{i}] is {cls.__name__}, which cannot be mixed "
                                        "(it reads a source run, collects, or is itself a mixture)")
        Intervention.__init__(self, embed_dim, members=members, weights=weights)

    def build(self, embed_dim: int) -> None:
        built = []
        for member in self.hparams["members"]:
            args = {k: v for k, v in member.items() if k not in ("intervention", "embed_dim")}
            built.append(get_intervention_class(member["intervention"])(**args).materialize(embed_dim))
        self.members = nn.ModuleList(built)
        # in the state dict, so a saved model keeps the weights set after construction (few-shot search)
        self.register_buffer("weights", torch.tensor(self.hparams["weights"], dtype=torch.float32))

    def set_weights(self, weights: Sequence[float] | torch.Tensor) -> None:
        """Replace ``α`` (one float per member)."""
        values = _check_weights(weights, len(self.hparams["members"]))
        self.hparams["weights"] = values
        if self.is_materialized:
            self.weights.copy_(torch.tensor(values, dtype=torch.float32))

    def config(self) -> dict[str, Any]:
        current = self.weights.tolist() if self.is_materialized else self.hparams["weights"]
        return {**super().config(), "weights": current}

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        x = h.float()
        out = (1.0 - self.weights.sum()) * x
        for alpha, member in zip(self.weights, self.members):
            out = out + alpha * member(h).float()
        return out.to(h.dtype)


def _check_weights(weights: Sequence[float] | torch.Tensor, count: int) -> list[float]:
    values = weights.detach().flatten().tolist() if isinstance(weights, torch.Tensor) else list(weights)
    if len(values) != count or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in values):
        raise InterventionError(f"Mixture: weights={values!r} must be {count} finite numbers, one per member")
    return [float(v) for v in values]


FAMILY: tuple[type[Intervention], ...] = (Mixture,)
