"""Many tasks, one frozen model (installed as ``reftkit.experts``): libraries of trained experts,
mixing them, dispatching requests to them (Transformer²'s three strategies) and the objectives
that train them beyond next-token cross entropy.

Names load on first use, so ``import reftkit.experts`` imports neither peft nor matplotlib.
"""
from __future__ import annotations

from reftkit.lazy_exports import lazy_exports

_EXPORTS: dict[str, tuple[str, ...]] = {
    "library": ("ExpertLibrary", "ExpertError"),
    "routing": ("ExpertRouter", "mixing_matrix", "mix_parameters"),
    "search": ("cem", "CEMResult"),
    "dispatch": ("prompt_dispatch", "train_dispatch_expert", "expert_dispatch", "few_shot_weights",
                 "two_pass_generate", "dispatch_prompts", "parse_category", "DispatchResult", "DISPATCH_TEMPLATE"),
    "svf_expert": ("SVFExpert", "train_svf_expert"),
    "train": ("train_expert", "answer_reward"),
    "scoring": ("answer_scores",),
    "policy_gradient": ("CompletionLogprobs", "check_rewards", "completion_logprobs", "policy_gradient_step",
                        "reinforce_loss", "shape_rewards", "train_policy_gradient"),
}
__getattr__, __dir__, __all__ = lazy_exports(__name__, _EXPORTS, globals())
