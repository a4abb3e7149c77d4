"""``ReftConfig``: which interventions go where — plain data, validated, JSON round-trip.

One representation entry names ``layer`` (an int, a list of ints, or ``"all"``), ``component``
(a pyvene component name or a raw module path), ``positions`` (pyreft's grammar or ``"all"``),
``intervention`` (a registered name, a class, or an instance), ``share_weights``, and the
intervention's own arguments (``low_rank_dimension``, ``dropout``, ``act_fn``, ``add_bias``...)
flat beside them, as pyreft writes them; ``tie`` shares one intervention across sites (``True``: this
entry's layers; a name: every site of every entry carrying it — pyvene's ``intervention_link_key``).
Everything a field can get wrong is checked here; what needs the model (layer range, component availability,
rank vs width, the widths of tied sites) is checked at attach.

An entry without ``positions`` gets ``"l1"`` (the last token of the prompt). pyreft's entries carry no
positions (pyreft takes them from its data), so a pyreft dict used here acts at ``l1`` unless it says
otherwise; ``positions=None`` makes every call pass ``intervention_locations`` instead. Fields of
pyvene's ``RepresentationConfig`` that reftkit does not have (``unit``, ``max_number_of_units``,
``group_key``...) and pyvene's module paths (``"model.layers[1].output"``) raise :class:`ConfigError`
saying what to write instead; ``reftkit.pyreft`` takes pyreft's and pyvene's forms as they are.
"""
from __future__ import annotations

import copy
import json
import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

from reftkit.interventions import Intervention, InterventionError, get_intervention_class
from reftkit.interventions.base import argument_problem

from .anatomy import STACKS
from .positions import PositionSpec, parse_positions, split_untied

FORMAT_VERSION = 1
_OWN_FIELDS = ("layer", "component", "positions", "intervention", "share_weights", "heads", "task", "source",
               "tie", "stack")

_USE_PYREFT = "reftkit.pyreft takes pyreft's and pyvene's config dicts as they are"
_SOURCES = "pass sources= per call (a batch the bare model runs first; source_locations= picks its rows)"
#: fields of pyvene's RepresentationConfig (0.1.8) that reftkit's entries do not have -> what to write instead
PYVENE_FIELDS: dict[str, str] = {
    "unit": "reftkit intervenes on token positions (pyvene's 'pos'): choose them with positions= or "
            "intervention_locations=, and attention heads with a head_* component and heads=[...]",
    "max_number_of_units": "drop it: the number of positions follows from positions= or intervention_locations",
    "intervention_type": "name the class with intervention= (a registered name, a class or an instance)",
    "subspace_partition": "pass subspaces= per call (the rank coordinates each row uses)",
    "group_key": "drop it: reftkit has no intervention groups, every entry acts in the one forward pass",
    "intervention_link_key": "write tie='name' in each entry that shares the intervention (tie=True shares one "
                             "across an entry's layers)",
    "moe_key": "give the expert's module path as component, e.g. 'model.layers.{layer}.mlp.experts.3:output'",
    "source_representation": _SOURCES,
    "hidden_source_representation": _SOURCES,
    "latent_dim": "give it only to an intervention that takes it as an argument",
}


class ConfigError(ValueError):
    """A config field with an invalid value; the message names the field and the value."""


def _where(index: int | None, name: str) -> str:
    return f"representations[{index}].{name}" if index is not None else name


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # True is an int to Python, not a layer


