"""One hook per resolved module: gather the selected rows, apply the interventions, scatter back.

The hooks read the positions of the call in flight from a :class:`CallState` that the
``ReftModel`` sets for the duration of one call; a hook with no state (or an inactive one, as in
the decode steps of ``generate``) returns its input untouched.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .positions import edit_rows, gather_rows, known_all_valid
from .structure import Site


@dataclass
class Slot:
    """One intervention at a site: its row ``index`` in the locations tensor and its module."""

    index: int
    key: str
    intervention: nn.Module
    site: Site
    every_token: bool = False  # positions "all": also applied to each new token at generate's decode steps
    source: int = 0            # which of the call's sources a source-using intervention reads
    task: str | None = None    # mixed-task batches: the task whose rows it acts on (None = every row)


def _joinable(a: Slot, b: Slot) -> bool:
    """Slots of different tasks editing the same tensor: their rows never overlap, so one gather and
    one scatter can serve them all (see ``HookManager._edit_tasks``)."""
    return (a.task is not None and b.task is not None and a.task != b.task
            and (a.site.module_path, a.site.hook, a.site.fused, a.site.heads, a.every_token)
            == (b.site.module_path, b.site.hook, b.site.fused, b.site.heads, b.every_token)
            and not (a.intervention.collects or b.intervention.collects))


def task_units(slots: list[Slot]) -> list[list[Slot]]:
    """Split one module's slots (in config order) into units: a single slot, or a run of
    consecutive slots of distinct tasks at the same tensor."""
    units: list[list[Slot]] = []
    for slot in slots:
        if units and all(_joinable(other, slot) for other in units[-1]):
            units[-1].append(slot)
        else:
            units.append([slot])
    return units


class SourcesRecorded(Exception):
    """Raised by a recording hook once every requested row is recorded: the rest of the source
    run would compute nothing that is used."""


@dataclass
class CallState:
    """Everything one call needs: ``locations`` ``[batch, K, P]`` (-1 empty) and derived masks,
    plus the optional per-call inputs of some interventions.

    * ``sources``: slot index -> rows of the source run at that slot's positions (``[B, P, W]``);
    * ``subspaces``: slot index -> bool mask over the intervention's rank (``[B, r]``);
    * ``routed``: slot index -> the rows it acts on (host list), for slots that skip some rows (tasks);
    * ``decoding``: generate's decode steps, where only ``every_token`` slots act, on whole rows;
    * ``edit_new_tokens``: during decode steps every slot acts (``generate(edit_new_tokens=True)``);
    * ``record``: a recording (source) run: rows of ``record_slots`` are stored, nothing is edited;
    * ``collected``: rows seen by ``Collect`` interventions, by key.
    """

    locations: torch.Tensor
    valid: torch.Tensor
    all_valid: bool
    active: bool = True
    batch: int = 0  # rows the model runs on (generate may expand the located batch for beams)
    decoding: bool = False
    edit_new_tokens: bool = False
    sources: dict[int, torch.Tensor] = field(default_factory=dict)
    subspaces: dict[int, torch.Tensor] = field(default_factory=dict)
    record: dict[int, torch.Tensor] | None = None
    record_slots: frozenset[int] = frozenset()
    collected: dict[str, torch.Tensor] = field(default_factory=dict)
    routed: dict[int, list[int]] = field(default_factory=dict)
    #: kept after its call returned, for gradient checkpointing's recompute: valid inside backward only
    backward_only: bool = False
    _row_index: dict[Any, torch.Tensor] = field(default_factory=dict)

    @classmethod
    def build(cls, locations: torch.Tensor, row_valid: torch.Tensor | None = None) -> "CallState":
        routed: dict[int, list[int]] = {}
        if row_valid is not None:
            locations = torch.where(row_valid[:, :, None], locations, -1)
            # Host lists of the rows each routed slot acts on: a slot then runs on those rows only,
            # so k tasks in a batch cost about what one does (one transfer per call, not per hook).
            on_host = row_valid.cpu()
            routed = {k: on_host[:, k].nonzero().flatten().tolist() for k in range(on_host.shape[1])
                      if not bool(on_host[:, k].all())}
        valid = locations >= 0
        return cls(locations=locations, valid=valid, all_valid=known_all_valid(valid), batch=locations.shape[0],
                   routed=routed)

    def _index(self, key: Any, rows: list[int], batch: int) -> torch.Tensor:
        """``rows`` of the located batch as an index into a ``batch``-row hidden state (generate's
        beams repeat each row in place), built once per call."""
        if key not in self._row_index:
            repeat = batch // self.locations.shape[0]
            self._row_index[key] = torch.tensor([r * repeat + j for r in rows for j in range(repeat)],
                                                dtype=torch.long, device=self.locations.device)
        return self._row_index[key]

    def member_rows(self, slots: list[int], batch: int) -> torch.Tensor:
        """For each row of a ``batch``-row hidden state, the place in ``slots`` of the routed slot acting on it
        (``len(slots)`` for rows none of them acts on), built once per call."""
        key = ("member", tuple(slots), batch)
        if key not in self._row_index:
            which = [len(slots)] * self.locations.shape[0]
            for place, slot in enumerate(slots):
                for row in self.routed[slot]:
                    which[row] = place
            repeat = batch // self.locations.shape[0]
            self._row_index[key] = torch.tensor([w for w in which for _ in range(repeat)], dtype=torch.long,
                                                device=self.locations.device)
        return self._row_index[key]

    def rows_outside(self, slots: list[int], batch: int) -> torch.Tensor:
        """The rows none of ``slots`` acts on (all routed slots), as an index tensor."""
        taken = {r for k in slots for r in self.routed[k]}
        rest = [r for r in range(self.locations.shape[0]) if r not in taken]
        return self._index((tuple(slots), batch), rest, batch)

    def row_index(self, slot: int, batch: int) -> torch.Tensor | None:
        """The rows (of a ``batch``-row hidden state) a routed slot acts on; None = every row."""
        rows = self.routed.get(slot)
        return None if rows is None else self._index((slot, batch), rows, batch)

    def _repeat(self, t: torch.Tensor, batch: int) -> torch.Tensor:
        if batch == t.shape[0]:
            return t
        if batch % t.shape[0]:
            raise RuntimeError(f"hidden batch {batch} is not a multiple of the located batch {t.shape[0]}")
        return t.repeat_interleave(batch // t.shape[0], 0)

    def rows_for(self, slot: int, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Locations of one intervention, repeated when generate expanded the batch (beams)."""
        return self._repeat(self.locations[:, slot], batch), self._repeat(self.valid[:, slot], batch)

    def subspace_for(self, slot: int, batch: int) -> torch.Tensor | None:
        mask = self.subspaces.get(slot)
        return None if mask is None else self._repeat(mask, batch)


