"""How suffix training cuts a batch (:class:`SuffixBatch`) and moves the prefix's keys/values between the KV cache
of its own run and the left-aligned cache the suffix attends through."""
from __future__ import annotations

from typing import Any

import torch

__all__ = ["SuffixBatch", "stack_cache", "left_aligned_cache", "cache_of"]


class SuffixBatch:
    """One batch cut at per-example splits ``s`` and ends ``e``: the prefix ``[B, max s]`` right-padded (run first,
    without grad), the suffix ``[B, max(e - s)]`` right-padded with its positions, its next-token ``targets``
    (``targets[:, t]``: what suffix position t predicts) and shifted locations, and the mask over
    ``[prefix left-aligned | suffix]`` that the suffix run attends through. Tokens from ``e`` on are left out:
    no supervised prediction is read there, and in a causal model nothing before them depends on them."""

    def __init__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, labels: torch.Tensor,
                 locations: torch.Tensor, lengths: torch.Tensor, split: torch.Tensor, ends: torch.Tensor) -> None:
        device = input_ids.device
        batch, width = input_ids.shape
        self.split, self.lengths, self.ends = split, lengths, ends
        prefix_width = max(int(split.max()), 1)
        suffix_width = int((ends - split).max())
        columns = torch.arange(prefix_width, device=device)
        self.prefix_ids = input_ids[:, :prefix_width]
        self.prefix_mask = (columns[None] < split[:, None]).long()
        self.prefix_positions = columns[None].expand(batch, -1)
        offsets = torch.arange(suffix_width, device=device)
        self.valid = offsets[None] < (ends - split)[:, None]
        self.index = (split[:, None] + offsets[None]).clamp_max(width - 1)
        self.ids = input_ids.gather(1, self.index)
        self.positions = torch.minimum(split[:, None] + offsets[None], (ends - 1).clamp_min(0)[:, None])
        following = labels.to(device).gather(1, (self.index + 1).clamp_max(width - 1))
        self.targets = torch.where(self.valid, following, torch.full_like(following, -100))
        self.locations = torch.where((locations >= 0) & (locations < ends[:, None, None]),
                                     locations - split[:, None, None], -1)
        left = columns[None] >= (prefix_width - split)[:, None]  # the prefix sits right before the suffix
        self.left = left
        self.full_mask = torch.cat([left, self.valid], 1).long()


def stack_cache(cache: Any, start: int) -> torch.Tensor:
    """``[layers - start, 2, B, H, P, D]`` from a filled ``DynamicCache``."""
    layers = [(layer.keys, layer.values) for layer in cache.layers][start:]
    return torch.stack([torch.stack(pair) for pair in layers])


def left_aligned_cache(kv: torch.Tensor, suffix: SuffixBatch) -> Any:
    """The right-padded prefix keys/values moved so each example's prefix ends at the last column, pads zero."""
    width = kv.shape[-2]
    shift = (width - suffix.split)[:, None]
    source = (torch.arange(width, device=kv.device)[None] - shift).clamp_min(0)  # [B, P]
    index = source[None, None, :, None, :, None].expand(kv.shape[0], 2, -1, kv.shape[3], -1, kv.shape[5])
    # where, not a product: an example with an empty prefix ran fully masked rows, which may hold NaN
    moved = torch.where(suffix.left[None, None, :, None, :, None], kv.gather(4, index), 0)
    return cache_of([(moved[i, 0], moved[i, 1]) for i in range(kv.shape[0])])


def cache_of(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> Any:
    from transformers import DynamicCache

    return DynamicCache(ddp_cache_data=pairs)

