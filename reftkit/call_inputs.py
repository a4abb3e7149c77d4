"""The optional per-call inputs of a ``ReftModel`` call, turned into tensors once per call.

* ``tasks`` — mixed-task batches: each row names the task (intervention set) that acts on it, or
  ``None``; interventions whose config entry has no ``task`` act on every row.
* ``subspaces`` — pyreft's subspace composition: per row, which coordinates of a low-rank
  intervention's rank are used (different tasks can own different rows of one intervention).
* ``sources`` / ``source_locations`` — source runs for interchange-style interventions (handled
  by ``ReftModel``, which runs them; only the shape helpers live here).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch

CALL_INPUTS = ("sources", "source_locations", "subspaces", "tasks")

_USE_SOURCES = ("use sources= (a batch the bare model runs first; interchange and DAS interventions read its rows at "
                "source_locations=); reftkit takes no precomputed source activations")
#: pyvene's / pyreft's call arguments (``IntervenableModel.forward`` and ``generate`` in pyvene 0.1.8) that
#: reftkit's own calls refuse, each with what to use instead. A refusal is a ``TypeError``: accepted, they
#: would flow into the Hugging Face model's ``**kwargs`` and be ignored, and the call would quietly run at
#: the default positions. ``reftkit.pyreft`` accepts pyvene's call form and converts it.
PYVENE_CALL_ARGUMENTS: dict[str, str] = {
    "base": "pass the batch's fields as keywords, reft_model(**inputs), not pyvene's base={...} dict",
    "unit_locations": (
        "use intervention_locations=, a [B, K, P] LongTensor padded with -1 (K in the order of "
        "reft_model.intervention_locations_order); pyvene's {'sources->base': (None, locs)} with locs [K][B][P] "
        "converts by torch.tensor(locs).permute(1, 0, 2), and a source part goes to source_locations=; "
        "or use reftkit.pyreft, which takes pyvene's call form"),
    "intervene_on_prompt": (
        "drop it: reftkit's generate always intervenes on the prompt at prefill (pyreft's "
        "intervene_on_prompt=True), and interventions with positions 'all' on each new token too"),
    "source_representations": _USE_SOURCES,
    "activations_sources": _USE_SOURCES,
    "output_original_output": (
        "call the base model itself, reft_model.model(**inputs): outside a ReftModel call the hooks "
        "pass through"),
    "intervention_additional_kwargs": (
        f"use the per-call inputs {', '.join(CALL_INPUTS)}: reftkit interventions take no other per-call "
        "arguments"),
}


def refuse_pyvene_arguments(call: str, first: Any, kwargs: Mapping[str, Any]) -> None:
    """Raise ``TypeError`` if a call got pyvene's call form: a pyvene-only keyword (one of
    :data:`PYVENE_CALL_ARGUMENTS`) or a dict as its first argument (pyvene's ``base``).

    ``call`` names the method for the message; ``first`` is what arrived as ``input_ids``.
    """
    if isinstance(first, Mapping):
        method = "" if call == "forward" else f".{call}"
        raise TypeError(f"{call}() got a dict as input_ids (pyvene's base={{...}} form, keys {list(first)}); "
                        f"unpack it: reft_model{method}(**inputs)")
    given = [name for name in PYVENE_CALL_ARGUMENTS if name in kwargs]
    if given:
        hints = "; ".join(f"{name}=: {PYVENE_CALL_ARGUMENTS[name]}" for name in given)
        raise TypeError(f"{call}() got pyvene/pyreft-only argument{'s' if len(given) > 1 else ''} {given}, "
                        f"which reftkit's ReftModel does not take: {hints}")


@dataclass
class Collected:
    """What ``ReftModel.collect`` returns: the model output and, per ``Collect`` intervention key,
    its rows ``[B, P, W]`` (zeros at empty slots) and their validity ``[B, P]``."""

    output: Any
    activations: dict[str, torch.Tensor]
    valid: dict[str, torch.Tensor]


def routing(task_names: list[str], slot_tasks: list[str | None], tasks: Any, batch: int,
            device: torch.device) -> torch.Tensor | None:
    """``[B, K]`` bool: whether intervention k acts on row b, or ``None`` when every one acts on every row.

    ``tasks``: a sequence of task names (``None`` = no task) or a LongTensor of indices into
    ``task_names`` (-1 = no task), one per row.
    """
    if not task_names:
        if tasks is not None:
            raise ValueError("tasks were given, but no intervention of this model belongs to a task; "
                             "set 'task' in the config entries to route rows")
        return None
    if tasks is None:
        raise ValueError(f"this model routes rows by task ({task_names}); pass tasks=[...] with one task name "
                         "(or None) per row")
    if isinstance(tasks, torch.Tensor):
        ids = tasks.to(device=device, dtype=torch.long).view(-1)
        bad = (ids < -1) | (ids >= len(task_names))
        if bool(bad.any()):
            raise ValueError(f"tasks[{int(bad.nonzero()[0])}] = {int(ids[bad][0])} is not a task index "
                             f"(0..{len(task_names) - 1} for {task_names}, or -1 for none)")
    else:
        if isinstance(tasks, str):
            raise ValueError(f"tasks={tasks!r} must be a list with one task per row, not a string")
        lookup = {name: i for i, name in enumerate(task_names)}
        unknown = [(i, t) for i, t in enumerate(tasks) if t is not None and t not in lookup]
        if unknown:
            raise ValueError(f"tasks[{unknown[0][0]}] = {unknown[0][1]!r} is not a task of this model; "
                             f"its tasks are {task_names} (or None)")
        ids = torch.tensor([-1 if t is None else lookup[t] for t in tasks], dtype=torch.long, device=device)
    if ids.numel() != batch:
        raise ValueError(f"tasks has {ids.numel()} entries, the batch has {batch} rows")
    slot_ids = torch.tensor([-1 if t is None else task_names.index(t) for t in slot_tasks], device=device)
    return (slot_ids[None, :] == -1) | (ids[:, None] == slot_ids[None, :])


def same_width(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad two ``[B, K, P]`` location tensors with -1 to the same ``P``."""
    width = max(a.shape[-1], b.shape[-1])

    def pad(t: torch.Tensor) -> torch.Tensor:
        return t if t.shape[-1] == width else torch.nn.functional.pad(t, (0, width - t.shape[-1]), value=-1)
    return pad(a), pad(b)


def _as_index_tensor(subspaces: Any) -> torch.Tensor:
    if isinstance(subspaces, torch.Tensor):
        return subspaces
    rows = [list(r) for r in subspaces]
    nested = any(len(r) and isinstance(r[0], (list, tuple)) for r in rows)
    if nested:  # [B][K][s]
        width = max((len(s) for r in rows for s in r), default=0)
        return torch.tensor([[list(s) + [-1] * (width - len(s)) for s in r] for r in rows], dtype=torch.long)
    width = max((len(r) for r in rows), default=0)
    return torch.tensor([r + [-1] * (width - len(r)) for r in rows], dtype=torch.long)


def subspace_masks(slots: Sequence[Any], subspaces: Any, batch: int, device: torch.device) -> dict[int, torch.Tensor]:
    """slot index -> ``[B, rank]`` bool mask for every subspace-aware intervention.

    ``subspaces``: ``[B, s]`` indices (-1 padding) shared by all such interventions, ``[B, K, s]``
    per intervention (K = all interventions, in order), a list of lists of either, or a ``[B, r]``
    bool mask.
    """
    if subspaces is None:
        return {}
    aware = [s for s in slots if s.intervention.uses_subspaces]
    if not aware:
        raise ValueError("subspaces were given, but no intervention of this model uses subspaces "
                         "(LoReFT, low-rank DAS, ...)")
    given = _as_index_tensor(subspaces).to(device)
    if given.shape[0] != batch:
        raise ValueError(f"subspaces has {given.shape[0]} rows, the batch has {batch}: reftkit's subspaces are "
                         "per row ([B][s] or [B][K][s]); pyvene's [K][B][s] lists need their first two axes swapped")
    masks = {}
    for slot in aware:
        rank = slot.intervention.rank
        if given.dtype == torch.bool:
            if given.dim() != 2 or given.shape[1] != rank:
                raise ValueError(f"subspaces is a bool mask of shape {tuple(given.shape)}; intervention "
                                 f"{slot.key!r} needs [batch, {rank}]")
            masks[slot.index] = given
            continue
        index = given[:, slot.index] if given.dim() == 3 else given
        if given.dim() == 3 and given.shape[1] != len(slots):
            raise ValueError(f"subspaces has {given.shape[1]} intervention rows, this model has {len(slots)}")
        bad = (index < -1) | (index >= rank)
        if bool(bad.any()):
            b, p = (int(i) for i in bad.nonzero()[0])
            raise ValueError(f"subspaces[{b}] index {int(index[b, p])} is outside the rank {rank} of intervention "
                             f"{slot.key!r} (valid 0..{rank - 1}, or -1 for padding)")
        mask = torch.zeros(batch, rank + 1, dtype=torch.bool, device=device)
        mask.scatter_(1, torch.where(index < 0, rank, index), True)  # -1 -> a spare column, dropped
        masks[slot.index] = mask[:, :rank]
    return masks
