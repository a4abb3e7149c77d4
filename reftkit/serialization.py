"""Save and load a ``ReftModel``: ``config.json`` + ``interventions.safetensors``; nothing is ever unpickled.

``config.json`` holds the format version, the ``ReftConfig`` with every constructor argument,
one record per intervention (key, class, arguments, site, tensor shapes) and the SHA-256 of the
weights file, so a missing, truncated or altered file is refused at load with its name; so is a folder
without that record, unless the caller passes ``verify_weights=False``. NaN or infinite weights are refused
by tensor name. A load that fails leaves the base model as it was.

A tied intervention (one module at several sites, ``tie`` in the config) is written once, under its first key;
the records of the other keys say ``"tied_to": <that key>``, and a load checks them against the ties the config
builds.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .attachment import tied_keys
from .config import FORMAT_VERSION, ConfigError, ReftConfig

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "interventions.safetensors"


class LoadError(ValueError):
    """A save folder that cannot be loaded; names the file and the field or tensor at fault."""


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks (save folders and expert libraries record it)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_reft(reft: nn.Module, path: str | Path) -> Path:
    """Write ``config.json`` and ``interventions.safetensors`` of a ``ReftModel`` into ``path`` (created if
    needed)."""
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    aliases = tied_keys(reft.interventions)
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in reft.interventions.state_dict().items()
               if name.split(".", 1)[0] not in aliases}  # a tied set once, under its first key
    weights = folder / WEIGHTS_NAME
    save_file(tensors, str(weights), metadata={"format": "pt", "reftkit_format_version": str(FORMAT_VERSION)})
    records = []
    for slot in reft._hooks.slots:
        site = slot.site
        records.append({
            "key": slot.key, "class": type(slot.intervention).__name__, "name": slot.intervention.name,
            "arguments": slot.intervention.config(),
            "site": {"layer": site.layer, "component": site.component, "module_path": site.module_path,
                     "hook": site.hook, "width": site.width},
            **({"tied_to": aliases[slot.key]} if slot.key in aliases else {}),
        })
    config = {
        **reft.reft_config.to_dict(),
        "library": "reftkit",
        "base_model": {"model_type": getattr(reft.model.config, "model_type", None),
                       "name_or_path": getattr(reft.model.config, "_name_or_path", None)},
        "interventions": records,
        "tensors": {name: list(t.shape) for name, t in tensors.items()},
        "weights_sha256": file_sha256(weights),
    }
    (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2))
    return folder


def read_json_object(config_file: Path, kind: str) -> dict[str, Any]:
    """A save folder's ``config.json`` as a dict; ``LoadError`` naming the file when it is missing, not JSON, or
    not a JSON object (``kind`` says what folder was expected, for the first)."""
    if not config_file.is_file():
        raise LoadError(f"{config_file} is missing; is {config_file.parent} {kind}?")
    try:
        config = json.loads(config_file.read_text())
    except (ValueError, OSError) as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise LoadError(f"{config_file} is not valid JSON: {err}") from None
    if not isinstance(config, dict):
        raise LoadError(f"{config_file}: the top level must be a JSON object, not {type(config).__name__}")
    return config


def read_config(path: str | Path) -> dict[str, Any]:
    config_file = Path(path) / CONFIG_NAME
    config = read_json_object(config_file, "a reftkit save folder")
    version = config.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise LoadError(f"{config_file}: format_version={version!r} must be an int")
    if version > FORMAT_VERSION:
        raise LoadError(f"{config_file}: format_version={version} was written by a newer reftkit "
                        f"(this one reads up to {FORMAT_VERSION}); upgrade reftkit to load it")
    return config


def read_weights(folder: Path, config: dict[str, Any], verify: bool = True) -> dict[str, torch.Tensor]:
    """The tensors of ``interventions.safetensors``, checked against ``weights_sha256`` of ``config`` unless
    ``verify`` is False (then a missing record is accepted and a mismatch is not looked for)."""
    weights = folder / WEIGHTS_NAME
    if not weights.is_file():
        raise LoadError(f"{weights} is missing")
    if verify:
        expected = config.get("weights_sha256")
        if expected is None:
            raise LoadError(f"{folder / CONFIG_NAME} has no weights_sha256, so {weights} cannot be checked; "
                            "save_pretrained always records it. To load it anyway, pass verify_weights=False")
        if not isinstance(expected, str):
            raise LoadError(f"{folder / CONFIG_NAME}: weights_sha256={expected!r:.80} must be a hex string")
        if file_sha256(weights) != expected:
            raise LoadError(f"{weights}: SHA-256 does not match weights_sha256 in {CONFIG_NAME}; the file is "
                            "truncated or was altered after saving. To load it anyway, pass verify_weights=False")
    try:
        return load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as err:
        raise LoadError(f"{weights} is not a readable safetensors file: {err}") from None


def check_finite(tensors: dict[str, Any], source: str) -> None:
    """Refuse a NaN or infinite value in any floating-point tensor, naming the tensor."""
    for name, tensor in tensors.items():
        if isinstance(tensor, torch.Tensor) and tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = "NaN" if bool(torch.isnan(tensor).any()) else "inf"
            raise LoadError(f"{source}: tensor {name!r} holds {bad} values; the weights are corrupt or training "
                            "diverged")


def _fold_ties(interventions: nn.ModuleDict, tensors: dict[str, torch.Tensor], source: str
               ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``tensors`` with a tied set's under its first key only (a full ``state_dict()`` repeats them under every
    key: the copies must be equal), and the ties (``{key: first key}``)."""
    aliases = tied_keys(interventions)
    if not aliases:
        return tensors, aliases
    folded = {name: t for name, t in tensors.items() if name.split(".", 1)[0] not in aliases}
    for name, tensor in tensors.items():
        key, _, rest = name.partition(".")
        if key in aliases:
            owner = f"{aliases[key]}.{rest}"
            if owner not in folded:
                folded[owner] = tensor
            elif not (folded[owner].shape == tensor.shape and torch.equal(folded[owner], tensor)):
                raise LoadError(f"{source}: tensor {name!r} differs from {owner!r}, but intervention {key!r} is tied "
                                f"to {aliases[key]!r} (one module): a tied set holds one set of weights")
    return folded, aliases


