"""The LoReFT family (Wu et al., 2024, "ReFT: Representation Finetuning for Language Models",
arXiv:2404.03592, section 3 and appendix; formulas as in pyreft 0.1.0's ``interventions.py``).

Notation, with ``h`` a row vector of width ``d`` and ``r = low_rank_dimension``:

* ``R`` — a ``d x r`` matrix with orthonormal columns (``R^T R = I_r``), see :class:`Orthonormal`;
* ``P`` — a ``r x d`` unconstrained projection (NoReFT, NodiReFT);
* ``W h + b`` — a learned linear map ``d -> r`` (``source``), passed through ``act_fn``
  (identity by default);
* ``b`` alone — a learned ``r``-vector (ConsReFT, LobiReFT).

Every class computes an *edit* and returns ``h + dropout(edit)``: dropout is on the edit, never
on the whole state, and is inactive in ``eval()``. (pyreft applies dropout to the whole output,
which in training also drops parts of ``h`` itself; in eval mode the two agree exactly.)
The edit is computed in float32 and the sum cast back to ``h``'s dtype.

Subspaces. Every class here writes its edit through ``r`` coordinates (``e R^T`` or ``e P`` with
``e`` of width ``r``), so each takes ``forward(h, subspaces=None)``: ``subspaces`` is a bool mask
broadcastable to ``h.shape[:-1] + (r,)``, and only the coordinates it marks True are edited,
``h + (e ⊙ m) R^T``. This is pyreft's subspace composition (one intervention, different rank
rows for different tasks; pyreft's ``examples/composition`` ``SubloreftIntervention``), which
writes the same thing with index lists, ``h + e[..., idx] R[:, idx]^T``. Unused coordinates get
no gradient: their rows of ``W``, ``b`` and ``P`` receive exactly zero, and so do the columns of
``R``; through the QR of :class:`Orthonormal`, column ``k`` of ``R`` depends on ``raw[:, :k+1]``,
so ``raw`` gets zero gradient only in the columns after the last used one.

Collapsed columns. The classes with ``R`` take ``collapsed_columns`` (default none): those columns of
``R`` are fixed at zero. It exists to reproduce pyreft saves exactly: pyreft's non-LoReFT classes build
``R`` with torch's ``orthogonal`` Householder map, which multiplies column ``j`` by
``int(original[j, j])``; once weight decay pulls that diagonal inside (-1, 1) the column is zero in every
forward pyreft ran (see :mod:`reftkit.pyreft_import`). Recorded in ``config()`` only when not empty.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from transformers.activations import ACT2FN

from .base import Intervention, InterventionError


def mask_subspaces(coords: torch.Tensor, subspaces: torch.Tensor | None, owner: nn.Module) -> torch.Tensor:
    """``coords`` (``[..., r]``) with the coordinates a ``subspaces`` mask leaves out set to zero.

    ``subspaces`` is None (all used) or a bool tensor whose last dim is ``r`` (or 1), broadcastable
    to ``coords``; True marks a coordinate that is used for that row.
    """
    if subspaces is None:
        return coords
    if not isinstance(subspaces, torch.Tensor) or subspaces.dtype != torch.bool:
        raise InterventionError(
            f"{type(owner).__name__}: subspaces must be a bool tensor over the rank "
            f"(True = coordinate used), got {subspaces!r:.80}")
    if subspaces.dim() == 0 or subspaces.shape[-1] not in (1, coords.shape[-1]):
        raise InterventionError(
            f"{type(owner).__name__}: subspaces has shape {tuple(subspaces.shape)}; its last dim must be "
            f"the rank {coords.shape[-1]}")
    return torch.where(subspaces.to(coords.device), coords, coords.new_zeros(()))


def _activation(name: str | None) -> Callable[[torch.Tensor], torch.Tensor]:
    if name is None or name == "linear":
        return nn.Identity()
    if name not in ACT2FN:
        raise InterventionError(f"act_fn={name!r} is not a known activation; choose one of {sorted(ACT2FN)}")
    return ACT2FN[name]


class Orthonormal(nn.Module):
    """``R = Q`` from the reduced QR decomposition ``raw = Q U`` of a free ``d x r`` matrix ``raw``, with
    the signs fixed so that ``diag(U) > 0`` (which makes the map unique).

    Why QR instead of ``torch.nn.utils.parametrizations.orthogonal`` (pyreft's choice): the
    latter keeps a ``d x d`` buffer per intervention (64 MiB at d=4096), loses orthogonality
    when run in bf16, and collapses under weight decay (its sign diagonal is read with ``.int()``:
    decayed from -1 to ``-(1 - lr wd)`` it reads 0, and ``R`` becomes 0 at the first decayed step).
    QR in float32 is exact to float eps whatever the scale of ``raw``, costs ``O(d r^2)`` per call,
    and ``raw`` alone is the saved state, so a reload resumes training exactly.

    Step size. ``R`` does not depend on the length of ``raw``'s columns (``Q(raw D) = Q(raw)`` for a
    positive diagonal ``D``), but how far a step moves ``R`` does. At ``raw = s R`` a change ``E`` of
    ``raw`` moves ``R`` by ``dR = ((I - R R^T) E + R (L - L^T)) / s`` to first order, ``L`` the
    strictly lower triangle of ``R^T E``: the gain is ``1 / s``. Adam moves each entry of ``raw`` by
    about ``lr`` whatever the gradient's scale, so ``R`` moves about ``lr sqrt(d r) / s`` per step (plain
    SGD: ``1 / s^2``). torch's map for a tall matrix starts at ``A = 0`` with Householder reflectors
    ``I - 2 v v^T / |v|^2``, ``v = e_i + a_i``, so a change ``dA`` moves ``R`` by ``2 dA``: the same
    first-order map as QR at ``s = 1/2``, up to a fixed rotation of the parameter's coordinates (its
    ``d x d`` ``base``); for a square matrix torch uses the matrix exponential, whose map is QR's at
    ``s = 1``. reftkit used to store unit columns: from the same weights, with the same optimiser,
    its ``R`` moved about 2/3 as far per step as pyreft's and learnt slower with pyreft's
    hyperparameters. So ``raw`` holds ``scale * R``, :attr:`scale` = 1/2 for a tall basis (1 for a
    square one), from initialisation and :meth:`assign`. Measured (``benchmarks/bench_dynamics.py``,
    SmolLM2, README quickstart, LoReFT r4 at layer 8, lr 4e-3, 3 seeds, same initial weights): loss
    after 8 steps 2.131 with unit columns, 2.071 now, 2.065 for pyreft; ``|R_8 - R_0|`` 0.72, 1.09
    and 1.15. What is left in the first steps is Adam's coordinates (the model's here, a random
    ``base``'s in torch's map), not the step size.

    During training Adam's steps, nearly orthogonal to ``raw``'s columns, lengthen them
    (``|raw_j|^2`` gains ``|step|^2``), so the gain falls slowly, as it does for torch's map while
    ``|A|`` grows. Weight decay shortens them: it cannot change ``R``, only raise the step. Under
    AdamW the length settles where the two balance and ``R`` then turns by about ``sqrt(2 lr wd)``
    per step, so the step stays bounded; but a column that gets no gradient for long (an unused
    subspace) shrinks as ``(1 - lr wd)^t`` and moves far when it is trained again. Decay on ``raw``
    regularises nothing; leaving it out of weight decay avoids that, and ``reftkit.training.ReftTrainer``
    does (its ``get_decay_parameter_names``).

    Old saves (unit columns) load to the same ``R`` and keep the step size they were trained with;
    a pyreft basis loaded into ``raw`` directly, rather than through :meth:`assign`, does too.
    """

    #: length of ``raw``'s columns for a tall basis (``r < d``): torch's Householder map's step
    TALL_SCALE = 0.5

    def __init__(self, embed_dim: int, rank: int, collapsed_columns: tuple[int, ...] = ()) -> None:
        super().__init__()
        self.raw = nn.Parameter(torch.empty(embed_dim, rank))
        with torch.no_grad():
            nn.init.orthogonal_(self.raw)
            self.raw.mul_(self.scale)
        #: columns of ``R`` fixed at zero (a pyreft save whose ``orthogonal`` map collapsed them); not a tensor
        #: of the state dict: it is a constructor argument of the intervention and saved in its config
        self.collapsed_columns = tuple(collapsed_columns)
        if self.collapsed_columns:
            self.register_buffer("collapsed_index", torch.tensor(self.collapsed_columns, dtype=torch.long),
                                 persistent=False)

    @property
    def scale(self) -> float:
        """Length of ``raw``'s columns at initialisation and after :meth:`assign`: ``1 / gain``."""
        d, r = self.raw.shape
        return self.TALL_SCALE if r < d else 1.0

    def forward(self) -> torch.Tensor:
        q, r = torch.linalg.qr(self.raw.float())
        signs = torch.where(r.diagonal() < 0, -1.0, 1.0).to(q.dtype)
        if self.collapsed_columns:
            return (q * signs).index_fill(1, self.collapsed_index, 0.0)
        return q * signs

    @torch.no_grad()
    def assign(self, basis: torch.Tensor) -> None:
        """Set ``raw = scale * basis`` so that ``forward()`` returns ``basis`` (a ``d x r`` orthonormal
        matrix) and the next step moves it as far as a fresh initialisation's would. With
        ``collapsed_columns``, give a full orthonormal ``basis``: QR reads every column, and ``forward()``
        zeroes the collapsed ones."""
        self.raw.copy_((basis.float() * self.scale).to(self.raw.dtype))


