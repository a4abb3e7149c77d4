"""Experts and mixtures of one library on one model, chosen per batch row.

A *route* is an expert of the library or a mixture of them with weights ``α`` — global (one weight
per expert) or per site (one row per intervention / SVF layer). How a mixture is computed depends on
what the experts are (``Intervention.mixing``):

* ``"parameters"`` — SVF ``z`` vectors (Transformer² §3.2: ``z' = Σ_k α_k z_k``) and IA3 scales:
  the mixture is a new expert of the same shape whose tensors are ``Σ_k α_k θ_k``;
* ``"outputs"`` — the LoReFT family and every other intervention: parameter averaging is not
  meaningful (orthonormal ``R`` of different experts span unrelated subspaces; their sum is not
  orthonormal), so the experts' edits are mixed, ``h + Σ_k α_k (f_k(h) − h)``
  (:class:`~reftkit.interventions.Mixture`). It costs one intervention call per expert.

:class:`ExpertRouter` serves many routes in one batch. ReFT libraries build one mixed-task
:class:`~reftkit.ReftModel` with one task per route, so every row of a batch gets its own expert in
a single forward (the mixed-task batches of ``tasks=``); a row routed to ``None`` runs the base model.
SVF experts change the weights themselves, so an SVF router groups the rows by route and runs each
group with its ``z`` (dense matmuls at the base model's cost, one pass per distinct route).
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from reftkit.config import ReftConfig
from reftkit.interventions import get_intervention_class
from reftkit.model import ReftModel
from reftkit.serialization import check_and_load

from .library import ExpertError, ExpertLibrary, set_svf

Weights = Mapping[str, float] | Sequence[float] | torch.Tensor
_OWN = ("layer", "component", "positions", "intervention", "share_weights", "heads", "task", "source")


def mixing_matrix(library: ExpertLibrary, weights: Weights) -> torch.Tensor:
    """``α`` as a ``[sites, experts]`` float tensor: a dict ``{expert: weight}`` (missing experts 0), a
    sequence / 1-D tensor with one weight per expert (the same at every site), or a ``[sites, experts]``
    tensor (one row per intervention key of a ReFT library, per SVF layer of an SVF library)."""
    sites, count = len(library.keys), len(library)
    if isinstance(weights, Mapping):
        library.check_names(weights, "weights names expert")
        weights = [float(weights.get(name, 0.0)) for name in library.names]
    alpha = torch.as_tensor(weights, dtype=torch.float32)
    if alpha.dim() == 1 and alpha.numel() == count:
        alpha = alpha.expand(sites, count)
    if alpha.shape != (sites, count):
        raise ExpertError(f"weights has shape {tuple(alpha.shape)}; give {count} weights (one per expert "
                          f"{library.names}) or a [{sites}, {count}] tensor (one row per site)")
    if not bool(torch.isfinite(alpha).all()):
        raise ExpertError(f"weights {alpha.tolist()} must be finite")
    return alpha.clone()


def _site_of(library: ExpertLibrary, tensor_name: str) -> int:
    return library.keys.index(tensor_name.split(".", 1)[0] if library.kind == "reft" else tensor_name)


def mix_parameters(library: ExpertLibrary, weights: Weights) -> dict[str, torch.Tensor]:
    """``θ = Σ_k α_k θ_k`` for every tensor (see the module docstring for when this is meaningful);
    with ``α = e_j`` it is expert ``j``'s tensors exactly."""
    alpha = mixing_matrix(library, weights)
    outputs = sorted({key for key, mode in library.mixing.items() if mode != "parameters"})
    if outputs:
        raise ExpertError(f"site {outputs[0]!r} holds interventions whose parameters cannot be averaged "
                          "(Intervention.mixing == 'outputs'); mix their outputs with ExpertRouter routes")
    return _weighted_sum(library, alpha, list(library.shapes))


def _weighted_sum(library: ExpertLibrary, alpha: torch.Tensor, tensor_names: list[str]) -> dict[str, torch.Tensor]:
    experts = [library.experts[name] for name in library.names]
    mixed = {}
    for name in tensor_names:
        row = alpha[_site_of(library, name)]
        total = row[0] * experts[0][name]  # summed in order from α_0·θ_0: α = e_j gives θ_j exactly
        for a, expert in zip(row[1:], experts[1:]):
            total = total + a * expert[name]
        mixed[name] = total
    return mixed


