"""Import a pyreft 0.1.0 save folder (``config.json`` + ``intkey_<key>.bin``) into reftkit.

pyreft saves each intervention with ``torch.save``; we read them with ``torch.load(..., weights_only=True)``,
which refuses anything but tensors and plain containers. pyreft does not save positions, ``dropout``, ``act_fn``
or ``add_bias``: pass ``positions`` (and ``act_fn``/``dropout`` if you trained with them) to
:func:`load_pyreft`; ``add_bias`` is read off the presence of the projection bias, and the rank off the
tensors (pyvene's config ``low_rank_dimension`` is ``None`` when only the instance carried the rank, as in
pyreft's memorisation and composition examples). A pyvene module path (``"model.layers[1].output"``) as a
component is translated by :func:`pyvene_component`.

Orthogonal bases: pyreft's LoReFT saves the materialised ``R`` (``rotate_layer``, ``d x r``); the
other orthogonal classes save torch's ``orthogonal`` parametrisation internals
(``...weight.original`` ``d x r`` and ``...weight.0.base`` ``d x d``), from which ``R`` is rebuilt
exactly as torch does with its Householder map: ``R = base @ (H(tril(X, -1)) * int(diag X))``. The ``int``
truncates: a diagonal entry that weight decay pulled inside (-1, 1) zeroes its column of ``R`` in every forward
pyreft ran. Such columns are reproduced (the intervention's ``collapsed_columns``) and reported by a
:class:`CollapsedColumnsWarning`; a LoReFT save's ``R`` with zero columns is read the same way.

A folder that cannot be imported raises :class:`~reftkit.serialization.LoadError` naming the file (and
the field or tensor), and leaves the base model as it was. ``sorted_keys`` name files inside the folder:
a key holding a path separator is refused before any file is opened.
"""
from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from reftkit.interventions import PYREFT_NAMES, InterventionError

from .config import ConfigError
from .serialization import Build, LoadError, check_and_load, check_finite, read_json_object

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


class CollapsedColumnsWarning(UserWarning):
    """A pyreft save whose ``R`` has zero columns (torch's ``orthogonal`` map collapsed them under weight decay):
    reftkit reproduces them, and the intervention edits fewer directions than its rank says."""