class _LowRank(Intervention):
    """Shared checks of the rank, the subspace mask and the dropout on the edit."""

    uses_subspaces = True

    @property
    def rank(self) -> int:
        return self.hparams["low_rank_dimension"]

    def check_width(self, embed_dim: int) -> None:
        r = self.hparams["low_rank_dimension"]
        if r > embed_dim:
            raise InterventionError(
                f"{type(self).__name__}: low_rank_dimension={r} exceeds the width {embed_dim} "
                "of the representation it is attached to")

    def _init_common(self, low_rank_dimension: int, dropout: float) -> None:
        if not isinstance(low_rank_dimension, int) or isinstance(low_rank_dimension, bool) or low_rank_dimension <= 0:
            raise InterventionError(
                f"{type(self).__name__}: low_rank_dimension={low_rank_dimension!r} must be a positive int")
        if not 0.0 <= float(dropout) < 1.0:
            raise InterventionError(f"{type(self).__name__}: dropout={dropout!r} must be in [0, 1)")

    def _collapsed(self, columns: tuple[int, ...] | list[int], rank: int) -> dict[str, list[int]]:
        """``collapsed_columns`` checked (distinct ints in ``[0, rank)``), as the hparams entry to record: none
        for the default ``()``, so an intervention without collapsed columns has the config it always had."""
        if isinstance(columns, (str, bytes)) or not isinstance(columns, (tuple, list)):
            raise InterventionError(f"{type(self).__name__}: collapsed_columns={columns!r:.80} must be a list of "
                                    "column indices")
        for col in columns:
            if not isinstance(col, int) or isinstance(col, bool) or not 0 <= col < rank:
                raise InterventionError(f"{type(self).__name__}: collapsed_columns contains {col!r}; each must be "
                                        f"an int in [0, low_rank_dimension={rank})")
        if len(set(columns)) != len(columns):
            raise InterventionError(f"{type(self).__name__}: collapsed_columns={list(columns)} repeats a column")
        return {"collapsed_columns": sorted(columns)} if columns else {}

    def _finish(self, h: torch.Tensor, edit: torch.Tensor) -> torch.Tensor:
        return (h.float() + self.dropout(edit)).to(h.dtype)


