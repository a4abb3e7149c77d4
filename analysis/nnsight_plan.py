"""What :mod:`reftkit.analysis.nnsight_tools` sends into an nnsight trace: a *plan* of plain data and
the *kernels* that run it.

A plan is a list of groups, one per ``(module, hook kind)`` — the same grouping reftkit's hooks use
(:class:`reftkit.hooks.HookManager`). A group is a dict of plain values: the module's nnsight
``Envoy``, ``"input"``/``"output"``, the located batch size, and its *parts* in config order. A part
says which columns of the tensor it sees (a fused q/k/v slice as a tuple, selected heads as an index
tensor), where it acts (``idx``/``valid`` ``[B, P]``, reftkit's locations; -1 = empty slot) and what
it does: ``kind`` plus float32 weight tensors (``"loreft"``, ``"noreft"``, ... — the formula of the
reftkit class of that name, with ``R`` computed once here), ``"replace"`` (activation patching: the
rows of another run), or ``"module"`` (call the reftkit intervention itself; local runs only).

:func:`kernels` builds the functions that read or edit a group inside a trace. They are defined
inside ``kernels`` on purpose: cloudpickle cannot import a nested function by name, so nnsight's
``CustomCloudPickler`` ships it by *source*, with only the names it uses. They use ``torch`` and
builtins and nothing from reftkit, so a remote request built from a plan needs no reftkit on the
server (a plan with a ``"module"`` part does, and is refused for remote runs).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from reftkit.structure import Site, StructureError, find_layers, resolve_site

#: activations the kernels compute with torch alone (the same functions transformers' ACT2FN gives)
PORTABLE_ACTS = (None, "linear", "relu", "gelu", "silu", "swish", "tanh", "sigmoid")

#: the order of named components inside one block, as every supported architecture runs them
STAGES = {name: i for i, name in enumerate((
    "block_input", "attention_input", "query_output", "key_output", "value_output", "attention_value_output",
    "attention_output", "mlp_input", "mlp_activation", "mlp_output", "block_output"))}


# ----------------------------------------------------------------------------- intervention -> part

def portable(iv: nn.Module) -> tuple[str, dict[str, torch.Tensor], dict[str, Any]] | None:
    """``(kind, weights, extra)`` for an intervention the kernels compute with torch ops, else None.

    Exact classes only (a subclass may change ``forward``); dropout must be inactive (eval mode or
    ``dropout=0``) and ``act_fn`` one of :data:`PORTABLE_ACTS`.
    """
    from reftkit.interventions import Addition, ConsReFT, DiReFT, LobiReFT, LoReFT, NodiReFT, NoReFT, Subtraction

    hp = getattr(iv, "hparams", {})
    if iv.training and float(hp.get("dropout", 0.0) or 0.0) > 0.0:
        return None
    act = hp.get("act_fn")
    if act not in PORTABLE_ACTS:
        return None
    kind = type(iv)
    with torch.no_grad():
        if kind in (LoReFT, DiReFT):
            w = {"rot": iv.rotation(), "w": iv.source.weight, "b": iv.source.bias}
        elif kind in (NoReFT, NodiReFT):
            w = {"p": iv.projection.weight, "w": iv.source.weight, "b": iv.source.bias}
            if iv.projection.bias is not None:
                w["pb"] = iv.projection.bias
        elif kind in (ConsReFT, LobiReFT):
            w = {"rot": iv.rotation(), "bias": iv.bias}
        elif kind in (Addition, Subtraction):
            return "add", {"vector": iv.vector.detach().float().clone()}, {
                "scale": iv.sign * hp["scale"], "act": None}
        else:
            return None
    return iv.name, {k: v.detach().float().clone() for k, v in w.items()}, {"act": act, "scale": 1.0}


def make_part(site: Site, idx: torch.Tensor, valid: torch.Tensor, kind: str, weights: dict[str, torch.Tensor],
              extra: dict[str, Any] | None = None, module: nn.Module | None = None, key: str = "",
              subspace: torch.Tensor | None = None) -> dict:
    """One part of a group: where (``idx``/``valid`` ``[B, P]``), which columns, what to do, and the
    rank coordinates it uses (``subspace``: a ``[B, r]`` bool mask, None = all)."""
    f = site.fused
    return {"key": key, "kind": kind, "weights": weights, "module": module, "subspace": subspace,
            "act": (extra or {}).get("act"), "scale": float((extra or {}).get("scale", 1.0)),
            "fused": None if f is None else (f.groups, f.group_width, f.start, f.stop),
            "heads": None if site.heads is None else torch.tensor(site.heads, dtype=torch.long),
            "num_heads": site.num_heads, "width": site.width,
            "idx": idx.long().contiguous(), "valid": valid.bool().contiguous()}


def read_part(site: Site, idx: torch.Tensor | None = None, valid: torch.Tensor | None = None) -> dict:
    """A part that only reads (capture): the site's view, whole (``idx=None``) or at ``idx``."""
    part = make_part(site, torch.empty(0, 0), torch.empty(0, 0), "read", {})
    part["idx"], part["valid"] = idx, valid
    return part


