"""Source runs: the bare model's pass over a second batch whose rows interchange and DAS interventions
read (pyvene's ``sources``).

A source batch runs through the frozen model with the hooks in recording mode: each hook that an
intervention reading this source sits on stores the rows at the source's positions, and the run
stops (:class:`~reftkit.hooks.SourcesRecorded`) once every needed row is stored, so layers above
the last such hook never run. The base call then reads those rows from its call state.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import torch
from torch import nn

from .call_inputs import same_width
from .hooks import CallState, HookManager, SourcesRecorded

__all__ = ["record_sources"]

#: ``locate(ref, attention_mask, locations, what, inputs=batch)`` -> ``[B, K, P]`` positions of one batch
Locate = Callable[[torch.Tensor, "torch.Tensor | None", Any, str], torch.Tensor]


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"Tensor of shape {tuple(value.shape)}"
    return type(value).__name__


_SOURCES_FORM = ("pass sources={'input_ids': ..., 'attention_mask': ...} (one batch, row by row with the base batch) "
                 "or a list of such dicts")


def _source_batches(sources: Any) -> list[Mapping]:
    """``sources`` as a list of batch dicts, or a ``TypeError`` naming what arrived instead."""
    if isinstance(sources, (torch.Tensor, str, bytes)) or not isinstance(sources, (list, tuple)):
        raise TypeError(f"sources is a {_describe(sources)}; {_SOURCES_FORM}")
    for j, src in enumerate(sources):
        if not isinstance(src, Mapping):
            raise TypeError(f"sources[{j}] is a {_describe(src)}; {_SOURCES_FORM}")
    if not sources:
        raise ValueError(f"sources is an empty {type(sources).__name__}; {_SOURCES_FORM}")
    return list(sources)


def record_sources(model: nn.Module, hooks: HookManager, locate: Locate, located: torch.Tensor,
                   row_valid: torch.Tensor | None, uses_source: list[int], sources: Any, source_locations: Any,
                   batch: int) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """Run each source batch through the bare ``model``, keeping the rows its interventions read.

    ``located`` ``[B, K, P]`` are the base call's positions and ``row_valid`` its task routing;
    ``uses_source`` are the indices of the slots that read a source; ``locate(ref, attention_mask,
    locations, what)`` resolves (or checks) positions as the model's own calls do. Returns the base
    positions (widened to the sources' if needed) and, per slot, the recorded rows ``[B, P, W]``
    (zeros where a position is empty).
    """
    if not uses_source:
        raise ValueError("sources were given, but no intervention of this model reads a source run "
                         "(interchange, DAS, ...)")
    if sources is None:
        keys = [hooks.slots[i].key for i in uses_source]
        raise ValueError(f"interventions {keys} read a source run: pass sources={{'input_ids': ..., "
                         "'attention_mask': ...}} (one batch, or a list of batches)")
    batches = [sources] if isinstance(sources, Mapping) else _source_batches(sources)
    if isinstance(sources, Mapping):
        where = [source_locations]
    elif source_locations is None:
        where = [None] * len(batches)
    elif isinstance(source_locations, (list, tuple)):
        where = list(source_locations)
    else:
        raise TypeError(f"source_locations is a {_describe(source_locations)}; with a list of {len(batches)} source "
                        "batches pass a list with one entry per batch (each [B, P] / [B, K, P] token indices, or None)")
    if len(where) != len(batches):
        raise ValueError(f"source_locations has {len(where)} entries for {len(batches)} source batches")
    beyond = {hooks.slots[i].key: hooks.slots[i].source for i in uses_source
              if hooks.slots[i].source >= len(batches)}
    if beyond:
        raise ValueError(f"interventions {list(beyond)} read source batches {list(beyond.values())}, but only "
                         f"{len(batches)} source batch(es) were given")
    recorded: dict[int, torch.Tensor] = {}
    for j, (src, src_locations) in enumerate(zip(batches, where)):
        slots = frozenset(i for i in uses_source if hooks.slots[i].source == j)
        if not slots:
            continue
        ids, embeds = src.get("input_ids"), src.get("inputs_embeds")
        src_ref = ids if ids is not None else embeds
        if src_ref is None:
            raise ValueError(f"sources[{j}] has neither input_ids nor inputs_embeds")
        if not isinstance(src_ref, torch.Tensor) or src_ref.dim() < 2:
            raise TypeError(f"sources[{j}]['{'input_ids' if ids is not None else 'inputs_embeds'}'] is a "
                            f"{_describe(src_ref)}; pass a tensor [batch, seq] as for the base inputs")
        if src_ref.shape[0] != batch:
            raise ValueError(f"sources[{j}] has batch size {src_ref.shape[0]}, the base inputs {batch}: a "
                             "source run pairs row by row with the base batch")
        src_located = locate(src_ref, src.get("attention_mask"), src_locations, "source_locations", inputs=src)
        located, src_located = same_width(located, src_located)
        base_valid = located >= 0 if row_valid is None else (located >= 0) & row_valid[:, :, None]
        for i in slots:
            short = base_valid[:, i] & (src_located[:, i] < 0)
            if bool(short.any()):
                b = int(short.nonzero()[0, 0])
                raise ValueError(f"example {b}: intervention {hooks.slots[i].key!r} acts on "
                                 f"{int(base_valid[b, i].sum())} positions of the base but its source run "
                                 f"has {int((src_located[b, i] >= 0).sum())}; give source_locations")
        state = CallState.build(src_located)
        state.record, state.record_slots = {}, slots
        hooks.state = state
        try:
            with torch.no_grad():
                model(**{k: v for k, v in src.items() if v is not None})
        except SourcesRecorded:
            pass
        finally:
            hooks.state = None
        recorded.update(state.record)
    # recorded rows may be narrower than the base's (padded) positions: pad them with zeros
    width = located.shape[-1]
    return located, {i: torch.nn.functional.pad(r, (0, 0, 0, width - r.shape[1])) for i, r in recorded.items()}
