"""One experiment end to end: train an expert per task, dispatch held-out prompts by each of
Transformer²'s strategies, and compare accuracy with the base model and one multi-task intervention.

Strategies (rows of the table):

* ``base`` — the frozen model, no intervention;
* ``multi-task`` — one intervention of the experts' shape trained on every task's data together;
* ``oracle`` — each prompt with its own task's expert (what a perfect dispatcher would reach);
* ``prompt (generate)`` — (a) as published: the base model generates the task's name after the adaptation
  prompt, then the named expert answers (text naming no task → the base model);
* ``prompt (rank)`` — (a) read by rank classification over the names instead (a reftkit option);
* ``classifier (ReFT)`` — (b) a ReFT dispatch intervention generates the task's name, then the named expert answers;
* any ``dispatchers`` given — e.g. ``classifier (SVF)``, the paper's SVF classification expert;
* ``few-shot`` — (c) per task, CEM mixes the experts using ``shots`` labelled examples of that task;
  the task of each prompt is known here (that is the few-shot setting: adapting to a given task).

Accuracy: the greedy continuation's first word equals the label. ``routing_accuracy``: the share of
prompts sent to their own task's expert (prompts of no task, when given, should go to the base model);
``unparsed``: how many of them a generating dispatcher answered with text naming no task.
"""
from __future__ import annotations

import random
import re
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import pandas as pd
from torch import nn

from .dispatch import expert_dispatch, few_shot_weights, prompt_dispatch, train_dispatch_expert
from .library import ExpertLibrary
from .routing import ExpertRouter
from .train import train_expert

STRATEGIES = ("base", "multi-task", "oracle", "prompt (generate)", "prompt (rank)", "classifier (ReFT)", "few-shot")


@dataclass
class StudyResult:
    """``table``: one row per strategy; ``predictions``: one row per held-out prompt and strategy;
    ``library``: the trained experts; ``few_shot``: the CEM weights found per task; ``seconds``: wall time of
    each step (training, few-shot search, dispatch, generation)."""

    table: pd.DataFrame
    predictions: pd.DataFrame
    library: ExpertLibrary
    few_shot: dict[str, list[float]] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)


def first_word(text: str) -> str:
    words = re.findall(r"[a-z]+", text.lower())
    return words[0] if words else ""


