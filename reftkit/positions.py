"""Token positions: pyreft's grammar (``f7+l7``, ``l1``, ``f3``) plus ``all``, turned into index
tensors once per call.

A resolved location tensor has shape ``[batch, positions]`` with ``-1`` marking an empty slot.
Positions count from the first real (non-padding) token of each example, so the same spec picks
the same tokens under left padding, right padding or no padding.

When an example is shorter than ``first + last`` tokens, the two ranges are shrunk so they never
overlap: ``first`` keeps ``min(first, L // 2)`` and ``last`` takes what remains up to its request
(pyreft shrinks both to ``L // 2``, which leaves a one-token prompt with no intervention at all
under ``l1``; reftkit keeps the last token).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch

_TERM = re.compile(r"^([fl])(\d+)$")


class PositionError(ValueError):
    """A malformed position spec or impossible explicit locations; names the field and value."""


@dataclass(frozen=True)
class PositionSpec:
    """``first`` tokens from the start and ``last`` tokens from the end, or ``every`` token."""

    first: int = 0
    last: int = 0
    every: bool = False

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
        kind, n = match.group(1), int(match.group(2))
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


def sequence_extent(attention_mask: torch.Tensor | None, batch: int, length: int,
                    device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(start, length) of the real tokens of each example, from a left- or right-padded mask."""
    if attention_mask is None:
        return (torch.zeros(batch, dtype=torch.long, device=device),
                torch.full((batch,), length, dtype=torch.long, device=device))
    mask = attention_mask.to(device=device, dtype=torch.long)
    start = mask.argmax(dim=1)  # first 1 (0 when the row is all padding)
    return start, mask.sum(dim=1)


def locate(spec: PositionSpec, start: torch.Tensor, lengths: torch.Tensor, width: int) -> torch.Tensor:
    """Absolute token indices ``[batch, slots]`` (``-1`` = empty) for one spec.

    ``width`` is the padded sequence length (used by ``all``)."""
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


def locate_all(specs: list[PositionSpec], start: torch.Tensor, lengths: torch.Tensor, width: int) -> torch.Tensor:
    """``[batch, K, P]`` for one spec per intervention, locating each distinct spec once."""
    located: dict[PositionSpec, torch.Tensor] = {}
    for spec in specs:
        if spec not in located:
            located[spec] = locate(spec, start, lengths, width)
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


def check_locations(locations: torch.Tensor, batch: int, length: int, count: int) -> torch.Tensor:
    """Validate explicit ``intervention_locations`` and return them as ``[batch, count, P]``."""
    if not isinstance(locations, torch.Tensor):
        locations = torch.as_tensor(locations)
    if locations.dtype.is_floating_point or locations.dtype == torch.bool:
        raise PositionError(f"intervention_locations has dtype {locations.dtype}; it must be an integer tensor")
    locations = locations.long()
    if locations.dim() == 2:
        locations = locations[:, None, :].expand(-1, count, -1)
    if locations.dim() != 3:
        raise PositionError(
            f"intervention_locations has shape {tuple(locations.shape)}; expected [batch, positions] "
            "or [batch, interventions, positions]")
    if locations.shape[0] != batch:
        raise PositionError(f"intervention_locations has batch size {locations.shape[0]}, the inputs {batch}")
    if locations.shape[1] != count:
        raise PositionError(
            f"intervention_locations has {locations.shape[1]} intervention rows; this model has {count} "
            "interventions (in the order of reft.interventions)")
    bad = (locations < -1) | (locations >= length)
    if bool(bad.any()):
        b, k, p = (int(i) for i in bad.nonzero()[0])
        raise PositionError(
            f"intervention_locations[{b}, {k}, {p}] = {int(locations[b, k, p])} is outside the sequence "
            f"(valid: 0..{length - 1}, or -1 for an empty slot)")
    # a token listed twice would be written twice and receive its gradient twice
    ordered = locations.sort(dim=-1).values
    twice = (ordered[..., 1:] == ordered[..., :-1]) & (ordered[..., 1:] >= 0)
    if bool(twice.any()):
        b, k, p = (int(i) for i in twice.nonzero()[0])
        raise PositionError(f"intervention_locations[{b}, {k}] lists token {int(ordered[b, k, p])} twice")
    return locations
