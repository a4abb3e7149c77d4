"""Where bottleneck adapters and AdapterFusion go in a model, as reftkit representation entries.

Placements follow ``adapters`` 1.3 (see ``reftkit.interventions.adapters`` for the formulas): Houlsby
puts an adapter after the attention and after the MLP of every layer, Pfeiffer one after the MLP; in
post-LN encoders (BERT) the sites are the sub-layer's dropout output and the LayerNorm input, in
pre-LN decoders (Llama, GPT-2) the attention/MLP outputs and the block output.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from .adapter_fusion import AdapterFusion
from .adapters import BottleneckAdapter, _check_bool
from .base import InterventionError

_LOCATIONS = {"mh_adapter": "attention_output", "output_adapter": "mlp_output"}


def _layer_list(model: nn.Module, layers: Any) -> list[int]:
    from reftkit.structure import num_layers

    n = num_layers(model)
    if layers == "all":
        return list(range(n))
    if isinstance(layers, int) and not isinstance(layers, bool):
        layers = [layers]
    if not isinstance(layers, (list, tuple)) or not layers or any(
            isinstance(i, bool) or not isinstance(i, int) for i in layers):
        raise InterventionError(f"layers={layers!r} must be 'all', an int or a non-empty list of ints")
    out = []
    for i in layers:
        if not -n <= i < n:
            raise InterventionError(f"layers={list(layers)!r}: layer {i} is out of range (the model has {n} layers)")
        out.append(i % n)
    return out


# Post-LN models whose LayerNorms sit on the block itself rather than in a BertOutput-like holder:
# the pre-LN reading of their structure would put adapters in the wrong place, so they are refused.
_UNVERIFIED_POST_LN = frozenset({"albert", "bart", "distilbert", "flaubert", "fsmt", "marian", "mbart", "plbart",
                                 "xlm"})


def _post_ln_sublayer(model: nn.Module, layer: int, component: str) -> dict[str, Any] | None:
    """For a post-LN encoder (BERT family), where adapters 1.3 hooks: the module that holds the
    sub-layer's projection, dropout and ``LayerNorm(x + r)`` (``BertSelfOutput`` / ``BertOutput``).
    None for a pre-LN block, whose sub-layer output is added to the residual stream unnormalised."""
    from reftkit.structure import find_layers, resolve_site

    site = resolve_site(model, layer, component)
    layers_path, _ = find_layers(model)
    block = f"{layers_path}.{site.layer}"
    parent = site.module_path.rpartition(".")[0]
    if site.hook != "output" or not parent.startswith(block + "."):
        return None
    holder = model.get_submodule(parent)
    norm = next((n for n, m in holder.named_children() if isinstance(m, nn.LayerNorm)), None)
    if norm is None:
        return None
    drop = next((n for n, m in holder.named_children() if isinstance(m, nn.Dropout)), None)
    template = f"{layers_path}.{{layer}}{parent[len(block):]}"
    return {"template": template, "parent": parent, "norm": norm, "dropout": drop, "site": site}


def bottleneck_representations(model: nn.Module, *, mh_adapter: bool, output_adapter: bool,
                               original_ln_before: bool = False, layers: Any = "all", positions: str = "all",
                               **adapter_kwargs: Any) -> list[dict[str, Any]]:
    """Representation entries placing :class:`BottleneckAdapter` where ``adapters`` 1.3 places a
    ``BnConfig`` adapter with these ``mh_adapter`` / ``output_adapter`` / ``original_ln_before``
    flags (see the module docstring's table); ``layers`` plays the role of adapters' ``leave_out``.
    ``adapter_kwargs`` go to :class:`BottleneckAdapter` (``reduction_factor``, ``non_linearity``, ...).
    """
    if not mh_adapter and not output_adapter:
        raise InterventionError("mh_adapter=False and output_adapter=False place no adapter; set one to True")
    _check_bool("bottleneck_representations", "original_ln_before", original_ln_before)
    for field in ("original_ln_before", "original_ln_eps"):
        if field in adapter_kwargs:
            raise InterventionError(f"{field}={adapter_kwargs[field]!r}: pass original_ln_before as its own argument; "
                                    "the layer norm (and its eps) is read from the model")
    try:  # check the arguments before touching the model
        BottleneckAdapter(**adapter_kwargs)
    except TypeError as err:
        raise InterventionError(f"BottleneckAdapter: {err}") from None
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in _UNVERIFIED_POST_LN:
        raise InterventionError(
            f"model_type={model_type!r}: a post-LN model with block-level LayerNorms, for which reftkit has no "
            "verified adapters placement; write the representation entries yourself (see the module docstring)")
    chosen = _layer_list(model, layers)
    entries: list[dict[str, Any]] = []
    for location, on in (("mh_adapter", mh_adapter), ("output_adapter", output_adapter)):
        if not on:
            continue
        component = _LOCATIONS[location]
        post = _post_ln_sublayer(model, chosen[0], component)
        common = {"positions": positions}
        if post is None and not original_ln_before:
            entries.append({"layer": chosen, "component": component, "intervention": "bottleneck_adapter",
                            **common, **adapter_kwargs})
        elif post is None:  # pre-LN: adapters adds only the residual, r + x, before the adapter
            if location == "mh_adapter":
                raise InterventionError(
                    "mh_adapter=True with original_ln_before=True on a pre-LN model: adapters 1.3 feeds the adapter "
                    "the mid-block residual stream r + attention(x), which no single hook site carries; a core "
                    "site for the residual stream between attention and MLP is needed")
            entries.append({"layer": chosen, "component": "block_output", "intervention": "bottleneck_adapter",
                            **common, **adapter_kwargs})
        elif not original_ln_before:  # post-LN: after the sub-layer's dropout, before LN(x + r)
            where = f"{post['template']}.{post['dropout']}:output" if post["dropout"] else component
            entries.append({"layer": chosen, "component": where, "intervention": "bottleneck_adapter",
                            **common, **adapter_kwargs})
        else:  # post-LN, LN before the adapter: at the LayerNorm's input z = x + r, with a copy of it
            for layer in chosen:
                info = _post_ln_sublayer(model, layer, component)
                norm = model.get_submodule(f"{info['parent']}.{info['norm']}")
                adapter = BottleneckAdapter(original_ln_before=True, original_ln_eps=float(norm.eps), **adapter_kwargs)
                if norm.weight.device.type != "meta":  # a meta model only counts parameters
                    adapter.set_original_layer_norm(norm)
                entries.append({"layer": layer, "component": f"{info['template']}.{info['norm']}:input",
                                "intervention": adapter, **common})
    return entries


def _fixed_by_placement(owner: str, kwargs: dict[str, Any]) -> None:
    for field in ("mh_adapter", "output_adapter", "original_ln_before"):
        if field in kwargs:
            raise InterventionError(f"{owner}: {field}={kwargs[field]!r} is fixed by this placement; use "
                                    "bottleneck_representations() to choose it")


def houlsby_representations(model: nn.Module, reduction_factor: float = 16, non_linearity: str = "swish",
                            layers: Any = "all", positions: str = "all",
                            **adapter_kwargs: Any) -> list[dict[str, Any]]:
    """Houlsby et al. 2019 placement (adapters' ``DoubleSeqBnConfig`` / ``"houlsby"``): one adapter after
    the attention and one after the MLP of every chosen layer, ``x -> x + f(x)`` on the sub-layer
    output before it meets the residual (and, in post-LN models, the LayerNorm)."""
    _fixed_by_placement("houlsby_representations", adapter_kwargs)
    return bottleneck_representations(model, mh_adapter=True, output_adapter=True, original_ln_before=False,
                                      layers=layers, positions=positions, reduction_factor=reduction_factor,
                                      non_linearity=non_linearity, **adapter_kwargs)


def pfeiffer_representations(model: nn.Module, reduction_factor: float = 16, non_linearity: str = "relu",
                             layers: Any = "all", positions: str = "all",
                             **adapter_kwargs: Any) -> list[dict[str, Any]]:
    """Pfeiffer et al. 2021 placement (adapters' ``SeqBnConfig`` / ``"pfeiffer"``): one adapter after the
    MLP, fed the output after the residual (and the base LayerNorm in post-LN models):
    ``z -> z + f(LN(z))`` at a post-LN model's LayerNorm input, ``h -> h + f(h)`` at a pre-LN model's
    block output."""
    _fixed_by_placement("pfeiffer_representations", adapter_kwargs)
    return bottleneck_representations(model, mh_adapter=False, output_adapter=True, original_ln_before=True,
                                      layers=layers, positions=positions, reduction_factor=reduction_factor,
                                      non_linearity=non_linearity, **adapter_kwargs)


def fusion_representations(reft_models: Sequence[Any], positions: str = "all",
                           **fusion_kwargs: Any) -> list[dict[str, Any]]:
    """Entries that put one :class:`AdapterFusion` at every site where the given ``ReftModel``s (same
    base model, same adapter placements, e.g. each trained on one task) hold a ``BottleneckAdapter``.
    The adapters are copied and frozen; build the fusion model with
    ``get_reft_model(model, fusion_representations([reft_a, reft_b], ...))`` after detaching them."""
    if not isinstance(reft_models, Sequence) or not reft_models:
        raise InterventionError(f"reft_models={reft_models!r} must be a non-empty list of ReftModel")
    slot_lists = []
    for i, reft in enumerate(reft_models):
        hooks = getattr(reft, "_hooks", None)
        if hooks is None:
            raise InterventionError(f"reft_models[{i}]={type(reft).__name__} is not a ReftModel")
        slot_lists.append(hooks.slots)
    first = slot_lists[0]
    for i, slots in enumerate(slot_lists):
        where = [(s.site.module_path, s.site.hook) for s in slots]
        if where != [(s.site.module_path, s.site.hook) for s in first]:
            raise InterventionError(f"reft_models[{i}] places its interventions at {where}, reft_models[0] at "
                                    f"{[(s.site.module_path, s.site.hook) for s in first]}; fused adapters must "
                                    "share their sites")
    if "dropout" not in fusion_kwargs:  # adapters: fusion dropout_prob or the model's attention dropout
        config = getattr(getattr(reft_models[0], "model", None), "config", None)
        fusion_kwargs["dropout"] = float(getattr(config, "attention_probs_dropout_prob", 0.0) or 0.0)
    entries = []
    for j, slot in enumerate(first):
        adapters = [slots[j].intervention for slots in slot_lists]
        for i, ad in enumerate(adapters):
            if not isinstance(ad, BottleneckAdapter):
                raise InterventionError(f"reft_models[{i}].interventions[{slot.key!r}] is a {type(ad).__name__}, "
                                        "not a BottleneckAdapter")
        fusion = AdapterFusion.from_adapters(adapters, **dict(fusion_kwargs))
        entries.append({"layer": slot.site.layer, "component": slot.site.component, "positions": positions,
                        "intervention": fusion})
    return entries


def fusion_regularization_loss(reft: Any) -> torch.Tensor:
    """The sum of :meth:`AdapterFusion.regularization_loss` over ``reft.interventions`` (adapters'
    ``get_fusion_regularization_loss``, which its trainer adds to the loss for "dynamic" fusion)."""
    terms = [iv.regularization_loss() for iv in reft.interventions.values() if isinstance(iv, AdapterFusion)]
    return torch.stack(terms).sum() if terms else torch.zeros(())