def _check_not_pyvene_path(component: str, where: str) -> None:
    """pyvene reads a module path's last dot-segment as the hook and ``name[i]`` as a ModuleList index;
    reftkit writes the hook after ``:`` and indices as dots. A bracket, or a last segment ``input`` /
    ``output`` without ``:`` (which reftkit would read as a module of that name), is refused."""
    translate = f"reftkit.pyreft_import.pyvene_component({component!r}) translates it; {_USE_PYREFT}"
    if "[" in component or "]" in component:
        raise ConfigError(f"{where}={component!r} is pyvene's module path syntax: reftkit writes a ModuleList "
                          f"index with a dot and the hook after ':' ('model.layers.1:output'); {translate}")
    if "." in component and ":" not in component and component.rsplit(".", 1)[1] in ("input", "output"):
        path, hook = component.rsplit(".", 1)
        raise ConfigError(f"{where}={component!r} is ambiguous: pyvene reads it as the {hook} of {path!r}, reftkit "
                          f"as the output of a module named {hook!r}; write {path + ':' + hook!r} for pyvene's "
                          f"meaning or {component + ':output'!r} for the module; {translate}")


@dataclass
class RepresentationConfig:
    """One entry of ``ReftConfig.representations``; ``positions`` defaults to ``"l1"`` (see the module
    docstring: a pyreft dict, which has none, gets it too)."""

    layer: int | list[int] | str
    component: str = "block_output"
    positions: str | None = "l1"
    intervention: str | type[Intervention] | Intervention = "loreft"
    share_weights: bool = True
    #: head-level components (``head_query_output``, ...): which heads, each edited on its own
    heads: list[int] | None = None
    #: mixed-task batches: the task (intervention set) this entry belongs to; ``None`` = every row
    task: str | None = None
    #: which of the call's ``sources`` this entry's source-using interventions read
    source: int = 0
    #: weight tying: ``True``, one intervention serves every layer of this entry; a name, one serves every site
    #: of every entry with that name; ``None`` (or False), one intervention per site
    tie: bool | str | None = None
    #: encoder-decoder models (T5, BART ...): the stack ``layer`` counts in, ``"encoder"`` or ``"decoder"``;
    #: required there, refused on a decoder-only model (checked at attach); positions count over that stack's input
    stack: str | None = None
    intervention_kwargs: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, entry: Mapping[str, Any], index: int | None = None) -> "RepresentationConfig":
        if isinstance(entry, RepresentationConfig):
            return entry
        if not isinstance(entry, Mapping):
            where = "representation" if index is None else f"representations[{index}]"
            raise ConfigError(f"{where}={entry!r} must be a dict")
        entry = dict(entry)
        if "layer" not in entry:
            raise ConfigError(f"{_where(index, 'layer')} is missing")
        own = {k: entry.pop(k) for k in _OWN_FIELDS if k in entry}
        extra = entry.pop("intervention_kwargs", {}) or {}
        rep = cls(**own, intervention_kwargs={**extra, **entry})
        rep.validate(index)
        return rep

    # -- validation -----------------------------------------------------------------------
    def validate(self, index: int | None = None) -> None:
        layer = self.layer
        if isinstance(layer, bool) or not (
                isinstance(layer, int) or layer == "all"
                or (isinstance(layer, (list, tuple)) and layer and all(_is_int(x) for x in layer))):
            raise ConfigError(f"{_where(index, 'layer')}={layer!r} must be an int, a non-empty list of ints, or 'all'")
        if isinstance(layer, (list, tuple)) and len(set(layer)) != len(layer):
            raise ConfigError(f"{_where(index, 'layer')}={list(layer)!r} lists a layer twice")
        if not isinstance(self.component, str) or not self.component:
            raise ConfigError(f"{_where(index, 'component')}={self.component!r} must be a non-empty string")
        _check_not_pyvene_path(self.component, _where(index, "component"))
        if self.many_layers and "." in self.component and "{layer}" not in self.component:
            # without the placeholder every layer resolves to the same module: one module hooked N times
            raise ConfigError(
                f"{_where(index, 'layer')}={layer!r} with {_where(index, 'component')}={self.component!r}: the module "
                "path has no '{layer}' placeholder, so every layer would hook that one module again; put '{layer}' "
                "where the layer index goes (e.g. 'model.layers.{layer}.mlp:output') or give a single layer")
        spec = None
        if self.positions is not None:
            try:
                spec = parse_positions(self.positions, field=_where(index, "positions"))
            except ValueError as err:
                raise ConfigError(str(err)) from None
        if not isinstance(self.share_weights, bool):
            raise ConfigError(f"{_where(index, 'share_weights')}={self.share_weights!r} must be True or False")
        if not self.share_weights and (spec is None or split_untied(spec) is None):
            raise ConfigError(
                f"{_where(index, 'share_weights')}=False with {_where(index, 'positions')}={self.positions!r}: untied "
                "weights split positions that name both first and last tokens (e.g. 'f5+l5': one intervention for "
                "the first 5, one for the last 5); give such positions, or share_weights=True")
        self._check_tie(index)
        heads = self.heads
        if heads is not None and not (isinstance(heads, (list, tuple)) and heads and all(
                _is_int(x) and x >= 0 for x in heads) and len(set(heads)) == len(heads)):
            raise ConfigError(f"{_where(index, 'heads')}={heads!r} must be a non-empty list of distinct head "
                              "indices (ints >= 0)")
        is_head = self.component.startswith("head_")
        if is_head and heads is None:
            raise ConfigError(f"{_where(index, 'component')}={self.component!r} is head-level: give heads=[...]")
        if heads is not None and not is_head:
            raise ConfigError(f"{_where(index, 'heads')}={heads!r} needs a head-level component "
                              f"(head_query_output, ...), not component={self.component!r}")
        if self.stack is not None and self.stack not in STACKS:
            raise ConfigError(f"{_where(index, 'stack')}={self.stack!r} is not a stack; give 'encoder' or 'decoder' "
                              "(an encoder-decoder model's two stacks), or leave it out for a decoder-only model")
        if self.task is not None and (not isinstance(self.task, str) or not self.task):
            raise ConfigError(f"{_where(index, 'task')}={self.task!r} must be a non-empty string or None")
        if isinstance(self.source, bool) or not isinstance(self.source, int) or self.source < 0:
            raise ConfigError(f"{_where(index, 'source')}={self.source!r} must be an int >= 0 (an index into sources)")
        try:
            cls = self.intervention_class
        except InterventionError as err:
            raise ConfigError(f"{_where(index, 'intervention')}: {err}") from None
        pyvene = [k for k in self.intervention_kwargs if k in PYVENE_FIELDS and k not in cls.arguments]
        if pyvene:
            name = pyvene[0]
            raise ConfigError(
                f"{_where(index, name)}={self.intervention_kwargs[name]!r} is a field of pyvene's "
                f"RepresentationConfig, which reftkit's entries do not have; {PYVENE_FIELDS[name]}. {_USE_PYREFT}")
        if isinstance(self.intervention, Intervention):
            if self.intervention_kwargs:
                raise ConfigError(
                    f"{_where(index, 'intervention')} is an instance, so its arguments are fixed; "
                    f"remove {sorted(self.intervention_kwargs)} from the entry")
            return
        unknown = sorted(set(self.intervention_kwargs) - set(cls.arguments))
        if unknown:
            raise ConfigError(
                f"{_where(index, unknown[0])}={self.intervention_kwargs[unknown[0]]!r}: {cls.__name__} takes "
                f"no argument {unknown[0]!r}; its arguments are {list(cls.arguments)}")
        for name, value in self.intervention_kwargs.items():  # by the constructor's annotations: "false" is truthy
            problem = argument_problem(cls, name, value)
            if problem is not None:
                raise ConfigError(f"{_where(index, name)}={value!r} {problem} (an argument of {cls.__name__})")
        try:  # construct without weights: checks rank, dropout and act_fn values now, not at attach
            cls(**self.intervention_kwargs)
        except InterventionError as err:
            # "BottleneckAdapter: scaling='0.5' must be ..." names one of this entry's fields: say which
            named = re.match(rf"^(?:{re.escape(cls.__name__)}: )?(\w+)=", str(err))
            if named and named.group(1) in self.intervention_kwargs:
                what = str(err)[named.start(1):]
                raise ConfigError(f"{_where(index, what)} (an argument of {cls.__name__})") from None
            raise ConfigError(f"{_where(index, 'intervention')}: {err}") from None
        except TypeError as err:
            raise ConfigError(f"{_where(index, 'intervention')}: {err}") from None

    def _check_tie(self, index: int | None) -> None:
        tie = self.tie
        if not (tie is None or isinstance(tie, bool) or (isinstance(tie, str) and tie.strip())):
            raise ConfigError(f"{_where(index, 'tie')}={tie!r} must be True (one intervention for this entry's "
                              "layers), a group name (one for every entry carrying it) or None")
        if tie and not self.share_weights:
            raise ConfigError(f"{_where(index, 'tie')}={tie!r} with {_where(index, 'share_weights')}=False: an "
                              "untied entry builds two interventions per site (first and last positions), a tie one "
                              "for all its sites; give one of them")
        if tie is True and not self.many_layers:
            raise ConfigError(f"{_where(index, 'tie')}=True with {_where(index, 'layer')}={self.layer!r}: one site, "
                              "nothing to tie; list the layers (layer=[2, 4, 6]) or name a group the entries that "
                              "share it carry (tie='steer')")

    # -- derived ---------------------------------------------------------------------------
    @property
    def many_layers(self) -> bool:
        """Whether ``layer`` may name more than one layer (a list of several, or ``"all"``)."""
        return self.layer == "all" or (isinstance(self.layer, (list, tuple)) and len(self.layer) > 1)

    def tie_group(self, index: int) -> tuple[str, Any] | None:
        """The key of the sites that share this entry's intervention (``index`` is the entry's place), or None."""
        if isinstance(self.tie, str):
            return ("name", self.tie)
        return ("entry", index) if self.tie else None

    @property
    def intervention_class(self) -> type[Intervention]:
        if isinstance(self.intervention, Intervention):
            return type(self.intervention)
        return get_intervention_class(self.intervention)

    @property
    def position_spec(self) -> PositionSpec | None:
        return None if self.positions is None else parse_positions(self.positions)

    def make_intervention(self) -> Intervention:
        """A new, not yet materialised intervention (a deep copy when an instance was given)."""
        if isinstance(self.intervention, Intervention):
            return copy.deepcopy(self.intervention)
        return self.intervention_class(**self.intervention_kwargs)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON data with every constructor argument (defaults filled in)."""
        iv = self.make_intervention()
        kwargs = {k: v for k, v in iv.hparams.items()}
        optional = {"heads": list(self.heads) if self.heads is not None else None, "task": self.task,
                    "source": self.source or None, "tie": self.tie or None, "stack": self.stack}
        return {"layer": list(self.layer) if isinstance(self.layer, tuple) else self.layer,
                "component": self.component, "positions": self.positions,
                "intervention": iv.name or type(iv).__name__, "share_weights": self.share_weights,
                **{k: v for k, v in optional.items() if v is not None}, **kwargs}


def _named(intervention: object) -> str:
    if isinstance(intervention, Intervention):
        return f"<{type(intervention).__name__} instance>"
    return repr(getattr(intervention, "__name__", intervention))


def check_ties(reps: list[RepresentationConfig]) -> None:
    """Refuse ties that cannot be one intervention: entries of one ``tie`` name asking for different classes or
    arguments (or different instances), a name no other site carries, and one instance passed to several entries
    without a shared ``tie`` (reftkit copies an entry's instance, so they would train apart)."""
    groups: dict[str, list[int]] = {}
    for i, rep in enumerate(reps):
        if isinstance(rep.tie, str):
            groups.setdefault(rep.tie, []).append(i)
    for name, members in groups.items():
        a = members[0]
        if len(members) == 1 and not reps[a].many_layers:
            raise ConfigError(f"representations[{a}].tie={name!r}: no other entry carries this name and the entry "
                              f"has one site (layer={reps[a].layer!r}), so nothing is tied; give the same tie to "
                              "every entry that shares the intervention")
        for b in members[1:]:
            first, other = reps[a], reps[b]
            clash = f"tie={name!r} shares one intervention between them"
            if isinstance(first.intervention, Intervention) or isinstance(other.intervention, Intervention):
                if first.intervention is not other.intervention:
                    raise ConfigError(
                        f"representations[{b}].intervention={_named(other.intervention)} and representations[{a}]"
                        f".intervention={_named(first.intervention)}: {clash}, so pass that one instance in each "
                        "entry, or a registered name with its arguments")
                continue
            if first.intervention_class is not other.intervention_class:
                raise ConfigError(f"representations[{b}].intervention={_named(other.intervention)} but representations"
                                  f"[{a}].intervention={_named(first.intervention)}: {clash}, so name the same one")
            mine, theirs = first.make_intervention().hparams, other.make_intervention().hparams
            for key in mine:
                if mine[key] != theirs.get(key):
                    raise ConfigError(f"representations[{b}].{key}={theirs.get(key)!r} but representations[{a}].{key}="
                                      f"{mine[key]!r}: {clash}, so give the same arguments")
    seen: dict[int, int] = {}
    for i, rep in enumerate(reps):
        if not isinstance(rep.intervention, Intervention):
            continue
        j = seen.setdefault(id(rep.intervention), i)
        if j != i and not (isinstance(rep.tie, str) and rep.tie == reps[j].tie):
            raise ConfigError(
                f"representations[{i}].intervention is the same {type(rep.intervention).__name__} instance as "
                f"representations[{j}].intervention, but the entries are not tied (tie={reps[j].tie!r} and "
                f"{rep.tie!r}): each entry builds its own copy, so they would train apart. To share one intervention "
                "give both entries the same tie name (\"tie\": \"shared\"); for separate ones pass separate instances "
                "(copy.deepcopy) or a registered name with its arguments")


class ReftConfig:
    """The list of representations to intervene on. An entry without ``positions`` acts at ``"l1"``, the
    last prompt token (pyreft's dicts have no positions: add them, or ``positions=None`` to pass
    ``intervention_locations`` per call).

    >>> ReftConfig(representations=[{"layer": 15, "component": "block_output",
    ...     "positions": "f7+l7", "intervention": "loreft", "low_rank_dimension": 4}])
    """

    def __init__(self, representations: Mapping[str, Any] | Iterable[Mapping[str, Any]]) -> None:
        if isinstance(representations, (Mapping, RepresentationConfig)):
            representations = [representations]
        if isinstance(representations, (str, bytes)) or not isinstance(representations, Iterable):
            raise ConfigError(f"representations={representations!r} must be a dict or a list of dicts")
        self.representations: list[RepresentationConfig] = [
            RepresentationConfig.from_dict(entry, index=i) for i, entry in enumerate(representations)]
        if not self.representations:
            raise ConfigError("representations=[] is empty; give at least one representation")
        check_ties(self.representations)

    def to_dict(self) -> dict[str, Any]:
        return {"format_version": FORMAT_VERSION, "representations": [r.to_dict() for r in self.representations]}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ReftConfig":
        version = data.get("format_version", FORMAT_VERSION)
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise ConfigError(
                f"format_version={version!r} was written by a newer reftkit (this one reads up to "
                f"{FORMAT_VERSION}); upgrade reftkit to load it")
        if "representations" not in data:
            raise ConfigError("representations is missing from the config")
        return cls(data["representations"])

    def to_json(self, **kwargs: Any) -> str:
        return json.dumps(self.to_dict(), indent=kwargs.pop("indent", 2), **kwargs)

    @classmethod
    def from_json(cls, text: str) -> "ReftConfig":
        return cls.from_dict(json.loads(text))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ReftConfig) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        return f"ReftConfig(representations={[r.to_dict() for r in self.representations]!r})"
