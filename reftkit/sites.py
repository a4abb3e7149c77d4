"""What a resolved intervention site is: a module, a hook kind, a width, and (for fused q/k/v
projections) which columns of the module's output belong to the requested component."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

__all__ = ["FusedSlice", "Site", "StructureError"]


class StructureError(ValueError):
    """A site cannot be resolved; the message names the offending field and value."""


@dataclass(frozen=True)
class FusedSlice:
    """Columns of a fused projection's output that belong to one of q, k or v.

    The last dim is viewed as ``[groups, group_width]``; inside each group the
    columns ``start:stop`` are taken and the groups flattened back, giving
    ``groups * (stop - start)`` features.
    """

    groups: int
    group_width: int
    start: int
    stop: int

    @property
    def width(self) -> int:
        """Number of features :meth:`extract` returns."""
        return self.groups * (self.stop - self.start)

    def _grouped(self, full: Tensor) -> Tensor:
        if full.shape[-1] != self.groups * self.group_width:
            raise StructureError(
                f"full.shape[-1]={full.shape[-1]} does not match the fused layout "
                f"groups={self.groups} x group_width={self.group_width}")
        return full.unflatten(-1, (self.groups, self.group_width))

    def extract(self, full: Tensor) -> Tensor:
        """``[..., groups*group_width] -> [..., width]`` (a view where possible)."""
        return self._grouped(full)[..., self.start:self.stop].flatten(-2)

    def insert(self, full: Tensor, part: Tensor) -> Tensor:
        """Return a new tensor equal to ``full`` with this slice replaced by ``part``.

        Built with ``torch.cat`` rather than in-place assignment so that it is safe
        inside autograd (``full`` may be a saved activation) and gradients reach
        both ``part`` and the untouched columns of ``full``.
        """
        if part.shape[-1] != self.width:
            raise StructureError(f"part.shape[-1]={part.shape[-1]} must equal width={self.width}")
        g = self._grouped(full)
        p = part.to(g.dtype).unflatten(-1, (self.groups, self.stop - self.start))
        p = p.expand(*g.shape[:-1], p.shape[-1])
        return torch.cat([g[..., :self.start], p, g[..., self.stop:]], dim=-1).flatten(-2)


@dataclass(frozen=True)
class Site:
    """Where and how to hook one intervention.

    ``hook="input"``: forward-pre-hook, the tensor is the module's first input
    (``hidden_states``, positional or keyword).  ``hook="output"``: forward hook,
    the tensor is the output (its first element if it is a tuple).  When ``fused``
    is set, the intervention sees ``fused.extract(output)`` only.  When ``heads`` is
    set (head-level components), the tensor is viewed as ``[..., num_heads, head_dim]``
    and the intervention sees the selected heads, each a row of width ``width`` (= head_dim).
    """

    layer: int | None
    component: str
    module_path: str
    hook: Literal["input", "output"]
    width: int
    fused: FusedSlice | None = None
    heads: tuple[int, ...] | None = None
    num_heads: int | None = None
