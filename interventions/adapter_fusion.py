"""AdapterFusion as an intervention, with the math of ``adapters`` 1.3: attention over the
up-projections of several trained, frozen bottleneck adapters of one site.

Source: Pfeiffer et al. 2021, "AdapterFusion: Non-Destructive Task Composition for Transfer Learning"
(EACL, arXiv:2005.00247); adapters 1.3's ``BertFusion`` driven by ``BottleneckLayer.compose_fuse``.
Where it goes in a model, and which sites it can take, is as for the adapters it fuses
(:mod:`reftkit.interventions.adapters`, :func:`reftkit.interventions.adapter_placement.fusion_representations`).
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from torch import nn

from .adapters import BottleneckAdapter, _bert_init, _check_bool, _check_dropout, _check_eps, _OriginalNorm
from .base import Intervention, InterventionError

_FUSION_CHILD_DROP = ("original_ln_before", "original_ln_eps")


class AdapterFusion(_OriginalNorm):
    """``AdapterFusion(h) = h + sum_i softmax_i(q . k_i / T) v_i`` over ``N`` frozen adapters.

    Pfeiffer et al. 2021, "AdapterFusion: Non-Destructive Task Composition for Transfer Learning",
    eq. (1)-(3); adapters 1.3's ``BertFusion`` as ``BottleneckLayer.compose_fuse`` calls it. With ``a``
    the adapter input (``h``, or ``LN(h)`` when ``original_ln_before``, exactly as in
    :class:`BottleneckAdapter`) and ``u_i`` adapter ``i``'s scaled up-projection of ``a``
    (:meth:`BottleneckAdapter.up_projection`; its dropout and ``ln_after`` do not enter):

    * ``q = W_Q a + b_Q`` (identity when ``query=False``), ``k_i = W_K u_i + b_K`` (``key``),
      ``v_i = W_V u_i`` (``value``, no bias; applied after the weighted sum instead when
      ``value_before_softmax=False``);
    * scores ``q . k_i`` (no ``1/sqrt(d)``), dropout on the scores, softmax over adapters at
      temperature ``T = temperature``;
    * ``residual_before``: ``u_i <- u_i + h`` before keys and values and no residual added after
      (adapters adds it in place to the tensor used for both keys and values; in the keys it only
      shifts every score by the same ``q . W_K h`` and so cancels in the softmax); otherwise ``h + c``.
    * ``dropout`` is on the scores (adapters: the fusion config's ``dropout_prob``, else the model's
      ``attention_probs_dropout_prob``, which
      :func:`~reftkit.interventions.adapter_placement.fusion_representations` reads likewise).

    ``value_initialized`` starts ``W_V`` at the identity plus 1e-6 off the diagonal (adapters'
    "dynamic" config); :meth:`regularization_loss` is adapters' ``0.01 ||I - W_V||^2``. The fused
    adapters are frozen (``train_adapters=False``, as ``train_adapter_fusion`` leaves them).
    Difference: adapters' ``temperature=True`` starts ``T`` at 50 and lowers it by 0.05 on every
    forward call, even in eval; here ``T`` is a fixed number (1 = adapters' default).
    Build one from trained adapters with :meth:`from_adapters` or
    :func:`~reftkit.interventions.adapter_placement.fusion_representations`.
    """

    name = "adapter_fusion"

    def __init__(self, embed_dim: int | None = None, adapters: Sequence[Mapping[str, Any]] = (),
                 query: bool = True, key: bool = True, value: bool = True, value_before_softmax: bool = True,
                 value_initialized: bool = True, residual_before: bool = False, temperature: float = 1.0,
                 dropout: float = 0.0, original_ln_before: bool = False, original_ln_eps: float = 1e-12,
                 train_adapters: bool = False) -> None:
        owner = type(self).__name__
        if isinstance(adapters, (str, bytes, Mapping)) or not isinstance(adapters, Sequence) or not adapters:
            raise InterventionError(f"{owner}: adapters={adapters!r} must be a non-empty list of BottleneckAdapter "
                                    "argument dicts, one per fused adapter")
        children = []
        for i, child in enumerate(adapters):
            if not isinstance(child, Mapping):
                raise InterventionError(
                    f"{owner}: adapters[{i}]={child!r} must be a dict of BottleneckAdapter arguments")
            child = {k: v for k, v in child.items() if k != "embed_dim"}
            if child.get("original_ln_before", original_ln_before) != original_ln_before:
                raise InterventionError(
                    f"{owner}: adapters[{i}].original_ln_before={child['original_ln_before']!r} differs from the "
                    f"fusion's original_ln_before={original_ln_before!r}; the fusion applies the base LayerNorm once "
                    "for all adapters (adapters 1.3 uses the last adapter's setting)")
            child = {k: v for k, v in child.items() if k not in _FUSION_CHILD_DROP}
            try:
                BottleneckAdapter(**child)
            except (InterventionError, TypeError) as err:
                raise InterventionError(f"{owner}: adapters[{i}]: {err}") from None
            children.append(child)
        for field, flag in (("query", query), ("key", key), ("value", value),
                            ("value_before_softmax", value_before_softmax), ("value_initialized", value_initialized),
                            ("residual_before", residual_before), ("original_ln_before", original_ln_before),
                            ("train_adapters", train_adapters)):
            _check_bool(owner, field, flag)
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
            raise InterventionError(f"{owner}: temperature={temperature!r} must be a positive number (adapters' "
                                    "temperature=False is 1.0)")
        if residual_before and original_ln_before:
            raise InterventionError(
                f"{owner}: residual_before=True with original_ln_before=True adds the sub-layer output before the "
                "base LayerNorm's residual to the values, which a one-tensor site cannot see")
        Intervention.__init__(
            self, embed_dim, adapters=children, query=query, key=key, value=value,
            value_before_softmax=value_before_softmax, value_initialized=value_initialized,
            residual_before=residual_before, temperature=float(temperature),
            dropout=_check_dropout(owner, "dropout", dropout), original_ln_before=original_ln_before,
            original_ln_eps=_check_eps(owner, original_ln_eps), train_adapters=train_adapters)

    def build(self, embed_dim: int) -> None:
        hp = self.hparams
        self.adapters = nn.ModuleList(BottleneckAdapter(embed_dim, **child) for child in hp["adapters"])
        self.adapters.requires_grad_(hp["train_adapters"])
        self.query = nn.Linear(embed_dim, embed_dim) if hp["query"] else None
        self.key = nn.Linear(embed_dim, embed_dim) if hp["key"] else None
        self.value = nn.Linear(embed_dim, embed_dim, bias=False) if hp["value"] else None
        for lin in (self.query, self.key, self.value):
            if lin is not None:
                _bert_init(lin)
        if self.value is not None and hp["value_initialized"]:
            with torch.no_grad():
                self.value.weight.fill_(1e-6).fill_diagonal_(1.0)
        self.dropout = nn.Dropout(hp["dropout"])
        self._build_original_norm(embed_dim)

    @classmethod
    def from_adapters(cls, adapters: Sequence[BottleneckAdapter], **fusion_kwargs: Any) -> "AdapterFusion":
        """A fusion over copies of trained ``adapters`` (materialised, same width, same site): their
        weights are copied and frozen; ``original_ln_before`` and the base LayerNorm copy come from the
        last adapter, as adapters 1.3's ``compose_fuse`` takes them from the last fused adapter."""
        owner = cls.__name__
        if isinstance(adapters, BottleneckAdapter) or not isinstance(adapters, Sequence) or not adapters:
            raise InterventionError(f"{owner}: adapters={adapters!r} must be a non-empty list of BottleneckAdapter")
        for i, ad in enumerate(adapters):
            if not isinstance(ad, BottleneckAdapter) or not ad.is_materialized:
                raise InterventionError(f"{owner}: adapters[{i}]={type(ad).__name__} must be a materialised "
                                        "BottleneckAdapter (one attached by a ReftModel, or built with embed_dim)")
            if ad.embed_dim != adapters[0].embed_dim:
                raise InterventionError(f"{owner}: adapters[{i}] has width {ad.embed_dim}, adapters[0] has "
                                        f"{adapters[0].embed_dim}")
        last = adapters[-1]
        for field in ("original_ln_before", "original_ln_eps"):
            if field in fusion_kwargs and fusion_kwargs[field] != last.hparams[field]:
                raise InterventionError(f"{owner}: {field}={fusion_kwargs[field]!r} differs from the last adapter's "
                                        f"{last.hparams[field]!r}")
            fusion_kwargs[field] = last.hparams[field]
        children = [{k: v for k, v in ad.hparams.items() if k not in _FUSION_CHILD_DROP} for ad in adapters]
        fusion = cls(last.embed_dim, adapters=children, **fusion_kwargs)
        with torch.no_grad():
            for child, ad in zip(fusion.adapters, adapters):
                state = {k: v for k, v in ad.state_dict().items() if not k.startswith("original_ln_")}
                child.load_state_dict(state, strict=True)
            if last.hparams["original_ln_before"]:
                if not last._norm_ready:
                    raise InterventionError(f"{owner}: the last adapter has original_ln_before=True but no base "
                                            "LayerNorm copy; call its set_original_layer_norm() first")
                for name in ("original_ln_weight", "original_ln_bias", "original_ln_set"):
                    getattr(fusion, name).copy_(getattr(last, name))
                fusion._norm_ready = True
        return fusion

    def attention(self, h: torch.Tensor) -> torch.Tensor:
        """The fusion weights over the adapters, ``[..., N]`` (float32)."""
        return self._fuse(h.float())[1]

    def _fuse(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hp = self.hparams
        a = self._adapter_input(x)
        u = torch.stack([ad.up_projection(a) for ad in self.adapters], dim=-2)            # [..., N, d]
        if hp["residual_before"]:
            u = u + x.unsqueeze(-2)
        q = self.query(a) if self.query is not None else a
        k = self.key(u) if self.key is not None else u
        v = self.value(u) if self.value is not None and hp["value_before_softmax"] else u
        scores = (k @ q.unsqueeze(-1)).squeeze(-1)                                         # [..., N]
        probs = torch.softmax(self.dropout(scores) / hp["temperature"], dim=-1)
        c = (probs.unsqueeze(-2) @ v).squeeze(-2)
        if self.value is not None and not hp["value_before_softmax"]:
            c = self.value(c)
        return (c if hp["residual_before"] else x + c), probs

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self._fuse(h.float())[0].to(h.dtype)

    def _device(self) -> torch.device:
        return next(self.parameters()).device

    def regularization_loss(self) -> torch.Tensor:
        """adapters' ``get_fusion_regularization_loss`` term: ``0.01 * ||I - W_V||_F^2`` (0 without a
        trainable value matrix)."""
        if self.value is None or not self.value.weight.requires_grad:
            return torch.zeros((), device=self._device())
        eye = torch.eye(self.value.weight.shape[0], device=self.value.weight.device)
        return 0.01 * (eye - self.value.weight).pow(2).sum()


FAMILY: tuple[type[Intervention], ...] = (AdapterFusion,)
# adapters 1.3's class name
ALIASES: dict[str, type[Intervention]] = {"BertFusion": AdapterFusion}
