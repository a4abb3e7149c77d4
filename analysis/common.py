"""Small checks and lookups shared by the analysis modules."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn


def model_device(model: Any) -> torch.device:
    """Where ``model`` runs: its ``device`` attribute if it has one, else its first parameter's device."""
    device = getattr(model, "device", None)
    if isinstance(device, torch.device):
        return device
    for param in model.parameters():
        return param.device
    return torch.device("cpu")


def check_tokenizer_fits(model: nn.Module, tokenizer: Any) -> None:
    """Raise if ``tokenizer`` can produce ids that ``model``'s input embedding has no row for."""
    rows = model.get_input_embeddings().weight.shape[0]
    size = len(tokenizer)
    if size > rows:
        raise ValueError(f"the tokenizer has {size} tokens but the model's input embedding has {rows} rows "
                         f"({type(model).__name__}): they are not a pair (a different model's tokenizer?)")
