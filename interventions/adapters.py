"""Bottleneck adapters and AdapterFusion as interventions, with the math of ``adapters`` 1.3.

* :class:`BottleneckAdapter` — Houlsby et al. 2019, "Parameter-Efficient Transfer Learning for NLP"
  (arXiv:1902.00751): ``h' = h + s * W_up act(W_down a + b_down) + b_up`` with ``a`` the adapter's
  input (``h`` itself, or ``LN(h)`` — see ``original_ln_before``). adapters 1.3's ``Adapter`` in
  ``methods/modeling.py`` with a ``BnConfig``.
* :class:`~reftkit.interventions.adapter_fusion.AdapterFusion` (its own module) — Pfeiffer et al.
  2021, "AdapterFusion: Non-Destructive Task Composition for Transfer Learning" (EACL,
  arXiv:2005.00247): attention over the up-projections of several trained, frozen adapters.
  adapters 1.3's ``BertFusion`` driven by ``BottleneckLayer.compose_fuse``.

Where adapters 1.3 puts them, and which reftkit site makes each one a function of one tensor
(``x`` = a sub-layer's output, ``r`` = its residual input, ``LN`` = the block's own LayerNorm):

====================  ============================================  ===================================
model / adapter       adapters 1.3 computes                         reftkit site and map
====================  ============================================  ===================================
post-LN (BERT)        ``LN(x + f(x) + r)``, ``x`` after the         ``...attention.output.dropout`` /
Houlsby (mh + out)    sub-layer's dense + dropout                   ``...output.dropout`` output:
                                                                    ``x -> x + f(x)``
post-LN (BERT)        ``LN(z + f(LN(z)))``, ``z = x + r``           ``...output.LayerNorm`` input:
Pfeiffer (output)     (``original_ln_before=True``)                 ``z -> z + f(LN(z))``
pre-LN (Llama, GPT2)  ``r + x + f(x)``, ``x`` = attention / MLP     ``attention_output`` /
Houlsby               output (no LayerNorm passed)                  ``mlp_output``: ``x -> x + f(x)``
pre-LN                ``h + f(h)``, ``h = r + x`` the block output  ``block_output``: ``h -> h + f(h)``
Pfeiffer (output)     (``original_ln_before`` adds ``r`` only)
====================  ============================================  ===================================

``LN(z)`` inside the post-LN Pfeiffer adapter needs the base LayerNorm's weights: the adapter keeps
a frozen float32 copy of them as buffers (saved with it), filled by
:func:`~reftkit.interventions.adapter_placement.pfeiffer_representations` or
:meth:`BottleneckAdapter.set_original_layer_norm`; an adapter that needs them and never got them
refuses to run rather than silently normalising with ``weight=1, bias=0``.

Out of reach of a one-tensor site (each raises ``InterventionError`` naming the field): a pre-LN
model's attention adapter with ``original_ln_before=True`` (its input ``r + x`` is the mid-block
residual stream, which no hook sees as one tensor before the MLP reads it), ``residual_before_ln``
other than True with ``original_ln_before=True``, ``adapter_residual_before_ln`` with
``original_ln_before=True``, AdapterFusion's ``residual_before`` or ``query_before_ln`` with
``original_ln_before=True`` (all of them need ``x`` and ``r`` separately), ``use_gating``
(its gate averages over the whole sequence), PHM layers and parallel adapters.

Weights are float32; the edit is computed in float32 and cast back to ``h``'s dtype.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from transformers.activations import ACT2FN

from .base import Intervention, InterventionError

_INITS = ("bert", "houlsby", "mam_adapter")


def _adapter_activation(owner: str, name: Any) -> nn.Module:
    """adapters' ``Activation_Function_Class``: transformers' activation by lower-cased name, plus
    ``leakyrelu`` (``F.leaky_relu``, slope 0.01)."""
    if not isinstance(name, str):
        raise InterventionError(f"{owner}: non_linearity={name!r} must be a string such as 'swish' or 'relu'")
    key = name.lower()
    if key == "leakyrelu":
        return nn.LeakyReLU()
    if key not in ACT2FN:
        raise InterventionError(f"{owner}: non_linearity={name!r} is not a known activation; choose one of "
                                f"{sorted(ACT2FN) + ['leakyrelu']}")
    return ACT2FN[key]


def _check_bool(owner: str, field: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise InterventionError(f"{owner}: {field}={value!r} must be True or False")
    return value


def _check_dropout(owner: str, field: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) < 1.0:
        raise InterventionError(f"{owner}: {field}={value!r} must be a number in [0, 1)")
    return float(value)


def _check_eps(owner: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not float(value) > 0:
        raise InterventionError(f"{owner}: original_ln_eps={value!r} must be a positive number")
    return float(value)


def _bert_init(module: nn.Module) -> None:
    """adapters' ``Adapter.init_bert_weights``: Linear weights ~ N(0, 0.02), biases 0, LayerNorm 1/0."""
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, 0.0, 0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


