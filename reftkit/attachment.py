"""Attaching interventions to a base model, and leaving it as it was.

:func:`build_slots` resolves a config's entries to sites on the model and builds one intervention per
site (and per first/last part of an untied entry). :class:`BaseState` is the base model's own
``requires_grad`` flags and per-submodule train/eval mode, recorded when the first ``ReftModel``
attaches and restored when the last one detaches: several may share one base (activation patching,
layer sweeps, expert libraries), and a second attach must not take the first one's frozen flags for
the base's own.
"""
from __future__ import annotations

import re
import weakref

import torch
from torch import nn

from reftkit.interventions import InterventionError

from .anatomy import StructureError
from .config import ConfigError, ReftConfig
from .hooks import Slot
from .positions import PositionSpec, split_untied
from .structure import resolve_site

__all__ = ["BaseState", "base_device", "base_state", "build_slots", "hold_base", "intervention_key", "release_base",
           "restore_base"]


def intervention_key(layer: int | None, component: str) -> str:
    """The key of an intervention in ``ReftModel.interventions``: ``layer3_block_output``."""
    name = re.sub(r"[^0-9A-Za-z]+", "_", component).strip("_")
    return name if layer is None else f"layer{layer}_{name}"


def base_device(model: nn.Module) -> torch.device:
    for param in model.parameters():
        return param.device
    return torch.device("cpu")


def build_slots(model: nn.Module, config: ReftConfig, interventions: nn.ModuleDict
                ) -> tuple[list[Slot], list[PositionSpec | None], list[str | None]]:
    """Resolve every entry of ``config`` on ``model``, add its interventions to ``interventions`` (float32, on
    the model's device) and return the slots with each one's positions and task. Raises ``ConfigError`` naming
    the entry before anything is hooked."""
    device = base_device(model)
    device = torch.device("cpu") if device.type == "meta" else device
    slots: list[Slot] = []
    specs: list[PositionSpec | None] = []
    tasks: list[str | None] = []
    for i, rep in enumerate(config.representations):
        spec = rep.position_spec
        split = None if rep.share_weights or spec is None else split_untied(spec)
        parts = [("", spec)] if split is None else [("_first", split[0]), ("_last", split[1])]
        rep.check_positions_fit(model, i)
        for layer in rep.layers_in(model, i):
            try:
                site = resolve_site(model, layer, rep.component, rep.heads)
            except StructureError as err:
                raise ConfigError(f"representations[{i}]: {err}") from None
            for suffix, part_spec in parts:
                stem = intervention_key(site.layer, rep.component)
                key, n = stem + suffix, 2
                while key in interventions:
                    key, n = f"{stem}{suffix}_{n}", n + 1
                iv = rep.make_intervention()
                try:
                    iv.materialize(site.width)
                except InterventionError as err:
                    raise ConfigError(f"representations[{i}] at layer {site.layer}: {err}") from None
                interventions[key] = iv.to(device=device, dtype=torch.float32)
                slots.append(Slot(index=len(slots), key=key, intervention=iv, site=site,
                                  every_token=part_spec is not None and part_spec.every, source=rep.source,
                                  task=rep.task))
                specs.append(part_spec)
                tasks.append(rep.task)
    return slots, specs, tasks


class BaseState:
    """A base model's own ``requires_grad`` flags and per-submodule ``training`` flags, recorded when the first
    ``ReftModel`` attaches to it and restored when the last one attached detaches (or a failed attach undoes)."""

    def __init__(self, model: nn.Module) -> None:
        self.requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
        self.training = {name: m.training for name, m in model.named_modules()}
        #: the ReftModels attached now; weak, so one dropped without detach() does not pin the base frozen
        self.owners = weakref.WeakSet()

    def restore(self, model: nn.Module) -> None:
        restore_base(model, self.requires_grad, self.training)


def restore_base(model: nn.Module, requires_grad: dict[str, bool], training: dict[str, bool]) -> None:
    for name, param in model.named_parameters():
        param.requires_grad_(requires_grad.get(name, param.requires_grad))
    for name, module in model.named_modules():
        module.training = training.get(name, module.training)


#: base model -> its state before the first of the ReftModels attached to it now
_ATTACHED: "weakref.WeakKeyDictionary[nn.Module, BaseState]" = weakref.WeakKeyDictionary()


def base_state(model: nn.Module) -> tuple[BaseState, bool]:
    """The recorded state of ``model``, and whether this is the first attach (then nothing is recorded yet)."""
    state = _ATTACHED.get(model)
    return (BaseState(model), True) if state is None else (state, False)


def hold_base(model: nn.Module, state: BaseState, owner: nn.Module) -> None:
    """Record that ``owner`` is attached to ``model`` (after its attach succeeded)."""
    _ATTACHED[model] = state
    state.owners.add(owner)


def release_base(model: nn.Module, owner: nn.Module, requires_grad: dict[str, bool],
                 training: dict[str, bool]) -> None:
    """``owner`` detached: restore the base when no other ReftModel holds it. ``requires_grad``/``training``
    are the owner's own copy of the record, for a deep copy whose base is a new object not in the registry."""
    state = _ATTACHED.get(model)
    if state is None:
        restore_base(model, requires_grad, training)
        return
    state.owners.discard(owner)
    if not state.owners:
        state.restore(model)
        _ATTACHED.pop(model, None)
