"""Activation capture and activation patching through nnsight traces (nnsight 0.8), locally or through
nnsight's remote execution (NDIF), and the helpers every nnsight path of reftkit shares.

* :func:`capture` — representations at reftkit sites (``("block_output", 3)``, fused q/k/v slices,
  heads), whole sequences or at positions, read in one nnsight trace;
* :func:`patch` / :func:`patching_grid` — activation patching: a clean run's representation at
  (layer, position) copied into the corrupted run.

Trained interventions inside traces, and what of them can run remotely, are in
:mod:`reftkit.analysis.nnsight_interventions`.

``model`` is an nnsight wrapper (``NNsight``, ``TransformersModel``/``LanguageModel``) or a plain
``nn.Module``, which is wrapped with ``nnsight.NNsight``. Wrapping installs nnsight's controller as each
module's ``forward`` (inert outside a trace, and permanent); wrap once and pass the wrapper to reuse it.
nnsight is imported only inside these functions: importing this module patches nothing
(``import nnsight`` replaces ``torch.Tensor.backward``, mounts ``.save`` on every object and overwrites
glibc's ``backtrace``).

Inputs. They reach the model as nnsight assembles them. ``NNsight`` passes them through;
``TransformersModel`` adds mask-derived ``position_ids`` to a left-padded batch when its tokenizer pads
left (``nnsight.modeling.processing.supply_position_ids``) while ``reft(...)`` lets the model count
positions itself — on absolute-position models (GPT-2) pass ``position_ids`` to both to compare.

Remote runs (``remote=True`` with a remote-capable wrapper; ``remote="local"`` is nnsight's in-process
simulation): captures and patching send only tensors and torch code, so they run remotely as they are.
"""
from __future__ import annotations

from types import SimpleNamespace
from typing import Any, Callable, Sequence

import torch
from torch import nn

from reftkit.structure import Site, resolve_site

from .nnsight_plan import as_site, kernels, make_group, make_part, read_part, site_key

__all__ = ["wrap", "capture", "patch", "patching_grid"]


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
    from reftkit.positions import locate_from_mask, parse_positions

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
            # over the real tokens, as ReftModel's calls count them (a mask with holes skips them)
            idx = locate_from_mask([parse_positions(positions)], attention_mask, batch, length, ref.device)[:, 0]
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
