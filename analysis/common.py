"""Small checks and lookups shared by the analysis modules."""
from __future__ import annotations

import contextlib
from typing import Any, Iterator

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


#: a ReftModel's per-call inputs, which a model without interventions must refuse rather than ignore
REFUSED_INTERVENTION_INPUTS = ("sources", "source_locations", "subspaces", "tasks")


class PromptModelSurface:
    """The ReftModel-like surface of a prompt method wrapping ``self.model.base`` (its ``config``, the
    ``intervening`` no-op the shared losses call, and the refusal of intervention inputs). Subclasses set
    ``_kind`` (for messages) and ``_builder`` (the function that builds them), and keep ``_detached``, the base's own
    ``requires_grad`` flags in ``_requires_grad`` and a ``model`` with ``base`` and ``enabled``."""

    _kind = "this model"
    _builder = "its builder"
    _detached: bool
    _requires_grad: dict[str, bool]

    @property
    def config(self) -> Any:
        return self.model.base.config

    def _check_live(self) -> None:
        if self._detached:
            raise RuntimeError(f"this {type(self).__name__} was detached; build a new one with {self._builder}")

    def _reft_inputs(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        refused = [k for k in REFUSED_INTERVENTION_INPUTS if kwargs.get(k) is not None]
        if refused:
            raise ValueError(f"{refused[0]}= is an intervention input; {self._kind} has no interventions")
        return {k: v for k, v in kwargs.items() if k not in REFUSED_INTERVENTION_INPUTS + ("intervention_locations",)}

    @contextlib.contextmanager
    def intervening(self, input_ids: Any = None, attention_mask: Any = None, intervention_locations: Any = None,
                    inputs_embeds: Any = None, **call: Any) -> Iterator[None]:
        """Nothing to arm (the prompts enter through the forward); kept so losses treat every model alike."""
        self._check_live()
        self._reft_inputs(call)
        yield

    @contextlib.contextmanager
    def disabled(self) -> Iterator[None]:
        """Behave as the base model (the method's prompts off) for the duration of the block."""
        self._check_live()
        self.model.enabled = False
        try:
            yield
        finally:
            self.model.enabled = True

    def detach(self) -> nn.Module:
        """The base model, bit-identical to before (the method never touched it), its flags restored."""
        self._check_live()
        base = self.model.base
        for name, param in base.named_parameters():
            param.requires_grad_(self._requires_grad.get(name, param.requires_grad))
        self._detached = True
        return base

