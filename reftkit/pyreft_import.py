"""Import a pyreft 0.1.0 save folder (``config.json`` + ``intkey_<key>.bin``) into reftkit.

pyreft saves each intervention with ``torch.save``; we read them with
``torch.load(..., weights_only=True)``, which refuses anything but tensors and plain containers.
pyreft does not save positions, ``dropout``, ``act_fn`` or ``add_bias``: pass ``positions`` (and
``act_fn``/``dropout`` if you trained with them) to :func:`load_pyreft`; ``add_bias`` is read off
the presence of the projection bias, and the rank off the tensors (pyvene writes the config's
``low_rank_dimension``, which is ``None`` when only the intervention instance carried the rank, as
in pyreft's memorisation and composition examples). A component that is a pyvene module path
(``"model.layers[1].output"``) is translated by :func:`pyvene_component`.

Orthogonal bases: pyreft's LoReFT saves the materialised ``R`` (``rotate_layer``, ``d x r``); the
other orthogonal classes save torch's ``orthogonal`` parametrisation internals
(``...weight.original`` ``d x r`` and ``...weight.0.base`` ``d x d``), from which ``R`` is rebuilt
exactly as torch does with its Householder map: ``R = base @ (H(tril(X, -1)) * sign(diag X))``.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from reftkit.interventions import PYREFT_NAMES

from .serialization import Build, LoadError, check_and_load

_CLASS = re.compile(r"<class '([\w.]+)'>")
#: the fields of pyvene's RepresentationConfig namedtuple (0.1.8), the order of a saved representation list
PYVENE_REPRESENTATION = ("layer", "component", "unit", "max_number_of_units", "low_rank_dimension",
                         "intervention_type", "intervention", "subspace_partition", "group_key",
                         "intervention_link_key", "moe_key", "source_representation",
                         "hidden_source_representation", "latent_dim")
#: fields that change what pyvene's forward does, which reftkit cannot take over from a save
_UNSUPPORTED = ("subspace_partition", "intervention_link_key", "moe_key", "hidden_source_representation")
_SEGMENT = re.compile(r"[^\[\]\s:]+")
_INDEXED = re.compile(r"([^\[\]\s:]+)\[\s*(-?\d+)\s*\]")


def pyvene_component(component: str) -> str:
    """pyvene's component -> reftkit's: a component name passes through, a module path is rewritten.

    pyvene (``modeling_utils.get_module_hook``) reads a component that is not one of its names as a
    module path whose last dot-segment is the hook, ``input`` or ``output``; in the rest, ``name[i]``
    indexes a ModuleList (``getattr_for_torch_module``) and a plain segment is an attribute, digits
    included. reftkit writes a module path with dots for indices and the hook after ``:``, so

    * ``"model.layers[3].mlp.output"`` -> ``"model.layers.3.mlp:output"``
    * ``"roberta.encoder.layer[1].output"`` -> ``"roberta.encoder.layer.1:output"`` (the layer's output;
      the module named ``output`` inside it would be ``"roberta.encoder.layer.1.output:output"``)
    * ``"block_output"`` (no dot) -> ``"block_output"``; a path already in reftkit's form (with ``:``
      and no bracket) is returned unchanged.

    Raises ``ValueError`` naming the value for a path pyvene could not hook or would read otherwise than
    it looks: a last segment other than ``input``/``output``, an empty segment, a malformed or repeated
    bracket (pyvene uses only the last index of ``a[1][2]``), a negative index (it counts from the end
    of a ModuleList, which needs the model: write the index itself).
    """
    if not isinstance(component, str) or not component:
        raise ValueError(f"component={component!r} must be a non-empty string")
    if "." not in component or (":" in component and "[" not in component and "]" not in component):
        return component
    *parts, hook = component.split(".")
    if hook not in ("input", "output"):
        raise ValueError(f"component={component!r}: pyvene reads the last dot-segment as the hook, and "
                         f"{hook!r} is neither 'input' nor 'output'")
    path = []
    for part in parts:
        indexed = _INDEXED.fullmatch(part)
        if indexed is not None:
            if int(indexed.group(2)) < 0:
                raise ValueError(f"component={component!r}: index [{indexed.group(2)}] counts from the end, which "
                                 "needs the model; write the non-negative index")
            path += [indexed.group(1), str(int(indexed.group(2)))]
        elif _SEGMENT.fullmatch(part):
            path.append(part)
        else:
            raise ValueError(f"component={component!r}: segment {part!r} is neither a name nor name[index]")
    if not path:
        raise ValueError(f"component={component!r} names a hook but no module")
    return ".".join(path) + ":" + hook


def _orthogonal_basis(state: dict[str, torch.Tensor],
                      prefix: str = "rotate_layer.parametrizations.weight") -> torch.Tensor:
    original, base = state[f"{prefix}.original"].double(), state[f"{prefix}.0.base"].double()
    reflectors = original.tril(-1)
    tau = 2.0 / (1.0 + (reflectors * reflectors).sum(dim=-2))
    q = torch.linalg.householder_product(reflectors, tau) * original.diagonal().int().unsqueeze(-2)
    return (base @ q).float()


def _rotation(state: dict[str, torch.Tensor]) -> torch.Tensor:
    if "rotate_layer" in state:  # LoReFT's own state_dict override: R itself
        return state["rotate_layer"].float()
    return _orthogonal_basis(state)


def translate_pyreft_state(cls_name: str, state: dict[str, torch.Tensor]
                           ) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
    """Map a pyreft state dict to reftkit names; the basis R (if any) is returned apart."""
    if cls_name == "LoreftIntervention":
        return {"source.weight": state["weight"], "source.bias": state["bias"]}, _rotation(state)
    if cls_name == "DireftIntervention":
        return {"source.weight": state["learned_source.weight"], "source.bias": state["learned_source.bias"]}, \
            _rotation(state)
    if cls_name in ("NoreftIntervention", "NodireftIntervention"):
        out = {"projection.weight": state["proj_layer.weight"], "source.weight": state["learned_source.weight"],
               "source.bias": state["learned_source.bias"]}
        if "proj_layer.bias" in state:
            out["projection.bias"] = state["proj_layer.bias"]
        return out, None
    if cls_name in ("ConsreftIntervention", "LobireftIntervention"):
        return {"bias": state["learned_source"]}, _rotation(state)
    raise LoadError(f"intervention class {cls_name!r} is not one of pyreft's six ({sorted(PYREFT_NAMES)})")


def rank_of(named: dict[str, torch.Tensor], basis: torch.Tensor | None) -> int:
    """The rank the intervention ran with: R's columns, else the projection's rows."""
    return int(basis.shape[1]) if basis is not None else int(named["projection.weight"].shape[0])


def _class_name(type_text: Any, classes: dict[str, str], where: str) -> str:
    """pyreft's class name for ``str(type(intervention))``; ``classes`` maps other classes to one of the six."""
    match = _CLASS.fullmatch(str(type_text).strip())
    dotted = match.group(1) if match else str(type_text)
    short = dotted.rsplit(".", 1)[-1]
    for name in (dotted, short):
        if name in classes:
            if classes[name] not in PYREFT_NAMES:
                raise LoadError(f"classes[{name!r}]={classes[name]!r} is not one of pyreft's six "
                                f"({sorted(PYREFT_NAMES)})")
            return classes[name]
    if match and dotted.startswith("pyreft.") and short in PYREFT_NAMES:
        return short
    raise LoadError(f"{where}={type_text!r} is not one of pyreft's six ({sorted(PYREFT_NAMES)}); if it subclasses "
                    f"one and keeps its weights (the composition example's SubloreftIntervention is a LoReFT), "
                    f"pass classes={{{short!r}: 'LoreftIntervention'}} (or the class it extends)")