class ExpertRouter:
    """A library's experts and mixtures on ``model``, one route per batch row.

    ``routes``: ``{route name: expert name or mixture weights}`` (default: one route per expert, named
    after it). Rows routed to ``None`` run the base model. ``set_weights`` changes a mixture in place.
    """

    def __init__(self, model: nn.Module, library: ExpertLibrary,
                 routes: Mapping[str, str | Weights] | None = None) -> None:
        if not len(library):
            raise ExpertError("the library is empty")
        self.library = library
        routes = {name: name for name in library.names} if routes is None else dict(routes)
        if not routes:
            raise ExpertError("routes is empty; give at least one route")
        self.routes: dict[str, str | torch.Tensor] = {}
        for name, target in routes.items():
            if not isinstance(name, str) or not name:
                raise ExpertError(f"route name {name!r} must be a non-empty string")
            if isinstance(target, str):
                library.check_names([target], f"route {name!r} names expert")
                self.routes[name] = target
            else:
                self.routes[name] = mixing_matrix(library, target)
        self.model = model
        if library.kind == "reft":
            self.reft = ReftModel(model, ReftConfig(self._entries()))
            self._route_slots = {r: [s for s in self.reft._hooks.slots if s.task == r] for r in self.routes}
            state = {}
            for route in self.routes:
                state.update(self._route_state(route))
            check_and_load(self.reft.interventions, state, "expert library")
        else:
            from reftkit.analysis.svf import svf_modules

            self.reft = None
            self._svf = {route: self._svf_tensors(route) for route in self.routes}
            self._applied_svf = not svf_modules(model)  # detach removes SVF layers only if this router added them
            set_svf(model, library, library.experts[library.names[0]])

    @property
    def _device(self) -> torch.device:
        from reftkit.analysis.common import model_device

        return model_device(self.model)

    @property
    def route_names(self) -> list[str]:
        return list(self.routes)

    def _mode(self, key: str) -> str:
        return self.library.mixing[key]

    # -- ReFT: one mixed-task ReftModel ------------------------------------------------------------
    def _entries(self) -> list[dict[str, Any]]:
        reps = self.library.config["reft_config"]["representations"]
        entries = []
        for route, target in self.routes.items():
            for rep in reps:
                entry = {**rep, "task": route}
                if not isinstance(target, str) and get_intervention_class(rep["intervention"]).mixing == "outputs":
                    member = {"intervention": rep["intervention"], **{k: v for k, v in rep.items() if k not in _OWN}}
                    entry = {k: v for k, v in entry.items() if k in _OWN}
                    entry.update(intervention="mixture", members=[member] * len(self.library),
                                 weights=[0.0] * len(self.library))
                entries.append(entry)
        return entries

    def _route_state(self, route: str, members: bool = True) -> dict[str, torch.Tensor]:
        """The route's tensors by state-dict name; ``members=False`` leaves out the output mixtures' members
        (unchanged when only the weights change)."""
        target = self.routes[route]
        slots = self._route_slots[route]
        if len(slots) != len(self.library.keys):
            raise ExpertError(f"route {route!r} builds {len(slots)} interventions, the library's experts have "
                              f"{len(self.library.keys)}")
        experts = [self.library.experts[n] for n in self.library.names]
        mixed: dict[str, torch.Tensor] = {}
        if not isinstance(target, str):
            param_keys = [k for k in self.library.keys if self._mode(k) == "parameters"]
            if param_keys:
                mixed = _weighted_sum(self.library, target, [n for n in self.library.shapes
                                                             if n.split(".", 1)[0] in param_keys])
        state = {}
        for slot, key in zip(slots, self.library.keys):
            prefix = key + "."
            for name in self.library.shapes:
                if not name.startswith(prefix):
                    continue
                rest = name[len(prefix):]
                if isinstance(target, str):
                    state[f"{slot.key}.{rest}"] = self.library.experts[target][name]
                elif self._mode(key) == "parameters":
                    state[f"{slot.key}.{rest}"] = mixed[name]
                elif members:
                    for k, expert in enumerate(experts):
                        state[f"{slot.key}.members.{k}.{rest}"] = expert[name]
            if not isinstance(target, str) and self._mode(key) == "outputs":
                state[f"{slot.key}.weights"] = target[self.library.keys.index(key)].clone()
        return state

    # -- SVF: z per route ----------------------------------------------------------------------------
    def _svf_tensors(self, route: str) -> dict[str, torch.Tensor]:
        target = self.routes[route]
        if isinstance(target, str):
            return self.library.experts[target]
        return mix_parameters(self.library, target)

    # -- changing a mixture ----------------------------------------------------------------------------
    def set_weights(self, route: str, weights: Weights) -> None:
        """Give mixture route ``route`` new weights (global or per site), in place."""
        if route not in self.routes:
            raise ExpertError(f"route {route!r} does not exist; routes are {self.route_names}")
        if isinstance(self.routes[route], str):
            raise ExpertError(f"route {route!r} is expert {self.routes[route]!r}, not a mixture")
        self.routes[route] = mixing_matrix(self.library, weights)
        if self.reft is None:
            self._svf[route] = self._svf_tensors(route)
            return
        state = self._route_state(route, members=False)
        with torch.no_grad():
            own = self.reft.interventions.state_dict()
            for name, tensor in state.items():
                own[name].copy_(tensor)

    # -- running ----------------------------------------------------------------------------------------
    def _check_routes(self, routes: Sequence[str | None], count: int) -> list[str | None]:
        routes = list(routes)
        if len(routes) != count:
            raise ExpertError(f"routes has {len(routes)} entries for {count} prompts; give one route (or None) each")
        unknown = [r for r in routes if r is not None and r not in self.routes]
        if unknown:
            raise ExpertError(f"route {unknown[0]!r} does not exist; routes are {self.route_names} (or None)")
        return routes

    def _groups(self, routes: list[str | None]) -> dict[str | None, list[int]]:
        groups: dict[str | None, list[int]] = {}
        for i, route in enumerate(routes):
            groups.setdefault(route, []).append(i)
        return groups

    def run_svf(self, route: str | None, fn: Callable[[], Any]) -> Any:
        """Call ``fn`` with the model's SVF layers set to ``route`` (``None``: the original weights)."""
        from reftkit.analysis.svf import svf_disabled

        if route is None:
            with svf_disabled(self.model):
                return fn()
        set_svf(self.model, self.library, self._svf[route])
        return fn()

    def generate(self, tokenizer: Any, prompts: Sequence[str], routes: Sequence[str | None], *,
                 max_new_tokens: int = 32, batch_size: int = 16, progress: bool = False) -> list[str]:
        """Greedy continuations of ``prompts``, each with its route's expert (``None``: the base model)."""
        from reftkit.analysis.text_metrics import generate_predictions

        routes = self._check_routes(routes, len(prompts))
        if self.reft is not None:
            return generate_predictions(self.reft, tokenizer, prompts, max_new_tokens=max_new_tokens,
                                        batch_size=batch_size, progress=progress, tasks=routes)
        out: list[str] = [""] * len(prompts)
        for route, rows in self._groups(routes).items():
            texts = self.run_svf(route, lambda: generate_predictions(
                self.model, tokenizer, [prompts[i] for i in rows], max_new_tokens=max_new_tokens,
                batch_size=batch_size, progress=progress))
            for i, text in zip(rows, texts):
                out[i] = text
        return out

    def answer_scores(self, tokenizer: Any, prompts: Sequence[str], answers: Sequence[str],
                      routes: Sequence[str | None], batch_size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
        """Per prompt: whether greedy decoding would start with ``answer`` (every answer token is the
        arg-max after the prompt and the answer's earlier tokens) and the answer's mean token log-prob —
        one teacher-forced forward, each row under its route."""
        from .scoring import answer_scores

        routes = self._check_routes(routes, len(prompts))
        if self.reft is not None:
            def logits(ids: torch.Tensor, mask: torch.Tensor, prompt_mask: torch.Tensor,
                       rows: list[int]) -> torch.Tensor:
                with self.reft.intervening(input_ids=ids, attention_mask=prompt_mask,
                                           tasks=[routes[i] for i in rows]):
                    return self.reft.model(input_ids=ids, attention_mask=mask).logits
            return answer_scores(logits, tokenizer, prompts, answers, batch_size, self._device)
        correct = torch.zeros(len(prompts), dtype=torch.bool)
        mean_lp = torch.zeros(len(prompts))
        for route, rows in self._groups(routes).items():
            def plain(ids: torch.Tensor, mask: torch.Tensor, prompt_mask: torch.Tensor, sub: list[int]) -> torch.Tensor:
                return self.model(input_ids=ids, attention_mask=mask).logits
            c, m = self.run_svf(route, lambda: answer_scores(plain, tokenizer, [prompts[i] for i in rows],
                                                            [answers[i] for i in rows], batch_size,
                                                            self._device))
            correct[rows], mean_lp[rows] = c, m
        return correct, mean_lp

    def detach(self) -> nn.Module:
        """Remove the experts; returns the base model as it was (SVF layers put back if this router added them)."""
        if self.reft is not None:
            return self.reft.detach()
        from reftkit.analysis.svf import remove_svf

        return remove_svf(self.model) if self._applied_svf else self.model
