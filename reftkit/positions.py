"""Token positions: pyreft's grammar (``f7+l7``, ``l1``, ``f3``) plus ``all``, turned into index
tensors once per call.

A resolved location tensor has shape ``[batch, positions]`` with ``-1`` marking an empty slot.
Positions count from the first real (non-padding) token of each example, so the same spec picks
the same tokens under left padding, right padding or no padding.

When an example is shorter than ``first + last`` tokens, the two ranges are shrunk so they never
overlap: ``first`` keeps ``min(first, L // 2)`` and ``last`` takes what remains up to its request
(pyreft shrinks both to ``L // 2``, which leaves a one-token prompt with no intervention at all
under ``l1``; reftkit keeps the last token).

A count is at most :data:`MAX_POSITION_COUNT` (config time) and at most the model's own limit
(``max_position_embeddings``, ``n_positions``...: attach time); ``"all"`` edits every token.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

import torch

_TERM = re.compile(r"^([fl])([0-9]+)$")
#: the largest count a position term may give (``f65536``). Each slot costs memory in every call whatever the
#: sequence's length, so a count is refused here, at config time, rather than allocated; at attach time the model's
#: own limit (``max_position_embeddings``, ``n_positions``...) bounds it further. Longer spans: use ``"all"``.
MAX_POSITION_COUNT = 65_536


class PositionError(ValueError):
    """A malformed position spec or impossible explicit locations; names the field and value."""


@dataclass(frozen=True)
class PositionSpec:
    """``first`` tokens from the start and ``last`` tokens from the end, or ``every`` token."""

    first: int = 0
    last: int = 0
    every: bool = False

    def __post_init__(self) -> None:
        for name in ("first", "last"):
            n = getattr(self, name)
            if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= MAX_POSITION_COUNT:
                raise PositionError(f"PositionSpec.{name}={n!r} must be an int in 0..{MAX_POSITION_COUNT} "
                                    "(reftkit.positions.MAX_POSITION_COUNT)")

    @property
    def slots(self) -> int | None:
        """Slots per example; ``None`` for ``all`` (depends on the sequence length)."""
        return None if self.every else self.first + self.last

    def __str__(self) -> str:
        if self.every:
            return "all"
        return "+".join(t for t in (f"f{self.first}" if self.first else "", f"l{self.last}" if self.last else "") if t)


def parse_positions(spec: str | PositionSpec, field: str = "positions") -> PositionSpec:
    """Parse ``"f7+l7"``, ``"l1"``, ``"f3"``, ``"l2+f1"`` or ``"all"``."""
    if isinstance(spec, PositionSpec):
        return spec
    if not isinstance(spec, str) or not spec.strip():
        raise PositionError(f"{field}={spec!r} must be a string such as 'f7+l7', 'l1', 'f3' or 'all'")
    text = spec.strip().lower()
    if text == "all":
        return PositionSpec(every=True)
    counts = {"f": None, "l": None}
    for term in text.split("+"):
        match = _TERM.match(term.strip())
        if not match:
            raise PositionError(f"{field}={spec!r}: term {term!r} is not of the form f<N> or l<N>")
        kind, digits = match.group(1), match.group(2)
        # compared as text first: int() of thousands of digits is slow, then refused by Python itself
        n = int(digits) if len(digits.lstrip("0")) <= len(str(MAX_POSITION_COUNT)) else MAX_POSITION_COUNT + 1
        if n > MAX_POSITION_COUNT:
            raise PositionError(f"{field}={spec!r}: {kind}{digits} exceeds the cap of {MAX_POSITION_COUNT} positions "
                                f"(reftkit.positions.MAX_POSITION_COUNT); to edit every token use positions='all'")
        if counts[kind] is not None:
            raise PositionError(f"{field}={spec!r}: '{kind}' appears twice")
        if n <= 0:
            raise PositionError(f"{field}={spec!r}: {kind}{n} selects no token; counts must be >= 1")
        counts[kind] = n
    return PositionSpec(first=counts["f"] or 0, last=counts["l"] or 0)


def split_untied(spec: PositionSpec) -> tuple[PositionSpec, PositionSpec] | None:
    """pyreft's untied layout: ``fN+lM`` -> one intervention for the first N, one for the last M."""
    if spec.every or not (spec.first and spec.last):
        return None
    return PositionSpec(first=spec.first), PositionSpec(last=spec.last)