def _graph_task_id() -> int:
    """The autograd engine's current graph task (>= 0 inside a backward pass, -1 outside)."""
    probe = getattr(torch._C, "_current_graph_task_id", None)
    return 0 if probe is None else probe()  # without the probe, a kept state stays usable (older behaviour)


class HookManager:
    """Owns the hook handles; groups slots by (module, hook kind) so each module gets one hook."""

    def __init__(self, model: nn.Module, slots: list[Slot]) -> None:
        self.model = model
        self.slots = slots
        self.state: CallState | None = None
        self._handles: list[Any] = []
        self._head_indices: dict[tuple[int, torch.device], torch.Tensor] = {}

    def attach(self) -> None:
        groups: dict[tuple[str, str], list[Slot]] = {}
        for slot in self.slots:
            groups.setdefault((slot.site.module_path, slot.site.hook), []).append(slot)
        for (path, kind), slots in groups.items():
            slots = task_units(slots)
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

    def current(self) -> CallState | None:
        """The state of the call in flight, or ``None``.

        A state kept past its call (``backward_only``: a training call with gradient checkpointing, whose
        layers re-run during backward) serves only that recomputation: ``_current_graph_task_id`` is -1
        outside the autograd engine (torch.utils.checkpoint tests it too), and a hook that runs there
        ignores the state, so a call of the bare model, of any batch size, is never edited. Ignored, not
        dropped: a bare call between the forward and its backward (a reference model's log-probs, say)
        must not take the edits out of the recomputation. The next reftkit call replaces it."""
        state = self.state
        if state is not None and state.backward_only and _graph_task_id() < 0:
            return None
        return state

    # -- the hooks ------------------------------------------------------------------------
    def _head_index(self, slot: Slot, device: torch.device) -> torch.Tensor:
        """The selected heads as an index tensor, made once per device rather than in every call."""
        key = (slot.index, device)
        if key not in self._head_indices:
            self._head_indices[key] = torch.tensor(slot.site.heads, device=device)
        return self._head_indices[key]

    def _source(self, slot: Slot) -> torch.Tensor | None:
        source = self.state.sources.get(slot.index)
        if slot.intervention.uses_source and source is None:
            raise RuntimeError(f"intervention {slot.key!r} reads a source run, but none was recorded for it")
        return source

    def _rests_while_decoding(self, slot: Slot) -> bool:
        """Decode steps: only "all"-position interventions edit the new tokens (every one does when the
        call asks for ``edit_new_tokens``); collecting and source-reading ones never do."""
        every = slot.every_token or self.state.edit_new_tokens
        return not every or slot.intervention.collects or slot.intervention.uses_source

    def _call(self, slot: Slot, source: torch.Tensor | None, subspace: torch.Tensor | None):
        """``rows -> rows'`` for one slot: passes the per-call inputs the intervention declares it
        uses, and for head-level sites applies it to each selected head (rows ``[..., heads, hd]``)."""
        iv, heads = slot.intervention, slot.site.heads

        def call(rows: torch.Tensor, src: torch.Tensor | None) -> torch.Tensor:
            kwargs = {}
            if iv.uses_source:
                kwargs["source"] = src
            if iv.uses_subspaces:
                # [B, r] -> [B, 1, ..., r], broadcast over the positions (and heads) of each row
                kwargs["subspaces"] = None if subspace is None else \
                    subspace.view(subspace.shape[0], *([1] * (rows.dim() - 2)), subspace.shape[-1])
            device = rows.device.type
            if torch.is_autocast_enabled(device):
                # Under bf16/fp16 autocast (Trainer's bf16=True) the intervention keeps its own float32
                # arithmetic: autocast would otherwise run its matmuls in half precision, and R's QR and
                # the low-rank edit are the parts that precision hurts. The base model stays autocast.
                with torch.autocast(device, enabled=False):
                    return iv(rows, **kwargs)
            return iv(rows, **kwargs)

        if heads is None:
            return lambda rows: call(rows, source)
        index = self._head_index(slot, self.state.locations.device)
        per_head = (slot.site.num_heads, slot.site.width)

        def on_heads(rows: torch.Tensor) -> torch.Tensor:
            grid = rows.unflatten(-1, per_head)
            src = None if source is None else source.unflatten(-1, per_head).index_select(-2, index)
            edited = call(grid.index_select(-2, index), src).to(grid.dtype)
            return grid.index_copy(-2, index, edited).flatten(-2)
        return on_heads

    def _edit(self, slot: Slot, part: torch.Tensor) -> torch.Tensor:
        state, batch = self.state, part.shape[0]
        if state.record is not None:  # source run: remember the rows, change nothing
            if slot.index in state.record_slots:
                idx, _ = state.rows_for(slot.index, batch)
                state.record[slot.index] = gather_rows(part, idx)
                if len(state.record) == len(state.record_slots):
                    raise SourcesRecorded
            return part
        if state.decoding and self._rests_while_decoding(slot):
            return part
        rows = state.row_index(slot.index, batch)
        if rows is None:
            return self._edit_rows(slot, part, batch, None)
        if rows.numel() == 0:
            return part
        # a routed slot works on its task's rows only, then writes them back
        return part.index_copy(0, rows, self._edit_rows(slot, part.index_select(0, rows), batch, rows))

    def _edit_rows(self, slot: Slot, part: torch.Tensor, batch: int, rows: torch.Tensor | None) -> torch.Tensor:
        state = self.state

        def pick(t: torch.Tensor | None) -> torch.Tensor | None:
            return t if t is None or rows is None else t.index_select(0, rows)
        subspace = pick(state.subspace_for(slot.index, batch))
        if state.decoding:
            return self._call(slot, None, subspace)(part)
        idx, valid = state.rows_for(slot.index, batch)
        idx, valid = pick(idx), pick(valid)
        # Compiled, the state's host flag would become a guard: a batch with a short example (an empty
        # slot) would recompile the whole model; the masked path serves both at the cost of a few [B, P] ops.
        all_valid = (not torch.compiler.is_compiling() and state.all_valid) if rows is None \
            else known_all_valid(valid)
        if slot.intervention.collects:
            found = torch.where(valid.unsqueeze(-1), gather_rows(part, idx), 0.0)
            if slot.site.heads is not None:  # [B, P, heads, head_dim]: the selected heads only
                found = found.unflatten(-1, (slot.site.num_heads, slot.site.width)).index_select(
                    -2, self._head_index(slot, found.device))
            if rows is not None:  # keep the batch layout: rows of other tasks stay zero
                found = torch.zeros((batch, *found.shape[1:]), dtype=found.dtype,
                                    device=found.device).index_copy(0, rows, found)
            state.collected[slot.key] = found
            return part
        return edit_rows(part, idx, valid, all_valid, self._call(slot, pick(self._source(slot)), subspace))

    def _apply(self, units: list[list[Slot]], h: torch.Tensor) -> torch.Tensor:
        state = self.state
        flat_shape = None
        if h.dim() == 2:  # some blocks (OPT's MLP) see tokens flattened to [batch * seq, hidden]
            flat_shape = h.shape
            h = h.reshape(state.batch, -1, h.shape[-1])
        elif h.dim() != 3:
            raise RuntimeError(f"reftkit hooks expect [batch, seq, hidden] representations, got {tuple(h.shape)}")
        for unit in units:
            fused = unit[0].site.fused
            part = fused.extract(h) if fused is not None else h
            edited = self._edit(unit[0], part) if len(unit) == 1 else self._edit_tasks(unit, part)
            if edited is not part:
                h = fused.insert(h, edited) if fused is not None else edited
        return h if flat_shape is None else h.reshape(flat_shape)

    def _edit_tasks(self, unit: list[Slot], part: torch.Tensor) -> torch.Tensor:
        """Several tasks' interventions at one tensor, each on its own rows, in one gather/scatter:
        k tasks in a batch then cost about what one does."""
        state, batch = self.state, part.shape[0]
        rows = [state.row_index(slot.index, batch) for slot in unit]
        if state.record is not None or any(r is None for r in rows):  # nothing to share: one by one
            for slot in unit:
                part = self._edit(slot, part)
            return part
        if state.decoding and self._rests_while_decoding(unit[0]):
            return part
        members = [(slot, r) for slot, r in zip(unit, rows) if r.numel()]
        if not members:
            return part
        each_on_its_rows = self._stacked(members, batch) or self._one_by_one(members, batch)
        if state.decoding:
            return each_on_its_rows(part)
        # each row keeps the positions of the one slot routed to it (the others are -1 there)
        idx = torch.stack([state.rows_for(slot.index, batch)[0] for slot, _ in members]).amax(0)
        valid = idx >= 0
        return edit_rows(part, idx, valid, known_all_valid(valid), each_on_its_rows)

    def _one_by_one(self, members: list[tuple[Slot, torch.Tensor]], batch: int):
        """``rows -> rows'`` applying each member to its own rows (gathered, edited, put back in order)."""
        state = self.state
        rest = state.rows_outside([slot.index for slot, _ in members], batch)
        order = torch.cat([r for _, r in members] + [rest])
        inverse = torch.empty_like(order).scatter_(0, order, torch.arange(len(order), device=order.device))

        def apply(found: torch.Tensor) -> torch.Tensor:
            pieces = []
            for slot, r in members:
                source = self._source(slot)
                subspace = state.subspace_for(slot.index, batch)
                fn = self._call(slot, None if source is None else source.index_select(0, r),
                                None if subspace is None else subspace.index_select(0, r))
                pieces.append(fn(found.index_select(0, r)).to(found.dtype))
            pieces.append(found.index_select(0, rest))
            return torch.cat(pieces).index_select(0, inverse)
        return apply

    def _stacked(self, members: list[tuple[Slot, torch.Tensor]], batch: int):
        """``rows -> rows'``: each member on its own rows in one op (its class's ``routed``), or None."""
        first = members[0][0].intervention
        # looked up on the class itself, not inherited: a subclass may change the formula
        routed = getattr(type(first), "routed") if "routed" in type(first).__dict__ else None
        if routed is None or any(type(slot.intervention) is not type(first) or slot.site.heads is not None
                                 or slot.intervention.uses_source or slot.index in self.state.subspaces
                                 for slot, _ in members):
            return None
        interventions = [slot.intervention for slot, _ in members]
        which = self.state.member_rows([slot.index for slot, _ in members], batch)

        def apply(rows: torch.Tensor) -> torch.Tensor:
            device = rows.device.type
            if torch.is_autocast_enabled(device):  # float32 arithmetic, as in _call
                with torch.autocast(device, enabled=False):
                    return routed(interventions, rows, which).to(rows.dtype)
            return routed(interventions, rows, which).to(rows.dtype)
        return apply

    def _output_hook(self, units: list[list[Slot]]):
        def hook(module: nn.Module, args: Any, output: Any) -> Any:
            state = self.current()
            if state is None or not state.active:
                return output
            if isinstance(output, torch.Tensor):
                return self._apply(units, output)
            if isinstance(output, (tuple, list)):
                return type(output)((self._apply(units, output[0]), *output[1:]))
            raise TypeError(f"reftkit cannot intervene on an output of type {type(output).__name__}")
        return hook

    def _input_hook(self, units: list[list[Slot]]):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> Any:
            state = self.current()
            if state is None or not state.active:
                return None
            if args:
                return (self._apply(units, args[0]), *args[1:]), kwargs
            if "hidden_states" in kwargs:
                return args, {**kwargs, "hidden_states": self._apply(units, kwargs["hidden_states"])}
            raise TypeError(f"reftkit found no hidden-state input to intervene on in {type(module).__name__}")
        return hook
