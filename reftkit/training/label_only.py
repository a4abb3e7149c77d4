"""The label-only causal-LM loss of a backbone's hidden states: the head sees only the labelled rows. Shared by
:mod:`~reftkit.training.causal_lm` and :mod:`~reftkit.training.suffix`."""
from __future__ import annotations

import torch
from torch import nn
from torch.autograd.function import once_differentiable

__all__ = ["label_only_loss", "next_token_loss", "cross_entropy_sum", "seq2seq_loss"]


class _CrossEntropySum(torch.autograd.Function):
    """``sum_i (logsumexp(z_i) - z_i[y_i])`` with the gradient ``softmax(z_i) - onehot(y_i)`` written in one pass.

    Same value as ``F.cross_entropy(z, y, reduction="sum")``; on CPU about ten times faster for a 49k vocabulary,
    because torch's log-softmax and NLL backward each sweep the ``[N, vocab]`` matrix several times (they were a
    tenth of a suffix-training step)."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        lse = torch.logsumexp(logits, dim=-1)
        ctx.save_for_backward(logits, lse, targets)
        return (lse - logits.gather(1, targets[:, None]).squeeze(1)).sum()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output: torch.Tensor) -> tuple[torch.Tensor, None]:
        logits, lse, targets = ctx.saved_tensors
        grad = torch.sub(logits, lse[:, None]).exp_().mul_(grad_output)
        grad[torch.arange(targets.shape[0], device=grad.device), targets] -= grad_output
        return grad, None


def cross_entropy_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed cross entropy of ``logits [N, vocab]`` against class indices ``targets [N]`` (no ignore index: pass
    only the rows that have a label)."""
    if logits.dim() != 2 or targets.shape != logits.shape[:1]:
        raise ValueError(f"cross_entropy_sum: logits {tuple(logits.shape)} must be [N, vocab] and targets "
                         f"{tuple(targets.shape)} [N]")
    return _CrossEntropySum.apply(logits, targets)


def label_only_loss(hidden: torch.Tensor, head: nn.Module, labels: torch.Tensor,
                     num_items_in_batch: torch.Tensor | int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross entropy of the rows of ``hidden[:, :-1]`` whose ``labels[:, 1:]`` are not -100, with vocabulary logits
    for those rows only: ``(loss, logits [N, vocab])``; ``sum / num_items_in_batch`` when given, else the mean."""
    return next_token_loss(hidden[:, :-1], head, labels[:, 1:], num_items_in_batch)


def next_token_loss(hidden: torch.Tensor, head: nn.Module, targets: torch.Tensor,
                    num_items_in_batch: torch.Tensor | int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`label_only_loss` with the targets already shifted: ``targets[:, t]`` is what ``hidden[:, t]``
    predicts (-100: nothing), so a caller can leave out positions whose prediction nobody reads."""
    targets = targets.to(hidden.device)
    keep = targets != -100
    rows = hidden[keep]  # [N, D]: boolean indexing gathers only the labelled rows
    logits = head(rows).float()  # HF computes the loss in float32 too
    return _per_item(cross_entropy_sum(logits, targets[keep]), keep, num_items_in_batch), logits


def seq2seq_loss(logits: torch.Tensor, labels: torch.Tensor,
                 num_items_in_batch: torch.Tensor | int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """An encoder-decoder model's loss: ``logits [B, T, vocab]`` at position t score ``labels[:, t]`` (no shift; the
    decoder's input is the labels shifted right). ``(loss, logits [N, vocab] of the labelled rows)``; reduced as
    :func:`label_only_loss`, so with ``num_items_in_batch`` it is gradient-accumulation correct."""
    labels = labels.to(logits.device)
    keep = labels != -100
    rows = logits[keep].float()
    return _per_item(cross_entropy_sum(rows, labels[keep]), keep, num_items_in_batch), rows


def _per_item(loss: torch.Tensor, keep: torch.Tensor, num_items_in_batch: torch.Tensor | int | None) -> torch.Tensor:
    """A summed loss over the ``keep`` rows divided by ``num_items_in_batch`` (the trainer's count over the whole
    accumulated batch: gradient-accumulation correct), or by the rows kept when it is not given."""
    if num_items_in_batch is None:
        return loss / keep.sum().clamp_min(1)
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(loss.device)
    return loss / num_items_in_batch