def check_attention_mask(attention_mask: object, batch: int, length: int, what: str = "attention_mask",
                         ref: str = "input_ids", cached: bool = False) -> None:
    """Refuse a mask that cannot describe the inputs' tokens: not a tensor, not 2-D or 4-D, or of another shape
    (a wrong length would put positions on the wrong tokens or fail inside a hook). ``cached``: the call
    continues from a KV cache, whose mask covers the cached tokens too, so it may be longer."""
    if attention_mask is None:
        return
    if not isinstance(attention_mask, torch.Tensor):
        raise PositionError(f"{what} is a {type(attention_mask).__name__}; pass a tensor of shape "
                            f"[{batch}, {length}] (1 = real token, 0 = padding), the shape of {ref}")
    if attention_mask.dim() == 4:  # a ready-made [batch, 1 | heads, query, key] mask (custom attention patterns)
        if attention_mask.shape[0] not in (1, batch) or attention_mask.shape[2] != length:
            raise PositionError(f"{what} has shape {tuple(attention_mask.shape)}; a 4-D mask must be [{batch} (or 1), "
                                f"heads, {length}, keys] for {ref} of shape {(batch, length)}")
        return
    if attention_mask.dim() != 2:
        raise PositionError(f"{what} has shape {tuple(attention_mask.shape)}; pass a 2-D mask of shape "
                            f"[{batch}, {length}] (1 = real token, 0 = padding), the shape of {ref}")
    longer = cached and attention_mask.shape[0] == batch and attention_mask.shape[1] >= length
    if tuple(attention_mask.shape) != (batch, length) and not longer:
        raise PositionError(f"{what} has shape {tuple(attention_mask.shape)} but {ref} has shape "
                            f"{(batch, length)}; they must match (one mask entry per token)")


def sequence_extent(attention_mask: torch.Tensor | None, batch: int, length: int,
                    device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(start, length) of the real tokens of each example, from a left- or right-padded mask.

    ``length`` counts the real tokens; for a mask with holes (``[1, 0, 1, 1]``) use :func:`real_tokens`
    too, so positions land on real tokens only."""
    if attention_mask is None:
        return (torch.zeros(batch, dtype=torch.long, device=device),
                torch.full((batch,), length, dtype=torch.long, device=device))
    if attention_mask.dim() != 2 or tuple(attention_mask.shape) != (batch, length):
        raise PositionError(f"attention_mask has shape {tuple(attention_mask.shape)}; positions from the config "
                            f"need a [batch, seq] mask of shape {(batch, length)}, or pass intervention_locations")
    mask = attention_mask.to(device=device) != 0
    start = mask.to(torch.uint8).argmax(dim=1)  # first 1 (0 when the row is all padding)
    return start, mask.sum(dim=1)


def real_tokens(attention_mask: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    """``[batch, seq]``: column j holds the index of each example's j-th real token (columns past its count
    are unused). For a left- or right-padded mask that is ``start + j``; a mask with holes skips them.
    ``None`` without a mask (every token is real)."""
    if attention_mask is None:
        return None
    mask = attention_mask.to(device=device) != 0
    batch, length = mask.shape
    rank = mask.long().cumsum(1) - 1
    # padding goes to a spare column, dropped: each real token writes its own index at its rank
    target = torch.where(mask, rank, length)
    index = torch.arange(length, device=device).expand(batch, length)
    table = torch.zeros(batch, length + 1, dtype=torch.long, device=device)
    return table.scatter_(1, target, index)[:, :length]


def locate_from_mask(specs: list[PositionSpec], attention_mask: torch.Tensor | None, batch: int, length: int,
                     device: torch.device) -> torch.Tensor:
    """``[batch, K, P]`` for inputs of ``[batch, length]`` tokens: :func:`locate_all` over the real tokens of
    ``attention_mask`` (left or right padding, or holes)."""
    start, lengths = sequence_extent(attention_mask, batch, length, device)
    return locate_all(specs, start, lengths, length, real_tokens(attention_mask, device))


def locate_sequences(specs: list[PositionSpec], sequences: list[str | None],
                     views: dict[str | None, tuple[torch.Tensor | None, int] | None], batch: int,
                     device: torch.device) -> torch.Tensor:
    """``[batch, K, P]`` for an encoder-decoder call: each spec located over the sequence its slot's tensor runs
    along (``views``: sequence -> ``(attention mask, length)``, or ``None`` when this call does not run it, whose
    slots then get no positions)."""
    located: dict[tuple[PositionSpec, str | None], torch.Tensor] = {}
    per = []
    for spec, seq in zip(specs, sequences):
        if views.get(seq) is None:
            per.append(torch.full((batch, 1), -1, dtype=torch.long, device=device))
            continue
        if (spec, seq) not in located:
            mask, length = views[seq]
            located[(spec, seq)] = locate_from_mask([spec], mask, batch, length, device)[:, 0]
        per.append(located[(spec, seq)])
    return stack_locations(per)


def check_sequence_bounds(locations: torch.Tensor, sequences: list[str | None], lengths: dict[str | None, int],
                          what: str = "intervention_locations") -> None:
    """Refuse explicit locations past the end of the sequence each slot's tensor runs along (an encoder-decoder
    model's slots index the encoder's or the decoder's tokens)."""
    for k, seq in enumerate(sequences):
        n = lengths.get(seq)
        bad = locations[:, k] >= n if n is not None else None
        if bad is not None and bool(bad.any()):
            b, p = (int(i) for i in bad.nonzero()[0])
            raise PositionError(f"{what}[{b}, {k}, {p}] = {int(locations[b, k, p])} is outside the {seq} sequence "
                                f"that intervention {k} indexes (valid: 0..{n - 1}, or -1 for an empty slot)")


