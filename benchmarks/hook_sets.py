"""Swapping whole sets of forward hooks on one model, so that the bare model, reftkit and the minimal
hook run on the very same weights in the same process.

A snapshot holds every module's hook dicts. Installing a snapshot makes its dicts the live ones; the
handles of the hooks registered into them keep working, because a handle points at its dict.
"""
from __future__ import annotations

from collections import OrderedDict

import torch

_HOOK_ATTRS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
               "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs")

HookSnapshot = list[tuple[torch.nn.Module, dict[str, OrderedDict]]]


def capture_hooks(model: torch.nn.Module) -> HookSnapshot:
    """The live hook dicts of every module (the objects themselves)."""
    return [(m, {a: getattr(m, a) for a in _HOOK_ATTRS}) for m in model.modules()]


def copy_hooks(snapshot: HookSnapshot) -> HookSnapshot:
    """New dicts with the same hooks: registering into the copy leaves the original unchanged."""
    return [(m, {a: OrderedDict(d) for a, d in attrs.items()}) for m, attrs in snapshot]


def install_hooks(snapshot: HookSnapshot) -> None:
    """Make ``snapshot``'s dicts the live hook dicts."""
    for m, attrs in snapshot:
        for a, d in attrs.items():
            object.__setattr__(m, a, d)
