"""Transformer²'s two-pass inference: a first pass picks (or mixes) experts, a second pass answers.

Sun et al. 2025, "Transformer²: Self-adaptive LLMs", §3.2, three adaptation strategies:

(a) **prompt-based** — the base model is given an *adaptation prompt* listing the experts' categories
    and "other" (→ the base model) and *generates* the category of the request; the category is read
    from the generated text (:func:`parse_category`). This is the paper's method and the default
    (``method="generate"``); ``method="rank"`` rank-classifies the candidate names instead (T-Few's rank
    classification, :mod:`reftkit.analysis.multiple_choice`: one forward per candidate, never
    unparseable — a reftkit option, not the paper's method);
(b) **classification expert** — an expert trained to answer that same prompt: an SVF vector trained
    with REINFORCE on the generated category, as in the paper (``kind="svf"``,
    :class:`~reftkit.experts.svf_expert.SVFExpert`), or a ReFT intervention trained with cross entropy on
    the category name (``kind="reft"``);
(c) **few-shot** — for a task with a handful of labelled examples, CEM searches mixing weights
    ``α`` over the experts, scored by the examples (:func:`few_shot_weights`).

The adaptation prompt (:data:`DISPATCH_TEMPLATE`) is reftkit's own wording of the paper's (its
appendix asks the model to classify the question into the listed categories or "others" and to output
the category); ``template=`` replaces it. :func:`two_pass_generate` runs dispatch on a whole batch,
then generates every row with its own route in the same batch (:class:`~reftkit.experts.ExpertRouter`).
"""
from __future__ import annotations

import contextlib
import re
from typing import Any, Callable, Iterator, Mapping, Sequence

import pandas as pd
import torch
from torch import nn

from .library import ExpertError, ExpertLibrary
from .routing import ExpertRouter
from .search import CEMResult, cem

DISPATCH_TEMPLATE = ("Classify the request below into exactly one of these categories: {categories}.\n"
                     "Answer with the category name only, or {other} if no other category fits.\n"
                     "Request: {prompt}\nCategory:")
FEW_SHOT_ROUTE = "few_shot"
METHODS = ("generate", "rank")
KINDS = ("svf", "reft")


class DispatchResult(list):
    """The routes (an expert's name, or ``None`` for the base model), one per prompt, as a list; with
    ``method="generate"`` also ``generations`` (the generated texts) and ``unparsed`` (how many named no
    category: routed to the base model, as "other" would be)."""

    def __init__(self, routes: Sequence[str | None], method: str, generations: Sequence[str] | None = None,
                 unparsed: int = 0) -> None:
        super().__init__(routes)
        self.method, self.unparsed = method, unparsed
        self.generations = None if generations is None else list(generations)


def dispatch_prompts(prompts: Sequence[str], names: Sequence[str], *, other: str = "other",
                     template: str = DISPATCH_TEMPLATE) -> list[str]:
    """The first-pass question for each prompt (``template`` with ``{categories}``, ``{other}`` and ``{prompt}``)."""
    if "{prompt}" not in template:
        raise ValueError(f"template={template!r} must contain {{prompt}}")
    categories = ", ".join([*names, other])
    return [template.format(categories=categories, other=other, prompt=p) for p in prompts]


def _choices(names: Sequence[str], other: str) -> list[str]:
    if not names:
        raise ExpertError("names is empty: give the experts' names to dispatch to")
    if other in names:
        raise ExpertError(f"other={other!r} is also an expert name; pick another label for the base model")
    return [" " + n for n in [*names, other]]


def parse_category(text: str, names: Sequence[str], other: str = "other") -> str | None:
    """The category a generated ``text`` names: the candidate (an expert's name or ``other``) whose exact
    name — case-insensitive, as a whole word — appears first (the longest one if several start there);
    ``None`` if it names none (unparseable)."""
    best: tuple[int, int, str] | None = None
    for candidate in [*names, other]:
        pattern = r"(?<![0-9A-Za-z])" + re.escape(candidate) + r"(?![0-9A-Za-z])"
        found = re.search(pattern, text, flags=re.IGNORECASE)
        if found and (best is None or (found.start(), -len(candidate)) < best[:2]):
            best = (found.start(), -len(candidate), candidate)
    return None if best is None else best[2]


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"method={method!r}; choose one of {METHODS}")


def _route(model: Any, tokenizer: Any, prompts: Sequence[str], names: Sequence[str], other: str, template: str,
           method: str, batch_size: int, max_new_tokens: int, chat_template: bool) -> DispatchResult:
    _check_method(method)
    choices = _choices(names, other)
    questions = dispatch_prompts(prompts, names, other=other, template=template)
    if method == "rank":
        from reftkit.analysis.multiple_choice import rank_classify

        if chat_template:
            raise ValueError("chat_template=True applies to method='generate' only")
        picked = rank_classify(model, tokenizer, questions, [choices] * len(prompts), batch_size=batch_size)
        return DispatchResult([names[k] if k < len(names) else None for k in picked], method)
    from reftkit.analysis.text_metrics import generate_predictions

    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens!r} must be a positive int")
    texts = generate_predictions(model, tokenizer, questions, max_new_tokens=max_new_tokens, batch_size=batch_size,
                                 chat_template=chat_template, progress=False)
    parsed = [parse_category(t, names, other) for t in texts]
    routes = [None if p in (None, other) else p for p in parsed]
    return DispatchResult(routes, method, texts, sum(p is None for p in parsed))


