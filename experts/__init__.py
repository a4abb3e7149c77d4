"""Many tasks, one frozen model (installed as ``reftkit.experts``): libraries of trained experts,
mixing them, dispatching requests to them (Transformer²'s three strategies) and the objectives
that train them beyond next-token cross entropy.

Names load on first use, so ``import reftkit.experts`` imports neither peft nor matplotlib.
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS: dict[str, tuple[str, ...]] = {
    "library": ("ExpertLibrary", "ExpertError"),
    "routing": ("ExpertRouter", "mixing_matrix", "mix_parameters"),
    "search": ("cem", "CEMResult"),
    "dispatch": ("prompt_dispatch", "train_dispatch_expert", "expert_dispatch", "few_shot_weights",
                 "two_pass_generate", "dispatch_prompts", "DISPATCH_TEMPLATE"),
    "train": ("train_expert",),
    "scoring": ("answer_scores",),
    "policy_gradient": ("CompletionLogprobs", "check_rewards", "completion_logprobs", "policy_gradient_step",
                        "reinforce_loss", "shape_rewards", "train_policy_gradient"),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'reftkit.experts' has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)


def __dir__() -> list[str]:
    return sorted(list(globals()) + list(_WHERE))


__all__ = sorted(_WHERE)
