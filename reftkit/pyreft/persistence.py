"""pyreft's save folder, written and read by ``reftkit.pyreft.ReftModel.save`` / ``.load``.

The layout is pyreft 0.1.0's (pyvene's ``IntervenableModel.save``), so a folder saved here loads in
pyreft, and one pyreft saved loads here:

* ``config.json``: pyvene's config (``representations`` as lists in RepresentationConfig order,
  ``intervention_types`` as ``"<class 'pyreft.interventions.LoreftIntervention'>"``, ``sorted_keys``);
* ``intkey_<key>.bin``: one state dict per intervention, in pyreft's tensor names (LoReFT: ``weight``,
  ``bias``, ``rotate_layer`` = R; the other orthonormal classes: torch's ``orthogonal`` internals,
  ``original`` = -I and a ``d x d`` ``base`` whose first r columns are R);
* ``pytorch_model.bin`` with ``include_model``: the base model's trainable weights (a classifier head).

Only tensors are written, and files are read with ``torch.load(weights_only=True)``, which refuses
anything else. Classes are looked up, never imported: pyreft's own names map to reftkit.pyreft's
classes, and a user's subclass (``"<class '__main__.SubloreftIntervention'>"``) is found only if its
module is already imported.
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

import torch
import transformers
from torch import nn

from reftkit.pyreft_import import (
    PyreftWeights,
    attach_or_undo,
    install_pyreft_weights,
    read_pyreft_config,
    read_pyreft_state,
    read_pyreft_weights,
)
from reftkit.serialization import LoadError

from .config import REPRESENTATION_FIELDS, ReftConfig
from .interventions import PYREFT_CLASSES, PyreftSurface, pyreft_base_class

_TYPE = re.compile(r"<class '([\w.]+)\.(\w+)'>")


def _type_string(iv: nn.Module) -> str:
    cls = type(iv)
    if PYREFT_CLASSES.get(cls.__name__) is cls:
        return f"<class 'pyreft.interventions.{cls.__name__}'>"
    return f"<class '{cls.__module__}.{cls.__qualname__}'>"


def _completed_basis(rotation: torch.Tensor) -> torch.Tensor:
    """A ``d x d`` orthogonal matrix whose first ``r`` columns are ``rotation`` exactly (torch's
    ``orthogonal`` keeps such a ``base`` and maps ``original = -I`` to its first columns)."""
    d, r = rotation.shape
    fill = torch.randn(d, d - r, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.cat([rotation.double(), fill], dim=1))
    q[:, :r] = rotation.double()  # q's first columns are ±rotation; the others are orthogonal to its span
    return q.float()


def pyreft_state(iv: PyreftSurface) -> dict[str, torch.Tensor]:
    """An intervention's tensors under pyreft 0.1.0's names."""
    name = pyreft_base_class(type(iv))
    width = torch.tensor(iv.embed_dim)
    if name == "LoreftIntervention":
        return {"weight": iv.source.weight.detach().cpu(), "bias": iv.source.bias.detach().cpu(),
                "rotate_layer": iv.rotation().detach().cpu()}
    state: dict[str, torch.Tensor] = {"embed_dim": width, "interchange_dim": width.clone()}
    if hasattr(iv, "rotation"):
        rotation = iv.rotation().detach().cpu()
        collapsed = list(getattr(iv.rotation, "collapsed_columns", ()))
        if collapsed:  # complete R's zero columns in base; a 0 on original's diagonal zeroes them in pyreft's map
            rotation[:, collapsed] = _completed_basis(rotation[:, [j for j in range(rotation.shape[1])
                                                                   if j not in collapsed]])[:, -len(collapsed):]
        original = torch.zeros_like(rotation)
        original.diagonal().fill_(-1.0)
        original.diagonal()[collapsed] = 0.0
        state["rotate_layer.parametrizations.weight.original"] = original
        state["rotate_layer.parametrizations.weight.0.base"] = _completed_basis(rotation)
    if name in ("ConsreftIntervention", "LobireftIntervention"):
        state["learned_source"] = iv.bias.detach().cpu()
    else:
        state["learned_source.weight"] = iv.source.weight.detach().cpu()
        state["learned_source.bias"] = iv.source.bias.detach().cpu()
    if name in ("NoreftIntervention", "NodireftIntervention"):
        state["proj_layer.weight"] = iv.projection.weight.detach().cpu()
        if iv.projection.bias is not None:
            state["proj_layer.bias"] = iv.projection.bias.detach().cpu()
    return state


def save_pyreft_folder(reft: Any, directory: str | Path, include_model: bool = False) -> Path:
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    representations, types, dims = [], [], []
    for (key, iv), rep in zip(reft.interventions.items(), reft.pyreft_config.representations):
        fields = {"layer": rep.layer, "component": rep.component, "unit": rep.unit,
                  "max_number_of_units": rep.max_number_of_units, "low_rank_dimension": iv.rank}
        representations.append([fields.get(name) for name in REPRESENTATION_FIELDS])
        types.append(_type_string(iv))
        dims.append(iv.embed_dim)
        torch.save(pyreft_state(iv), folder / f"intkey_{key}.bin")
    config = {"intervention_constant_sources": [True] * len(types), "intervention_dimensions": dims,
              "intervention_types": types, "mode": "parallel", "representations": representations,
              "sorted_keys": list(reft.interventions), "transformers_version": transformers.__version__}
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    if include_model:
        trainable = {n: p.detach().cpu() for n, p in reft.model.named_parameters() if p.requires_grad}
        torch.save(trainable, folder / "pytorch_model.bin")
    return folder


def _resolve_class(text: str, index: int, config_file: Path) -> type[PyreftSurface]:
    match = _TYPE.fullmatch(str(text).strip())
    if match is None:
        raise LoadError(f"{config_file}: intervention_types[{index}]={text!r} is not a class string")
    module, name = match.groups()
    if module in ("pyreft.interventions", "pyreft", "reftkit.pyreft.interventions") and name in PYREFT_CLASSES:
        return PYREFT_CLASSES[name]
    loaded = sys.modules.get(module)
    cls = getattr(loaded, name, None) if loaded is not None else None
    if not (isinstance(cls, type) and issubclass(cls, PyreftSurface)):
        raise LoadError(f"{config_file}: intervention_types[{index}] is {module}.{name}, which is not one of pyreft's "
                        f"classes and is not an imported subclass of one; import the module that defines it (as a "
                        f"subclass of a reftkit.pyreft class) before loading - reftkit never imports modules a file "
                        f"names")
    return cls


def _read_folder(folder: Path) -> tuple[list[dict[str, Any]], list[PyreftWeights], list[str]]:
    """The entries (with fresh interventions) and translated weights of a pyreft save folder, and its keys."""
    config_file, reps, types, keys = read_pyreft_config(folder)
    entries, loaded = [], []
    for i, (rep, text, key) in enumerate(zip(reps, types, keys)):
        if isinstance(rep, list):
            fields = dict(zip(REPRESENTATION_FIELDS, rep))
        elif isinstance(rep, dict):
            fields = dict(rep)
        else:
            raise LoadError(f"{config_file}: representations[{i}]={rep!r:.80} is not a pyvene RepresentationConfig "
                            f"(a list of up to {len(REPRESENTATION_FIELDS)} fields)")
        cls = _resolve_class(text, i, config_file)
        weights = read_pyreft_weights(folder, key, pyreft_base_class(cls), i)
        arguments = dict(weights.arguments)
        collapsed = arguments.pop("collapsed_columns", [])
        intervention = cls(**arguments)
        if collapsed:
            # pyreft's constructors have no such argument; set it where build() reads it, before materialising
            intervention.hparams["collapsed_columns"] = list(collapsed)
        entries.append({f: fields.get(f) for f in ("layer", "component", "unit", "max_number_of_units")}
                       | {"intervention": intervention})
        loaded.append(weights)
    return entries, loaded, list(keys)


def _load_states(reft: Any, weights: list[PyreftWeights], folder: Path, include_model: bool) -> None:
    install_pyreft_weights(reft.interventions, weights, str(folder))
    if include_model:
        _load_model_weights(reft.model, folder / "pytorch_model.bin")


def load_pyreft_folder(build: type, directory: str | Path, model: nn.Module, include_model: bool = False) -> Any:
    """Rebuild the pyreft save in ``directory`` on ``model`` with ``build`` (reftkit.pyreft's ReftModel)."""
    folder = Path(directory)
    try:
        entries, states, _ = _read_folder(folder)
    except LoadError:
        raise
    except Exception as err:  # noqa: BLE001 - a malformed folder fails by its file's name, whatever breaks
        raise LoadError(f"{folder / 'config.json'}: {type(err).__name__}: {err}") from err
    return attach_or_undo(lambda: build(ReftConfig(representations=entries), model), folder / "config.json",
                          lambda reft: _load_states(reft, states, folder, include_model))


def load_into(reft: Any, directory: str | Path, include_model: bool = True) -> None:
    """pyvene's ``load_intervention``: read a save folder's weights into ``reft``'s own interventions, which
    must be the same classes at the same keys."""
    folder = Path(directory)
    entries, states, keys = _read_folder(folder)
    if keys != list(reft.interventions):
        raise LoadError(f"{folder} holds interventions {keys}; this model has {list(reft.interventions)}")
    for key, entry in zip(keys, entries):
        if type(entry["intervention"]) is not type(reft.interventions[key]):
            raise LoadError(f"{folder}: intervention {key!r} is a {type(entry['intervention']).__name__} there and a "
                            f"{type(reft.interventions[key]).__name__} here")
    _load_states(reft, states, folder, include_model)


def _load_model_weights(model: nn.Module, path: Path) -> None:
    state = read_pyreft_state(path)
    own = dict(model.named_parameters())
    unknown = sorted(set(state) - set(own))
    if unknown:
        raise LoadError(f"{path}: weight {unknown[0]!r} is not a parameter of this model")
    for name, tensor in state.items():
        if tuple(tensor.shape) != tuple(own[name].shape):
            raise LoadError(f"{path}: weight {name!r} has shape {tuple(tensor.shape)}, the model's has "
                            f"{tuple(own[name].shape)}")
        with torch.no_grad():
            own[name].copy_(tensor)
        own[name].requires_grad_(True)