def prompt_dispatch(model: nn.Module, tokenizer: Any, prompts: Sequence[str], names: Sequence[str], *,
                    method: str = "generate", other: str = "other", template: str = DISPATCH_TEMPLATE,
                    max_new_tokens: int = 8, chat_template: bool = False, batch_size: int = 8,
                    router: ExpertRouter | None = None) -> DispatchResult:
    """Strategy (a): the base ``model`` names each prompt's category; ``other`` → ``None`` (base model).

    ``method="generate"`` (the paper's): greedy generation of up to ``max_new_tokens`` tokens after the
    adaptation prompt (wrapped in the tokenizer's chat template with ``chat_template``), read by
    :func:`parse_category`; text naming no category goes to the base model and is counted in
    ``result.unparsed``. ``method="rank"``: rank classification over the names. With an SVF ``router`` on
    the same model its SVF layers are bypassed for this pass."""
    with _base(router):
        return _route(model, tokenizer, prompts, names, other, template, method, batch_size, max_new_tokens,
                      chat_template)


def train_dispatch_expert(model: nn.Module, tokenizer: Any, prompts: Sequence[str], labels: Sequence[str | None],
                          names: Sequence[str], config: Any = None, *, kind: str = "svf", other: str = "other",
                          template: str = DISPATCH_TEMPLATE, chat_template: bool = False, **training: Any) -> Any:
    """Strategy (b): train an expert to answer the dispatch question — ``labels`` gives each prompt's
    expert (``None`` or ``other`` for the base model).

    ``kind="svf"`` (the paper's): an SVF vector ``z_c`` trained with REINFORCE on the model's own sampled
    answers, reward +1 when :func:`parse_category` reads the right category, −1 otherwise
    (:func:`~reftkit.experts.svf_expert.train_svf_expert`; ``config``: :func:`~reftkit.analysis.svf.apply_svf`'s
    options, default the MLP matrices; ``training``: :func:`~reftkit.experts.train_policy_gradient`'s, default
    ``epochs=1``, ``max_new_tokens=4``). Returns an :class:`~reftkit.experts.svf_expert.SVFExpert`, off until used.
    ``kind="reft"``: an intervention trained with cross entropy on ``" <category>"``; ``config`` defaults to
    LoReFT rank 4 at the last prompt token of the middle layer; ``training`` goes to
    :func:`~reftkit.experts.train_expert`. Returns the attached ReftModel."""
    from reftkit.structure import num_layers

    if kind not in KINDS:
        raise ValueError(f"kind={kind!r}; choose one of {KINDS}")
    if len(prompts) != len(labels):
        raise ValueError(f"{len(prompts)} prompts but {len(labels)} labels")
    bad = [(i, lab) for i, lab in enumerate(labels) if lab is not None and lab != other and lab not in names]
    if bad:
        raise ExpertError(f"labels[{bad[0][0]}] = {bad[0][1]!r} is not one of {list(names)} (or {other!r} / None)")
    _choices(names, other)
    gold = [other if lab is None else lab for lab in labels]
    questions = dispatch_prompts(prompts, names, other=other, template=template)
    if kind == "svf":
        from .svf_expert import train_svf_expert

        def reward(texts: list[str], completions: list[str]) -> list[float]:
            return [1.0 if parse_category(c, names, other) == by_text[t] else -1.0 for t, c in zip(texts, completions)]

        texts = _chat(tokenizer, questions) if chat_template else questions
        by_text: dict[str, str] = {}
        for i, (text, label) in enumerate(zip(texts, gold)):
            if by_text.setdefault(text, label) != label:
                raise ExpertError(f"prompts[{i}] = {prompts[i]!r} appears with two labels, {by_text[text]!r} and "
                                  f"{label!r}; a reward needs one")
        options = {"epochs": 1, "max_new_tokens": 4, **training}
        if "steps" in options:
            options.pop("epochs")
        elif float(options["epochs"]) != int(options["epochs"]) or int(options["epochs"]) < 1:
            raise ValueError(f"epochs={options['epochs']!r}: REINFORCE runs whole passes; give a whole number or steps")
        else:
            options["epochs"] = int(options["epochs"])
        return train_svf_expert(model, tokenizer, texts, reward, config, add_special_tokens=not chat_template,
                                **options)
    from .train import train_expert

    if chat_template:
        raise ValueError("chat_template=True applies to kind='svf' only (a ReFT dispatcher trains on the plain prompt)")
    if config is None:
        config = {"layer": num_layers(model) // 2, "component": "block_output", "positions": "l1",
                  "intervention": "loreft", "low_rank_dimension": 4}
    return train_expert(model, tokenizer, questions, [" " + g for g in gold], config, **training)


def _chat(tokenizer: Any, texts: Sequence[str]) -> list[str]:
    return [tokenizer.apply_chat_template([{"role": "user", "content": t}], tokenize=False, add_generation_prompt=True)
            for t in texts]


def expert_dispatch(dispatch_expert: Any, tokenizer: Any, prompts: Sequence[str], names: Sequence[str], *,
                    method: str = "generate", other: str = "other", template: str = DISPATCH_TEMPLATE,
                    max_new_tokens: int = 8, chat_template: bool = False, batch_size: int = 8,
                    router: ExpertRouter | None = None) -> DispatchResult:
    """Strategy (b): answer the dispatch question with the trained ``dispatch_expert`` (an
    :class:`~reftkit.experts.svf_expert.SVFExpert`, applied for this pass only, or a ReftModel), by
    ``method`` as in :func:`prompt_dispatch`."""
    from .svf_expert import SVFExpert

    _check_method(method)
    with _base(router):
        if isinstance(dispatch_expert, SVFExpert):
            with dispatch_expert.applied() as model:
                return _route(model, tokenizer, prompts, names, other, template, method, batch_size,
                              max_new_tokens, chat_template)
        return _route(dispatch_expert, tokenizer, prompts, names, other, template, method, batch_size,
                      max_new_tokens, chat_template)


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
