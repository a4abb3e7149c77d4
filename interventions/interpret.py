"""Interpretability interventions: interchange (activation patching), steering by addition,
ablation, collection, distributed alignment search (DAS) and noise.

Each maps the rows ``h`` (``[..., d]``) a hook selected; the classes with ``uses_source`` also get
``source``, the rows of a source run (the same model on other inputs, no interventions) at the
paired positions, with ``h``'s shape. pyvene 0.1.8's class names (``VanillaIntervention``, ...) are
aliases; where the math differs from pyvene's, the class docstring says how.

Coordinates. ``Interchange``, ``ZeroAblation`` and ``MeanAblation`` take ``subspace``: a list of
coordinate indices of ``h`` to act on (None = all of them); the others are untouched. This is
pyvene's ``interchange_dim`` / fixed ``subspaces`` on a localist representation.

Rows, not flattened rows. Every class here maps each row (each position, each head) on its own
with the same weights. pyvene 0.1.8 does so for its "localist" classes (vanilla, addition, zero,
...), but flattens the selected rows before its "distributed" ones (``RotatedSpace``,
``LowRankRotatedSpace``): ``[B, P, d] -> [B, P*d]`` and heads ``[B, H, S, d] -> [B, S, H*d]``, so a
pyvene DAS over several positions or heads is one rotation of their concatenation (and needs
``embed_dim`` = that width). For one position and one head the two agree; checked numerically
against pyvene 0.1.8 on shared weights (``VanillaIntervention``, ``ZeroIntervention``,
``Addition``/``SubtractionIntervention`` with a ``source_representation``,
``LowRankRotatedSpaceIntervention`` with and without ``subspaces`` / ``subspace_partition``,
``RotatedSpaceIntervention``): equal to float32 rounding (<= 1.1e-6).

Unlike pyvene, nothing here writes into ``h`` in place: every class returns a new tensor.
Learned and stored weights are float32; arithmetic is done in float32 and cast back to ``h``'s
dtype (pure copies, e.g. an interchange, are exact in any dtype).
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import torch
from torch import nn

from .base import Intervention, InterventionError
from .reft import Orthonormal, _LowRank, mask_subspaces


def _check_subspace(owner: str, subspace: Any) -> list[int] | None:
    """``subspace`` as a JSON-friendly list of distinct non-negative ints, or None."""
    if subspace is None:
        return None
    if isinstance(subspace, range):
        subspace = list(subspace)
    if isinstance(subspace, torch.Tensor):
        subspace = subspace.tolist()
    if (not isinstance(subspace, (list, tuple)) or not subspace
            or any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in subspace)):
        raise InterventionError(
            f"{owner}: subspace={subspace!r} must be None (all coordinates) or a non-empty list of "
            "non-negative int coordinate indices")
    if len(set(subspace)) != len(subspace):
        raise InterventionError(f"{owner}: subspace={list(subspace)!r} repeats an index")
    return [int(i) for i in subspace]


def _as_vector(owner: Intervention, field: str, value: Any) -> torch.Tensor:
    """``value`` as a float32 vector whose width matches ``owner`` (materialising it if needed)."""
    v = torch.as_tensor(value).detach()
    if v.dim() != 1 or v.is_complex() or v.dtype == torch.bool:
        raise InterventionError(f"{type(owner).__name__}: {field} must be a real 1-d vector, got shape "
                                f"{tuple(v.shape)} and dtype {v.dtype}")
    if owner.embed_dim is None:
        owner.materialize(v.shape[0])
    elif v.shape[0] != owner.embed_dim:
        raise InterventionError(
            f"{type(owner).__name__}: {field} has width {v.shape[0]}, but the intervention has width "
            f"{owner.embed_dim}")
    return v.to(torch.float32)


def _need_source(owner: Intervention, source: torch.Tensor | None) -> torch.Tensor:
    if source is None:
        raise InterventionError(
            f"{type(owner).__name__} (uses_source) needs the rows of a source run: forward(h, source)")
    return source


class _Coordinates(Intervention):
    """Shared ``subspace`` handling: a bool mask over ``h``'s coordinates (a non-saved buffer)."""

    def check_width(self, embed_dim: int) -> None:
        subspace = self.hparams["subspace"]
        if subspace is not None and max(subspace) >= embed_dim:
            raise InterventionError(
                f"{type(self).__name__}: subspace={subspace!r} has index {max(subspace)} outside the "
                f"width {embed_dim} of the representation it is attached to")

    def _build_mask(self, embed_dim: int) -> None:
        subspace = self.hparams["subspace"]
        mask = None
        if subspace is not None:
            mask = torch.zeros(embed_dim, dtype=torch.bool)
            mask[subspace] = True
        self.register_buffer("coordinates", mask, persistent=False)

    def _replace(self, h: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """``value`` where the coordinate is selected, ``h`` elsewhere (``value`` broadcasts to ``h``)."""
        value = value.to(h.dtype)
        if self.coordinates is None:
            return value.expand(h.shape).clone() if value.shape != h.shape else value
        return torch.where(self.coordinates, value, h)


class Interchange(_Coordinates):
    """``h' = s`` on the coordinates in ``subspace`` (all when None), ``h`` elsewhere, with ``s``
    the source run's rows — interchange intervention / activation patching (Geiger et al., 2021,
    "Causal Abstractions of Neural Networks"; Vig et al., 2020). pyvene's ``VanillaIntervention``
    (``subspace=list(range(k))`` is its ``interchange_dim=k``). For a fixed source vector, pyvene's
    ``source_representation``, use :class:`MeanAblation` with ``set_mean(v)``."""

    name = "interchange"
    uses_source = True

    def __init__(self, embed_dim: int | None = None, subspace: Sequence[int] | None = None) -> None:
        subspace = _check_subspace(type(self).__name__, subspace)
        Intervention.__init__(self, embed_dim, subspace=subspace)

    def build(self, embed_dim: int) -> None:
        self._build_mask(embed_dim)

    def forward(self, h: torch.Tensor, source: torch.Tensor | None = None) -> torch.Tensor:
        return self._replace(h, _need_source(self, source))


class ZeroAblation(_Coordinates):
    """``h' = 0`` on the coordinates in ``subspace`` (all when None), ``h`` elsewhere. pyvene's
    ``ZeroIntervention``."""

    name = "zero_ablation"

    def __init__(self, embed_dim: int | None = None, subspace: Sequence[int] | None = None) -> None:
        subspace = _check_subspace(type(self).__name__, subspace)
        Intervention.__init__(self, embed_dim, subspace=subspace)

    def build(self, embed_dim: int) -> None:
        self._build_mask(embed_dim)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self._replace(h, h.new_zeros(()))


class MeanAblation(_Coordinates):
    """``h' = μ`` on the coordinates in ``subspace`` (all when None), ``h`` elsewhere, with ``μ`` a
    stored vector (usually the mean activation over a reference set; zeros until
    :meth:`set_mean`). ``μ`` is a float32 weight with ``requires_grad=False``, saved with the
    interventions. Mean ablation as in Wang et al., 2022 ("Interpretability in the Wild", IOI);
    pyvene writes it as ``VanillaIntervention(source_representation=μ)``."""

    name = "mean_ablation"

    def __init__(self, embed_dim: int | None = None, subspace: Sequence[int] | None = None) -> None:
        subspace = _check_subspace(type(self).__name__, subspace)
        Intervention.__init__(self, embed_dim, subspace=subspace)

    def build(self, embed_dim: int) -> None:
        self._build_mask(embed_dim)
        self.mean = nn.Parameter(torch.zeros(embed_dim), requires_grad=False)

    @torch.no_grad()
    def set_mean(self, mean: Any) -> "MeanAblation":
        """Store ``mean`` (a width-``d`` vector); materialises the intervention if it is not yet."""
        v = _as_vector(self, "mean", mean)
        self.mean.copy_(v.to(self.mean.device))
        return self

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self._replace(h, self.mean)


class Addition(Intervention):
    """``h' = h + scale · v`` — activation addition / steering (Turner et al., 2023, "Activation
    Addition"; Rimsky et al., 2024, "Contrastive Activation Addition"). ``v`` is a float32 weight
    of width ``d`` (zeros until :meth:`set_vector`), frozen unless ``trainable``.

    pyvene's ``AdditionIntervention`` adds the *source run's* rows (``h + s``), or a fixed
    ``source_representation``; the latter is this class with ``scale=1``. Here the vector is a
    weight of the intervention, so it is saved, and can be learned with ``trainable=True``.
    """

    name = "addition"
    sign = 1.0

    def __init__(self, embed_dim: int | None = None, scale: float = 1.0, trainable: bool = False) -> None:
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
            raise InterventionError(f"{type(self).__name__}: scale={scale!r} must be a finite number")
        if not isinstance(trainable, bool):
            raise InterventionError(f"{type(self).__name__}: trainable={trainable!r} must be a bool")
        Intervention.__init__(self, embed_dim, scale=float(scale), trainable=trainable)

    def build(self, embed_dim: int) -> None:
        self.vector = nn.Parameter(torch.zeros(embed_dim), requires_grad=self.hparams["trainable"])

    @torch.no_grad()
    def set_vector(self, vector: Any) -> "Addition":
        """Store the steering vector (width ``d``); materialises the intervention if it is not yet."""
        v = _as_vector(self, "vector", vector)
        self.vector.copy_(v.to(self.vector.device))
        return self

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return (h.float() + (self.sign * self.hparams["scale"]) * self.vector).to(h.dtype)


class Subtraction(Addition):
    """``h' = h − scale · v`` — :class:`Addition` with the sign flipped. pyvene's
    ``SubtractionIntervention`` subtracts the source run's rows or a fixed ``source_representation``
    (the latter is this class with ``scale=1``)."""

    name = "subtraction"
    sign = -1.0


class Collect(Intervention):
    """``h' = h``; the hook manager records the rows (``collects``). pyvene's
    ``CollectIntervention`` (which returns the rows in place of an edit)."""

    name = "collect"
    collects = True

    def __init__(self, embed_dim: int | None = None) -> None:
        Intervention.__init__(self, embed_dim)

    def build(self, embed_dim: int) -> None:
        pass

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h


class _Rotation(Orthonormal):
    """:class:`~reftkit.interventions.reft.Orthonormal` whose basis can be asked for its first
    ``k`` columns only: Gram-Schmidt (QR) makes column ``j`` depend on ``raw[:, :j+1]`` alone, so
    the first ``k`` columns of the full basis are the basis of ``raw[:, :k]`` — an ``O(d k^2)``
    QR instead of ``O(d^3)`` for a full rotation."""

    def forward(self, columns: int | None = None) -> torch.Tensor:
        raw = self.raw.float() if columns is None else self.raw[:, :columns].float()
        q, r = torch.linalg.qr(raw)
        return q * torch.where(r.diagonal() < 0, -1.0, 1.0).to(q.dtype)


class LowRankRotatedSpace(_LowRank):
    """Distributed interchange in an ``r``-dimensional learned subspace (DAS: Geiger et al., 2024,
    "Finding Alignments Between Interpretable Causal Variables and Distributed Neural
    Representations"): ``h' = h + R^T (R s − R h)``, ``R`` ``r x d`` with orthonormal rows, ``s`` the
    source run's rows. Stored transposed (``rotation()``, ``d x r``, as in LoReFT):
    ``h + ((s − h) R) R^T``. With ``subspaces`` (bool ``[..., r]``) only the marked rotated
    coordinates are interchanged: ``h + (((s − h) R) ⊙ m) R^T``.

    pyvene's ``LowRankRotatedSpaceIntervention`` computes the same function (``R s − R h`` there,
    ``(s − h) R`` here, equal up to float rounding); its ``subspaces`` are index lists (optionally
    through ``subspace_partition``) where ours are a bool mask over ``r``. pyvene keeps ``R`` with
    ``torch.nn.utils.parametrizations.orthogonal``; here it is the QR of a free ``d x r`` matrix.
    """

    name = "lowrank_rotated_space"
    uses_source = True  # rank checks and subspace support come from the LoReFT family's base

    def __init__(self, embed_dim: int | None = None, low_rank_dimension: int = 1) -> None:
        self._init_common(low_rank_dimension, 0.0)
        Intervention.__init__(self, embed_dim, low_rank_dimension=low_rank_dimension)

    def build(self, embed_dim: int) -> None:
        self.rotation = _Rotation(embed_dim, self.hparams["low_rank_dimension"])

    def forward(self, h: torch.Tensor, source: torch.Tensor | None = None,
                subspaces: torch.Tensor | None = None) -> torch.Tensor:
        x, rot = h.float(), self.rotation()
        coords = mask_subspaces((_need_source(self, source).float() - x) @ rot, subspaces, self)
        return (x + coords @ rot.T).to(h.dtype)


class RotatedSpace(Intervention):
    """DAS with a full rotation: ``h' = R^T concat((R s)[:k], (R h)[k:])``, ``R`` a learned ``d x d``
    orthogonal matrix, ``k = interchange_dim`` (all ``d`` when None, pyvene's default — then
    ``h' = s``). With ``subspaces`` (bool ``[..., d]`` over the rotated coordinates) the marked
    coordinates are interchanged instead of the first ``k`` (pyvene's ``subspaces`` likewise
    override ``interchange_dim``).

    Computed as ``h + (((s − h) R) ⊙ m) R^T``, equal to the formula since ``R R^T = I``, but
    exact on the untouched directions (pyvene's rotate–swap–unrotate returns ``h R R^T``, which
    differs from ``h`` by float rounding). Without ``subspaces`` only the first ``k`` columns of
    ``R`` enter, so this is :class:`LowRankRotatedSpace` with rank ``k`` plus unused parameters, and
    only those columns are computed (QR of ``raw[:, :k]``) and receive gradient. pyvene keeps ``R``
    with ``torch.nn.utils.parametrizations.orthogonal`` (a matrix-exponential map of the whole
    matrix), which spreads the gradient over all of it: the same function family, a different
    training trajectory.
    """

    name = "rotated_space"
    uses_source = True
    uses_subspaces = True

    def __init__(self, embed_dim: int | None = None, interchange_dim: int | None = None) -> None:
        if interchange_dim is not None and (isinstance(interchange_dim, bool)
                                            or not isinstance(interchange_dim, int) or interchange_dim <= 0):
            raise InterventionError(
                f"{type(self).__name__}: interchange_dim={interchange_dim!r} must be None (all) or a positive int")
        Intervention.__init__(self, embed_dim, interchange_dim=interchange_dim)

    @property
    def rank(self) -> int | None:
        return self.embed_dim

    def check_width(self, embed_dim: int) -> None:
        k = self.hparams["interchange_dim"]
        if k is not None and k > embed_dim:
            raise InterventionError(
                f"{type(self).__name__}: interchange_dim={k} exceeds the width {embed_dim} "
                "of the representation it is attached to")

    def build(self, embed_dim: int) -> None:
        self.rotation = _Rotation(embed_dim, embed_dim)

    def forward(self, h: torch.Tensor, source: torch.Tensor | None = None,
                subspaces: torch.Tensor | None = None) -> torch.Tensor:
        x, diff = h.float(), _need_source(self, source).float() - h.float()
        if subspaces is None:
            rot = self.rotation(self.hparams["interchange_dim"])
            return (x + (diff @ rot) @ rot.T).to(h.dtype)
        rot = self.rotation()
        return (x + mask_subspaces(diff @ rot, subspaces, self) @ rot.T).to(h.dtype)


class Noise(Intervention):
    """``h' = h + scale · ε``, ``ε ~ N(0, I)`` drawn fresh at every call (in train and eval mode);
    with ``seed`` set, ``ε`` comes from a generator seeded with it at every call, so every call
    with the same shape on the same device type adds the same noise (CPU and CUDA generators give
    different streams). Gaussian corruption as in causal tracing (Meng et
    al., 2022, "ROME", which uses ``scale`` = 3 × the std of the embeddings).

    pyvene's ``NoiseIntervention`` differs: its ``ε`` is one fixed ``1 x 4 x d`` buffer drawn once
    from ``numpy.random.RandomState(1)`` (so it only broadcasts over exactly 4 positions), its
    default scale is ``0.13462981581687927`` (ROME's value for GPT-2 XL, read from a misspelled
    ``noise_leve`` kwarg) and it edits ``h`` in place. Here ``scale`` has no model-specific default,
    any number of positions works, and ``h`` is not modified.
    """

    name = "noise"

    def __init__(self, embed_dim: int | None = None, scale: float = 1.0, seed: int | None = None) -> None:
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale < 0:
            raise InterventionError(f"{type(self).__name__}: scale={scale!r} must be a finite number >= 0")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise InterventionError(f"{type(self).__name__}: seed={seed!r} must be None or an int")
        Intervention.__init__(self, embed_dim, scale=float(scale), seed=seed)

    def build(self, embed_dim: int) -> None:
        pass

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        seed = self.hparams["seed"]
        generator = None if seed is None else torch.Generator(device=h.device).manual_seed(seed)
        eps = torch.randn(h.shape, generator=generator, device=h.device, dtype=torch.float32)
        return (h.float() + self.hparams["scale"] * eps).to(h.dtype)


FAMILY: tuple[type[Intervention], ...] = (Interchange, Addition, Subtraction, ZeroAblation, MeanAblation,
                                          Collect, LowRankRotatedSpace, RotatedSpace, Noise)
#: pyvene 0.1.8 class names (``pyvene.models.interventions``); see each class for differences
ALIASES: dict[str, type[Intervention]] = {
    "VanillaIntervention": Interchange,
    "AdditionIntervention": Addition,
    "SubtractionIntervention": Subtraction,
    "ZeroIntervention": ZeroAblation,
    "CollectIntervention": Collect,
    "LowRankRotatedSpaceIntervention": LowRankRotatedSpace,
    "RotatedSpaceIntervention": RotatedSpace,
    "NoiseIntervention": Noise,
}
