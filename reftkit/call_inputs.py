"""The optional per-call inputs of a ``ReftModel`` call, turned into tensors once per call.

* ``tasks`` — mixed-task batches: each row names the task (intervention set) that acts on it, or
  ``None``; interventions whose config entry has no ``task`` act on every row.
* ``subspaces`` — pyreft's subspace composition: per row, which coordinates of a low-rank
  intervention's rank are used (different tasks can own different rows of one intervention).
* ``sources`` / ``source_locations`` — source runs for interchange-style interventions (handled
  by ``ReftModel``, which runs them; only the shape helpers live here).
"""
from __future__ import annotations

import contextlib
import difflib
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch

from .positions import PositionError, check_attention_mask

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


def decoder_sequence(inputs: Mapping[str, Any], generating: bool = False) -> tuple[int, Any] | None:
    """``(length, attention mask or None)`` of what an encoder-decoder model's decoder reads in a call with these
    keyword ``inputs``, over which decoder-stack positions count; ``None`` when the call gives no decoder input.

    ``decoder_input_ids`` / ``decoder_inputs_embeds`` with ``decoder_attention_mask``; else ``labels`` shifted right
    as Hugging Face does (the start token, then every label but the last): a slot whose label is -100 is padding
    there. ``generating``: without decoder inputs, generate's decoder starts from the one start token."""
    ref = inputs.get("decoder_input_ids")
    ref = inputs.get("decoder_inputs_embeds") if ref is None else ref
    mask = inputs.get("decoder_attention_mask")
    labels = inputs.get("labels") if ref is None else None
    if ref is None and labels is None:
        return (1, None) if generating else None
    ref = ref if ref is not None else labels
    name = "labels" if labels is not None else "decoder_input_ids"
    if not isinstance(ref, torch.Tensor) or ref.dim() < 2 or 0 in ref.shape[:2]:
        raise PositionError(f"{name} is {ref!r:.60}; pass a tensor [batch, seq] with at least one token")
    check_attention_mask(mask, ref.shape[0], ref.shape[1], "decoder_attention_mask", name)
    if mask is None and labels is not None:
        mask = torch.cat([torch.ones_like(labels[:, :1]), (labels[:, :-1] != -100).long()], dim=1)
    return ref.shape[1], mask


def sequence_views(sequences: Sequence[str | None], attention_mask: Any, length: int, inputs: Mapping | None,
                   generating: bool, required: bool) -> dict[str, Any] | None:
    """For an encoder-decoder model's slots (``sequences``: each one's ``"encoder"`` / ``"decoder"``), the
    ``(attention mask, length)`` of each sequence of this call (``None`` for the decoder's when the call gives no
    decoder input; ``required``: refuse that when a slot counts over it); ``None`` for a decoder-only model."""
    if all(seq is None for seq in sequences):
        return None
    dec = decoder_sequence(inputs or {}, generating)
    if dec is None and required and "decoder" in sequences:
        raise ValueError("this model has decoder-stack interventions, whose positions count over the decoder's "
                         "input: pass decoder_input_ids (with decoder_attention_mask) or labels")
    return {"encoder": (attention_mask, length), "decoder": None if dec is None else (dec[1], dec[0])}


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


# -- misspelt or unknown keywords -------------------------------------------------------------
#: reftkit's own per-call inputs of forward / collect / generate: a keyword close to one of these and
#: not accepted by the model is almost surely a misspelling of it
OWN_CALL_INPUTS = ("input_ids", "attention_mask", "inputs_embeds", "intervention_locations", *CALL_INPUTS,
                   "edit_new_tokens")
#: names Hugging Face's forward decorators take (``can_return_tuple`` pops ``return_dict``, output capturing
#: reads ``output_*``, older or deprecated cache names), though the decorated forward does not list them
_HF_DECORATOR_KWARGS = frozenset({"return_dict", "output_attentions", "output_hidden_states", "past_key_values",
                                  "cache_position", "use_cache", "num_items_in_batch"})
_ACCEPTED: dict[Any, tuple[frozenset[str], bool]] = {}