def _representation(rep: Any, where: str) -> dict[str, Any]:
    """A saved representation (pyvene writes the namedtuple as a list; a dict is read by name) as a dict."""
    if isinstance(rep, dict):
        fields = dict(rep)
    elif isinstance(rep, list) and 2 <= len(rep) <= len(PYVENE_REPRESENTATION):
        fields = dict(zip(PYVENE_REPRESENTATION, rep))
    else:
        raise LoadError(f"{where}={rep!r} is not a pyvene RepresentationConfig (a list of up to "
                        f"{len(PYVENE_REPRESENTATION)} fields: {', '.join(PYVENE_REPRESENTATION)})")
    unit = fields.get("unit", "pos")
    if unit not in ("pos", None):
        raise LoadError(f"{where}: unit={unit!r}; reftkit intervenes on positions (pyvene's 'pos', what pyreft "
                        "writes), not on pyvene's head units")
    for name in _UNSUPPORTED:
        if fields.get(name) not in (None, False):
            raise LoadError(f"{where}: {name}={fields[name]!r} changes what pyvene's forward does, and reftkit "
                            "does not take it over from a save")
    try:
        fields["component"] = pyvene_component(fields.get("component", "block_output"))
    except ValueError as err:
        raise LoadError(f"{where}: {err}") from None
    return fields


def read_pyreft_config(folder: Path) -> tuple[Path, list, list, list]:
    """``config.json`` of a pyreft save folder: its path, ``representations``, ``intervention_types`` and
    ``sorted_keys``, checked to be present and of one length."""
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise LoadError(f"{config_file} is missing; is {folder} a folder saved by pyreft (or reftkit.pyreft)?")
    config = json.loads(config_file.read_text())
    for field in ("representations", "intervention_types", "sorted_keys"):
        if field not in config:
            raise LoadError(f"{config_file}: field {field!r} is missing; this is not a pyreft 0.1.0 config")
    reps, types, keys = config["representations"], config["intervention_types"], config["sorted_keys"]
    if not len(reps) == len(types) == len(keys):
        raise LoadError(f"{config_file}: {len(reps)} representations, {len(types)} intervention_types and "
                        f"{len(keys)} sorted_keys must agree")
    return config_file, reps, types, keys


