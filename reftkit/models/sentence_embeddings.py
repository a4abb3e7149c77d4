"""Sentence embeddings from an encoder such as the embedded all-MiniLM-L6-v2."""

from __future__ import annotations

from typing import Sequence

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase


def encode_sentences(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    sentences: Sequence[str],
    *,
    normalize: bool = True,
    batch_size: int = 64,
    max_length: int = 256,
) -> torch.Tensor:
    """Sentence embeddings from an encoder (all-MiniLM-L6-v2 recipe).

    Mean-pools the last hidden state over non-padding tokens and (by
    default) L2-normalises, as sentence-transformers does for
    all-MiniLM-L6-v2.

    Returns:
        A float tensor of shape ``(len(sentences), hidden_size)`` on CPU.
    """
    device = next(model.parameters()).device
    chunks = []
    with torch.no_grad():
        for start in range(0, len(sentences), batch_size):
            batch = tokenizer(
                list(sentences[start : start + batch_size]),
                padding=True,
                truncation=True,
                max_length=max_length,
                return_tensors="pt",
            ).to(device)
            hidden = model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            if normalize:
                pooled = torch.nn.functional.normalize(pooled, p=2, dim=-1)
            chunks.append(pooled.float().cpu())
    if not chunks:
        return torch.empty(0, model.config.hidden_size)
    return torch.cat(chunks)
