"""Activation capture, activation patching and trained reftkit interventions inside nnsight traces
(nnsight 0.8), locally or through nnsight's remote execution (NDIF).

* :func:`capture` — representations at reftkit sites (``("block_output", 3)``, fused q/k/v slices,
  heads), whole sequences or at positions, read in one nnsight trace;
* :func:`patch` / :func:`patching_grid` — activation patching: a clean run's representation at
  (layer, position) copied into the corrupted run;
* :func:`trace_with_interventions` — the logits of a ``ReftModel``'s trained interventions run inside an
  nnsight trace of the same model (equal to ``reft(input_ids=..., attention_mask=...)``);
* :func:`apply_interventions` / :func:`intervention_editor` — the same, called inside your own
  ``with model.trace(...)`` block (the editor is the form that can be shipped remotely).

``model`` is an nnsight wrapper (``NNsight``, ``TransformersModel``/``LanguageModel``) or a plain
``nn.Module``, which is wrapped with ``nnsight.NNsight``. Wrapping installs nnsight's controller as each
module's ``forward`` (inert outside a trace, and permanent); wrap once and pass the wrapper to reuse it.
nnsight is imported only inside these functions: importing this module patches nothing
(``import nnsight`` replaces ``torch.Tensor.backward``, mounts ``.save`` on every object and overwrites
glibc's ``backtrace``).

How the interventions run. Sites, positions and hook kinds come from reftkit itself
(:func:`reftkit.structure.resolve_site`, the ReftModel's own locations): for each module the
kernels in :mod:`reftkit.analysis.nnsight_plan` read ``.output`` (or ``.inputs``), gather the
located rows, apply the interventions in config order, scatter back and assign the value — what
:class:`reftkit.hooks.HookManager` does in a forward hook. Supported: every named component, fused
q/k/v slices, head-level components, raw module paths, several layers, explicit
``intervention_locations`` or the config's positions under left or right padding, ``subspaces``. Not
supported (a ``NotImplementedError`` names it): source-reading interventions (interchange, DAS) and
``tasks`` routing; ``Collect`` interventions are skipped (they edit nothing); ``generate``.

Inputs. They reach the model as nnsight assembles them. ``NNsight`` passes them through;
``TransformersModel`` adds mask-derived ``position_ids`` to a left-padded batch when its tokenizer pads
left (``nnsight.modeling.processing.supply_position_ids``) while ``reft(...)`` lets the model count
positions itself — on absolute-position models (GPT-2) pass ``position_ids`` to both to compare.

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
  :data:`~reftkit.analysis.nnsight_plan.PORTABLE_ACTS`; captures and patching (tensors only);
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

from types import SimpleNamespace
from typing import Any, Callable, Sequence

import torch
from torch import nn

from reftkit.call_inputs import subspace_masks
from reftkit.structure import Site, StructureError, resolve_site

from .nnsight_plan import as_site, kernels, make_group, make_part, portable, read_part, site_key, static_order

__all__ = ["wrap", "capture", "patch", "patching_grid", "trace_with_interventions", "apply_interventions",
           "intervention_editor"]


def _nnsight():
    """Import nnsight (first use: this is when its global patches happen) and check ``.save()``."""
    try:
        import nnsight
    except ImportError as err:  # pragma: no cover - nnsight is a dependency
        raise ImportError("reftkit.analysis.nnsight_tools needs nnsight: pip install nnsight") from err
    if not hasattr(torch.Tensor, "save"):
        raise RuntimeError("nnsight's .save() mount is off (nnsight CONFIG.APP.PYMOUNT is False, or its C extension "
                           "did not build); these helpers save values with .save(), the form remote runs use")
    return nnsight


def wrap(model: Any, tokenizer: Any = None) -> Any:
    """An nnsight wrapper of ``model``: itself if it already is one, ``TransformersModel(model,
    tokenizer=...)`` when a tokenizer is given (remote-capable), else ``nnsight.NNsight(model)``."""
    nnsight = _nnsight()
    if isinstance(model, nnsight.Envoy):
        return model
    if not isinstance(model, nn.Module):
        raise TypeError(f"model={type(model).__name__} must be a torch nn.Module or an nnsight wrapper")
    if tokenizer is not None:
        from nnsight.modeling.transformers import TransformersModel
        return TransformersModel(model, tokenizer=tokenizer)
    return nnsight.NNsight(model)


def _trace_kwargs(root: Any, remote: Any, backend: Any) -> dict:
    if remote and not callable(getattr(type(root), "_remote_backend", None)):
        raise ValueError(f"remote={remote!r} needs a remote-capable nnsight model (TransformersModel / LanguageModel); "
                         f"got {type(root).__name__}")
    kwargs = {} if backend is None else {"backend": backend}
    if remote:
        kwargs["remote"] = remote
    return kwargs


def _inputs(input_ids: Any, attention_mask: Any, inputs_embeds: Any, forward_kwargs: dict) -> tuple[dict, torch.Tensor]:
    ref = input_ids if input_ids is not None else inputs_embeds
    if ref is None:
        raise ValueError("pass input_ids or inputs_embeds")
    inputs = {"input_ids": input_ids, "inputs_embeds": inputs_embeds, "attention_mask": attention_mask}
    return {k: v for k, v in {**inputs, **forward_kwargs}.items() if v is not None}, ref


def _logits(root: Any, inputs: dict, groups: list[dict], trace_kwargs: dict) -> torch.Tensor:
    """One trace: the inputs in one invoke, each group edited in an invoke of its own (so groups
    need no particular order); returns the output's logits (its first element if it has none)."""
    _nnsight()
    edit_group, _, _ = kernels()
    model = root
    with model.trace(**trace_kwargs) as tracer:
        with tracer.invoke(**inputs):
            out = model.output
            logits = getattr(out, "logits", None)
            if logits is None:
                logits = out[0]
            logits = logits.save()
        for group in groups:
            with tracer.invoke():
                edit_group(group)
    return logits


