"""Model FLOPs of a ReFT training epoch, and the peak they are divided by for the model FLOPs
utilisation (MFU) of the llama7b recipe.
"""
from __future__ import annotations

import torch
from synthetic_batches import Batch

H100_BF16_DENSE_FLOPS = 989e12  # NVIDIA H100 SXM datasheet, dense bf16 tensor-core peak


def training_flops(model: torch.nn.Module, intervened_layers: list[int], batches: list[Batch]) -> float:
    """Model FLOPs of one epoch of a ReFT step, for MFU: forward 2·N·T over every real token (N = the
    decoder's and head's weights; the head on labelled rows only), backward 2·N·T for the activation
    gradients of the layers from the earliest intervention up (no weight gradients: the base is frozen),
    plus attention's 4·T·ctx·d per layer forward (×2 in the layers backward runs through)."""
    cfg = model.config
    layers, d = cfg.num_hidden_layers, cfg.hidden_size
    per_layer = sum(x.numel() for x in model.model.layers[0].parameters())
    head = cfg.vocab_size * d
    first = min(intervened_layers)
    total = 0.0
    for b in batches:
        t = b.real_tokens
        labelled = int((b.labels[:, 1:] != -100).sum())
        ctx = float((b.mask.sum(1).float() ** 2).sum()) / 2  # causal attention: ~L²/2 query-key pairs per row
        fwd = 2 * per_layer * layers * t + 2 * head * labelled + 4 * d * ctx * layers
        bwd = 2 * per_layer * (layers - first) * t + 2 * head * labelled + 8 * d * ctx * (layers - first)
        total += fwd + bwd
    return total