def make_group(root: Any, site: Site, batch: int, parts: list[dict]) -> dict:
    return {"envoy": envoy_for(root, site.module_path), "path": site.module_path, "hook": site.hook,
            "batch": batch, "parts": parts}


# ----------------------------------------------------------------------------- sites and envoys

def as_site(module: nn.Module, spec: Any) -> Site:
    """A site from ``("block_output", 3)``, ``(3, "block_output")``, ``(layer, component, heads)``,
    ``{"layer": ..., "component": ..., "heads": ...}`` or a :class:`~reftkit.structure.Site`."""
    if isinstance(spec, Site):
        return spec
    if isinstance(spec, dict):
        unknown = sorted(set(spec) - {"layer", "component", "heads"})
        if unknown:
            raise StructureError(f"site {spec!r}: unknown field {unknown[0]!r}; use layer, component and heads")
        return resolve_site(module, spec.get("layer"), spec.get("component", "block_output"), spec.get("heads"))
    if isinstance(spec, (tuple, list)) and len(spec) in (2, 3):
        a, b = spec[0], spec[1]
        heads = spec[2] if len(spec) == 3 else None
        if isinstance(a, str) and not isinstance(b, str):
            return resolve_site(module, b, a, heads)
        if isinstance(b, str) and not isinstance(a, str):
            return resolve_site(module, a, b, heads)
    raise StructureError(f"site={spec!r} must be (component, layer), (layer, component), optionally with heads "
                         "as a third element, a dict with layer/component/heads, or a reftkit Site")


def site_key(site: Site) -> str:
    from reftkit.attachment import intervention_key

    key = intervention_key(site.layer, site.component)
    return key if site.heads is None else f"{key}_heads{'_'.join(map(str, site.heads))}"


def envoy_for(root: Any, path: str) -> Any:
    """The envoy of the module at ``path`` (a path from the wrapped model's root). Looked up by module
    identity, so modules that nnsight re-exposes under another name (BERT's ``output`` becomes
    ``E_output``) are found too."""
    module = root._module.get_submodule(path) if path else root._module
    found = root.interleaver.envoys.get(id(module))
    if found is None:
        found = next((e for e in root.modules() if e._module is module), None)
    if found is None:
        raise StructureError(f"module {path!r} has no nnsight envoy under {type(root).__name__}")
    return found


def order_key(module: nn.Module, sites: list[Site]) -> tuple:
    """Where a group's first event falls in one forward pass: (block, stage). Raw module paths
    have no known stage: ``(block, None)``."""
    site = sites[0]
    stages = [STAGES[c] for c in (s.component.removeprefix("head_") for s in sites) if c in STAGES]
    if stages and site.layer is not None:
        return site.layer, min(stages)
    try:
        layers_path, layers = find_layers(module)
    except StructureError:
        return -1, None
    prefix = f"{layers_path}." if layers_path else ""
    if site.module_path.startswith(prefix):
        head = site.module_path[len(prefix):].split(".")[0]
        if head.isdigit():
            return int(head), None
    names = [p for p, _ in module.named_modules()]
    before = names.index(site.module_path) < names.index(layers_path) if site.module_path in names else True
    return (-1 if before else len(layers)), None