class LoReFT(_LowRank):
    """``LoReFT(h) = h + R^T (act(W h + b) - R h)`` — ReFT paper, eq. 2, with ``R`` ``r x d`` having
    orthonormal rows. In code ``R`` is stored transposed (``rotation()``, ``d x r``) and rows act on
    the right: ``h + (act(h W^T + b) - h R) R^T``."""

    name = "loreft"

    def __init__(self, embed_dim: int | None = None, low_rank_dimension: int = 4,
                 dropout: float = 0.0, act_fn: str | None = None, collapsed_columns: tuple[int, ...] = ()) -> None:
        self._init_common(low_rank_dimension, dropout)
        _activation(act_fn)
        Intervention.__init__(self, embed_dim, low_rank_dimension=low_rank_dimension, dropout=dropout, act_fn=act_fn,
                              **self._collapsed(collapsed_columns, low_rank_dimension))

    def build(self, embed_dim: int) -> None:
        r = self.hparams["low_rank_dimension"]
        self.rotation = Orthonormal(embed_dim, r, tuple(self.hparams.get("collapsed_columns", ())))
        self.source = nn.Linear(embed_dim, r)
        self.act = _activation(self.hparams["act_fn"])
        self.dropout = nn.Dropout(self.hparams["dropout"])

    def forward(self, h: torch.Tensor, subspaces: torch.Tensor | None = None) -> torch.Tensor:
        x, rot = h.float(), self.rotation()
        coords = mask_subspaces(self.act(self.source(x)) - x @ rot, subspaces, self)
        return self._finish(h, coords @ rot.T)


