"""An SVF expert trained with REINFORCE, as Transformer² trains its experts (Sun et al. 2025, §3.1) —
e.g. the classification expert ``z_c`` of its dispatch strategy (b).

:func:`train_svf_expert` wraps the chosen linear layers in :class:`~reftkit.analysis.svf.SVFLinear`
(one SVD each, computed once), trains their ``z`` with :func:`~reftkit.experts.train_policy_gradient`
on the model's own sampled completions and a reward function, then puts the original layers back: the
model is left exactly as it was (modules, ``requires_grad`` flags, train/eval mode). The returned
:class:`SVFExpert` keeps the trained layers and swaps them in only inside :meth:`SVFExpert.applied`, so
the same model can serve ReFT experts, an SVF library router or the bare model the rest of the time.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator, Mapping, Sequence

import torch
from torch import nn

from .library import ExpertError
from .policy_gradient import RewardFn


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, child = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


class SVFExpert:
    """Trained SVF layers of ``model`` (``modules``: name → :class:`~reftkit.analysis.svf.SVFLinear`), off
    until :meth:`applied`. ``history``: the REINFORCE metrics, one row per step."""

    def __init__(self, model: nn.Module, modules: Mapping[str, nn.Module], history: Any = None) -> None:
        self.model, self.modules, self.history = model, dict(modules), history

    @property
    def z(self) -> dict[str, torch.Tensor]:
        """The trained vectors, ``{layer name: z}`` (what an SVF :class:`~reftkit.experts.ExpertLibrary` stores)."""
        return {name: m.z.detach().float().cpu().clone() for name, m in self.modules.items()}

    @contextlib.contextmanager
    def applied(self) -> Iterator[nn.Module]:
        """The model with this expert's layers in place (an SVF layer already there — an SVF router's — is
        set aside for the block); yields the model."""
        from reftkit.analysis.svf import SVFLinear

        previous: dict[str, nn.Module] = {}
        try:
            for name, mine in self.modules.items():
                parent, child = _parent(self.model, name)
                current = getattr(parent, child)
                base = current.base if isinstance(current, SVFLinear) else current
                if base is not mine.base:
                    raise ExpertError(f"layer {name!r} of the model is not the layer this SVF expert was trained on "
                                      "(another model, or the layer was replaced)")
                previous[name] = current
                mine.enabled = True
                setattr(parent, child, mine)
            yield self.model
        finally:
            for name, current in previous.items():
                parent, child = _parent(self.model, name)
                setattr(parent, child, current)

    def detach(self) -> nn.Module:
        """The model (never changed outside :meth:`applied`); kept for symmetry with ReftModel."""
        return self.model

    def __repr__(self) -> str:
        return f"SVFExpert(layers={len(self.modules)}, parameters={sum(m.z.numel() for m in self.modules.values())})"


def train_svf_expert(model: nn.Module, tokenizer: Any, prompts: Sequence[str], reward_fn: RewardFn,
                     config: Mapping[str, Any] | None = None, *, learning_rate: float = 2e-3,
                     progress: bool = True, **training: Any) -> SVFExpert:
    """Train an SVF expert on ``model`` with REINFORCE: ``reward_fn(prompts, completions)`` scores the model's sampled
    completions (Transformer²: +1 correct, −1 wrong). ``config``: :func:`~reftkit.analysis.svf.apply_svf`'s
    options (``target_modules``, default ``"mlp"`` as the released code; ``parametrization``, ``init_val``,
    ``max_mult``, ``seed``). ``training``: :func:`~reftkit.experts.train_policy_gradient`'s (``steps`` or
    ``epochs``, ``batch_size``, ``kl_coef``, ``samples_per_prompt``, ``max_new_tokens``, ...); ``learning_rate``
    defaults to the released code's 2e-3. ``model`` must not hold SVF layers yet."""
    from reftkit.analysis.svf import apply_svf, svf_modules

    from .policy_gradient import train_policy_gradient

    if svf_modules(model):
        raise ExpertError("the model already has SVF layers (an SVF library router or apply_svf): train the SVF "
                          "expert on the bare model, before attaching them")
    options = dict(config or {})
    unknown = sorted(set(options) - {"target_modules", "parametrization", "init_val", "max_mult", "seed"})
    if unknown:
        raise ExpertError(f"config has {unknown[0]!r}, which an SVF expert does not read; give apply_svf's options "
                          "(target_modules, parametrization, init_val, max_mult, seed)")
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    was_training = model.training
    modules = apply_svf(model, **options)  # installs the layers, freezes the rest
    expert = SVFExpert(model, modules)
    try:
        model.eval()  # dropout would make log π differ from the sampling policy
        originals = {name: m.base for name, m in modules.items()}
        for name in modules:  # back to the original layers: applied() swaps ours in again
            parent, child = _parent(model, name)
            setattr(parent, child, originals[name])
        with expert.applied():
            expert.history = train_policy_gradient(model, tokenizer, list(prompts), reward_fn,
                                                   learning_rate=learning_rate, progress=progress, **training)
    finally:
        for name, module in modules.items():
            parent, child = _parent(model, name)
            if getattr(parent, child) is module:
                setattr(parent, child, module.base)
        for name, p in model.named_parameters():
            p.requires_grad_(flags.get(name, p.requires_grad))
        model.train(was_training)
    for m in modules.values():
        m.z.requires_grad_(False)
    return expert
