"""The training loop that ``bench_dynamics.py`` runs on both sides (reftkit in this venv, pyreft in its
own), so that the two differ only in the intervention and its parametrisation. Imports torch only.

The loop is what ``transformers.Trainer`` does with its defaults, written out: AdamW (betas 0.9 /
0.999, eps 1e-8) with weight decay on every parameter except biases, the gradient clipped to norm
``max_grad_norm`` (1.0), HF's linear schedule (``lr * t / warmup`` while ``t < warmup``, then
``lr * (total - t) / (total - warmup)``), one batch per step in a fixed order. A batch is a list of
parts (micro-batches of similar lengths) whose losses are combined into the mean over the whole
batch's labelled tokens, as one padded batch would give it, with less padding computed.
"""
from __future__ import annotations

import math
from typing import Callable

import torch


def linear_schedule(warmup: int, total: int | None) -> Callable[[int], float]:
    """``transformers.get_linear_schedule_with_warmup``'s multiplier at step ``t``; constant after the
    warm-up when ``total`` is None."""
    def factor(t: int) -> float:
        if t < warmup:
            return t / max(1, warmup)
        if total is None:
            return 1.0
        return max(0.0, (total - t) / max(1, total - warmup))
    return factor


def orthonormality_error(rotations: list[torch.Tensor]) -> float:
    """``max |R^T R - I|`` over the interventions' ``d x r`` bases."""
    return max(float((r.double().T @ r.double() - torch.eye(r.shape[1], dtype=torch.float64)).abs().max())
               for r in rotations)


def labelled(part: dict) -> int:
    """Tokens that carry a label after the causal shift."""
    return int((part["labels"][:, 1:] != -100).sum())


def batch_loss(batch: list[dict], loss_of: Callable[[dict], torch.Tensor]) -> torch.Tensor:
    """The mean loss over a batch's labelled tokens, computed part by part (a batch is a list of parts
    of similar lengths, so that little padding is computed): ``sum_p loss_p * n_p / sum_p n_p``."""
    counts = [labelled(part) for part in batch]
    return sum(loss_of(part) * (n / sum(counts)) for part, n in zip(batch, counts))


def _distance(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return math.sqrt(sum(float((x.double() - y.double()).pow(2).sum()) for x, y in zip(a, b)))


@torch.no_grad()
def _eval_loss(job: dict, loss_of: Callable[[dict], torch.Tensor]) -> float:
    """Token-weighted mean loss over the job's evaluation batches."""
    total, tokens = 0.0, 0
    for i in job["eval"]:
        n = sum(labelled(part) for part in job["batches"][i])
        total += float(batch_loss(job["batches"][i], loss_of)) * n
        tokens += n
    return total / max(1, tokens)


def run_job(job: dict, named: list[tuple[str, torch.Tensor]], loss_of: Callable[[dict], torch.Tensor],
            rotations: Callable[[], list[torch.Tensor]],
            probe: Callable[[], dict[str, float]] | None = None) -> dict:
    """Train ``named`` parameters for ``job["steps"]`` steps; return the curves.

    ``loss``: the loss of each step's batch before its update, then (index ``steps``) of the next batch
    in the order after the last update; ``dR``: ``|R_t - R_0|_F`` after each update (all interventions
    together); ``step_dR``: ``|R_t - R_{t-1}|_F``; ``eval``: the evaluation loss at the steps listed in
    ``job["eval_at"]``; ``orth``: ``max |R^T R - I|`` at the end; ``probe``: what ``probe()`` returned
    after each update.
    """
    decay = [p for n, p in named if not n.endswith("bias")]
    no_decay = [p for n, p in named if n.endswith("bias")]
    params = decay + no_decay
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": job["weight_decay"]},
                             {"params": no_decay, "weight_decay": 0.0}], lr=job["lr"], betas=(0.9, 0.999), eps=1e-8)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, linear_schedule(job["warmup"], job["total"]))
    start = rotations()
    previous = start
    out: dict = {"loss": [], "dR": [], "step_dR": [], "grad_norm": [], "eval": {}, "probe": []}
    for t in range(job["steps"]):
        if t in job["eval_at"]:
            out["eval"][t] = _eval_loss(job, loss_of)
        loss = batch_loss(job["batches"][job["order"][t]], loss_of)
        loss.backward()
        out["grad_norm"].append(float(torch.nn.utils.clip_grad_norm_(params, job["max_grad_norm"])))
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        out["loss"].append(float(loss.detach()))
        now = rotations()
        out["dR"].append(_distance(now, start))
        out["step_dR"].append(_distance(now, previous))
        previous = now
        if probe is not None:
            out["probe"].append(probe())
    with torch.no_grad():
        out["loss"].append(float(batch_loss(job["batches"][job["order"][job["steps"]]], loss_of)))
    if job["steps"] in job["eval_at"]:
        out["eval"][job["steps"]] = _eval_loss(job, loss_of)
    out["orth"] = orthonormality_error(previous)
    return out
