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


def model_dims(model: torch.nn.Module) -> dict:
    """What the per-batch count needs: layers, width, weights per decoder layer, LM head size."""
    cfg = model.config
    return {"layers": cfg.num_hidden_layers, "d": cfg.hidden_size, "vocab": cfg.vocab_size,
            "per_layer": sum(x.numel() for x in model.model.layers[0].parameters())}



def batch_flops(dims: dict, shape: list[int], first: int, path: str, cached: bool = False) -> float:
    """FLOPs one training step spends on a batch of ``shape`` = ``[rows, width, labelled, prefix, suffix]``
    (``bench_recipe._batch_shape``: ``prefix`` / ``suffix`` are the widths suffix training runs the batch at),
    counted on the shapes each path computes.

    ``path``: ``"hf"`` (every position through every layer and the LM head, as pyreft's loss), ``"label_only"``
    (the same, the head on labelled rows only: reftkit's full path), ``"suffix"`` (reftkit's suffix training:
    the prefix ``[B, prefix]`` forward without grad, the suffix ``[B, suffix]`` forward and backward on its
    cache; ``cached``: the prefix and the layers below ``first`` are read from the store). Linear layers cost
    2 FLOPs per weight per token forward and 2 more backward (activation gradients only: the base is frozen);
    attention 4·d per query-key pair forward, 8·d backward; backward runs only from layer ``first``."""
    n, d, per_layer, head = dims["layers"], dims["d"], dims["per_layer"], dims["vocab"] * dims["d"]
    rows, width, labelled, prefix, suffix = shape
    upper = n - first

    def layers_cost(queries: int, keys: int, count: int, backward: bool) -> float:
        linear, attention = 2 * per_layer * rows * queries, 4 * d * rows * queries * keys
        return count * (linear * (2 if backward else 1) + attention * (3 if backward else 1))

    if path in ("hf", "label_only"):
        head_rows = rows * width if path == "hf" else labelled
        return layers_cost(width, width, first, False) + layers_cost(width, width, upper, True) + 4 * head * head_rows
    if path != "suffix":
        raise ValueError(f"path={path!r}: 'hf', 'label_only' or 'suffix'")
    total = layers_cost(suffix, prefix + suffix, upper, True) + 4 * head * labelled
    if not cached:
        total += layers_cost(prefix, prefix, n, False) + layers_cost(suffix, prefix + suffix, first, False)
    return total