def check_and_load(interventions: nn.ModuleDict, tensors: dict[str, torch.Tensor], source: str) -> None:
    """Load ``tensors`` into ``interventions`` strictly, naming any missing, extra or misshapen tensor. A tied
    intervention's tensors are expected once, under its first key (repeated copies are accepted if equal)."""
    check_finite(tensors, source)
    tensors, aliases = _fold_ties(interventions, tensors, source)
    own = {name: t for name, t in interventions.state_dict().items() if name.split(".", 1)[0] not in aliases}
    missing = sorted(set(own) - set(tensors))
    extra = sorted(set(tensors) - set(own))
    if missing:
        raise LoadError(f"{source}: tensor {missing[0]!r} is missing (expected {len(own)} tensors: {sorted(own)})")
    if extra:
        raise LoadError(f"{source}: tensor {extra[0]!r} does not belong to any intervention of this config")
    for name, tensor in tensors.items():
        if tuple(tensor.shape) != tuple(own[name].shape):
            raise LoadError(f"{source}: tensor {name!r} has shape {tuple(tensor.shape)}, the model expects "
                            f"{tuple(own[name].shape)} (was it saved for another base model?)")
    for name in interventions.state_dict():
        key, _, rest = name.partition(".")
        if key in aliases:
            tensors[name] = tensors[f"{aliases[key]}.{rest}"]
    interventions.load_state_dict(tensors, strict=True)


#: ``build(model, config)`` attaches a config's interventions to a base model: ``ReftModel`` itself
Build = Callable[[nn.Module, ReftConfig], Any]


def _saved_keys(config: dict[str, Any], config_file: Path) -> list[str]:
    """The intervention keys ``config.json`` records (``interventions[i].key``), checked to be well formed."""
    records = config.get("interventions", [])
    if not isinstance(records, list):
        raise LoadError(f"{config_file}: interventions={records!r:.80} must be a list of records")
    keys = []
    for i, record in enumerate(records):
        if not isinstance(record, dict):
            raise LoadError(f"{config_file}: interventions[{i}]={record!r:.80} must be a record (a JSON object)")
        if not isinstance(record.get("key"), str):
            raise LoadError(f"{config_file}: interventions[{i}].key={record.get('key')!r:.80} must be a string")
        keys.append(record["key"])
    return keys


def _check_ties(config: dict[str, Any], config_file: Path, built: dict[str, str]) -> None:
    """The ties the records state (``interventions[i].tied_to``) must be the ties the config builds."""
    records = config.get("interventions", [])
    keys = [record["key"] for record in records]
    for i, record in enumerate(records):
        key, target = record["key"], record.get("tied_to")
        if target is not None and (not isinstance(target, str) or target not in keys or target == key):
            raise LoadError(f"{config_file}: interventions[{i}].tied_to={target!r:.80} names no other saved "
                            f"intervention (the keys are {keys})")
        if target != built.get(key):
            does = f"ties it to {built[key]!r}" if key in built else "does not tie it"
            raise LoadError(f"{config_file}: interventions[{i}].tied_to={target!r} ({key!r}), but the config's "
                            f"representations (their tie fields) {does}; the folder was edited inconsistently")


def load_reft(model: nn.Module, path: str | Path, build: Build, verify_weights: bool = True) -> Any:
    """Rebuild a ``ReftModel`` on ``model`` from a folder written by ``save_pretrained``.

    ``build`` attaches the saved config (``ReftModel.from_pretrained`` passes its class), so this
    module never imports the model it loads into. ``verify_weights=False`` skips the SHA-256 check of the
    weights file (see :func:`read_weights`). Whatever fails raises :class:`LoadError` naming the file, and
    ``model`` is left as it was: no hooks, its own ``requires_grad`` flags and train/eval mode.
    """
    folder = Path(path)
    config_file = folder / CONFIG_NAME
    reft = None
    try:
        config = read_config(folder)
        saved_keys = _saved_keys(config, config_file)
        reft_config = ReftConfig.from_dict(config)
        tensors = read_weights(folder, config, verify=verify_weights)
        reft = build(model, reft_config)
        if saved_keys and saved_keys != list(reft.interventions):
            raise LoadError(f"{config_file}: interventions {saved_keys} were saved, this model builds "
                            f"{list(reft.interventions)}")
        if saved_keys:
            _check_ties(config, config_file, tied_keys(reft.interventions))
        check_and_load(reft.interventions, tensors, str(folder / WEIGHTS_NAME))
    except BaseException as err:
        if reft is not None:
            reft.detach()
        if isinstance(err, LoadError) or not isinstance(err, Exception):
            raise
        # a config error keeps its message (it names the field); anything else is named by its type
        what = str(err) if isinstance(err, ConfigError) else f"{type(err).__name__}: {err}"
        raise LoadError(f"{config_file}: {what}") from err
    return reft
