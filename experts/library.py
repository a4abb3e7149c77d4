"""A named collection of trained experts of one shape, saved and loaded as one folder.

Two kinds, one per library:

* ``"reft"`` — the interventions of a :class:`~reftkit.ReftModel` (LoReFT and its family, IA3
  vectors attached as :class:`~reftkit.interventions.IA3`, adapters...): every expert has the same
  ``ReftConfig`` and tensors of the same shapes, only the values differ.
* ``"svf"`` — Transformer²'s SVF expert vectors: one ``z`` per adapted linear layer
  (:mod:`reftkit.analysis.svf`), the same layers and parametrisation for every expert.

The folder holds ``library.json`` (kind, shared config, tensor shapes, expert names, SHA-256 of the
weights) and ``experts.safetensors`` (``"<expert>/<tensor>"``). Nothing is pickled.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from reftkit.config import ReftConfig
from reftkit.model import ReftModel
from reftkit.serialization import file_sha256

LIBRARY_FILE = "library.json"
WEIGHTS_FILE = "experts.safetensors"
FORMAT_VERSION = 1
KINDS = ("reft", "svf")


class ExpertError(ValueError):
    """An expert or library that cannot be used; names the expert, the tensor or field at fault."""


def _svf_modules(model: nn.Module) -> dict[str, nn.Module]:
    from reftkit.analysis.svf import svf_modules

    inner = getattr(model, "model", None) if getattr(model, "method", None) == "svf" else None
    return svf_modules(inner if inner is not None else model)


def _describe(source: Any) -> tuple[str, dict[str, Any], dict[str, torch.Tensor], dict[str, str]]:
    """(kind, shared config, tensors, mixing mode per tensor group) of a trained model."""
    if isinstance(source, ReftModel):
        entries = source.reft_config.to_dict()
        routed = [i for i, r in enumerate(entries["representations"]) if r.get("task") is not None]
        if routed:
            task = entries["representations"][routed[0]]["task"]
            raise ExpertError(f"representations[{routed[0]}] has task={task!r}:"
                              " an expert is one intervention set; give the model of a single task")
        special = [k for k, iv in source.interventions.items() if iv.uses_source or iv.collects]
        if special:
            raise ExpertError(f"intervention {special[0]!r} reads a source run or collects activations: only "
                              "interventions that edit on their own can be experts")
        tensors = {k: v.detach().float().cpu().clone() for k, v in source.interventions.state_dict().items()}
        mixing = {k: type(iv).mixing for k, iv in source.interventions.items()}
        return "reft", {"reft_config": entries, "keys": list(source.interventions)}, tensors, mixing
    modules = _svf_modules(source) if isinstance(source, nn.Module) else {}
    if modules:
        first = next(iter(modules.values()))
        config = {"parametrization": first.parametrization, "max_mult": first.max_mult, "keys": list(modules)}
        tensors = {name: m.z.detach().float().cpu().clone() for name, m in modules.items()}
        return "svf", config, tensors, {name: "parameters" for name in modules}
    raise ExpertError(f"cannot make an expert of {type(source).__name__}: give a reftkit ReftModel, a model with SVF "
                      "applied (reftkit.analysis.apply_svf) or an 'svf' WeightSpaceModel")


class ExpertLibrary:
    """Named experts of one kind and one shape.

    >>> library = ExpertLibrary()
    >>> library.add("sentiment", reft_a)      # trained ReftModels with one config
    >>> library.add("topic", reft_b)
    >>> library.save("experts/"); library = ExpertLibrary.load("experts/")
    """

    def __init__(self) -> None:
        self.kind: str | None = None
        self.config: dict[str, Any] = {}
        self.mixing: dict[str, str] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.experts: dict[str, dict[str, torch.Tensor]] = {}

    # -- contents ------------------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        return list(self.experts)

    def __len__(self) -> int:
        return len(self.experts)

    def __iter__(self) -> Iterator[str]:
        return iter(self.experts)

    def __contains__(self, name: object) -> bool:
        return name in self.experts

    def __getitem__(self, name: str) -> dict[str, torch.Tensor]:
        self.check_names([name])
        return self.experts[name]

    def check_names(self, names: Any, field: str = "expert") -> None:
        """Raise naming the first of ``names`` that is not an expert of this library."""
        for name in names:
            if name not in self.experts:
                raise ExpertError(f"{field} {name!r} does not exist; this library has {self.names}")

    @property
    def keys(self) -> list[str]:
        """Intervention keys (``"reft"``) or adapted module names (``"svf"``), in order."""
        return list(self.config.get("keys", []))

    def add(self, name: str, source: Any) -> None:
        """Store the trained weights of ``source`` (a ReftModel, or a model with SVF layers) as ``name``.

        The first expert fixes the kind, the config and the tensor shapes; every later one must match."""
        if not isinstance(name, str) or not name or "/" in name:
            raise ExpertError(f"name={name!r} must be a non-empty string without '/'")
        if name in self.experts:
            raise ExpertError(f"expert {name!r} is already in the library; remove it first")
        kind, config, tensors, mixing = _describe(source)
        if self.kind is None:
            self.kind, self.config, self.mixing = kind, config, mixing
            self.shapes = {k: tuple(v.shape) for k, v in tensors.items()}
        else:
            self._check_match(name, kind, config, tensors)
        self.experts[name] = tensors

    def add_tensors(self, name: str, tensors: Mapping[str, torch.Tensor]) -> None:
        """Store ready-made tensors (e.g. a parameter mixture) under ``name``; shapes are checked."""
        if self.kind is None:
            raise ExpertError("the library is empty: add a trained model first, which fixes the kind and shapes")
        if name in self.experts:
            raise ExpertError(f"expert {name!r} is already in the library; remove it first")
        self._check_tensors(name, {k: v.detach().float().cpu().clone() for k, v in tensors.items()})
        self.experts[name] = {k: v.detach().float().cpu().clone() for k, v in tensors.items()}

    def remove(self, name: str) -> None:
        self.check_names([name])
        del self.experts[name]

    def _check_match(self, name: str, kind: str, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        if kind != self.kind:
            raise ExpertError(f"expert {name!r} is a {kind!r} expert; this library holds {self.kind!r} experts")
        for field, (mine, theirs) in _differences(config, self.config).items():
            raise ExpertError(f"expert {name!r} differs from the library in {field}: {mine!r} vs {theirs!r}; all "
                              "experts of a library share one shape")
        self._check_tensors(name, tensors)

    def _check_tensors(self, name: str, tensors: Mapping[str, torch.Tensor]) -> None:
        missing = sorted(set(self.shapes) - set(tensors))
        extra = sorted(set(tensors) - set(self.shapes))
        if missing or extra:
            what = f"lacks tensor {missing[0]!r}" if missing else f"has an extra tensor {extra[0]!r}"
            raise ExpertError(f"expert {name!r} {what}; the library's experts have {sorted(self.shapes)}")
        for key, tensor in tensors.items():
            if tuple(tensor.shape) != self.shapes[key]:
                raise ExpertError(f"expert {name!r}: tensor {key!r} has shape {tuple(tensor.shape)}, the library's "
                                  f"experts {self.shapes[key]}; experts of different shapes cannot share a library")

    # -- one expert as a model ------------------------------------------------------------------
    def reft_config(self) -> ReftConfig:
        if self.kind != "reft":
            raise ExpertError(f"this library holds {self.kind!r} experts, not ReFT interventions")
        return ReftConfig.from_dict(self.config["reft_config"])

    def load_into(self, model: nn.Module, name: str) -> Any:
        """Expert ``name`` on ``model``: a ReftModel (``"reft"``), or ``model`` with SVF layers holding its
        ``z`` (``"svf"``; SVF is applied first if the model has none)."""
        self.check_names([name])
        if self.kind == "reft":
            from reftkit.serialization import check_and_load

            reft = ReftModel(model, self.reft_config())
            check_and_load(reft.interventions, self.experts[name], f"expert {name!r}")
            return reft
        set_svf(model, self, self.experts[name])
        return model

    # -- persistence ------------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        if not self.experts:
            raise ExpertError("the library is empty; add experts before saving")
        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {f"{name}/{key}": t.contiguous()
                   for name, expert in self.experts.items() for key, t in expert.items()}
        save_file(tensors, str(folder / WEIGHTS_FILE), metadata={"format": "pt"})
        record = {"format_version": FORMAT_VERSION, "library": "reftkit.experts", "kind": self.kind,
                  "config": self.config, "mixing": self.mixing,
                  "shapes": {k: list(v) for k, v in self.shapes.items()}, "experts": self.names,
                  "weights_sha256": file_sha256(folder / WEIGHTS_FILE)}
        (folder / LIBRARY_FILE).write_text(json.dumps(record, indent=2))
        return folder

    @classmethod
    def load(cls, path: str | Path) -> "ExpertLibrary":
        folder = Path(path)
        meta_file, weights_file = folder / LIBRARY_FILE, folder / WEIGHTS_FILE
        if not meta_file.is_file():
            raise ExpertError(f"{meta_file} is missing; is {folder} an expert library folder?")
        try:
            meta = json.loads(meta_file.read_text())
        except json.JSONDecodeError as err:
            raise ExpertError(f"{meta_file} is not valid JSON: {err}") from None
        if meta.get("kind") not in KINDS:
            raise ExpertError(f"{meta_file}: kind={meta.get('kind')!r} must be one of {KINDS}")
        if not isinstance(meta.get("format_version"), int) or meta["format_version"] > FORMAT_VERSION:
            raise ExpertError(f"{meta_file}: format_version={meta.get('format_version')!r} is not one this reftkit "
                              f"reads (up to {FORMAT_VERSION})")
        if not weights_file.is_file():
            raise ExpertError(f"{weights_file} is missing")
        if meta.get("weights_sha256") not in (None, file_sha256(weights_file)):
            raise ExpertError(f"{weights_file}: SHA-256 does not match {LIBRARY_FILE}; the file is truncated or "
                              "was altered after saving")
        try:
            flat = load_file(str(weights_file))
        except (SafetensorError, OSError, ValueError) as err:
            raise ExpertError(f"{weights_file} is not a readable safetensors file: {err}") from None
        library = cls()
        library.kind, library.config, library.mixing = meta["kind"], meta["config"], meta["mixing"]
        library.shapes = {k: tuple(v) for k, v in meta["shapes"].items()}
        for name in meta["experts"]:
            expert = {key[len(name) + 1:]: t for key, t in flat.items() if key.startswith(name + "/")}
            library._check_tensors(name, expert)
            library.experts[name] = expert
        return library

    def __repr__(self) -> str:
        return f"ExpertLibrary(kind={self.kind!r}, experts={self.names})"


def _differences(a: Any, b: Any, where: str = "") -> dict[str, tuple[Any, Any]]:
    """The leaves where two JSON-like values differ, by dotted path (``reft_config.representations[0].layer``)."""
    if isinstance(a, dict) and isinstance(b, dict):
        out: dict[str, tuple[Any, Any]] = {}
        for key in list(a) + [k for k in b if k not in a]:
            out.update(_differences(a.get(key), b.get(key), f"{where}.{key}" if where else str(key)))
        return out
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b) and any(isinstance(x, dict) for x in a):
        out = {}
        for i, (x, y) in enumerate(zip(a, b)):
            out.update(_differences(x, y, f"{where}[{i}]"))
        return out
    return {} if a == b else {where: (a, b)}


def set_svf(model: nn.Module, library: ExpertLibrary, tensors: Mapping[str, torch.Tensor]) -> dict[str, nn.Module]:
    """Give ``model``'s SVF layers the ``z`` vectors ``tensors`` (applying SVF as the library's experts
    were trained, if the model has none yet)."""
    from reftkit.analysis.svf import apply_svf

    modules = _svf_modules(model)
    if not modules:
        modules = apply_svf(model, library.keys, library.config["parametrization"],
                            max_mult=library.config["max_mult"])
    if sorted(modules) != sorted(library.keys):
        raise ExpertError(f"the model's SVF layers {sorted(modules)[:3]}... are not the library's "
                          f"{sorted(library.keys)[:3]}...")
    with torch.no_grad():
        for name, module in modules.items():
            module.z.copy_(tensors[name].to(module.z.device))
    return modules

