"""The adapters a server holds on its one frozen base model, and the model that serves them all.

Every ReFT-format save folder (``config.json`` + ``interventions.safetensors``: the LoReFT family, IA3,
Houlsby adapters, any intervention of the catalogue) becomes one *task* of a single mixed-task
:class:`~reftkit.ReftModel`, so a batch whose rows ask for different adapters runs in one forward, each row
edited by its own adapter only (``tasks=``). SVF experts (``svf_config.json`` + ``svf.safetensors``) change the
base weights themselves, so their rows cannot share a forward with other routes: the engine batches them by
expert. Loading and unloading rebuild the mixed-task model (a few kilobytes of weights; the base is untouched).
Nothing is unpickled: both formats are safetensors, checked by their own loaders.
"""
from __future__ import annotations

import contextlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from reftkit.analysis.svf import SVF_CONFIG_NAME, SVF_WEIGHTS_NAME, apply_svf, remove_svf, svf_disabled, svf_modules
from reftkit.config import ReftConfig
from reftkit.experts.library import LIBRARY_FILE, ExpertError, ExpertLibrary
from reftkit.experts.routing import ExpertRouter
from reftkit.model import ReftModel
from reftkit.serialization import CONFIG_NAME, LoadError

__all__ = ["Adapter", "AdapterError", "AdapterSet", "NAME_PATTERN"]

#: adapter names: what follows ``base:`` in a request's ``model`` field
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$")
_TERM = re.compile(r"^\s*(-?(?:\d+\.?\d*|\.\d+))\s*\*\s*([A-Za-z0-9][A-Za-z0-9_.\-]{0,63})\s*$")
#: mixtures kept built at once (each is a task of the served model); the least recently used goes first
MAX_MIXTURES = 16
SVF_CONFIG = SVF_CONFIG_NAME
_PICKLED = ("*.bin", "*.pt", "*.pth", "*.pkl", "*.ckpt")


class AdapterError(ValueError):
    """An adapter that cannot be loaded, named or found; the message names the adapter and the reason."""


@dataclass
class Adapter:
    """One loaded adapter: ``kind`` is ``"reft"`` (a task of the mixed-task model) or ``"svf"`` (z vectors)."""

    name: str
    kind: str
    folder: Path
    entries: list[dict[str, Any]] = field(default_factory=list)  # reft: its config's representations
    states: list[dict[str, torch.Tensor]] = field(default_factory=list)  # reft: per intervention, its tensors
    svf: dict[str, torch.Tensor] = field(default_factory=dict)  # svf: module name -> z
    config: dict[str, Any] = field(default_factory=dict)  # svf: svf_config.json
    parameters: int = 0
    members: tuple[str, ...] = ()  # a mixture: the adapters it mixes


