"""Sequence classification with a ReftModel (pooled hidden state -> linear head), and loading saved
interventions into a live ReftModel (used by :class:`reftkit.training.ReftTrainer` to resume)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from transformers.modeling_outputs import SequenceClassifierOutput

from reftkit.call_inputs import CALL_INPUTS
from reftkit.model import ReftModel
from reftkit.serialization import CONFIG_NAME, LoadError, check_and_load, read_config, read_weights

HEAD_WEIGHTS = "head.safetensors"
HEAD_CONFIG = "head_config.json"
POOLINGS = ("last", "first", "mean")


class ReftForSequenceClassification(nn.Module):
    """A :class:`ReftModel` plus a trainable float32 linear head on one pooled hidden state.

    ``pooling``: ``"last"`` (default) — the last real token (``attention_mask``-aware, left or right
    padding), the only position that has seen the whole sequence in a causal model; ``"first"`` —
    the first real token (BERT's [CLS]); ``"mean"`` — the mean over real tokens. The hidden state is
    the backbone's ``last_hidden_state`` (final norm applied), never vocabulary logits.
    """

    def __init__(self, reft: ReftModel, num_labels: int, pooling: str = "last") -> None:
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"pooling={pooling!r}; expected one of {POOLINGS}")
        if not isinstance(num_labels, int) or num_labels < 2:
            raise ValueError(f"num_labels={num_labels!r} must be an int >= 2")
        self.reft, self.num_labels, self.pooling = reft, num_labels, pooling
        width = reft.config.hidden_size
        self.head = nn.Linear(width, num_labels).to(device=reft.device, dtype=torch.float32)

    @property
    def config(self) -> Any:
        return self.reft.config

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs: dict | None = None,
                                        **kwargs: Any) -> None:
        """What ``Trainer`` calls for ``activation_checkpointing=True``; see the ReftModel method."""
        self.reft.gradient_checkpointing_enable(activation_checkpointing_kwargs, **kwargs)

    def _hidden(self, input_ids: torch.Tensor | None, attention_mask: torch.Tensor | None,
                intervention_locations: torch.Tensor | None, **kwargs: Any) -> torch.Tensor:
        hf = self.reft.model
        backbone = hf.get_decoder() if hasattr(hf, "get_decoder") else getattr(hf, "base_model", hf)
        call = {k: kwargs.pop(k) for k in CALL_INPUTS if k in kwargs}
        with self.reft.intervening(input_ids, attention_mask, intervention_locations, kwargs.get("inputs_embeds"),
                                   **call):
            if backbone is hf and hasattr(hf, "get_output_embeddings") and hf.get_output_embeddings() is not None:
                # no separate backbone: ask the full model for its last hidden state
                return hf(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True,
                          **kwargs).hidden_states[-1]
            return backbone(input_ids=input_ids, attention_mask=attention_mask, **kwargs)[0]

    def pool(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """``[B, T, D]`` -> ``[B, D]`` by ``self.pooling`` over the real (mask == 1) tokens."""
        batch, length = hidden.shape[:2]
        mask = (torch.ones(batch, length, device=hidden.device) if attention_mask is None
                else attention_mask.to(hidden.device).float())
        if self.pooling == "mean":
            return (hidden * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True).clamp_min(1)
        order = torch.arange(length, device=hidden.device).float()
        # last real token = argmax of mask * position; first = argmax of mask * (reversed position)
        score = mask * (order if self.pooling == "last" else length - order)
        index = score.argmax(1)
        return hidden[torch.arange(batch, device=hidden.device), index]

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                intervention_locations: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                num_items_in_batch: torch.Tensor | int | None = None, **kwargs: Any) -> SequenceClassifierOutput:
        """Logits ``[B, num_labels]``; with ``labels`` ``[B]`` also the cross entropy (mean, or
        sum / ``num_items_in_batch`` when given)."""
        hidden = self._hidden(input_ids, attention_mask, intervention_locations, **kwargs)
        logits = self.head(self.pool(hidden, attention_mask).float())
        loss = None
        if labels is not None:
            labels = labels.to(logits.device).long().view(-1)
            bad = (labels < 0) | (labels >= self.num_labels)
            if bool(bad.any()):  # one host sync per step; a silent out-of-range label is worse
                raise ValueError(f"label {int(labels[bad][0])} is out of range for {self.num_labels} classes "
                                 f"(expected 0..{self.num_labels - 1})")
            loss = F.cross_entropy(logits, labels, reduction="sum")
            loss = loss / (labels.numel() if num_items_in_batch is None else num_items_in_batch)
        return SequenceClassifierOutput(loss=loss, logits=logits)

    def save_pretrained(self, path: str | Path) -> Path:
        """``reft.save_pretrained`` plus ``head.safetensors`` and ``head_config.json``."""
        folder = self.reft.save_pretrained(path)
        save_file({k: v.detach().cpu().contiguous() for k, v in self.head.state_dict().items()},
                  str(folder / HEAD_WEIGHTS), metadata={"format": "pt"})
        meta = {"library": "reftkit", "num_labels": self.num_labels, "pooling": self.pooling,
                "hidden_size": self.head.in_features}
        (folder / HEAD_CONFIG).write_text(json.dumps(meta, indent=2))
        return folder

    def load_weights(self, path: str | Path) -> None:
        """Load interventions and head saved by :meth:`save_pretrained` into this instance."""
        folder = Path(path)
        load_interventions(self.reft, folder)
        meta = json.loads((folder / HEAD_CONFIG).read_text()) if (folder / HEAD_CONFIG).is_file() else None
        if meta is None or not (folder / HEAD_WEIGHTS).is_file():
            raise LoadError(f"{folder} has no {HEAD_CONFIG} / {HEAD_WEIGHTS}; was it saved by a classifier?")
        if (meta.get("num_labels"), meta.get("pooling")) != (self.num_labels, self.pooling):
            raise LoadError(f"{folder / HEAD_CONFIG}: num_labels={meta.get('num_labels')}, pooling="
                            f"{meta.get('pooling')!r}; this model has {self.num_labels}, {self.pooling!r}")
        tensors = load_file(str(folder / HEAD_WEIGHTS))
        self.head.load_state_dict({k: v.to(self.head.weight.device) for k, v in tensors.items()}, strict=True)

    @classmethod
    def from_pretrained(cls, model: nn.Module, path: str | Path) -> "ReftForSequenceClassification":
        """Rebuild on ``model`` (the untouched base) from a folder written by :meth:`save_pretrained`."""
        folder = Path(path)
        meta = json.loads((folder / HEAD_CONFIG).read_text())
        clf = cls(ReftModel.from_pretrained(model, folder), meta["num_labels"], meta["pooling"])
        tensors = load_file(str(folder / HEAD_WEIGHTS))
        clf.head.load_state_dict({k: v.to(clf.head.weight.device) for k, v in tensors.items()}, strict=True)
        return clf


def load_interventions(reft: ReftModel, path: str | Path) -> None:
    """Load the intervention weights of a save folder into an existing ``reft`` (same config)."""
    folder = Path(path)
    config = read_config(folder)
    saved = [r["key"] for r in config.get("interventions", [])]
    if saved and saved != list(reft.interventions):
        raise LoadError(f"{folder / CONFIG_NAME}: interventions {saved} were saved, this model has "
                        f"{list(reft.interventions)}")
    check_and_load(reft.interventions, read_weights(folder, config), str(folder))
