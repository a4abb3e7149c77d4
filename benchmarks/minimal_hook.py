"""The minimal hand-written baseline the benchmarks hold reftkit against: "the same math, no framework".

One ``register_forward_hook`` per intervened layer gathers the intervened rows at precomputed
indices, applies an intervention module and scatters the result back; the loss computes the head on
labelled rows only. Imports only torch, so the pyreft worker can use it inside pyreft's own venv.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F


def _layer_output(output):
    return output[0] if isinstance(output, tuple) else output


def _with_layer_output(output, h: torch.Tensor):
    return (h, *output[1:]) if isinstance(output, tuple) else h


def make_minimal_hook(intervention: torch.nn.Module, gidx_ref: dict, k: int) -> Callable:
    """The minimal hook: gather the rows, apply the intervention, scatter back (out of place).

    ``gidx_ref[k]`` is read at each call, so the caller can switch batches by updating the dict."""
    def hook(module, args, output):
        h = _layer_output(output)
        g = gidx_ref[k]
        return _with_layer_output(output, h.scatter(1, g, intervention(h.gather(1, g))))
    return hook


def gather_index(locs: torch.Tensor, width: int) -> dict[int, torch.Tensor]:
    """``[B, K, P]`` locations -> {k: ``[B, P, width]`` index for gather/scatter}."""
    return {k: locs[:, k, :, None].expand(-1, -1, width).contiguous() for k in range(locs.shape[1])}


def label_only_loss(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor,
                    labels: torch.Tensor) -> torch.Tensor:
    """Hand-written reference: backbone, then the head on labelled rows only."""
    hidden = model.model(input_ids=ids, attention_mask=mask).last_hidden_state
    targets = labels[:, 1:]
    keep = targets != -100
    return F.cross_entropy(model.lm_head(hidden[:, :-1][keep]).float(), targets[keep])
