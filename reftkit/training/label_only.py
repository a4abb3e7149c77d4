"""The label-only causal-LM loss of a backbone's hidden states: the head sees only the labelled rows. Shared by
:mod:`~reftkit.training.causal_lm` and :mod:`~reftkit.training.suffix`."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["label_only_loss"]


def label_only_loss(hidden: torch.Tensor, head: nn.Module, labels: torch.Tensor,
                     num_items_in_batch: torch.Tensor | int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross entropy of the rows of ``hidden[:, :-1]`` whose ``labels[:, 1:]`` are not -100, with vocabulary logits
    for those rows only: ``(loss, logits [N, vocab])``; ``sum / num_items_in_batch`` when given, else the mean."""
    targets = labels[:, 1:].to(hidden.device)
    keep = targets != -100
    rows = hidden[:, :-1][keep]  # [N, D]: boolean indexing gathers only the labelled rows
    logits = head(rows).float()  # HF computes the loss in float32 too
    loss = F.cross_entropy(logits, targets[keep], reduction="sum")
    if num_items_in_batch is None:
        loss = loss / keep.sum().clamp_min(1)
    else:
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(loss.device)
        loss = loss / num_items_in_batch
    return loss, logits