def _typed_dict_keys() -> frozenset[str]:
    """Keys of transformers' ``TransformersKwargs`` / ``FlashAttentionKwargs`` (what a ``**kwargs:
    Unpack[...]`` forward passes down), wherever the installed version defines them."""
    import typing
    keys: set[str] = set()
    for module, name in (("transformers.utils.generic", "TransformersKwargs"),
                         ("transformers.utils", "TransformersKwargs"),
                         ("transformers.processing_utils", "TransformersKwargs"),
                         ("transformers.modeling_flash_attention_utils", "FlashAttentionKwargs")):
        try:
            cls = getattr(__import__(module, fromlist=[name]), name)
        except (ImportError, AttributeError):  # absent in this transformers version
            continue
        # a TypedDict lists its keys itself; get_type_hints would also need every annotation resolvable
        keys |= set(getattr(cls, "__required_keys__", ())) | set(getattr(cls, "__optional_keys__", ()))
        with contextlib.suppress(Exception):
            keys |= set(typing.get_type_hints(cls))
    return frozenset(keys)


def _named_and_var(fn: Any) -> tuple[set[str], bool]:
    """Keyword names a callable (and each function it wraps, ``__wrapped__``) accepts, and whether the
    innermost one takes ``**kwargs``; deprecated names a ``deprecate_kwarg`` wrapper renames count too."""
    import inspect
    names: set[str] = set()
    var = False
    seen = 0
    while fn is not None and seen < 20:
        seen += 1
        try:
            params = inspect.signature(fn, follow_wrapped=False).parameters.values()
        except (TypeError, ValueError):
            params = ()
        params = list(params)
        names |= {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
        var = any(p.kind is p.VAR_KEYWORD for p in params)
        func = getattr(fn, "__func__", fn)
        code, closure = getattr(func, "__code__", None), getattr(func, "__closure__", None)
        if code is not None and closure:
            cells = dict(zip(code.co_freevars, closure))
            for cell_name in ("old_name", "new_name"):
                with contextlib.suppress(ValueError):
                    value = cells[cell_name].cell_contents if cell_name in cells else None
                    if isinstance(value, str):
                        names.add(value)
        fn = getattr(fn, "__wrapped__", None)
    names.discard("self")
    return names, var


def accepted_kwargs(model: Any) -> tuple[frozenset[str], bool]:
    """(names ``model``'s forward accepts, whether it takes arbitrary ``**kwargs`` we cannot enumerate).

    A forward whose ``**kwargs`` are Hugging Face's (``TransformersKwargs``) accepts those keys; a peft
    wrapper's forward passes its ``**kwargs`` to the base model, whose names count too."""
    key = type(model)
    inner = model.get_base_model() if hasattr(model, "get_base_model") else None
    if inner is not None and inner is not model:
        key = (type(model), type(inner))
    if key in _ACCEPTED:
        return _ACCEPTED[key]
    names, var = _named_and_var(type(model).forward)
    if inner is not None and inner is not model:
        inner_names, var = _named_and_var(type(inner).forward)
        names |= inner_names
    open_ended = False
    if var:
        hf = _is_transformers_model(inner if inner is not None else model)
        if hf:
            names |= _typed_dict_keys() | _HF_DECORATOR_KWARGS
        else:
            open_ended = True  # a plain module with **kwargs: we cannot know what it reads
    _ACCEPTED[key] = (frozenset(names), open_ended)
    return _ACCEPTED[key]


def _is_transformers_model(model: Any) -> bool:
    try:
        from transformers import PreTrainedModel
    except ImportError:
        return False
    return isinstance(model, PreTrainedModel)


def suggest(name: str, candidates: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.75)
    return f" (did you mean {close[0]}=?)" if close else ""


def check_keywords(call: str, model: Any, first: Any, kwargs: Mapping[str, Any]) -> bool:
    """Refuse pyvene's call form (:func:`refuse_pyvene_arguments`; ``first`` is what arrived as ``input_ids``) and
    keywords of ``forward`` / ``collect`` / ``generate`` / ``intervening`` that nothing reads (see
    :func:`refuse_unknown_kwargs`, :func:`refuse_misspelt_generate_kwargs`); return whether the call continues
    from a KV cache (``past_key_values`` / ``cache``), whose ``attention_mask`` covers the cached tokens too."""
    refuse_pyvene_arguments(call, first, kwargs)
    if call == "intervening":  # its keywords are the per-call inputs only
        unknown = [k for k in kwargs if k not in CALL_INPUTS]
        if unknown:
            own = ("input_ids", "attention_mask", "intervention_locations", "inputs_embeds", "cached", *CALL_INPUTS)
            hints = ", ".join(f"{k!r}{suggest(k, own)}" for k in sorted(unknown))
            raise TypeError(f"intervening() got unexpected arguments {hints}; its inputs are {list(own)}")
        return False
    if call == "generate":
        refuse_misspelt_generate_kwargs(model, kwargs)
    else:
        refuse_unknown_kwargs(call, model, kwargs)
    return any(kwargs.get(name) is not None for name in ("past_key_values", "cache"))


def check_inputs(ref: Any, attention_mask: Any, source: bool = False, cached: bool = False) -> Any:
    """Refuse inputs positions cannot be computed over (``ref``: the call's ``input_ids`` or ``inputs_embeds``;
    ``source``: a source batch's) and return the mask positions count over: with a KV cache (``cached``) its
    last ``seq`` columns, the new tokens."""
    field = "inputs_embeds" if isinstance(ref, torch.Tensor) and ref.is_floating_point() else "input_ids"
    ref_name = f"a source batch's {field}" if source else field
    if not isinstance(ref, torch.Tensor):
        raise TypeError(f"{ref_name} is a {type(ref).__name__}; pass a LongTensor [batch, seq] (a tokenizer's "
                        "return_tensors='pt' output)")
    if ref.dim() < 2 or ref.shape[0] == 0 or ref.shape[1] == 0:
        hint = " (for one example, add the batch axis: ids[None])" if ref.dim() == 1 else ""
        raise PositionError(f"{ref_name} has shape {tuple(ref.shape)}; expected [batch, seq] with at least one "
                            f"example and one token{hint}")
    batch, length = ref.shape[0], ref.shape[1]
    mask_name = "a source batch's attention_mask" if source else "attention_mask"
    check_attention_mask(attention_mask, batch, length, mask_name, ref_name, cached)
    if cached and attention_mask is not None and attention_mask.dim() == 2:
        return attention_mask[:, -length:]  # a KV cache's mask covers the cached tokens first
    return attention_mask


def refuse_unknown_kwargs(call: str, model: Any, kwargs: Mapping[str, Any]) -> None:
    """``TypeError`` for a keyword of ``forward`` / ``collect`` that neither reftkit nor the model reads:
    passed on, it would land in the model's ``**kwargs`` and be ignored (a misspelt
    ``intervention_location=`` would run the call at the config's positions)."""
    if not kwargs:
        return
    names, open_ended = accepted_kwargs(model)
    unknown = [k for k in kwargs if k not in names]
    if open_ended:  # only refuse what is clearly one of reftkit's own inputs misspelt
        unknown = [k for k in unknown if difflib.get_close_matches(k, OWN_CALL_INPUTS, n=1, cutoff=0.75)]
    if unknown:
        candidates = sorted(set(OWN_CALL_INPUTS) | names)
        hints = "; ".join(f"{k!r}{suggest(k, candidates)}" for k in unknown)
        raise TypeError(f"{call}() got unexpected keyword argument{'s' if len(unknown) > 1 else ''} {hints}: neither "
                        f"reftkit nor {type(model).__name__}.forward reads it (passed on it would be ignored); "
                        f"reftkit's per-call inputs are {list(OWN_CALL_INPUTS)}")


def refuse_misspelt_generate_kwargs(model: Any, kwargs: Mapping[str, Any]) -> None:
    """``generate`` takes any generation-config field, so only a keyword that is close to one of reftkit's own
    per-call inputs (and that neither the model's forward nor its generation config knows) is refused."""
    names, _ = accepted_kwargs(model)
    config = getattr(model, "generation_config", None)
    generate = getattr(type(model), "generate", None)
    known = set(names) | set(vars(config) if config is not None else ()) | {"generation_config"}
    if generate is not None:
        known |= _named_and_var(generate)[0]
    hints = {key: suggest(key, OWN_CALL_INPUTS) for key in kwargs if key not in known}
    bad = [f"{key!r}{hint}" for key, hint in hints.items() if hint]
    if bad:
        raise TypeError(f"generate() got unexpected keyword argument{'s' if len(bad) > 1 else ''} {'; '.join(bad)}: "
                        f"reftkit's per-call inputs are {list(OWN_CALL_INPUTS)}; passed on, it would be ignored")
