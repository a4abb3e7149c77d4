"""Trained reftkit interventions inside nnsight traces (nnsight 0.8), locally or through nnsight's remote
execution (NDIF).

* :func:`trace_with_interventions` — the logits of a ``ReftModel``'s trained interventions run inside an
  nnsight trace of the same model (equal to ``reft(input_ids=..., attention_mask=...)``);
* :func:`apply_interventions` / :func:`intervention_editor` — the same, called inside your own
  ``with model.trace(...)`` block (the editor is the form that can be shipped remotely).

Wrapping, inputs and the import of nnsight are as in :mod:`reftkit.analysis.nnsight_tools`.

How the interventions run. Sites, positions and hook kinds come from reftkit itself
(:func:`reftkit.structure.resolve_site`, the ReftModel's own locations): for each module the
kernels in :mod:`reftkit.analysis.nnsight_plan` read ``.output`` (or ``.inputs``), gather the
located rows, apply the interventions in config order, scatter back and assign the value — what
:class:`reftkit.hooks.HookManager` does in a forward hook. Supported: every named component, fused
q/k/v slices, head-level components, raw module paths, several layers, explicit
``intervention_locations`` or the config's positions under left or right padding, ``subspaces``. Not
supported (a ``NotImplementedError`` names it): source-reading interventions (interchange, DAS) and
``tasks`` routing; ``Collect`` interventions are skipped (they edit nothing); ``generate``.

Remote execution (``remote=True``; ``remote="local"`` is nnsight's in-process simulation). What nnsight
0.8.1 sends (read in ``nnsight/schema/request.py`` ``RequestModel.serialize``,
``nnsight/intervention/serialization.py`` and ``nnsight/intervention/backends/remote.py``): the model is
named by its model key, never sent; the traced block travels as *source* plus the values it reads,
pickled by nnsight's cloudpickle subclass. Functions and classes of an importable module are pickled by
*reference*, so they must exist on the server; ``nnsight.register``/``pull_env`` ship local source trees
by value, but reftkit is an installed distribution and is not shipped. Hence:

* can run remotely: the kernels (nested functions of ``torch`` ops, shipped by source), the plan's
  plain data, and the intervention *weights as float32 tensors inside the request* (LoReFT/DiReFT:
  ``R`` (computed here), ``W``, ``b``; NoReFT/NodiReFT: ``P``, ``W``, ``b``; ConsReFT/LobiReFT: ``R``,
  ``b``; Addition/Subtraction: the vector), with ``act_fn`` in
  :data:`~reftkit.analysis.nnsight_plan.PORTABLE_ACTS`;
* cannot: any other intervention class (IA3, adapters, DAS, custom subclasses: their module code is not
  on the server — refused before sending), dropout in training mode, other activations, ``metric``
  callables (they run here, on the returned logits);
* the server restricts what runs: the public ndif-team/ndif sandbox whitelist
  (``src/services/ray/src/ray/nn/security/whitelist.yaml``) lists torch, numpy, einops, math,
  collections, ... but not transformers or reftkit — hence torch-only kernels. That file is a snapshot of
  the server's source, not a statement about the deployed service.

Established offline (tests/test_nnsight_tools.py): the request body built by ``RequestModel.serialize``
— the function ``RemoteBackend`` sends — references no reftkit module, and deserialised and executed in
a process where reftkit cannot be imported, it gives the hook path's logits. Not established (no network
here): a run against a live NDIF server, its sandbox's verdict on the kernels, model-key resolution.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from reftkit.call_inputs import subspace_masks
from reftkit.structure import Site, StructureError, resolve_site

from .nnsight_plan import kernels, make_group, make_part, portable, static_order
from .nnsight_tools import _inputs, _logits, _trace_kwargs, wrap

__all__ = ["trace_with_interventions", "apply_interventions", "intervention_editor"]


def _check_same_model(module: nn.Module, reft: Any) -> None:
    base = reft.model
    if base is module:
        return
    if module is reft:
        raise ValueError("model mismatch: the nnsight model wraps the ReftModel itself; wrap its base (reft.model), "
                         "whose forward the interventions are run in")
    if type(base) is not type(module):
        raise ValueError(f"model mismatch: the ReftModel's base is a {type(base).__name__}, the nnsight model wraps a "
                         f"{type(module).__name__}; wrap the same model (or one of the same architecture)")
    for slot in reft._hooks.slots:
        s = slot.site
        try:
            other = resolve_site(module, s.layer, s.component, list(s.heads) if s.heads else None)
        except StructureError as err:
            raise ValueError(f"model mismatch: intervention {slot.key!r} does not resolve on the nnsight model: "
                             f"{err}") from None
        if other != s:
            raise ValueError(f"model mismatch: intervention {slot.key!r} sits at {s.module_path!r} ({s.hook}, width "
                             f"{s.width}) in the ReftModel's base but at {other.module_path!r} ({other.hook}, width "
                             f"{other.width}) in the nnsight model")


def _root(model: Any, reft: Any) -> Any:
    if model is reft:  # checked before wrapping: wrapping would instrument the ReftModel
        raise ValueError("model mismatch: model is the ReftModel itself; pass its base (reft.model) or an nnsight "
                         "wrapper of it, whose forward the interventions are run in")
    return wrap(model)


def _plan(root: Any, reft: Any, input_ids: Any, attention_mask: Any, intervention_locations: Any,
          inputs_embeds: Any, subspaces: Any, portable_only: bool) -> tuple[list[dict], list[list[Site]]]:
    reft._check_live()
    module = root._module
    _check_same_model(module, reft)
    slots = reft._hooks.slots
    if reft.task_names:
        raise NotImplementedError(f"this ReftModel routes rows by task ({reft.task_names}); the nnsight path does "
                                  "not support tasks")
    sourced = [s.key for s in slots if s.intervention.uses_source]
    if sourced:
        raise NotImplementedError(f"interventions {sourced} read a source run (interchange/DAS); the nnsight path "
                                  "does not support sources — use patch() for activation patching")
    ref = input_ids if input_ids is not None else inputs_embeds
    if ref is None:
        raise ValueError("pass input_ids or inputs_embeds")
    locations = reft._locations(ref, attention_mask, intervention_locations)
    masks = subspace_masks(slots, subspaces, ref.shape[0], ref.device)
    groups: dict[tuple[str, str], tuple[list[dict], list[Site]]] = {}
    for slot in slots:
        iv = slot.intervention
        if iv.collects:
            continue
        found = portable(iv)
        if found is None:
            if portable_only:
                raise NotImplementedError(
                    f"intervention {slot.key!r} ({type(iv).__name__}) cannot run remotely: its code is reftkit's "
                    "and is not on the server; remote runs support LoReFT, DiReFT, NoReFT, NodiReFT, ConsReFT, "
                    "LobiReFT, Addition, Subtraction in eval mode with act_fn in "
                    "reftkit.analysis.nnsight_plan.PORTABLE_ACTS")
            kind, weights, extra, mod = "module", {}, {}, iv
        else:
            (kind, weights, extra), mod = found, None
        loc = locations[:, slot.index]
        part = make_part(slot.site, loc, loc >= 0, kind, weights, extra, mod, slot.key, masks.get(slot.index))
        parts, sites = groups.setdefault((slot.site.module_path, slot.site.hook), ([], []))
        parts.append(part)
        sites.append(slot.site)
    batch = ref.shape[0]
    plan = [make_group(root, sites[0], batch, parts) for parts, sites in groups.values()]
    return plan, [sites for _, sites in groups.values()]


def trace_with_interventions(model: Any, reft: Any, input_ids: torch.Tensor | None = None,
                             attention_mask: torch.Tensor | None = None,
                             intervention_locations: torch.Tensor | None = None, *,
                             inputs_embeds: torch.Tensor | None = None, subspaces: Any = None, remote: Any = False,
                             backend: Any = None, **forward_kwargs: Any) -> torch.Tensor:
    """The logits of ``reft``'s interventions run inside an nnsight trace of ``model`` — what
    ``reft(input_ids=..., attention_mask=..., intervention_locations=...).logits`` gives through hooks.

    Positions are the ReftModel's own (explicit ``intervention_locations``, else its config's specs over
    the attention mask); ``subspaces`` as in ``ReftModel.forward``. Each module gets its own nnsight
    invoke, so any mix of sites works. ``remote`` and ``backend`` go to ``model.trace``; with either, only
    torch-computable interventions are allowed (see the module docstring; a custom backend may serialise
    the block). ``forward_kwargs`` go to the model's forward. One forward pass: ``generate`` is not covered.
    """
    root = _root(model, reft)
    trace_kwargs = _trace_kwargs(root, remote, backend)
    groups, _ = _plan(root, reft, input_ids, attention_mask, intervention_locations, inputs_embeds, subspaces,
                      portable_only=bool(remote) or backend is not None)
    inputs, _ = _inputs(input_ids, attention_mask, inputs_embeds, forward_kwargs)
    return _logits(root, inputs, groups, trace_kwargs)


def intervention_editor(model: Any, reft: Any, input_ids: torch.Tensor | None = None,
                        attention_mask: torch.Tensor | None = None,
                        intervention_locations: torch.Tensor | None = None, *,
                        inputs_embeds: torch.Tensor | None = None, subspaces: Any = None,
                        portable_only: bool = False) -> Callable[[], None]:
    """A function ``edit()`` to call inside your own ``with model.trace(...)`` block: it applies ``reft``'s
    interventions for these inputs (the ones the trace runs on).

    It visits the modules in forward order, as one nnsight worker must: read values from before the first
    intervened module before calling ``edit()``, and values after the last one (``model.output``) after
    it. A raw module path that shares a block with another site is refused (its place in that order is
    not known here; :func:`trace_with_interventions` has no such limit). With torch-computable
    interventions ``edit`` holds only torch code and tensors, so it can be called in a ``remote=True``
    block; ``portable_only=True`` refuses the others here rather than on the server.
    """
    root = _root(model, reft)
    groups, sites = _plan(root, reft, input_ids, attention_mask, intervention_locations, inputs_embeds, subspaces,
                          portable_only)
    ordered = static_order(root._module, groups, sites)
    _, _, apply_all = kernels()

    def edit():
        apply_all(ordered)
    return edit


def apply_interventions(model: Any, reft: Any, input_ids: torch.Tensor | None = None,
                        attention_mask: torch.Tensor | None = None,
                        intervention_locations: torch.Tensor | None = None, *,
                        inputs_embeds: torch.Tensor | None = None, subspaces: Any = None) -> None:
    """Apply ``reft``'s interventions inside a running ``with model.trace(...)`` block (local runs):
    ``intervention_editor(...)()``. Pass the same ``input_ids``/``attention_mask`` as the trace."""
    intervention_editor(model, reft, input_ids, attention_mask, intervention_locations, inputs_embeds=inputs_embeds,
                        subspaces=subspaces)()
