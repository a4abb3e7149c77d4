"""The label-only causal-LM loss: the backbone runs with the interventions active and the LM head sees
only the rows that carry a label, so no ``[B, T, vocab]`` logits are ever built."""
from __future__ import annotations

from typing import Any

import torch

from reftkit.anatomy import find_backbone_and_head, is_encoder_decoder
from reftkit.call_inputs import CALL_INPUTS
from reftkit.model import ReftModel

from .frozen_prefix import FrozenPrefixCache
from .label_only import label_only_loss, seq2seq_loss
from .suffix import SuffixTraining

__all__ = ["causal_lm_loss"]


def causal_lm_loss(reft: ReftModel, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                   labels: torch.Tensor | None = None, intervention_locations: torch.Tensor | None = None,
                   num_items_in_batch: torch.Tensor | int | None = None,
                   prefix_cache: FrozenPrefixCache | None = None, suffix_training: SuffixTraining | None = None,
                   **kwargs: Any) -> dict[str, torch.Tensor]:
    """Causal-LM cross entropy of ``reft`` on unshifted ``labels`` (an encoder-decoder model: the seq2seq loss of
    its decoder on ``labels``, from its full forward), with vocabulary logits only for the
    labelled positions: ``hidden[:, :-1]`` rows whose ``labels[:, 1:]`` is not -100 are gathered and
    only they go through the head. Returns ``{"loss", "logits" [N, vocab] of those rows (row-major)}``.

    Reduction is HF's: ``sum / num_items_in_batch`` when given (gradient-accumulation correct), else
    the mean over labelled tokens (0, not NaN, when a batch has none).

    ``prefix_cache``: a :class:`~reftkit.training.frozen_prefix.FrozenPrefixCache` of this ``reft``; batches whose
    examples it holds run only the layers from the earliest intervention on.

    ``suffix_training``: a :class:`~reftkit.training.suffix.SuffixTraining` of this ``reft``; batches it can take
    run autograd only from each example's first intervened or supervised token (same loss and gradients);
    the others run as without it (with ``prefix_cache`` when given).
    """
    if labels is None:
        raise ValueError("causal_lm_loss needs labels ([batch, seq], -100 where unsupervised)")
    if prefix_cache is not None and prefix_cache.reft is not reft:
        raise ValueError("prefix_cache was built for another ReftModel; build one per model")
    if suffix_training is not None and suffix_training.reft is not reft:
        raise ValueError("suffix_training was built for another ReftModel; build one per model")
    call = {k: kwargs.pop(k) for k in CALL_INPUTS if k in kwargs}  # e.g. a mixed-task batch's "tasks"
    if is_encoder_decoder(reft.model):
        # labels are the decoder's targets, not shifted against the input: the model's own forward builds the
        # decoder input from them (shifted right) and the loss reads every labelled position
        if prefix_cache is not None or suffix_training is not None:
            raise ValueError(f"{type(reft.model).__name__} is an encoder-decoder model: the prefix cache and suffix "
                             "training serve causal decoders only; train without them")
        # the class's forward, not reft(...): the trainer routes reft's own forward to this function
        out = ReftModel.forward(reft, input_ids=input_ids, attention_mask=attention_mask, labels=labels,
                                intervention_locations=intervention_locations, **call, **kwargs)
        loss, logits = seq2seq_loss(out.logits, labels, num_items_in_batch)
        return {"loss": loss, "logits": logits}
    parts = find_backbone_and_head(reft)
    if suffix_training is not None:
        out = suffix_training.loss(input_ids, attention_mask, labels, intervention_locations, num_items_in_batch,
                                   call, kwargs)
        if out is not None:
            return out
    with reft.intervening(input_ids, attention_mask, intervention_locations, kwargs.get("inputs_embeds"), **call):
        if parts is None:
            # Fallback: the model exposes no (backbone, head) pair we can trust to match its own
            # forward, so run it whole; it computes logits for every position (correct, costlier).
            out = reft.model(input_ids=input_ids, attention_mask=attention_mask, labels=labels,
                             num_items_in_batch=num_items_in_batch, **kwargs)
            return {"loss": out.loss, "logits": out.logits}
        backbone, head = parts

        def label_only(hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return label_only_loss(hidden, head, labels, num_items_in_batch)

        if prefix_cache is not None:
            hidden = prefix_cache.hidden_states(input_ids, attention_mask, score=lambda h: label_only(h)[0],
                                                **kwargs)
        else:
            hidden = backbone(input_ids=input_ids, attention_mask=attention_mask, **kwargs)[0]
    loss, logits = label_only(hidden)
    return {"loss": loss, "logits": logits}