def static_order(module: nn.Module, groups: list[dict], sites: list[list[Site]]) -> list[dict]:
    """The groups in the order one forward pass reaches them (for a single nnsight worker, which
    must ask for values in that order). Raw module paths are placed by block only, so one is
    refused when another group shares its block."""
    keys = [order_key(module, s) for s in sites]
    for k, (block, stage) in enumerate(keys):
        if stage is None and sum(1 for b, _ in keys if b == block) > 1:
            raise NotImplementedError(
                f"the site {groups[k]['path']!r} (a raw module path) shares block {block} with other sites; inside "
                "a single trace worker the order of their values is not known here. Use trace_with_interventions "
                "(one nnsight invoke per site, any order) instead of apply_interventions.")
    order = sorted(range(len(groups)), key=lambda k: (keys[k][0], -1 if keys[k][1] is None else keys[k][1]))
    return [groups[k] for k in order]


# ----------------------------------------------------------------------------- the kernels

def kernels():
    """``(edit_group, read_group, apply_all)``: functions of a plan group, for use inside a trace.

    Nested on purpose (see the module docstring): they reach nothing but ``torch`` and builtins, so
    nnsight ships them to a remote server by source.
    """

    def activation(name, x):
        if name is None or name == "linear":
            return x
        if name == "relu":
            return torch.relu(x)
        if name == "gelu":
            return torch.nn.functional.gelu(x)
        if name == "silu" or name == "swish":
            return torch.nn.functional.silu(x)
        if name == "tanh":
            return torch.tanh(x)
        if name == "sigmoid":
            return torch.sigmoid(x)
        raise NotImplementedError(f"act_fn={name!r} has no torch-only kernel")

    def transform(part, rows):
        """``rows`` (``[B, P, ..., W]``) -> the intervention's output, reftkit's formulas (``coords`` are
        the rank coordinates a ``subspaces`` mask selects, as in ``reftkit.interventions.reft``)."""
        kind = part["kind"]
        mask = part.get("subspace")
        if mask is not None:  # [B, r] -> [B, 1, ..., r], broadcast over positions (and heads)
            mask = mask.to(rows.device).view(mask.shape[0], *([1] * (rows.dim() - 2)), mask.shape[-1])

        def used(coords):
            return coords if mask is None else torch.where(mask, coords, coords.new_zeros(()))
        if kind == "module":
            if mask is not None:
                return part["module"](rows, subspaces=mask)
            return part["module"](rows)
        w = {k: v.to(rows.device) for k, v in part["weights"].items()}
        if kind == "replace":
            src = w["source"].to(rows.dtype)
            return src.expand(rows.shape).clone() if src.shape != rows.shape else src
        x = rows.float()
        act = part["act"]
        if kind == "loreft":
            edit = used(activation(act, torch.nn.functional.linear(x, w["w"], w["b"])) - x @ w["rot"]) @ w["rot"].T
        elif kind == "direft":
            edit = used(activation(act, torch.nn.functional.linear(x, w["w"], w["b"]))) @ w["rot"].T
        elif kind == "noreft":
            proj = torch.nn.functional.linear(x, w["p"], w.get("pb"))
            edit = used(activation(act, torch.nn.functional.linear(x, w["w"], w["b"])) - proj) @ w["p"]
        elif kind == "nodireft":
            edit = used(activation(act, torch.nn.functional.linear(x, w["w"], w["b"]))) @ w["p"]
        elif kind == "consreft":
            edit = used(w["bias"] - x @ w["rot"]) @ w["rot"].T
        elif kind == "lobireft":
            edit = (used(w["bias"]) @ w["rot"].T).expand(rows.shape)
        elif kind == "add":
            edit = part["scale"] * w["vector"]
        else:
            raise NotImplementedError(f"unknown part kind {kind!r}")
        return (x + edit).to(rows.dtype)

    def on_rows(part, rows):
        """Apply to each selected head of head-level sites (rows ``[..., heads, head_dim]``)."""
        heads = part["heads"]
        if heads is None:
            return transform(part, rows)
        index = heads.to(rows.device)
        grid = rows.unflatten(-1, (part["num_heads"], part["width"]))
        edited = transform(part, grid.index_select(-2, index)).to(grid.dtype)
        return grid.index_copy(-2, index, edited).flatten(-2)

    def edit_rows(part, h):
        """reftkit's ``edit_rows``: gather the rows at ``idx``, transform, scatter back out of place;
        empty slots (-1) write a copy of their example's first valid slot."""
        idx, valid = part["idx"].to(h.device), part["valid"].to(h.device)
        width = h.shape[-1]
        slots = torch.arange(idx.shape[1], device=h.device)
        any_valid = valid.any(1, keepdim=True)
        first = valid.to(torch.uint8).argmax(1, keepdim=True)
        safe = torch.where(valid, idx, idx.gather(1, first).clamp_min(0))
        gidx = safe.unsqueeze(-1).expand(-1, -1, width)
        rows = h.gather(1, gidx)
        value = torch.where(any_valid.unsqueeze(-1), on_rows(part, rows), rows)
        primary = valid | ((slots == 0) & ~any_valid)
        source = torch.where(valid, slots, first).unsqueeze(-1).expand(-1, -1, width)
        value = torch.where(primary.unsqueeze(-1), value, value.detach().gather(1, source))
        return h.scatter(1, gidx, value)

    def apply_parts(group, h):
        flat = None
        if h.dim() == 2:  # OPT-style blocks flatten tokens around their MLP
            flat = h.shape
            h = h.reshape(group["batch"], -1, h.shape[-1])
        elif h.dim() != 3:
            raise RuntimeError(f"{group['path']}: expected a [batch, seq, hidden] tensor, got {tuple(h.shape)}")
        for part in group["parts"]:
            f = part["fused"]
            if f is None:
                h = edit_rows(part, h)
                continue
            g = h.unflatten(-1, (f[0], f[1]))
            edited = edit_rows(part, g[..., f[2]:f[3]].flatten(-2))
            p = edited.to(g.dtype).unflatten(-1, (f[0], f[3] - f[2]))
            p = p.expand(*g.shape[:-1], p.shape[-1])
            h = torch.cat([g[..., :f[2]], p, g[..., f[3]:]], dim=-1).flatten(-2)
        return h if flat is None else h.reshape(flat)

    def edit_group(group):
        """Read the group's tensor from the running trace, apply its parts, write it back."""
        env = group["envoy"]
        if group["hook"] == "output":
            out = env.output
            if isinstance(out, torch.Tensor):
                env.output = apply_parts(group, out)
            elif isinstance(out, (tuple, list)):
                new = [apply_parts(group, out[0])] + list(out[1:])
                env.output = tuple(new) if isinstance(out, tuple) else new
            else:
                raise TypeError(f"{group['path']}: cannot intervene on an output of type {type(out).__name__}")
            return
        args, kwargs = env.inputs
        if len(args):
            env.inputs = (tuple([apply_parts(group, args[0])] + list(args[1:])), kwargs)
        elif "hidden_states" in kwargs:
            new = dict(kwargs)
            new["hidden_states"] = apply_parts(group, kwargs["hidden_states"])
            env.inputs = (args, new)
        else:
            raise TypeError(f"{group['path']}: found no hidden-state input to intervene on")

    def read_group(group):
        """The group's tensor (first part's view: fused columns, selected heads), optionally at
        ``idx`` (``[B, P, ...]``, zeros at empty slots), detached."""
        env = group["envoy"]
        if group["hook"] == "output":
            out = env.output
            h = out if isinstance(out, torch.Tensor) else out[0]
        else:
            args, kwargs = env.inputs
            h = args[0] if len(args) else kwargs["hidden_states"]
        h = h.detach()
        if h.dim() == 2:
            h = h.reshape(group["batch"], -1, h.shape[-1])
        part = group["parts"][0]
        f = part["fused"]
        if f is not None:
            h = h.unflatten(-1, (f[0], f[1]))[..., f[2]:f[3]].flatten(-2)
        if part["idx"] is not None:
            idx, valid = part["idx"].to(h.device), part["valid"].to(h.device)
            rows = h.gather(1, idx.clamp_min(0).unsqueeze(-1).expand(-1, -1, h.shape[-1]))
            h = torch.where(valid.unsqueeze(-1), rows, torch.zeros((), dtype=rows.dtype, device=rows.device))
        if part["heads"] is not None:
            h = h.unflatten(-1, (part["num_heads"], part["width"])).index_select(-2, part["heads"].to(h.device))
        return h

    def apply_all(groups):
        """Every group, in the given order (a single worker must follow the forward pass)."""
        for group in groups:
            edit_group(group)

    return edit_group, read_group, apply_all
