"""Transformer²'s two-pass inference: a first pass picks (or mixes) experts, a second pass answers.

Sun et al. 2025, "Transformer²: Self-adaptive LLMs", §3.2, three adaptation strategies:

(a) **prompt-based** — the base model itself is asked which category a request belongs to, among
    the experts' names and "other" (→ the base model);
(b) **classification expert** — an expert trained to answer that question (Transformer² trains an
    SVF vector for it; here it is a ReFT intervention on the same frozen model);
(c) **few-shot** — for a task with a handful of labelled examples, CEM searches mixing weights
    ``α`` over the experts, scored by the examples (:func:`few_shot_weights`).

The paper's first pass generates the category; here (a) and (b) rank-classify it instead (T-Few's
rank classification over the candidate names, :mod:`reftkit.analysis.multiple_choice`): the same
question, answered with one forward per candidate rather than free text that may name no category.
:func:`two_pass_generate` runs dispatch on a whole batch, then generates every row with its own
route in the same batch (:class:`~reftkit.experts.ExpertRouter`).
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, Mapping, Sequence

import pandas as pd
import torch
from torch import nn

from .library import ExpertError, ExpertLibrary
from .routing import ExpertRouter
from .search import CEMResult, cem

DISPATCH_TEMPLATE = ("Which category does this request belong to: {categories}?\n"
                     "Request: {prompt}\nCategory:")
FEW_SHOT_ROUTE = "few_shot"


def dispatch_prompts(prompts: Sequence[str], names: Sequence[str], *, other: str = "other",
                     template: str = DISPATCH_TEMPLATE) -> list[str]:
    """The first-pass question for each prompt (``template`` with ``{categories}`` and ``{prompt}``)."""
    if "{prompt}" not in template:
        raise ValueError(f"template={template!r} must contain {{prompt}}")
    categories = ", ".join([*names, other])
    return [template.format(categories=categories, prompt=p) for p in prompts]


def _choices(names: Sequence[str], other: str) -> list[str]:
    if not names:
        raise ExpertError("names is empty: give the experts' names to dispatch to")
    if other in names:
        raise ExpertError(f"other={other!r} is also an expert name; pick another label for the base model")
    return [" " + n for n in [*names, other]]


def _rank(model: Any, tokenizer: Any, prompts: Sequence[str], names: Sequence[str], other: str, template: str,
          batch_size: int) -> list[str | None]:
    from reftkit.analysis.multiple_choice import rank_classify

    choices = _choices(names, other)
    picked = rank_classify(model, tokenizer, dispatch_prompts(prompts, names, other=other, template=template),
                           [choices] * len(prompts), batch_size=batch_size)
    return [names[k] if k < len(names) else None for k in picked]


def prompt_dispatch(model: nn.Module, tokenizer: Any, prompts: Sequence[str], names: Sequence[str], *,
                    other: str = "other", template: str = DISPATCH_TEMPLATE, batch_size: int = 8,
                    router: ExpertRouter | None = None) -> list[str | None]:
    """Strategy (a): the base ``model`` names each prompt's category; ``other`` → ``None`` (base model).
    With an SVF ``router`` on the same model its SVF layers are bypassed for this pass."""
    with _base(router):
        return _rank(model, tokenizer, prompts, names, other, template, batch_size)


def train_dispatch_expert(model: nn.Module, tokenizer: Any, prompts: Sequence[str], labels: Sequence[str | None],
                          names: Sequence[str], config: Any = None, *, other: str = "other",
                          template: str = DISPATCH_TEMPLATE, **training: Any) -> Any:
    """Strategy (b): train an intervention to answer the dispatch question — ``labels`` gives each
    prompt's expert (``None`` or ``other`` for the base model). ``config`` defaults to LoReFT rank 4 at
    the last prompt token of the middle layer; ``training`` goes to :func:`~reftkit.experts.train_expert`."""
    from reftkit.structure import num_layers

    from .train import train_expert

    if len(prompts) != len(labels):
        raise ValueError(f"{len(prompts)} prompts but {len(labels)} labels")
    bad = [(i, lab) for i, lab in enumerate(labels) if lab is not None and lab != other and lab not in names]
    if bad:
        raise ExpertError(f"labels[{bad[0][0]}] = {bad[0][1]!r} is not one of {list(names)} (or {other!r} / None)")
    _choices(names, other)
    if config is None:
        config = {"layer": num_layers(model) // 2, "component": "block_output", "positions": "l1",
                  "intervention": "loreft", "low_rank_dimension": 4}
    outputs = [" " + (other if lab is None else lab) for lab in labels]
    return train_expert(model, tokenizer, dispatch_prompts(prompts, names, other=other, template=template), outputs,
                        config, **training)


def expert_dispatch(dispatch_expert: Any, tokenizer: Any, prompts: Sequence[str], names: Sequence[str], *,
                    other: str = "other", template: str = DISPATCH_TEMPLATE, batch_size: int = 8,
                    router: ExpertRouter | None = None) -> list[str | None]:
    """Strategy (b): rank-classify the dispatch question with the trained ``dispatch_expert``."""
    with _base(router):
        return _rank(dispatch_expert, tokenizer, prompts, names, other, template, batch_size)


@contextlib.contextmanager
def _base(router: ExpertRouter | None) -> Iterator[None]:
    """Bypass an SVF router's layers (a ReFT router's hooks are inert outside its own calls)."""
    if router is None or router.reft is not None:
        yield
        return
    from reftkit.analysis.svf import svf_disabled

    with svf_disabled(router.model):
        yield


def few_shot_weights(library: ExpertLibrary, model: nn.Module, tokenizer: Any, prompts: Sequence[str],
                     answers: Sequence[str], *, per_site: bool = False, population: int = 32,
                     elite_ratio: float = 0.2, iterations: int = 50, bounds: tuple[float, float] = (0.0, 1.0),
                     init: Sequence[float] | None = None, seed: int = 0, batch_size: int = 16,
                     progress: bool = True) -> CEMResult:
    """Strategy (c): CEM over mixing weights ``α`` (one per expert, or ``[sites, experts]`` with
    ``per_site``), scored on the labelled ``prompts`` → ``answers`` by ``(accuracy, mean answer
    log-likelihood)``: accuracy is whether greedy decoding starts with the answer, ties are broken by
    likelihood (the released code breaks ties among its best members the same way). ``init``: the first
    mean, default ``1/K`` for every expert. Returns :class:`CEMResult` with ``best`` shaped as ``α``."""
    if not prompts or len(prompts) != len(answers):
        raise ValueError(f"few-shot search needs labelled examples: {len(prompts)} prompts, {len(answers)} answers")
    count, sites = len(library), len(library.keys)
    shape = (sites, count) if per_site else (count,)
    start = torch.full(shape, 1.0 / count) if init is None else torch.as_tensor(init, dtype=torch.float32).expand(shape)
    router = ExpertRouter(model, library, {FEW_SHOT_ROUTE: start})
    routes = [FEW_SHOT_ROUTE] * len(prompts)

    def score(alpha: torch.Tensor) -> tuple[float, float]:
        router.set_weights(FEW_SHOT_ROUTE, alpha)
        correct, mean_lp = router.answer_scores(tokenizer, prompts, answers, routes, batch_size)
        return float(correct.float().mean()), float(mean_lp.mean())

    try:
        return cem(score, start, population=population, elite_ratio=elite_ratio, iterations=iterations,
                   bounds=bounds, seed=seed, progress=progress)
    finally:
        router.detach()


Router = Callable[[list[str]], Sequence[str | None]]


def two_pass_generate(router: ExpertRouter, tokenizer: Any, prompts: Sequence[str],
                      dispatch: Router | Sequence[str | None], *, max_new_tokens: int = 32, batch_size: int = 16,
                      route_names: Mapping[str, str] | None = None, progress: bool = False) -> pd.DataFrame:
    """First pass: ``dispatch(prompts)`` picks a route per prompt (an expert, a mixture route of
    ``router``, or ``None`` for the base model); or give the routes directly. ``route_names`` maps a
    dispatcher's labels to route names (e.g. a task to its few-shot mixture). Second pass: every prompt
    is generated with its own route, in shared batches. Returns ``prompt, route, completion``."""
    prompts = list(prompts)
    routes = list(dispatch(prompts) if callable(dispatch) else dispatch)
    if route_names is not None:
        routes = [None if r is None else route_names.get(r, r) for r in routes]
    completions = router.generate(tokenizer, prompts, routes, max_new_tokens=max_new_tokens, batch_size=batch_size,
                                  progress=progress)
    return pd.DataFrame({"prompt": prompts, "route": routes, "completion": completions})
