"""Search by the cross-entropy method (CEM), as Transformer²'s few-shot adaptation uses it to search mixing weights.

Each iteration samples a population ``x ~ N(μ, σ²)`` (clamped to ``bounds``), scores every member,
and refits ``μ, σ`` to the elite — the best ``⌊elite_ratio · population⌋`` members:

    μ ← mean(elite),  σ ← std(elite)

Defaults follow the released code (SakanaAI/self-adaptive-llms, ``optim_modules.CEM`` and
``cfgs/optimization/cem.yaml``): population 32, elite ratio 0.2, ``σ₀ = (hi − lo)/2`` over
``bounds = (0, 1)``, and member 0 of each population is the best solution so far, re-evaluated.
Transformer² runs 50 iterations (its few-shot experiments). Scores are maximised; a score may be a
tuple, compared in order — e.g. ``(accuracy, mean log-likelihood)`` breaks accuracy ties by
likelihood, as the released code does among its best members.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import pandas as pd
import torch


@dataclass
class CEMResult:
    """``best``: the best solution found; ``best_score``: its score; ``history``: one row per iteration."""

    best: torch.Tensor
    best_score: Any
    history: pd.DataFrame


def _key(score: Any) -> tuple:
    return tuple(float(s) for s in score) if isinstance(score, (tuple, list)) else (float(score),)


def cem(objective: Callable[[torch.Tensor], Any], init: torch.Tensor | Sequence[float], *, population: int = 32,
        elite_ratio: float = 0.2, iterations: int = 50, bounds: tuple[float, float] = (0.0, 1.0),
        init_std: float | None = None, re_eval_best: bool = True, seed: int = 0,
        progress: bool = True) -> CEMResult:
    """Maximise ``objective(x)`` over vectors ``x`` shaped like ``init`` (the first mean) with CEM."""
    from tqdm.auto import tqdm

    mean = torch.as_tensor(init, dtype=torch.float64).clone()
    lo, hi = (float(b) for b in bounds)
    if not lo < hi:
        raise ValueError(f"bounds={bounds!r} must be (low, high) with low < high")
    if not isinstance(population, int) or population < 2:
        raise ValueError(f"population={population!r} must be an int >= 2")
    elites = int(elite_ratio * population)
    if not 1 <= elites <= population:
        raise ValueError(f"elite_ratio={elite_ratio!r} keeps {elites} of population={population}; it must keep "
                         "at least one member")
    if not isinstance(iterations, int) or iterations < 1:
        raise ValueError(f"iterations={iterations!r} must be a positive int")
    std = torch.full_like(mean, (hi - lo) / 2 if init_std is None else float(init_std))
    generator = torch.Generator().manual_seed(seed)
    best, best_score = mean.clamp(lo, hi), None
    rows = []
    for step in tqdm(range(iterations), disable=not progress, desc="CEM"):
        noise = torch.randn((population, *mean.shape), generator=generator, dtype=torch.float64)
        members = (mean + noise * std).clamp(lo, hi)
        if re_eval_best:
            members[0] = best
        scores = [objective(member.float()) for member in members]
        keys = [_key(s) for s in scores]
        order = sorted(range(population), key=lambda i: keys[i], reverse=True)
        if best_score is None or keys[order[0]] >= _key(best_score):
            best, best_score = members[order[0]].clone(), scores[order[0]]
        elite = members[order[:elites]]
        mean = elite.mean(0)
        std = elite.std(0) if elites > 1 else torch.zeros_like(mean)
        rows.append({"iteration": step, "best_score": _key(best_score)[0],
                     "population_mean_score": sum(k[0] for k in keys) / population,
                     "elite_std": float(std.mean())})
    return CEMResult(best=best.float(), best_score=best_score, history=pd.DataFrame(rows))