def locate(spec: PositionSpec, start: torch.Tensor, lengths: torch.Tensor, width: int,
           tokens: torch.Tensor | None = None) -> torch.Tensor:
    """Absolute token indices ``[batch, slots]`` (``-1`` = empty) for one spec.

    ``width`` is the padded sequence length (used by ``all``). ``tokens`` (from :func:`real_tokens`) maps
    the j-th real token to its index, for masks with holes; without it the real tokens are
    ``start .. start + length - 1``."""
    if tokens is not None:
        rel = locate(spec, torch.zeros_like(start), lengths, width)
        return torch.where(rel >= 0, tokens.gather(1, rel.clamp_min(0)), -1)
    device = lengths.device
    if spec.every:
        rel = torch.arange(width, device=device).expand(len(lengths), width)
        return torch.where(rel < lengths[:, None], rel + start[:, None], -1)
    want_first, want_last = spec.first, spec.last
    fits = lengths >= want_first + want_last
    n_first = torch.where(fits, want_first, torch.clamp(lengths // 2, max=want_first)) if want_last else \
        torch.clamp(lengths, max=want_first)
    n_last = torch.clamp(lengths - n_first, max=want_last)
    parts = []
    if want_first:
        j = torch.arange(want_first, device=device)
        parts.append(torch.where(j < n_first[:, None], start[:, None] + j, -1))
    if want_last:
        j = torch.arange(want_last, device=device)
        pos = start[:, None] + lengths[:, None] - n_last[:, None] + j
        parts.append(torch.where(j < n_last[:, None], pos, -1))
    return torch.cat(parts, dim=1)


def locate_all(specs: list[PositionSpec], start: torch.Tensor, lengths: torch.Tensor, width: int,
               tokens: torch.Tensor | None = None) -> torch.Tensor:
    """``[batch, K, P]`` for one spec per intervention, locating each distinct spec once (``tokens``: as
    in :func:`locate`)."""
    located: dict[PositionSpec, torch.Tensor] = {}
    for spec in specs:
        if spec not in located:
            located[spec] = locate(spec, start, lengths, width, tokens)
    return stack_locations([located[spec] for spec in specs])


def stack_locations(per_intervention: list[torch.Tensor]) -> torch.Tensor:
    """Pad each ``[batch, P_k]`` with -1 to a common width and stack to ``[batch, K, P]``."""
    first = per_intervention[0]
    if all(t is first for t in per_intervention):  # one spec for all: a view, no copies
        return first.unsqueeze(1).expand(-1, len(per_intervention), -1)
    width = max(t.shape[1] for t in per_intervention)
    padded = [t if t.shape[1] == width else torch.nn.functional.pad(t, (0, width - t.shape[1]), value=-1)
              for t in per_intervention]
    return torch.stack(padded, dim=1)


def check_locations(locations: object, batch: int, length: int, count: int,
                    what: str = "intervention_locations") -> torch.Tensor:
    """Validate explicit ``intervention_locations`` and return them as ``[batch, count, P]``.

    Accepted: ``[batch, P]`` (every intervention), ``[batch, 1, P]`` (the same, as pyreft-style data modules
    built with the base model give it) or ``[batch, count, P]``, integer indices, ``-1`` = empty slot;
    a tensor or a rectangular nested list."""
    shape_help = (f"pass a LongTensor of token indices, [batch, positions] or [batch, {count}, positions] "
                  "(one row per intervention, in the order of reft.interventions), -1 padded")
    if isinstance(locations, (str, bytes)):
        raise PositionError(f"{what}={locations!r} is a string; position strings such as 'l1' go in the config "
                            f"(positions=...); here {shape_help}")
    if not isinstance(locations, torch.Tensor):
        if not isinstance(locations, (list, tuple)) and not hasattr(locations, "__array__"):
            raise TypeError(f"{what} is a {type(locations).__name__}; {shape_help}")
        try:
            locations = torch.as_tensor(locations)
        except (ValueError, TypeError, RuntimeError) as err:
            raise PositionError(f"{what} is a {type(locations).__name__} that is not a rectangular array of "
                                f"integers (ragged rows?): {err}; pad every row to one length with -1, or "
                                f"{shape_help}") from None
    if locations.dtype.is_floating_point or locations.dtype.is_complex or locations.dtype == torch.bool:
        raise PositionError(f"{what} has dtype {locations.dtype} (shape {tuple(locations.shape)}); it must be an "
                            f"integer tensor: {shape_help}")
    locations = locations.long()
    if locations.dim() == 2:
        locations = locations[:, None, :].expand(-1, count, -1)
    elif locations.dim() == 3 and locations.shape[1] == 1 and count > 1:
        locations = locations.expand(-1, count, -1)  # [B, 1, P]: one set of positions for every intervention
    if locations.dim() != 3:
        hint = " (for one example, add the batch axis: locations[None])" if locations.dim() == 1 else ""
        raise PositionError(
            f"{what} has shape {tuple(locations.shape)}; expected [batch, positions] "
            f"or [batch, interventions, positions]{hint}")
    if locations.shape[0] != batch:
        raise PositionError(f"{what} has batch size {locations.shape[0]}, the inputs {batch} (shape "
                            f"{tuple(locations.shape)} given)")
    if locations.shape[1] != count:
        raise PositionError(
            f"{what} has {locations.shape[1]} intervention rows; this model has {count} interventions (in the "
            f"order of reft.interventions), or pass 1 row for all of them (shape {tuple(locations.shape)} given)")
    bad = (locations < -1) | (locations >= length)
    if bool(bad.any()):
        b, k, p = (int(i) for i in bad.nonzero()[0])
        raise PositionError(
            f"{what}[{b}, {k}, {p}] = {int(locations[b, k, p])} is outside the sequence "
            f"(valid: 0..{length - 1}, or -1 for an empty slot)")
    # a token listed twice would be written twice and receive its gradient twice
    ordered = locations.sort(dim=-1).values
    twice = (ordered[..., 1:] == ordered[..., :-1]) & (ordered[..., 1:] >= 0)
    if bool(twice.any()):
        b, k, p = (int(i) for i in twice.nonzero()[0])
        raise PositionError(f"{what}[{b}, {k}] lists token {int(ordered[b, k, p])} twice")
    return locations


# -- editing the rows at located positions (the hooks' gather / scatter) ---------------------------
def known_all_valid(valid: torch.Tensor) -> bool:
    """Whether every slot of ``valid`` is filled, where that answer is free: on CPU, in eager mode.

    ``edit_rows``'s fast path needs it on the host. On an accelerator reading it is a device sync per
    call, and inside ``torch.compile`` a graph break (a host read of a traced tensor), so both take the
    masked path instead, which is correct for any mask."""
    return valid.device.type == "cpu" and not torch.compiler.is_compiling() and bool(valid.all())


def gather_rows(h: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``h[b, idx[b, p]]`` as ``[B, P, W]``; -1 slots read token 0 (their rows are never used)."""
    gidx = idx.clamp_min(0).unsqueeze(-1).expand(-1, -1, h.shape[-1])
    return h.gather(1, gidx)


def edit_rows(h: torch.Tensor, idx: torch.Tensor, valid: torch.Tensor, all_valid: bool,
              fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Return ``h`` (``[B, T, D]``) with ``fn`` applied to the rows ``idx`` (``[B, P]``), out of place."""
    width = h.shape[-1]
    if all_valid:
        gidx = idx.unsqueeze(-1).expand(-1, -1, width)
        return h.scatter(1, gidx, fn(h.gather(1, gidx)))
    slots = torch.arange(idx.shape[1], device=idx.device)
    any_valid = valid.any(1, keepdim=True)
    first = valid.to(torch.uint8).argmax(1, keepdim=True)  # first valid slot; 0 when none
    safe = torch.where(valid, idx, idx.gather(1, first).clamp_min(0))
    gidx = safe.unsqueeze(-1).expand(-1, -1, width)
    rows = h.gather(1, gidx)
    value = torch.where(any_valid.unsqueeze(-1), fn(rows), rows)
    # Empty slots point at the example's first valid token and write a detached copy of its value:
    # scatter then never sees two different values for one index, and the gradient reaches each
    # written token exactly once (through its "primary" slot).
    primary = valid | ((slots == 0) & ~any_valid)
    source = torch.where(valid, slots, first).unsqueeze(-1).expand(-1, -1, width)
    value = torch.where(primary.unsqueeze(-1), value, value.detach().gather(1, source))
    return h.scatter(1, gidx, value)