def _complete(columns: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """``columns`` (``d x r``, float64) with the columns ``keep`` leaves out replaced by unit vectors orthogonal to
    all the others, so that QR of the result returns the kept columns as they are."""
    fill = torch.randn(*columns.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    q, kept = torch.linalg.qr(torch.cat([columns[:, keep], fill], dim=1))[0], int(keep.sum())
    out = columns.clone()
    out[:, ~keep] = q[:, kept:kept + int((~keep).sum())]
    return out


def _orthogonal_basis(state: dict[str, torch.Tensor], where: str,
                      prefix: str = "rotate_layer.parametrizations.weight") -> tuple[torch.Tensor, list[int]]:
    """torch's ``orthogonal`` parametrisation (``_Orthogonal.forward``) of a saved ``original`` and ``base``:
    ``R = base @ (H(tril(X, -1)) * int(diag X))`` for a tall ``X`` (Householder), ``base @ exp(tril X - tril X^T)``
    for a square one. ``int`` truncates: a diagonal that weight decay pulled inside (-1, 1) gives a zero
    column. Returns ``R`` with those columns completed to an orthonormal basis, and their indices."""
    original, base = state[f"{prefix}.original"].double(), state[f"{prefix}.0.base"].double()
    if original.dim() != 2 or base.dim() != 2 or base.shape[0] != base.shape[1] or base.shape[1] != original.shape[0]:
        raise LoadError(f"{where}: {prefix}.original has shape {tuple(original.shape)} and {prefix}.0.base "
                        f"{tuple(base.shape)}; torch's orthogonal map needs d x r and d x d")
    n, k = original.shape
    if n < k:
        raise LoadError(f"{where}: {prefix}.original has shape {tuple(original.shape)}; pyreft's R is d x r, r <= d")
    if n == k:  # torch's default map for a square matrix is the matrix exponential, which never collapses
        return (base @ torch.matrix_exp(original.tril() - original.tril().mT)).float(), []
    reflectors = original.tril(-1)
    tau = 2.0 / (1.0 + (reflectors * reflectors).sum(dim=-2))
    factors = original.diagonal().int()
    if bool((factors.abs() > 1).any()):
        j = int((factors.abs() > 1).nonzero()[0])
        raise LoadError(f"{where}: {prefix}.original[{j}, {j}]={float(original[j, j])} scales column {j} of R by "
                        f"{int(factors[j])} in torch's orthogonal map; R is not orthonormal and reftkit cannot "
                        "reproduce it")
    signs = torch.where(original.diagonal() < 0, -1.0, 1.0).to(torch.float64)
    full = base @ (torch.linalg.householder_product(reflectors, tau) * signs.unsqueeze(-2))
    return full.float(), (factors == 0).nonzero().flatten().tolist()


def _rotation(state: dict[str, torch.Tensor], where: str) -> tuple[torch.Tensor, list[int]]:
    """R (with any zero columns completed to an orthonormal basis) and the indices of its zero columns."""
    if "rotate_layer" in state:  # LoReFT's own state_dict override: R itself, zero columns included
        rotation = state["rotate_layer"]
        if rotation.dim() != 2:
            raise LoadError(f"{where}: tensor 'rotate_layer' has shape {tuple(rotation.shape)}; R is d x r")
        keep = rotation.ne(0).any(dim=0)
        return (rotation.float(), []) if bool(keep.all()) else \
            (_complete(rotation.double(), keep).float(), (~keep).nonzero().flatten().tolist())
    return _orthogonal_basis(state, where)


def translate_pyreft_state(cls_name: str, state: dict[str, torch.Tensor], where: str = "pyreft state"
                           ) -> tuple[dict[str, torch.Tensor], torch.Tensor | None, list[int]]:
    """Map a pyreft state dict to reftkit names; the basis R (if any, completed to an orthonormal basis) is
    returned apart, with the indices of the columns pyreft's R has at zero."""
    if cls_name == "LoreftIntervention":
        return {"source.weight": state["weight"], "source.bias": state["bias"]}, *_rotation(state, where)
    if cls_name == "DireftIntervention":
        return {"source.weight": state["learned_source.weight"], "source.bias": state["learned_source.bias"]}, \
            *_rotation(state, where)
    if cls_name in ("NoreftIntervention", "NodireftIntervention"):
        out = {"projection.weight": state["proj_layer.weight"], "source.weight": state["learned_source.weight"],
               "source.bias": state["learned_source.bias"]}
        if "proj_layer.bias" in state:
            out["projection.bias"] = state["proj_layer.bias"]
        return out, None, []
    if cls_name in ("ConsreftIntervention", "LobireftIntervention"):
        return {"bias": state["learned_source"]}, *_rotation(state, where)
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


def _check_key(key: Any, index: int, config_file: Path) -> str:
    """A ``sorted_keys`` entry names the file ``intkey_<key>.bin`` inside the folder: refuse anything that would
    make that name a path (a separator or NUL), so no file outside the folder is ever opened."""
    if not isinstance(key, str) or not key:
        raise LoadError(f"{config_file}: sorted_keys[{index}]={key!r:.80} must be a non-empty string")
    if any(ch in key for ch in ("/", "\\", "\0")) or Path(f"intkey_{key}.bin").name != f"intkey_{key}.bin":
        raise LoadError(f"{config_file}: sorted_keys[{index}]={key!r:.80} contains a path separator; an intervention "
                        "key names a file inside the save folder, never a path")
    return key


def read_pyreft_config(folder: Path) -> tuple[Path, list, list, list]:
    """``config.json`` of a pyreft save folder: its path, ``representations``, ``intervention_types`` and
    ``sorted_keys``, checked to be lists of one length, the keys to be plain file-name parts."""
    config_file = folder / "config.json"
    config = read_json_object(config_file, "a folder saved by pyreft (or reftkit.pyreft)")
    for field in ("representations", "intervention_types", "sorted_keys"):
        if field not in config:
            raise LoadError(f"{config_file}: field {field!r} is missing; this is not a pyreft 0.1.0 config")
        if not isinstance(config[field], list):
            raise LoadError(f"{config_file}: {field}={config[field]!r:.80} must be a list")
    reps, types, keys = config["representations"], config["intervention_types"], config["sorted_keys"]
    if not len(reps) == len(types) == len(keys):
        raise LoadError(f"{config_file}: {len(reps)} representations, {len(types)} intervention_types and "
                        f"{len(keys)} sorted_keys must agree")
    keys = [_check_key(key, i, config_file) for i, key in enumerate(keys)]
    if len(set(keys)) != len(keys):
        raise LoadError(f"{config_file}: sorted_keys={keys} repeats a key")
    return config_file, reps, types, keys


def read_pyreft_state(path: Path, what: str = "") -> dict[str, torch.Tensor]:
    """One ``torch.save``d file of a pyreft folder, read with ``weights_only=True`` (tensors and plain
    containers only), checked to be a dict of named tensors without NaN or inf; ``what`` says which entry of
    the config named it."""
    if not path.is_file():
        raise LoadError(f"{path} is missing" + (f" ({what})" if what else ""))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - report any refusal of the unpickler by file name
        raise LoadError(f"{path} could not be read safely (weights_only=True): {err}") from None
    if not isinstance(state, dict):
        raise LoadError(f"{path} holds a {type(state).__name__}, not a state dict of named tensors")
    for name, tensor in state.items():
        if not isinstance(name, str) or not isinstance(tensor, torch.Tensor):
            raise LoadError(f"{path}: entry {name!r:.80} is a {type(tensor).__name__}, not a named tensor")
    check_finite(state, str(path))
    return state


class PyreftWeights(NamedTuple):
    """One intervention of a pyreft folder: its saved ``state``, the tensors under reftkit's names, ``R`` apart
    (``None`` without a basis; zero columns completed to an orthonormal basis), and the constructor
    ``arguments`` the tensors fix (rank, NoReFT's ``add_bias``, the ``collapsed_columns`` of R), and the
    ``intkey_<key>.bin`` ``file`` it was read from."""

    state: dict[str, torch.Tensor]
    named: dict[str, torch.Tensor]
    basis: torch.Tensor | None
    arguments: dict[str, Any]
    file: str = ""


def read_pyreft_weights(folder: Path, key: str, cls_name: str, index: int) -> PyreftWeights:
    """Read and translate ``intkey_<key>.bin`` of a ``cls_name`` (one of pyreft's six); warns
    (:class:`CollapsedColumnsWarning`) when pyreft's R has zero columns."""
    path = folder / f"intkey_{key}.bin"
    state = read_pyreft_state(path, f"sorted_keys[{index}]={key!r}")
    try:
        named, basis, collapsed = translate_pyreft_state(cls_name, state, str(path))
        # the tensors are what pyreft's forward ran with; the config's low_rank_dimension is None when only the
        # instance carried the rank, and the instance's rank wins in pyvene where the two differ
        arguments: dict[str, Any] = {"low_rank_dimension": rank_of(named, basis)}
    except KeyError as err:
        raise LoadError(f"{path}: tensor {err} is missing for a {cls_name}") from None
    except (IndexError, RuntimeError, TypeError, ValueError) as err:
        if isinstance(err, LoadError):
            raise
        raise LoadError(f"{path}: the tensors do not form a {cls_name} ({type(err).__name__}: {err})") from None
    if cls_name in ("NoreftIntervention", "NodireftIntervention"):
        arguments["add_bias"] = "proj_layer.bias" in state
    if collapsed:
        arguments["collapsed_columns"] = collapsed
        warnings.warn(f"{path}: intervention {key!r} has collapsed columns {collapsed} of R (zero in pyreft: torch's "
                      "orthogonal map reads its diagonal with int(), and weight decay pulled it inside (-1, 1)); "
                      "reftkit reproduces them, so the intervention edits "
                      f"{arguments['low_rank_dimension'] - len(collapsed)} of its "
                      f"{arguments['low_rank_dimension']} directions", CollapsedColumnsWarning, stacklevel=3)
    return PyreftWeights(state, named, basis, arguments, str(path))


def install_pyreft_weights(interventions: nn.ModuleDict, weights: list[PyreftWeights], source: str) -> None:
    """Load translated weights into ``interventions`` (in order), strictly; ``R`` goes through ``assign`` so the
    next step moves it as far as pyreft's map would."""
    tensors: dict[str, torch.Tensor] = {}
    for (key, iv), loaded in zip(interventions.items(), weights):
        saved_width = loaded.state.get("embed_dim")
        if saved_width is not None and (saved_width.numel() != 1 or int(saved_width) != iv.embed_dim):
            raise LoadError(f"{source}: intervention {key!r} was saved with embed_dim={saved_width.tolist()}, the "
                            f"model's site has width {iv.embed_dim}")
        own = iv.state_dict()
        for name, tensor in loaded.named.items():
            if name in own and tuple(tensor.shape) != tuple(own[name].shape):
                saved = next((k for k, v in loaded.state.items() if v is tensor), name)  # pyreft's name for it
                raise LoadError(f"{loaded.file or source}: tensor {saved!r} (intervention {key!r}) has shape "
                                f"{tuple(tensor.shape)}, the model expects {tuple(own[name].shape)}")
        tensors.update({f"{key}.{name}": t.float() for name, t in loaded.named.items()})
        if loaded.basis is not None:
            expected = tuple(own["rotation.raw"].shape) if "rotation.raw" in own else None
            if expected is not None and tuple(loaded.basis.shape) != expected:
                saved = "rotate_layer" if "rotate_layer" in loaded.state else "rotate_layer.parametrizations.weight"
                raise LoadError(f"{loaded.file or source}: tensor {saved!r} (intervention {key!r}) gives R of shape "
                                f"{tuple(loaded.basis.shape)}, the model expects {expected} (d x r)")
            tensors[f"{key}.rotation.raw"] = loaded.basis.float()
            collapsed = list(getattr(iv.rotation, "collapsed_columns", ()))
            if collapsed != list(loaded.arguments.get("collapsed_columns", [])):
                raise LoadError(f"{source}: intervention {key!r} has collapsed columns "
                                f"{loaded.arguments.get('collapsed_columns', [])} in the save, {collapsed} as built")
    check_and_load(interventions, tensors, source)
    for (key, iv), loaded in zip(interventions.items(), weights):
        if loaded.basis is not None:
            iv.rotation.assign(loaded.basis.float())


def attach_or_undo(build: Any, source: Path, install: Any) -> Any:
    """``reft = build()``, then ``install(reft)``; whatever fails raises :class:`LoadError` naming ``source``
    (keeping the message of reftkit's own errors) with the base model left as it was: ``build`` undoes a failed
    attach itself, and a failure after it detaches the model it built."""
    reft = None
    try:
        reft = build()
        install(reft)
    except BaseException as err:
        if reft is not None:
            reft.detach()
        if isinstance(err, LoadError) or not isinstance(err, Exception):
            raise
        what = str(err) if isinstance(err, (ConfigError, InterventionError)) else f"{type(err).__name__}: {err}"
        raise LoadError(f"{source}: {what}") from err
    return reft


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
    config_file = folder / "config.json"
    entries, loaded = [], []
    try:
        _, reps, types, keys = read_pyreft_config(folder)
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
    except LoadError:
        raise
    except Exception as err:  # noqa: BLE001 - a malformed folder fails by its file's name, whatever breaks
        raise LoadError(f"{config_file}: {type(err).__name__}: {err}") from err
    return attach_or_undo(lambda: build(model, entries), config_file,
                          lambda reft: install_pyreft_weights(reft.interventions, loaded, str(folder)))
