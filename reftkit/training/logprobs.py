"""Per-token log-probabilities of a continuation given a prompt: the part every scorer of answers,
choices and completions shares.

For a continuation ``y = y_1 … y_T`` after a prompt ``x``, each token is scored as::

    log p(y_t | x, y_<t) = log_softmax(z_s)[y_t]

where ``z_s`` are the model's vocabulary logits at the position ``s`` that *predicts* ``y_t``: the
last real token before it (column ``c − 1`` for ``y_t`` at column ``c`` in an unbroken row; for the
first continuation token after a right-padded prompt, the prompt's last real token). Only those rows
are read, so ``[N, L, vocab]`` logits are never built when the model has a trustworthy (backbone,
LM head) pair (:func:`reftkit.anatomy.find_backbone_and_head`): the head runs on the read rows
alone. The log-softmax runs in float32.

* :func:`predicting_states` runs the model: ``(hidden states, head)``, or ``(logits, None)``;
* :func:`label_positions` turns causal-LM labels into positions, targets and a mask;
* :func:`continuation_logprobs` reads the rows and lays the log-probabilities out ``[N, T]``.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import torch
from torch import Tensor, nn

from reftkit.anatomy import find_backbone_and_head, is_encoder_decoder
from reftkit.model import ReftModel

__all__ = ["ContinuationLogprobs", "continuation_logprobs", "label_positions", "predicting_states",
           "seq2seq_logprobs"]


class ContinuationLogprobs(NamedTuple):
    """``token_logprobs`` ``[N, T]`` (0 where ``mask`` is False), ``mask`` ``[N, T]`` (bool) and
    ``rows`` ``[M, vocab]``: the float32 log-softmax rows of the ``M = mask.sum()`` scored tokens,
    row-major (for a KL term)."""

    token_logprobs: Tensor
    mask: Tensor
    rows: Tensor


def predicting_states(adapted: Any, input_ids: Tensor, attention_mask: Tensor | None,
                      **kwargs: Any) -> tuple[Tensor, nn.Module | None]:
    """Run ``adapted.model`` (a ReftModel, a weight-space model, or anything with that attribute; arm
    interventions around this call) on the batch. Returns ``(last hidden states [N, L, D], LM head)``
    when :func:`~reftkit.anatomy.find_backbone_and_head` finds a pair, else ``(logits [N, L, vocab],
    None)`` of the full forward — its last ``L`` columns, as a model that prepends virtual tokens
    returns more."""
    parts = find_backbone_and_head(adapted)
    if parts is None:
        # no (backbone, head) pair matching the model's own forward: run it whole (costlier)
        logits = adapted.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs).logits
        return logits[:, -input_ids.shape[1]:], None
    backbone, head = parts
    return backbone(input_ids=input_ids, attention_mask=attention_mask, **kwargs)[0], head


def label_positions(labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(positions, targets, mask)``, each ``[N, T]``, of unshifted causal-LM ``labels`` ``[N, L]``
    (-100 where nothing is scored): row ``n``'s ``t``-th labelled token ``labels[n, c]`` is
    ``targets[n, t]``, predicted at ``positions[n, t] = c − 1``. ``T`` is the most labelled tokens of
    any row; a label in column 0 has nothing before it and is ignored, as in a Hugging Face LM loss."""
    keep = labels[:, 1:] != -100
    lengths = keep.sum(1)
    width = int(lengths.max()) if len(lengths) else 0
    mask = torch.arange(width, device=labels.device)[None, :] < lengths[:, None]
    # masked_scatter fills row-major, so row n's labelled columns land in its first lengths[n] slots
    positions = torch.zeros(mask.shape, dtype=torch.long, device=labels.device)
    positions = positions.masked_scatter(mask, keep.nonzero()[:, 1])
    targets = torch.zeros_like(positions).masked_scatter(mask, labels[:, 1:][keep])
    return positions, targets, mask