class NoReFT(_LowRank):
    """``NoReFT(h) = h + (act(W h + b) - (P h + c)) P`` — LoReFT without the orthogonality
    constraint; ``P h + c`` is a linear layer whose bias ``c`` exists when ``add_bias``
    (pyreft 0.1.0's ``NoreftIntervention``)."""

    name = "noreft"

    def __init__(self, embed_dim: int | None = None, low_rank_dimension: int = 4,
                 dropout: float = 0.0, act_fn: str | None = None, add_bias: bool = True) -> None:
        self._init_common(low_rank_dimension, dropout)
        _activation(act_fn)
        Intervention.__init__(self, embed_dim, low_rank_dimension=low_rank_dimension, dropout=dropout,
                         act_fn=act_fn, add_bias=bool(add_bias))

    def build(self, embed_dim: int) -> None:
        r = self.hparams["low_rank_dimension"]
        self.projection = nn.Linear(embed_dim, r, bias=self.hparams["add_bias"])
        self.source = nn.Linear(embed_dim, r)
        self.act = _activation(self.hparams["act_fn"])
        self.dropout = nn.Dropout(self.hparams["dropout"])

    def forward(self, h: torch.Tensor, subspaces: torch.Tensor | None = None) -> torch.Tensor:
        x = h.float()
        coords = mask_subspaces(self.act(self.source(x)) - self.projection(x), subspaces, self)
        return self._finish(h, coords @ self.projection.weight)


class DiReFT(_LowRank):
    """``DiReFT(h) = h + act(W h + b) R^T`` — LoReFT without subtracting the projection of ``h``
    (ReFT paper, appendix "DiReFT"; pyreft's ``DireftIntervention``)."""

    name = "direft"

    __init__ = LoReFT.__init__
    build = LoReFT.build

    def forward(self, h: torch.Tensor, subspaces: torch.Tensor | None = None) -> torch.Tensor:
        coords = mask_subspaces(self.act(self.source(h.float())), subspaces, self)
        return self._finish(h, coords @ self.rotation().T)


class NodiReFT(_LowRank):
    """``NodiReFT(h) = h + act(W h + b) P`` — DiReFT with an unconstrained ``r x d`` projection
    ``P`` (pyreft's ``NodireftIntervention``; its projection bias, kept when ``add_bias``, is
    saved but does not enter the formula)."""

    name = "nodireft"

    __init__ = NoReFT.__init__
    build = NoReFT.build

    def forward(self, h: torch.Tensor, subspaces: torch.Tensor | None = None) -> torch.Tensor:
        coords = mask_subspaces(self.act(self.source(h.float())), subspaces, self)
        return self._finish(h, coords @ self.projection.weight)


class ConsReFT(_LowRank):
    """``ConsReFT(h) = h + (b - R^T h) R^T`` — sets the subspace coordinates to a learned
    constant ``b`` (pyreft's ``ConsreftIntervention``; pyreft applies no dropout here, and
    ``dropout`` is kept for symmetry, default 0)."""

    name = "consreft"

    def __init__(self, embed_dim: int | None = None, low_rank_dimension: int = 4,
                 dropout: float = 0.0, collapsed_columns: tuple[int, ...] = ()) -> None:
        self._init_common(low_rank_dimension, dropout)
        Intervention.__init__(self, embed_dim, low_rank_dimension=low_rank_dimension, dropout=dropout,
                              **self._collapsed(collapsed_columns, low_rank_dimension))

    def build(self, embed_dim: int) -> None:
        r = self.hparams["low_rank_dimension"]
        self.rotation = Orthonormal(embed_dim, r, tuple(self.hparams.get("collapsed_columns", ())))
        self.bias = nn.Parameter(torch.rand(r))
        self.dropout = nn.Dropout(self.hparams["dropout"])

    def forward(self, h: torch.Tensor, subspaces: torch.Tensor | None = None) -> torch.Tensor:
        x, rot = h.float(), self.rotation()
        return self._finish(h, mask_subspaces(self.bias - x @ rot, subspaces, self) @ rot.T)


class LobiReFT(_LowRank):
    """``LobiReFT(h) = h + b R^T`` — a learned bias confined to an ``r``-dimensional orthonormal
    subspace, the same for every input (pyreft's ``LobireftIntervention``)."""

    name = "lobireft"

    __init__ = ConsReFT.__init__
    build = ConsReFT.build

    def forward(self, h: torch.Tensor, subspaces: torch.Tensor | None = None) -> torch.Tensor:
        edit = (mask_subspaces(self.bias, subspaces, self) @ self.rotation().T).expand(h.shape)
        return self._finish(h, edit)


REFT_FAMILY: tuple[type[Intervention], ...] = (LoReFT, NoReFT, DiReFT, NodiReFT, ConsReFT, LobiReFT)