class _OriginalNorm(Intervention):
    """Shared handling of ``original_ln_before``: a frozen copy of the base model's LayerNorm.

    Buffers ``original_ln_weight``, ``original_ln_bias`` (float32) and ``original_ln_set`` (1 once
    they hold the base LayerNorm's values) are saved with the intervention, so a reload needs no
    access to the base module. ``original_ln_eps`` is a hyper-parameter.
    """

    def _build_original_norm(self, embed_dim: int) -> None:
        self._norm_ready = False
        if not self.hparams["original_ln_before"]:
            return
        self.register_buffer("original_ln_weight", torch.ones(embed_dim))
        self.register_buffer("original_ln_bias", torch.zeros(embed_dim))
        self.register_buffer("original_ln_set", torch.zeros(()))
        self.register_load_state_dict_post_hook(_OriginalNorm._after_load)

    @staticmethod
    def _after_load(module: nn.Module, incompatible_keys: Any) -> None:
        module._norm_ready = bool(module.original_ln_set)

    @torch.no_grad()
    def set_original_layer_norm(self, layer_norm: nn.Module) -> "_OriginalNorm":
        """Copy the base model's LayerNorm (``weight``, ``bias``, ``eps``) that ``original_ln_before``
        applies before the adapter; the copy is frozen and saved with the intervention."""
        owner = type(self).__name__
        if not self.hparams["original_ln_before"]:
            raise InterventionError(f"{owner}: original_ln_before=False, so there is no layer norm to set")
        weight = getattr(layer_norm, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.dim() != 1:
            raise InterventionError(f"{owner}: layer_norm={type(layer_norm).__name__} has no 1-d weight to copy")
        if self.embed_dim is None:
            self.materialize(weight.shape[0])
        if weight.shape[0] != self.embed_dim:
            raise InterventionError(f"{owner}: layer_norm has width {weight.shape[0]}, the intervention has "
                                    f"width {self.embed_dim}")
        eps = getattr(layer_norm, "eps", None)
        if eps is not None and not math.isclose(float(eps), self.hparams["original_ln_eps"], rel_tol=1e-9):
            raise InterventionError(f"{owner}: original_ln_eps={self.hparams['original_ln_eps']!r} differs from "
                                    f"the layer norm's eps={eps!r}")
        bias = getattr(layer_norm, "bias", None)
        self.original_ln_weight.copy_(weight.detach().float())
        self.original_ln_bias.copy_(bias.detach().float() if isinstance(bias, torch.Tensor)
                                    else torch.zeros_like(self.original_ln_bias))
        self.original_ln_set.fill_(1.0)
        self._norm_ready = True
        return self

    def _adapter_input(self, x: torch.Tensor) -> torch.Tensor:
        """``LN(x)`` with the copied base LayerNorm when ``original_ln_before``, else ``x``."""
        if not self.hparams["original_ln_before"]:
            return x
        if not self._norm_ready:
            raise InterventionError(
                f"{type(self).__name__}: original_ln_before=True but the base model's LayerNorm was never "
                "copied in; build it with pfeiffer_representations(model) or call set_original_layer_norm()")
        return F.layer_norm(x, (x.shape[-1],), self.original_ln_weight.float(), self.original_ln_bias.float(),
                            self.hparams["original_ln_eps"])


class BottleneckAdapter(_OriginalNorm):
    """``BottleneckAdapter(h) = h + dropout(s * (W_up act(W_down a + b_down) + b_up))``.

    Houlsby et al. 2019, "Parameter-Efficient Transfer Learning for NLP", fig. 2; the configurable
    ``Adapter`` of ``adapters`` 1.3 (``methods/modeling.py``, ``BnConfig``). ``a`` is the adapter
    input: ``h``, or ``LN(h)`` with the base model's LayerNorm when ``original_ln_before`` (used at a
    post-LN model's LayerNorm input, where it gives adapters' ``LN(z + f(LN(z)))``), then the
    adapter's own ``LayerNorm`` when ``ln_before``. The bottleneck width is
    ``max(1, int(d // reduction_factor))`` unless ``bottleneck_dim`` is given. ``scaling`` is a float,
    ``"learned"`` (one scalar, init 1) or ``"channel"`` (a ``d``-vector, init 1), as in He et al. 2021.
    With ``ln_after`` a new LayerNorm ``N`` is applied: ``h + N(edit)``, or ``N(h + edit)`` when
    ``adapter_residual_before_ln``. ``init_weights`` follows adapters (``"bert"``: N(0, 0.02) and
    zero biases; ``"houlsby"``: truncated N(0, 0.01); ``"mam_adapter"``: zero up-projection).
    The Houlsby and Pfeiffer placements are :func:`~reftkit.interventions.adapter_placement.houlsby_representations`
    and :func:`~reftkit.interventions.adapter_placement.pfeiffer_representations`.
    """

    name = "bottleneck_adapter"

    def __init__(self, embed_dim: int | None = None, reduction_factor: float = 16, bottleneck_dim: int | None = None,
                 non_linearity: str = "swish", scaling: float | str = 1.0, dropout: float = 0.0,
                 ln_before: bool = False, ln_after: bool = False, adapter_residual_before_ln: bool = False,
                 original_ln_before: bool = False, original_ln_eps: float = 1e-12,
                 init_weights: str = "bert") -> None:
        owner = type(self).__name__
        if isinstance(reduction_factor, bool) or not isinstance(reduction_factor, (int, float)) \
                or not reduction_factor > 0:
            raise InterventionError(f"{owner}: reduction_factor={reduction_factor!r} must be a positive number")
        if bottleneck_dim is not None and (isinstance(bottleneck_dim, bool) or not isinstance(bottleneck_dim, int)
                                           or bottleneck_dim <= 0):
            raise InterventionError(f"{owner}: bottleneck_dim={bottleneck_dim!r} must be None or a positive int")
        _adapter_activation(owner, non_linearity)
        if isinstance(scaling, bool) or not (isinstance(scaling, (int, float)) or scaling in ("learned", "channel")):
            raise InterventionError(f"{owner}: scaling={scaling!r} must be a number, 'learned' or 'channel'")
        dropout = _check_dropout(owner, "dropout", dropout)
        for field, value in (("ln_before", ln_before), ("ln_after", ln_after),
                             ("adapter_residual_before_ln", adapter_residual_before_ln),
                             ("original_ln_before", original_ln_before)):
            _check_bool(owner, field, value)
        if adapter_residual_before_ln and original_ln_before and ln_after:
            raise InterventionError(
                f"{owner}: adapter_residual_before_ln=True with original_ln_before=True and ln_after=True adds the "
                "sub-layer output before the base LayerNorm's residual, which a one-tensor site cannot see")
        original_ln_eps = _check_eps(owner, original_ln_eps)
        if init_weights not in _INITS:
            raise InterventionError(f"{owner}: init_weights={init_weights!r} must be one of {list(_INITS)}")
        Intervention.__init__(
            self, embed_dim, reduction_factor=reduction_factor, bottleneck_dim=bottleneck_dim,
            non_linearity=non_linearity, scaling=float(scaling) if not isinstance(scaling, str) else scaling,
            dropout=dropout, ln_before=ln_before, ln_after=ln_after,
            adapter_residual_before_ln=adapter_residual_before_ln, original_ln_before=original_ln_before,
            original_ln_eps=original_ln_eps, init_weights=init_weights)

    def bottleneck_width(self, embed_dim: int) -> int:
        size = self.hparams["bottleneck_dim"]
        return size if size is not None else max(1, int(embed_dim // self.hparams["reduction_factor"]))

    def build(self, embed_dim: int) -> None:
        m, hp = self.bottleneck_width(embed_dim), self.hparams
        self.norm_before = nn.LayerNorm(embed_dim) if hp["ln_before"] else None
        self.down = nn.Linear(embed_dim, m)
        self.act = _adapter_activation(type(self).__name__, hp["non_linearity"])
        self.up = nn.Linear(m, embed_dim)
        scaling = hp["scaling"]
        if scaling == "learned":
            self.scale = nn.Parameter(torch.ones(1))
        elif scaling == "channel":
            self.scale = nn.Parameter(torch.ones(embed_dim))
        self.norm_after = nn.LayerNorm(embed_dim) if hp["ln_after"] else None
        self.dropout = nn.Dropout(hp["dropout"])
        self._build_original_norm(embed_dim)
        self._init_weights(hp["init_weights"])

    @torch.no_grad()
    def _init_weights(self, how: str) -> None:
        if how == "bert":
            self.apply(_bert_init)
        elif how == "mam_adapter":
            nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
            nn.init.zeros_(self.down.bias)
            nn.init.zeros_(self.up.weight)
            nn.init.zeros_(self.up.bias)
        else:  # houlsby
            for lin in (self.down, self.up):
                nn.init.trunc_normal_(lin.weight, mean=0.0, std=1e-2, a=-2e-2, b=2e-2)
                nn.init.zeros_(lin.bias)

    def up_projection(self, a: torch.Tensor) -> torch.Tensor:
        """``s * (W_up act(W_down a' + b_down) + b_up)`` with ``a' = ln_before(a)`` — adapters' ``up``,
        which is also what AdapterFusion attends over (before dropout and ``ln_after``)."""
        if self.norm_before is not None:
            a = self.norm_before(a)
        up = self.up(self.act(self.down(a)))
        scaling = self.hparams["scaling"]
        return up * (self.scale if isinstance(scaling, str) else scaling)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        x = h.float()
        edit = self.dropout(self.up_projection(self._adapter_input(x)))
        if self.norm_after is not None:
            if self.hparams["adapter_residual_before_ln"]:
                return self.norm_after(x + edit).to(h.dtype)
            edit = self.norm_after(edit)
        return (x + edit).to(h.dtype)


FAMILY: tuple[type[Intervention], ...] = (BottleneckAdapter,)
# adapters 1.3's class name
ALIASES: dict[str, type[Intervention]] = {"Adapter": BottleneckAdapter}