def read_pyreft_state(path: Path, what: str = "") -> dict[str, torch.Tensor]:
    """One ``torch.save``d file of a pyreft folder, read with ``weights_only=True`` (tensors and plain
    containers only); ``what`` says which entry of the config named it."""
    if not path.is_file():
        raise LoadError(f"{path} is missing" + (f" ({what})" if what else ""))
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - report any refusal of the unpickler by file name
        raise LoadError(f"{path} could not be read safely (weights_only=True): {err}") from None


class PyreftWeights(NamedTuple):
    """One intervention of a pyreft folder: its saved ``state``, the tensors under reftkit's names, ``R`` apart
    (``None`` without a basis), and the constructor ``arguments`` the tensors fix (rank, NoReFT's ``add_bias``)."""

    state: dict[str, torch.Tensor]
    named: dict[str, torch.Tensor]
    basis: torch.Tensor | None
    arguments: dict[str, Any]


def read_pyreft_weights(folder: Path, key: str, cls_name: str, index: int) -> PyreftWeights:
    """Read and translate ``intkey_<key>.bin`` of a ``cls_name`` (one of pyreft's six)."""
    path = folder / f"intkey_{key}.bin"
    state = read_pyreft_state(path, f"sorted_keys[{index}]={key!r}")
    try:
        named, basis = translate_pyreft_state(cls_name, state)
    except KeyError as err:
        raise LoadError(f"{path}: tensor {err} is missing for a {cls_name}") from None
    # the tensors are what pyreft's forward ran with; the config's low_rank_dimension is None when only the
    # instance carried the rank, and the instance's rank wins in pyvene where the two differ
    arguments: dict[str, Any] = {"low_rank_dimension": rank_of(named, basis)}
    if cls_name in ("NoreftIntervention", "NodireftIntervention"):
        arguments["add_bias"] = "proj_layer.bias" in state
    return PyreftWeights(state, named, basis, arguments)


def install_pyreft_weights(interventions: nn.ModuleDict, weights: list[PyreftWeights], source: str) -> None:
    """Load translated weights into ``interventions`` (in order), strictly; ``R`` goes through ``assign`` so the
    next step moves it as far as pyreft's map would."""
    tensors: dict[str, torch.Tensor] = {}
    for (key, iv), loaded in zip(interventions.items(), weights):
        saved_width = loaded.state.get("embed_dim")
        if saved_width is not None and int(saved_width) != iv.embed_dim:
            raise LoadError(f"{source}: intervention {key!r} was saved with embed_dim={int(saved_width)}, the "
                            f"model's site has width {iv.embed_dim}")
        tensors.update({f"{key}.{name}": t.float() for name, t in loaded.named.items()})
        if loaded.basis is not None:
            tensors[f"{key}.rotation.raw"] = loaded.basis.float()
    check_and_load(interventions, tensors, source)
    for (key, iv), loaded in zip(interventions.items(), weights):
        if loaded.basis is not None:
            iv.rotation.assign(loaded.basis.float())


def load_pyreft(model: nn.Module, path: str | Path, build: Build, positions: str | None = None,
                classes: dict[str, str] | None = None, **intervention_kwargs: Any) -> Any:
    """Build a :class:`~reftkit.ReftModel` on ``model`` from pyreft's save folder ``path``
    (``build(model, config)`` attaches; ``ReftModel.from_pyreft`` passes its class).

    ``positions`` applies to every representation (pyreft keeps positions in its data, not its
    save); leave it ``None`` and every call must pass ``intervention_locations`` (a call without them
    raises), in the order of pyreft's ``sorted_keys`` (which is also reftkit's order).
    ``classes`` maps an intervention class of the save that is not one of pyreft's six (by its name
    or its dotted path, e.g. the composition example's ``SubloreftIntervention``) to the one of the
    six whose weights and formula it keeps. ``intervention_kwargs`` (``act_fn``, ``dropout``) are
    set on every representation. Each rank is read off the saved tensors.
    """
    folder = Path(path)
    config_file, reps, types, keys = read_pyreft_config(folder)
    entries, loaded = [], []
    for i, (rep, type_text, key) in enumerate(zip(reps, types, keys)):
        cls_name = _class_name(type_text, dict(classes or {}), f"{config_file}: intervention_types[{i}]")
        fields = _representation(rep, f"{config_file}: representations[{i}]")
        weights = read_pyreft_weights(folder, key, cls_name, i)
        kwargs = weights.arguments | dict(intervention_kwargs)
        if cls_name in ("ConsreftIntervention", "LobireftIntervention"):
            kwargs.pop("act_fn", None)  # these two have no activation
        layer = fields.get("layer", 0)  # pyvene's default; it ignores the layer of a module path
        entries.append({"layer": layer, "component": fields["component"], "positions": positions,
                        "intervention": PYREFT_NAMES[cls_name].name, **kwargs})
        loaded.append(weights)
    reft = build(model, entries)
    try:
        install_pyreft_weights(reft.interventions, loaded, str(folder))
    except LoadError:
        reft.detach()
        raise
    return reft