# ----------------------------------------------------------------------------- capture

def capture(model: Any, sites: Sequence[Any], input_ids: torch.Tensor | None = None,
            attention_mask: torch.Tensor | None = None, positions: str | torch.Tensor | None = None, *,
            inputs_embeds: torch.Tensor | None = None, remote: Any = False, backend: Any = None,
            **forward_kwargs: Any) -> dict[str, torch.Tensor]:
    """Representations at reftkit sites from one nnsight trace.

    ``sites``: ``("block_output", 3)`` / ``(3, "block_output")`` / ``(layer, component, heads)`` / a dict /
    a :class:`~reftkit.structure.Site`. Returns ``{key: tensor}`` with reftkit's intervention keys
    (``"layer3_block_output"``): ``[B, T, W]`` — the site's view, i.e. a fused projection's q/k/v columns
    — or ``[B, P, W]`` at ``positions`` (a spec such as ``"l1"``/``"f3+l3"`` located from the attention
    mask like reftkit's, or a ``[B, P]`` index tensor; zeros at empty slots, as ``ReftModel.collect``
    gives). Head-level sites give ``[..., heads, head_dim]``.
    """
    from reftkit.positions import locate, parse_positions, sequence_extent

    root = wrap(model)
    module = root._module
    inputs, ref = _inputs(input_ids, attention_mask, inputs_embeds, forward_kwargs)
    trace_kwargs = _trace_kwargs(root, remote, backend)
    if isinstance(sites, (Site, dict)) or (isinstance(sites, tuple) and any(isinstance(s, str) for s in sites)):
        sites = [sites]
    resolved = [as_site(module, s) for s in sites]
    batch, length = ref.shape[0], ref.shape[1]
    idx = valid = None
    if positions is not None:
        if isinstance(positions, str):
            start, lengths = sequence_extent(attention_mask, batch, length, ref.device)
            idx = locate(parse_positions(positions), start, lengths, length)
        else:
            idx = torch.as_tensor(positions).long()
            if idx.dim() != 2 or idx.shape[0] != batch or bool(((idx < -1) | (idx >= length)).any()):
                raise ValueError(f"positions has shape {tuple(idx.shape)} / values outside -1..{length - 1}; "
                                 f"expected a [{batch}, P] index tensor (-1 = empty)")
        valid = idx >= 0
    groups = [make_group(root, site, batch, [read_part(site, idx, valid)]) for site in resolved]
    keys = [site_key(s) for s in resolved]
    _, read_group, _ = kernels()
    model = root
    with torch.no_grad():
        with model.trace(**trace_kwargs) as tracer:
            found = {}
            with tracer.invoke(**inputs):
                pass
            for key, group in zip(keys, groups):
                with tracer.invoke():
                    found[key] = read_group(group)
            found = found.save()
    return dict(found)


