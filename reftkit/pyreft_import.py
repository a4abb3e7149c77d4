"""Import a pyreft 0.1.0 save folder (``config.json`` + ``intkey_<key>.bin``) into reftkit.

pyreft saves each intervention with ``torch.save``; we read them with
``torch.load(..., weights_only=True)``, which refuses anything but tensors and plain containers.
pyreft does not save positions, ``dropout``, ``act_fn`` or ``add_bias``: pass ``positions`` (and
``act_fn``/``dropout`` if you trained with them) to :func:`load_pyreft`; ``add_bias`` is read off
the presence of the projection bias.

Orthogonal bases: pyreft's LoReFT saves the materialised ``R`` (``rotate_layer``, ``d x r``); the
other orthogonal classes save torch's ``orthogonal`` parametrisation internals
(``...weight.original`` ``d x r`` and ``...weight.0.base`` ``d x d``), from which ``R`` is rebuilt
exactly as torch does with its Householder map: ``R = base @ (H(tril(X, -1)) * sign(diag X))``.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from reftkit.interventions import PYREFT_NAMES

from .serialization import Build, LoadError, check_and_load

_CLASS = re.compile(r"pyreft\.interventions\.(\w+)")


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


def _translate(cls_name: str, state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
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


def load_pyreft(model: nn.Module, path: str | Path, build: Build, positions: str | None = None,
                **intervention_kwargs: Any) -> Any:
    """Build a :class:`~reftkit.ReftModel` on ``model`` from pyreft's save folder ``path``
    (``build(model, config)`` attaches; ``ReftModel.from_pyreft`` passes its class).

    ``positions`` applies to every representation (pyreft keeps positions in its data, not its
    save); leave it ``None`` to pass ``intervention_locations`` at call time, in the order of
    pyreft's ``sorted_keys`` (which is also reftkit's order). ``intervention_kwargs`` (``act_fn``,
    ``dropout``) are set on every representation.
    """
    folder = Path(path)
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise LoadError(f"{config_file} is missing; is {folder} a pyreft save folder?")
    config = json.loads(config_file.read_text())
    for field in ("representations", "intervention_types", "sorted_keys"):
        if field not in config:
            raise LoadError(f"{config_file}: field {field!r} is missing; this is not a pyreft 0.1.0 config")
    reps, types, keys = config["representations"], config["intervention_types"], config["sorted_keys"]
    if not len(reps) == len(types) == len(keys):
        raise LoadError(f"{config_file}: {len(reps)} representations, {len(types)} intervention_types and "
                        f"{len(keys)} sorted_keys must agree")
    entries, states, class_names = [], [], []
    for i, (rep, type_text, key) in enumerate(zip(reps, types, keys)):
        match = _CLASS.search(str(type_text))
        if not match or match.group(1) not in PYREFT_NAMES:
            raise LoadError(f"{config_file}: intervention_types[{i}]={type_text!r} is not one of pyreft's six")
        weights = folder / f"intkey_{key}.bin"
        if not weights.is_file():
            raise LoadError(f"{weights} is missing (sorted_keys[{i}]={key!r})")
        try:
            state = torch.load(weights, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - report any refusal of the unpickler by file name
            raise LoadError(f"{weights} could not be read safely (weights_only=True): {err}") from None
        cls_name = match.group(1)
        layer, component, low_rank = rep[0], rep[1], rep[4]
        kwargs = {"low_rank_dimension": int(low_rank)} | dict(intervention_kwargs)
        if cls_name in ("NoreftIntervention", "NodireftIntervention"):
            kwargs["add_bias"] = "proj_layer.bias" in state
        if cls_name in ("ConsreftIntervention", "LobireftIntervention"):
            kwargs.pop("act_fn", None)  # these two have no activation
        entries.append({"layer": layer, "component": component, "positions": positions,
                        "intervention": PYREFT_NAMES[cls_name].name, **kwargs})
        states.append(state)
        class_names.append(cls_name)
    reft = build(model, entries)
    tensors: dict[str, torch.Tensor] = {}
    for key, cls_name, state in zip(reft.interventions, class_names, states):
        iv = reft.interventions[key]
        if "embed_dim" in state and int(state["embed_dim"]) != iv.embed_dim:
            reft.detach()
            raise LoadError(f"{folder}: intervention {key!r} was saved with embed_dim={int(state['embed_dim'])}, "
                            f"the model's site has width {iv.embed_dim}")
        named, basis = _translate(cls_name, state)
        tensors.update({f"{key}.{name}": t for name, t in named.items()})
        if basis is not None:
            tensors[f"{key}.rotation.raw"] = basis
    try:
        check_and_load(reft.interventions, {k: v.float() for k, v in tensors.items()}, str(folder))
    except LoadError:
        reft.detach()
        raise
    return reft