def continuation_logprobs(states: Tensor, positions: Tensor, targets: Tensor, mask: Tensor,
                          head: Callable[[Tensor], Tensor] | None = None) -> ContinuationLogprobs:
    """``log p(y_t | x, y_<t)`` of ``targets`` ``[N, T]`` where ``mask`` ``[N, T]`` is True, read at
    ``states[n, positions[n, t]]``, the position that predicts ``targets[n, t]`` (see the module docstring).

    ``states``: ``[N, L, D]`` hidden states with ``head`` the LM head, applied to the read rows only, or
    ``[N, L, vocab]`` logits with ``head=None``. Entries where ``mask`` is False are ignored; a row
    with none True (an empty continuation) scores zeros. Differentiable in ``states`` and ``head``.
    """
    mask = mask.to(states.device).bool()
    if positions.shape != mask.shape or targets.shape != mask.shape or mask.shape[0] != states.shape[0]:
        raise ValueError(f"positions {tuple(positions.shape)}, targets {tuple(targets.shape)} and mask "
                         f"{tuple(mask.shape)} must all be [N, T] with N = {states.shape[0]}, the rows of states")
    columns = positions.to(states.device)[mask]
    # a negative column would silently read from the right end of the row
    if bool(((columns < 0) | (columns >= states.shape[1])).any()):
        raise ValueError(f"positions must be columns 0..{states.shape[1] - 1} of states where mask is True")
    picked = states[mask.nonzero()[:, 0], columns]  # [M, D] or [M, vocab]: the predicting rows only
    rows = (picked if head is None else head(picked)).float().log_softmax(-1)
    values = rows.gather(-1, targets.to(states.device)[mask][:, None]).squeeze(-1)
    return ContinuationLogprobs(values.new_zeros(mask.shape).masked_scatter(mask, values), mask, rows)


def seq2seq_logprobs(adapted: Any, input_ids: Tensor, attention_mask: Tensor | None, labels: Tensor,
                     intervention_locations: Tensor | None = None, **kwargs: Any) -> ContinuationLogprobs:
    """An encoder-decoder model's ``log p(y_t | x, y_<t)``: ``input_ids`` is the prompt ``x`` (the encoder's
    input) and ``labels`` ``[N, T]`` the continuation ``y`` (the decoder's targets, -100 where nothing is
    scored, unshifted: column t is scored at decoder position t). The decoder reads the labels shifted right
    (the model's ``prepare_decoder_input_ids_from_labels``), masked where a label is -100. ``adapted``: a
    ReftModel (its encoder entries act on the prompt, its decoder entries over the decoder's input), or a
    model with the same ``.model`` surface; ``intervention_locations`` as a ReftModel call takes them."""
    from transformers import PreTrainedModel

    # a Hugging Face model itself, or a wrapper of one (BART has a .model of its own: it is not a wrapper)
    hf = adapted if isinstance(adapted, PreTrainedModel) or not hasattr(adapted, "model") else adapted.model
    if not is_encoder_decoder(hf):
        raise ValueError(f"seq2seq_logprobs scores an encoder-decoder model; {type(hf).__name__} is not one")
    labels = labels.to(input_ids.device)
    decoder = {"decoder_input_ids": hf.prepare_decoder_input_ids_from_labels(labels=labels),
               "decoder_attention_mask": torch.cat([torch.ones_like(labels[:, :1]),
                                                    (labels[:, :-1] != -100).long()], dim=1)}
    if isinstance(adapted, ReftModel):
        with adapted.intervening(input_ids, attention_mask, intervention_locations, decoder_inputs=decoder):
            logits = hf(input_ids=input_ids, attention_mask=attention_mask, **decoder, **kwargs).logits
    else:
        logits = (adapted if hf is adapted else adapted.model)(input_ids=input_ids, attention_mask=attention_mask,
                                                               **decoder, **kwargs).logits
    # label_positions reads unshifted causal labels (column c predicted at c - 1): one -100 column in front
    # makes it read column t at position t, as a decoder predicts its own targets
    shifted = torch.cat([torch.full_like(labels[:, :1], -100), labels], dim=1)
    return continuation_logprobs(logits, *label_positions(shifted), None)
