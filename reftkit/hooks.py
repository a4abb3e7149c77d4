"""One hook per resolved module: gather the selected rows, apply the interventions, scatter back.

The hooks read the positions of the call in flight from a :class:`CallState` that the
``ReftModel`` sets for the duration of one call; a hook with no state (or an inactive one, as in
the decode steps of ``generate``) returns its input untouched.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from .structure import Site


@dataclass
class Slot:
    """One intervention at a site: its row ``index`` in the locations tensor and its module."""

    index: int
    key: str
    intervention: nn.Module
    site: Site


@dataclass
class CallState:
    """Positions of one call: ``locations`` ``[batch, K, P]`` (-1 empty) and derived masks."""

    locations: torch.Tensor
    valid: torch.Tensor
    all_valid: bool
    active: bool = True
    batch: int = 0  # rows the model runs on (generate may expand the located batch for beams)

    @classmethod
    def build(cls, locations: torch.Tensor) -> "CallState":
        valid = locations >= 0
        # The fast path needs a host-side answer; on an accelerator that is a device sync per call,
        # so there the masked path (correct for any mask) is used instead.
        all_valid = bool(valid.all()) if locations.device.type == "cpu" else False
        return cls(locations=locations, valid=valid, all_valid=all_valid, batch=locations.shape[0])

    def rows_for(self, slot: int, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Locations of one intervention, repeated when generate expanded the batch (beams)."""
        loc, valid = self.locations[:, slot], self.valid[:, slot]
        if batch != loc.shape[0]:
            if batch % loc.shape[0]:
                raise RuntimeError(f"hidden batch {batch} is not a multiple of the located batch {loc.shape[0]}")
            repeat = batch // loc.shape[0]
            loc, valid = loc.repeat_interleave(repeat, 0), valid.repeat_interleave(repeat, 0)
        return loc, valid


def edit_rows(h: torch.Tensor, idx: torch.Tensor, valid: torch.Tensor, all_valid: bool,
              fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Return ``h`` (``[B, T, D]``) with ``fn`` applied to the rows ``idx`` (``[B, P]``), out of place."""
    width = h.shape[-1]
    if all_valid:
        gidx = idx.unsqueeze(-1).expand(-1, -1, width)
        return h.scatter(1, gidx, fn(h.gather(1, gidx)))
    slots = torch.arange(idx.shape[1], device=idx.device)
    any_valid = valid.any(1, keepdim=True)
    first = valid.to(torch.uint8).argmax(1, keepdim=True)  # first valid slot; 0 when none
    safe = torch.where(valid, idx, idx.gather(1, first).clamp_min(0))
    gidx = safe.unsqueeze(-1).expand(-1, -1, width)
    rows = h.gather(1, gidx)
    value = torch.where(any_valid.unsqueeze(-1), fn(rows), rows)
    # Empty slots point at the example's first valid token and write a detached copy of its value:
    # scatter then never sees two different values for one index, and the gradient reaches each
    # written token exactly once (through its "primary" slot).
    primary = valid | ((slots == 0) & ~any_valid)
    source = torch.where(valid, slots, first).unsqueeze(-1).expand(-1, -1, width)
    value = torch.where(primary.unsqueeze(-1), value, value.detach().gather(1, source))
    return h.scatter(1, gidx, value)


class HookManager:
    """Owns the hook handles; groups slots by (module, hook kind) so each module gets one hook."""

    def __init__(self, model: nn.Module, slots: list[Slot]) -> None:
        self.model = model
        self.slots = slots
        self.state: CallState | None = None
        self._handles: list[Any] = []

    def attach(self) -> None:
        groups: dict[tuple[str, str], list[Slot]] = {}
        for slot in self.slots:
            groups.setdefault((slot.site.module_path, slot.site.hook), []).append(slot)
        for (path, kind), slots in groups.items():
            module = self.model.get_submodule(path)
            if kind == "output":
                handle = module.register_forward_hook(self._output_hook(slots))
            else:
                handle = module.register_forward_pre_hook(self._input_hook(slots), with_kwargs=True)
            self._handles.append(handle)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.state = None

    # -- the hooks ------------------------------------------------------------------------
    def _apply(self, slots: list[Slot], h: torch.Tensor) -> torch.Tensor:
        state = self.state
        flat_shape = None
        if h.dim() == 2:  # some blocks (OPT's MLP) see tokens flattened to [batch * seq, hidden]
            flat_shape = h.shape
            h = h.reshape(state.batch, -1, h.shape[-1])
        elif h.dim() != 3:
            raise RuntimeError(f"reftkit hooks expect [batch, seq, hidden] representations, got {tuple(h.shape)}")
        for slot in slots:
            idx, valid = state.rows_for(slot.index, h.shape[0])
            fused = slot.site.fused
            part = fused.extract(h) if fused is not None else h
            part = edit_rows(part, idx, valid, state.all_valid, slot.intervention)
            h = fused.insert(h, part) if fused is not None else part
        return h if flat_shape is None else h.reshape(flat_shape)

    def _output_hook(self, slots: list[Slot]):
        def hook(module: nn.Module, args: Any, output: Any) -> Any:
            if self.state is None or not self.state.active:
                return output
            if isinstance(output, torch.Tensor):
                return self._apply(slots, output)
            if isinstance(output, (tuple, list)):
                return type(output)((self._apply(slots, output[0]), *output[1:]))
            raise TypeError(f"reftkit cannot intervene on an output of type {type(output).__name__}")
        return hook

    def _input_hook(self, slots: list[Slot]):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> Any:
            if self.state is None or not self.state.active:
                return None
            if args:
                return (self._apply(slots, args[0]), *args[1:]), kwargs
            if "hidden_states" in kwargs:
                return args, {**kwargs, "hidden_states": self._apply(slots, kwargs["hidden_states"])}
            raise TypeError(f"reftkit found no hidden-state input to intervene on in {type(module).__name__}")
        return hook