# ----------------------------------------------------------------------------- patching

def _patch_group(root: Any, site: Site, rows: torch.Tensor, position: int) -> dict:
    batch = rows.shape[0]
    idx = torch.full((batch, 1), position, dtype=torch.long)
    part = make_part(site, idx, torch.ones(batch, 1, dtype=torch.bool), "replace", {"source": rows})
    return make_group(root, site, batch, [part])


def _pair(clean: dict, corrupt: dict) -> tuple[int, int]:
    ids, c_ids = corrupt.get("input_ids"), clean.get("input_ids")
    if ids is None or c_ids is None or ids.shape != c_ids.shape:
        raise ValueError(f"clean input_ids {None if c_ids is None else tuple(c_ids.shape)} and corrupt input_ids "
                         f"{None if ids is None else tuple(ids.shape)} must have the same shape: patching pairs "
                         "position t of one with position t of the other")
    return ids.shape[0], ids.shape[1]


def patch(model: Any, clean: dict, corrupt: dict, layer: int, position: int, component: str = "block_output",
          heads: list[int] | None = None, metric: Callable[[Any], torch.Tensor] | None = None, *,
          remote: Any = False, backend: Any = None) -> torch.Tensor:
    """Run ``corrupt`` with the representation at (``layer``, ``component``, ``position``) taken from the
    ``clean`` run (two traces: capture, then patch). Returns the logits, or ``metric(output)`` where
    ``output.logits`` are those logits (``metric`` runs here, never remotely)."""
    root = wrap(model)
    batch, length = _pair(clean, corrupt)
    if not 0 <= position < length:
        raise ValueError(f"position={position} is outside the sequence (0..{length - 1})")
    site = resolve_site(root._module, layer, component, heads)
    where = torch.full((batch, 1), position, dtype=torch.long)
    rows = next(iter(capture(root, [site], positions=where, remote=remote, backend=backend, **clean).values()))
    with torch.no_grad():
        logits = _logits(root, dict(corrupt), [_patch_group(root, site, rows, position)],
                         _trace_kwargs(root, remote, backend))
    return logits if metric is None else metric(SimpleNamespace(logits=logits))


def patching_grid(model: Any, clean: dict, corrupt: dict, metric: Callable[[Any], torch.Tensor],
                  layers: Sequence[int] | None = None, component: str = "block_output",
                  positions: Sequence[int] | None = None, *, remote: Any = False,
                  backend: Any = None) -> "pandas.DataFrame":  # noqa: F821
    """:func:`reftkit.analysis.patching.activation_patching` through nnsight: one (layer, position) patch
    at a time, same columns (``layer``, ``position``, ``score``, ``clean_score``, ``corrupt_score``,
    ``recovered``). The clean run is captured once for all layers."""
    import pandas as pd

    from reftkit.structure import num_layers

    root = wrap(model)
    batch, length = _pair(clean, corrupt)
    layers = list(range(num_layers(root._module))) if layers is None else list(layers)
    positions = list(range(length)) if positions is None else list(positions)
    bad = [p for p in positions if not 0 <= p < length]
    if bad:
        raise ValueError(f"positions: {bad[0]} is outside the sequence (0..{length - 1})")
    trace_kwargs = _trace_kwargs(root, remote, backend)

    def score(inputs: dict, groups: list[dict]) -> float:
        with torch.no_grad():
            logits = _logits(root, dict(inputs), groups, trace_kwargs)
        return float(metric(SimpleNamespace(logits=logits)).float().mean())

    sites = {layer: resolve_site(root._module, layer, component) for layer in layers}
    found = capture(root, list(sites.values()), remote=remote, backend=backend, **clean)
    clean_score, corrupt_score = score(clean, []), score(corrupt, [])
    rows = []
    for layer, site in sites.items():
        full = found[site_key(site)]
        for pos in positions:
            group = _patch_group(root, site, full[:, pos:pos + 1], pos)
            rows.append({"layer": layer, "position": pos, "score": score(corrupt, [group])})
    frame = pd.DataFrame(rows)
    frame["clean_score"], frame["corrupt_score"] = clean_score, corrupt_score
    span = clean_score - corrupt_score
    frame["recovered"] = (frame["score"] - corrupt_score) / span if span != 0 else float("nan")
    return frame


# ----------------------------------------------------------------------------- trained interventions

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
