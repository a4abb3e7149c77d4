"""pyvene's call arguments (``unit_locations``, ``subspaces``) as reftkit's tensors.

pyvene's ``unit_locations`` is ``{"sources->base": (source_locations, base_locations)}`` (or
``{"base": ...}`` for the base alone), where ``base_locations`` is nested ``[K][B][P]`` (K
interventions in key order, B examples, P positions), or a shorthand pyvene broadcasts: an int (that
position everywhere) or a flat list of ints (those positions everywhere). reftkit takes one ``[B, K, P]``
LongTensor, -1 marking an empty slot. ``None`` means every position, as in pyvene.

pyvene's ``subspaces`` is ``[K][B][s]`` rank indices (``None`` for an intervention that takes none), an
int, or a flat list of ints (broadcast like positions); reftkit takes ``[B, K, s]`` with -1 padding.
"""
from __future__ import annotations

from typing import Any

import torch


def _depth(value: Any) -> int:
    depth = 0
    while isinstance(value, (list, tuple)) and value:
        value, depth = value[0], depth + 1
    return depth


def _broadcast(value: Any, batch: int, count: int, what: str) -> list:
    """pyvene's shorthands -> nested ``[K][B][P]`` lists."""
    if isinstance(value, torch.Tensor):
        value = value.tolist()
    if isinstance(value, bool) or value is None:
        raise ValueError(f"{what}={value!r} is not a location; give an int, a list of ints or [K][B][P] lists")
    if isinstance(value, int):
        return [[[value]] * batch] * count
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"{what} has type {type(value).__name__}; pyvene's locations are ints or nested lists")
    depth = _depth(value)
    if depth == 1:
        return [[list(value)] * batch] * count
    if depth != 3:
        raise ValueError(f"{what} is nested {depth} deep; pyvene's base locations are [K][B][P] (3 deep), an int or "
                         "a flat list (reftkit.pyreft does not support pyvene's nested h.pos locations)")
    if len(value) != count:
        raise ValueError(f"{what} has locations for {len(value)} interventions; this model has {count} (in the "
                         "order of reft_model.interventions)")
    for k, per_example in enumerate(value):
        if len(per_example) != batch:
            raise ValueError(f"{what}[{k}] has {len(per_example)} examples; the batch has {batch}")
    return [[list(p) for p in per_example] for per_example in value]


def _padded(nested: list, batch: int, count: int) -> torch.Tensor:
    """``[K][B][P]`` ragged lists -> ``[B, K, P]`` LongTensor, -1 padded."""
    width = max((len(p) for per_example in nested for p in per_example), default=0)
    out = torch.full((batch, count, max(width, 1)), -1, dtype=torch.long)
    for k, per_example in enumerate(nested):
        for b, positions in enumerate(per_example):
            if positions:
                out[b, k, :len(positions)] = torch.as_tensor(positions, dtype=torch.long)
    return out


def once_each(locations: torch.Tensor) -> torch.Tensor:
    """``[B, K, P]`` locations with each position kept once per row (repeats become -1, empty).

    pyreft pads short position lists by repeating a position; editing it once gives the same forward (the
    edit of a row does not depend on how often it is listed). pyvene's scatter would also count such a
    position's gradient once per listing; here each position counts once."""
    same = locations[..., :, None] == locations[..., None, :]
    repeated = torch.tril(same, diagonal=-1).any(-1)
    return torch.where(repeated, torch.full_like(locations, -1), locations)


def base_locations(unit_locations: Any, batch: int, length: int, count: int) -> torch.Tensor:
    """pyvene's ``unit_locations`` -> reftkit's ``intervention_locations`` ``[B, K, P]``.

    ``None`` gives every position ``0..length-1`` (pyvene's meaning of no locations)."""
    if unit_locations is None:
        return torch.arange(length).expand(batch, count, length).clone()
    if not isinstance(unit_locations, dict):
        raise ValueError(f"unit_locations must be a dict such as {{'sources->base': (None, locations)}}, got "
                         f"{type(unit_locations).__name__}")
    unknown = sorted(set(unit_locations) - {"base", "sources->base"})
    if unknown or len(unit_locations) != 1:
        raise ValueError(f"unit_locations has keys {sorted(unit_locations)}; reftkit.pyreft takes exactly one of "
                         "'sources->base' or 'base'")
    key, value = next(iter(unit_locations.items()))
    if isinstance(value, torch.Tensor):
        value = value.tolist()
    if key == "sources->base" and not isinstance(value, int):
        pair = isinstance(value, (list, tuple)) and len(value) == 2
        if pair and (value[0] is None or _depth(value[0]) == 3):
            sources, value = value
            if sources is not None:
                raise ValueError("unit_locations['sources->base'][0] (source locations) is set, but pyreft's "
                                 "interventions are sourceless; pass (None, base_locations)")
        elif pair and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            value = value[1]  # pyvene's (source position, base position) shorthand
        elif isinstance(value, (list, tuple)) and _depth(value) == 1:
            pass  # a flat list of positions, broadcast
        else:
            raise ValueError("unit_locations['sources->base'] must be a pair (None, base_locations), an int or a "
                             "list of ints")
    return once_each(_padded(_broadcast(value, batch, count, f"unit_locations[{key!r}]"), batch, count))


def subspace_indices(subspaces: Any, batch: int, ranks: list[int]) -> torch.Tensor | None:
    """pyvene's ``subspaces`` -> ``[B, K, s]`` rank indices, -1 padded (``None`` stays ``None``).

    An intervention given ``None`` gets all of its rank (reftkit passes a list of all indices)."""
    if subspaces is None:
        return None
    count = len(ranks)
    if isinstance(subspaces, torch.Tensor):
        subspaces = subspaces.tolist()
    if isinstance(subspaces, int) and not isinstance(subspaces, bool):
        nested = [[[subspaces]] * batch] * count
    elif isinstance(subspaces, (list, tuple)) and subspaces and all(
            isinstance(s, int) and not isinstance(s, bool) for s in subspaces):
        nested = [[list(subspaces)] * batch] * count
    elif isinstance(subspaces, (list, tuple)) and len(subspaces) == count:
        nested = []
        for k, per_example in enumerate(subspaces):
            if per_example is None:
                nested.append([list(range(ranks[k]))] * batch)
                continue
            if not isinstance(per_example, (list, tuple)) or len(per_example) != batch:
                raise ValueError(f"subspaces[{k}] must be a list with one index list per example ({batch}), got "
                                 f"{per_example!r:.60}")
            nested.append([list(s) for s in per_example])
    else:
        raise ValueError(f"subspaces must be an int, a list of ints, or [K][B][s] index lists with K={count} (one "
                         f"entry per intervention), got {subspaces!r:.80}")
    return _padded(nested, batch, count)