def dispatch_study(model: nn.Module, tokenizer: Any, families: Mapping[str, Mapping[str, Any]],
                   config: Any, *, other_prompts: Sequence[str] = (), epochs: float = 1.0,
                   learning_rate: float = 4e-3, batch_size: int = 8, shots: int = 8, population: int = 32,
                   elite_ratio: float = 0.2, iterations: int = 50, max_new_tokens: int = 3, seed: int = 0,
                   library: ExpertLibrary | None = None, dispatcher: Any = None,
                   few_shot: Mapping[str, Sequence[float]] | None = None,
                   dispatchers: Mapping[str, Callable[[list[str]], Sequence[str | None]]] | None = None,
                   prompt_options: Mapping[str, Any] | None = None, progress: bool = True) -> StudyResult:
    """Run the study on ``families`` (``{task: {"train": [{prompt, answer}], "eval": [...]}}``, e.g.
    :func:`reftkit.data.datasets.task_families`); ``config`` is every expert's ReftConfig; ``other_prompts``
    belong to no task: the second half trains the classification expert's "other", the first half counts
    towards routing accuracy. ``library`` (one expert per task, named after it), ``dispatcher`` (a trained
    dispatch ReftModel, left attached) and ``few_shot`` (weights per task) reuse earlier work instead of
    training or searching again. ``dispatchers``: further routing strategies, name → ``f(prompts)`` returning a
    task (or ``None``) per prompt, placed before few-shot. ``prompt_options``: keywords for every
    :func:`~reftkit.experts.prompt_dispatch` / :func:`~reftkit.experts.expert_dispatch` call (``template``,
    ``max_new_tokens``, ...). The model is left as it was given."""
    from tqdm.auto import tqdm

    tasks = list(families)
    train = {t: list(families[t]["train"]) for t in tasks}
    held_out = [(t, row) for t in tasks for row in families[t]["eval"]]
    prompts = [row["prompt"] for _, row in held_out]
    gold_task = [t for t, _ in held_out]
    options = {"epochs": epochs, "learning_rate": learning_rate, "batch_size": batch_size, "seed": seed,
               "progress": False}
    steps = tqdm(total=len(tasks) * 2 + 3, desc="study", disable=not progress)

    seconds: dict[str, float] = {}
    trained_here = library is None
    if library is not None and sorted(library.names) != sorted(tasks):
        raise ValueError(f"library has experts {library.names}; the study needs one per task {tasks}")
    library = ExpertLibrary() if library is None else library
    for task in tasks if trained_here else ():
        start = time.perf_counter()
        reft = train_expert(model, tokenizer, [r["prompt"] for r in train[task]], [r["answer"] for r in train[task]],
                            config, **options)
        seconds[f"train {task}"] = time.perf_counter() - start
        library.add(task, reft)
        reft.detach()
        steps.update()
    mixed_rows = [row for task in tasks for row in train[task]]
    random.Random(seed).shuffle(mixed_rows)
    start = time.perf_counter()
    multi = train_expert(model, tokenizer, [r["prompt"] for r in mixed_rows], [r["answer"] for r in mixed_rows],
                         config, **options)
    seconds["train multi-task"] = time.perf_counter() - start
    steps.update()
    dispatcher_prompts = [r["prompt"] for r in mixed_rows] + list(other_prompts[len(other_prompts) // 2:])
    by_prompt = {r["prompt"]: t for t in tasks for r in train[t]}
    dispatcher_labels = [by_prompt.get(p) for p in dispatcher_prompts]
    own_dispatcher = dispatcher is None
    if own_dispatcher:
        start = time.perf_counter()
        dispatcher = train_dispatch_expert(model, tokenizer, dispatcher_prompts, dispatcher_labels, tasks, kind="reft",
                                           **{k: v for k, v in (prompt_options or {}).items() if k == "template"},
                                           **options)
        seconds["train dispatcher"] = time.perf_counter() - start
    steps.update()
    weights: dict[str, list[float]] = {t: list(w) for t, w in (few_shot or {}).items()}
    for task in [t for t in tasks if t not in weights]:
        examples = train[task][:shots]
        start = time.perf_counter()
        result = few_shot_weights(library, model, tokenizer, [r["prompt"] for r in examples],
                                  [r["answer"] for r in examples], population=population, elite_ratio=elite_ratio,
                                  iterations=iterations, seed=seed, progress=False)
        weights[task] = result.best.tolist()
        seconds[f"few-shot search {task}"] = time.perf_counter() - start
        steps.update()

    router = ExpertRouter(model, library, {**{t: t for t in tasks}, **{f"{t}/few-shot": w for t, w in weights.items()}})
    routing_prompts = prompts + list(other_prompts[:len(other_prompts) // 2])
    routing_gold = gold_task + [None] * (len(routing_prompts) - len(prompts))
    routes: dict[str, list[str | None]] = {"base": [None] * len(prompts), "oracle": gold_task,
                                           "few-shot": [f"{t}/few-shot" for t in gold_task]}
    routing: dict[str, float] = {}
    unparsed: dict[str, int] = {}
    asks = dict(prompt_options or {})
    by_name: dict[str, Callable[[list[str]], Sequence[str | None]]] = {
        "prompt (generate)": lambda p: prompt_dispatch(model, tokenizer, p, tasks, **asks),
        "prompt (rank)": lambda p: prompt_dispatch(model, tokenizer, p, tasks, method="rank",
                                                   **{k: v for k, v in asks.items() if k != "chat_template"}),
        "classifier (ReFT)": lambda p: expert_dispatch(dispatcher, tokenizer, p, tasks,
                                                       **{k: v for k, v in asks.items() if k != "chat_template"}),
        **(dispatchers or {})}
    strategies = [*STRATEGIES[:-1], *[n for n in by_name if n not in STRATEGIES], STRATEGIES[-1]]
    for name, dispatch in by_name.items():
        start = time.perf_counter()
        chosen = dispatch(routing_prompts)
        seconds[f"dispatch {name}"] = time.perf_counter() - start
        routing[name] = sum(c == g for c, g in zip(chosen, routing_gold)) / len(routing_gold)
        routes[name] = list(chosen[:len(prompts)])
        if getattr(chosen, "generations", None) is not None:
            unparsed[name] = chosen.unparsed
    completions: dict[str, list[str]] = {}
    for name in strategies:
        start = time.perf_counter()
        if name == "multi-task":
            from reftkit.analysis.text_metrics import generate_predictions

            completions[name] = generate_predictions(multi, tokenizer, prompts, max_new_tokens=max_new_tokens,
                                                     batch_size=16, progress=False)
        else:
            completions[name] = router.generate(tokenizer, prompts, routes[name], max_new_tokens=max_new_tokens)
        seconds[f"generate {name}"] = time.perf_counter() - start
    steps.update()
    steps.close()
    router.detach()
    multi.detach()
    if own_dispatcher:
        dispatcher.detach()

    labels = [first_word(row["answer"]) for _, row in held_out]
    records, table = [], []
    for name in strategies:
        hits = [first_word(c) == lab for c, lab in zip(completions[name], labels)]
        for i, (task, row) in enumerate(held_out):
            records.append({"strategy": name, "task": task, "prompt": row["prompt"], "label": labels[i],
                            "route": routes.get(name, [None] * len(prompts))[i] if name != "multi-task" else "multi",
                            "completion": completions[name][i], "correct": hits[i]})
        entry = {"strategy": name}
        for task in tasks:
            entry[task] = 100.0 * sum(h for h, t in zip(hits, gold_task) if t == task) / gold_task.count(task)
        entry["mean"] = sum(entry[t] for t in tasks) / len(tasks)
        entry["routing_accuracy"] = 100.0 * routing[name] if name in routing else float("nan")
        entry["unparsed"] = unparsed.get(name, float("nan"))
        entry["dispatch_s"] = seconds.get(f"dispatch {name}", 0.0)
        entry["generate_s"] = seconds[f"generate {name}"]
        table.append(entry)
    return StudyResult(table=pd.DataFrame(table), predictions=pd.DataFrame(records), library=library,
                       few_shot=weights, seconds=seconds)