class AdapterSet:
    """Named adapters on ``model``; ``reft`` is the mixed-task model of the ReFT ones (``None`` without any).

    Not thread-safe by design: the serving engine calls ``load`` / ``unload`` / ``mixture`` between batches only."""

    def __init__(self, model: nn.Module) -> None:
        config = getattr(model, "config", None)
        if getattr(config, "is_encoder_decoder", False):
            raise AdapterError(f"{type(model).__name__} is an encoder-decoder model; the server generates with "
                               "decoder-only (causal) language models")
        self.model = model
        self.adapters: dict[str, Adapter] = {}
        self.mixtures: dict[str, Adapter] = {}  # built on first use, the least recently used dropped first
        self.reft: ReftModel | None = None

    def __contains__(self, name: object) -> bool:
        return name in self.adapters

    def names(self) -> list[str]:
        return list(self.adapters)

    def kind(self, route: str) -> str:
        """``"reft"`` or ``"svf"`` for a loaded adapter or a built mixture."""
        return (self.adapters.get(route) or self.mixtures[route]).kind

    def route_kind(self, route: str | None) -> str:
        """``"bare"`` (None), ``"reft"``, ``"svf"``, or ``"gone"`` for a route no longer loaded."""
        if route is None:
            return "bare"
        found = self.adapters.get(route) or self.mixtures.get(route)
        return "gone" if found is None else found.kind

    # -- loading ------------------------------------------------------------------------------------
    def load(self, name: str, folder: str | Path) -> list[Adapter]:
        """Read ``folder`` as adapter ``name`` (an expert library: one adapter ``name.<expert>`` per expert) and
        rebuild the served model; the adapters loaded. On any failure nothing changes."""
        if not isinstance(name, str) or not NAME_PATTERN.match(name):
            raise AdapterError(f"adapter name {name!r}: use 1-64 letters, digits, '_', '-' or '.', starting with "
                               "a letter or digit (it follows 'base:' in a request's model field)")
        path = Path(folder).expanduser()
        if not path.is_dir():
            raise AdapterError(f"adapter {name!r}: {str(folder)!r} is not a folder")
        pickled = sorted(p.name for pattern in _PICKLED for p in path.glob(pattern))
        if (path / LIBRARY_FILE).is_file():
            loaded = self._read_library(name, path)
        elif (path / SVF_CONFIG).is_file():
            loaded = [self._read_svf(name, path)]
        elif (path / CONFIG_NAME).is_file():
            loaded = [self._read_reft(name, path)]
        else:
            extra = f"; it holds {pickled}, which the server never unpickles" if pickled else ""
            raise AdapterError(f"adapter {name!r}: {path} has neither {CONFIG_NAME} (a reftkit save_pretrained "
                               f"folder), {SVF_CONFIG} (save_svf) nor {LIBRARY_FILE} (an expert library){extra}")
        taken = [a.name for a in loaded if a.name in self.adapters]
        if taken:
            raise AdapterError(f"adapter {taken[0]!r} is already loaded; unload it first (DELETE /v1/adapters/"
                               f"{taken[0]})")
        previous = dict(self.adapters)
        self.adapters.update({a.name: a for a in loaded})
        try:
            self.rebuild()
        except Exception as err:
            self.adapters = previous
            self.rebuild()
            raise AdapterError(f"adapter {name!r} ({path}) cannot be served with the others: {err}") from err
        return loaded

    def unload(self, name: str) -> None:
        if name not in self.adapters:
            raise AdapterError(f"adapter {name!r} is not loaded; loaded: {self.names()}")
        del self.adapters[name]
        self.mixtures = {k: m for k, m in self.mixtures.items() if name not in m.members}
        self.rebuild()

    def _read_reft(self, name: str, path: Path) -> Adapter:
        try:
            with self._plain_base():
                own = ReftModel.from_pretrained(self.model, path)
        except LoadError as err:
            raise AdapterError(f"adapter {name!r}: {err}") from None
        try:
            entries = own.reft_config.to_dict()["representations"]
            tasks = sorted({e["task"] for e in entries if e.get("task")})
            if tasks:
                raise AdapterError(f"adapter {name!r}: {path} is a mixed-task model (tasks {tasks}); save each "
                                   "task as its own folder and serve each as an adapter")
            states = _slot_states(own)
            count = sum(p.numel() for p in own.interventions.parameters())
        finally:
            own.detach()
        return Adapter(name, "reft", path, entries=entries, states=states, parameters=count)

    def _read_svf(self, name: str, path: Path) -> Adapter:
        try:
            config = json.loads((path / SVF_CONFIG).read_text())
            if not isinstance(config, dict):
                raise ValueError(f"{SVF_CONFIG} must hold a JSON object")
            tensors = load_file(str(path / SVF_WEIGHTS_NAME))
        except (OSError, ValueError, SafetensorError) as err:
            raise AdapterError(f"adapter {name!r}: {path} is not a readable SVF folder: {err}") from None
        if config.get("modules") and sorted(config["modules"]) != sorted(tensors):
            raise AdapterError(f"adapter {name!r}: {SVF_CONFIG} lists other layers than {SVF_WEIGHTS_NAME}")
        return self._svf_adapter(name, path, config, tensors)

    def _svf_adapter(self, name: str, path: Path, config: dict[str, Any], tensors: dict[str, torch.Tensor]
                     ) -> Adapter:
        """z vectors checked against the base's linear layers and the other SVF adapters' layers."""
        modules = dict(self.model.named_modules())
        for module_name, z in tensors.items():
            base = modules.get(module_name)
            base = getattr(base, "base", base)
            if not isinstance(base, nn.Linear):
                raise AdapterError(f"adapter {name!r}: SVF vector {module_name!r} names no linear layer of "
                                   f"{type(self.model).__name__} (a different base model?)")
            if z.dim() != 1 or z.numel() != min(base.in_features, base.out_features) or not torch.isfinite(z).all():
                raise AdapterError(f"adapter {name!r}: SVF vector {module_name!r} has shape {tuple(z.shape)}; the "
                                   f"layer needs ({min(base.in_features, base.out_features)},) finite values")
        other = next((a for a in self.adapters.values() if a.kind == "svf"), None)
        if other is not None and sorted(other.svf) != sorted(tensors):
            raise AdapterError(f"adapter {name!r} adapts other layers than SVF adapter {other.name!r}; the SVF "
                               "adapters of one server must share their layers (one set of SVF layers on the base)")
        return Adapter(name, "svf", path, svf=dict(tensors), config=config,
                       parameters=sum(z.numel() for z in tensors.values()))

    def _read_library(self, name: str, path: Path) -> list[Adapter]:
        """An :class:`~reftkit.experts.ExpertLibrary` folder: each expert as adapter ``name.<expert>``."""
        try:
            library = ExpertLibrary.load(path)
        except ExpertError as err:
            raise AdapterError(f"adapter {name!r}: {err}") from None
        loaded = []
        for expert in library.names:
            full = f"{name}.{expert}"
            if not NAME_PATTERN.match(full):
                raise AdapterError(f"adapter {name!r}: expert {expert!r} makes the name {full!r}, which a request's "
                                   "model field cannot carry; rename the expert or use a shorter adapter name")
            tensors = library.experts[expert]
            if library.kind == "svf":
                loaded.append(self._svf_adapter(full, path, library.config, tensors))
                continue
            states = [{t[len(key) + 1:]: v for t, v in tensors.items() if t.startswith(key + ".")}
                      for key in library.keys]
            loaded.append(Adapter(full, "reft", path, entries=library.config["reft_config"]["representations"],
                                  states=states, parameters=sum(v.numel() for v in tensors.values())))
        return loaded

    # -- mixtures ---------------------------------------------------------------------------------------
    def mixture(self, spec: str) -> str:
        """The route of mixture ``spec`` (``"0.7*a+0.3*b"``: weights times loaded adapters), built on first use
        with :mod:`reftkit.experts`' rules: SVF z vectors and IA3 scales are averaged, the LoReFT family's edits
        are mixed (``h + Σ α_k (f_k(h) - h)``); the adapters must share their sites (one expert library)."""
        terms = []
        for term in spec.split("+"):
            found = _TERM.match(term)
            if found is None or not math.isfinite(float(found[1])):
                raise AdapterError(f"mixture {spec!r}: write weight*adapter terms joined by '+', e.g. '0.7*a+0.3*b'")
            terms.append((found[2], float(found[1])))
        names = [n for n, _ in terms]
        missing = [n for n in names if n not in self.adapters]
        if missing or len(set(names)) != len(names):
            what = f"{missing[0]!r} is not loaded" if missing else "names an adapter twice"
            raise AdapterError(f"mixture {spec!r}: {what}; loaded: {self.names()}")
        key = "mix(" + "+".join(f"{w:g}*{n}" for n, w in terms) + ")"
        if key in self.mixtures:
            self.mixtures[key] = self.mixtures.pop(key)  # most recently used last
            return key
        members = [self.adapters[n] for n in names]
        if len({m.kind for m in members}) != 1:
            raise AdapterError(f"mixture {spec!r} mixes SVF and ReFT adapters; mix adapters of one kind")
        if members[0].kind == "svf":
            if any(sorted(m.svf) != sorted(members[0].svf) for m in members):
                raise AdapterError(f"mixture {spec!r}: the SVF adapters adapt different layers")
            z = {k: sum((w * m.svf[k] for m, (_, w) in zip(members[1:], terms[1:])), terms[0][1] * members[0].svf[k])
                 for k in members[0].svf}
            mixed = Adapter(key, "svf", members[0].folder, svf=z, config=members[0].config, members=tuple(names))
        else:
            mixed = self._reft_mixture(key, spec, members, dict(terms))
        self.mixtures[key] = mixed
        while len(self.mixtures) > MAX_MIXTURES:
            self.mixtures.pop(next(iter(self.mixtures)))
        self.rebuild()
        return key

    def _reft_mixture(self, key: str, spec: str, members: list[Adapter], weights: dict[str, float]) -> Adapter:
        library = ExpertLibrary()
        with self._plain_base():
            try:
                for member in members:
                    own = self._attach([member], routed=False)
                    try:
                        library.add(member.name, own)
                    finally:
                        own.detach()
                router = ExpertRouter(self.model, library, routes={key: weights})
            except ValueError as err:
                raise AdapterError(f"mixture {spec!r}: {err}") from None
            try:
                entries = router.reft.reft_config.to_dict()["representations"]
                states = _slot_states(router.reft)
            finally:
                router.detach()
        return Adapter(key, "reft", members[0].folder, entries=entries, states=states,
                       members=tuple(m.name for m in members))

    # -- the served model ----------------------------------------------------------------------------
    def rebuild(self) -> None:
        """Re-attach one mixed-task ``ReftModel`` with a task per ReFT adapter (tie names kept per adapter).

        It is built on the plain base (SVF layers taken out for the attach and put back after), so its hooks sit
        on the original linear layers, which the SVF layers call while they are disabled (ReFT batches)."""
        with self._plain_base():  # detached as attached: on the base without SVF layers
            if self.reft is not None:
                self.reft.detach()
                self.reft = None
            self.reft = self._attach([a for a in [*self.adapters.values(), *self.mixtures.values()]
                                      if a.kind == "reft"])

    @contextlib.contextmanager
    def _plain_base(self) -> Iterator[None]:
        """The base without its SVF layers for the block (ReFT sites resolve on the original linear layers)."""
        layers = svf_modules(self.model)
        remove_svf(self.model)
        try:
            yield
        finally:
            self._put_back_svf(layers)

    def _attach(self, reft_adapters: list[Adapter], routed: bool = True) -> ReftModel | None:
        if not reft_adapters:
            return None
        entries = []
        for adapter in reft_adapters:
            for entry in adapter.entries:
                entry = {**entry, "task": adapter.name if routed else None}
                if isinstance(entry.get("tie"), str):  # two adapters may both say tie="shared"
                    entry["tie"] = f"{adapter.name}/{entry['tie']}"
                entries.append(entry)
        reft = ReftModel(self.model, ReftConfig(entries))
        try:
            with torch.no_grad():
                for adapter in reft_adapters:
                    slots = [s for s in reft._hooks.slots if s.task == (adapter.name if routed else None)]
                    if len(slots) != len(adapter.states):
                        raise AdapterError(f"adapter {adapter.name!r} builds {len(slots)} interventions on this "
                                           f"model, its folder saved {len(adapter.states)}")
                    for slot, state in zip(slots, adapter.states):
                        slot.intervention.load_state_dict(state)
        except BaseException:
            reft.detach()
            raise
        return reft.eval()

    def _put_back_svf(self, layers: dict[str, nn.Module]) -> None:
        """SVF layers on the base while an SVF adapter is loaded (the previous ones when they fit)."""
        wanted = next((a for a in [*self.adapters.values(), *self.mixtures.values()] if a.kind == "svf"), None)
        if wanted is None:
            return
        if sorted(layers) != sorted(wanted.svf):
            config = wanted.config
            layers = apply_svf(self.model, sorted(wanted.svf), config.get("parametrization", "identity"),
                               max_mult=config.get("max_mult", 1.0))
            remove_svf(self.model)
        for name, layer in layers.items():
            parent, _, child = name.rpartition(".")
            setattr(self.model.get_submodule(parent) if parent else self.model, child, layer)

    def svf_route(self, name: str | None) -> Any:
        """A context in which the base runs with SVF adapter ``name``'s z vectors (``None``: the base weights)."""
        if not svf_modules(self.model):
            return contextlib.nullcontext()
        if name is None:
            return svf_disabled(self.model)
        modules = svf_modules(self.model)
        with torch.no_grad():
            for module_name, z in (self.adapters.get(name) or self.mixtures[name]).svf.items():
                modules[module_name].z.copy_(z)
        return contextlib.nullcontext()

    def detach(self) -> nn.Module:
        """Remove every adapter; returns the base model as it was."""
        self.adapters.clear()
        self.mixtures.clear()
        self.rebuild()
        return self.model


def _slot_states(reft: ReftModel) -> list[dict[str, torch.Tensor]]:
    """Each intervention's tensors, copied, in slot (config) order: what ``_attach`` loads back per task."""
    return [{k: v.detach().clone() for k, v in slot.intervention.state_dict().items()} for slot in reft._hooks.slots]
