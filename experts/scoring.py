"""Teacher-forced answer scores: would greedy decoding produce the answer, and how likely is it.

One forward of ``prompt + answer`` gives both. Greedy decoding starts with the answer's tokens exactly
when each of them is the arg-max of the logits after the prompt and the answer's earlier tokens, so
``correct`` equals "the greedy continuation begins with the answer" without generating. The mean
token log-probability is the length-normalised score of T-Few's rank classification and the
tie-breaker Transformer²'s few-shot search uses among equally accurate candidates.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from reftkit.training.logprobs import continuation_logprobs, label_positions

#: ``logits(input_ids, attention_mask, prompt_mask, rows)`` → ``[B, T, vocab]``; ``prompt_mask`` covers the
#: prompt tokens only (where interventions are placed), ``rows`` are the batch rows' indices in the input
LogitsFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, list[int]], torch.Tensor]


@torch.no_grad()
def answer_scores(logits_fn: LogitsFn, tokenizer: Any, prompts: Sequence[str], answers: Sequence[str],
                  batch_size: int = 16, device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(correct [N] bool, mean answer-token log-prob [N])``; prompts are tokenized with special
    tokens, answers without (put a separating space in the answer, as the tokenizer sees it)."""
    if len(prompts) != len(answers):
        raise ValueError(f"{len(prompts)} prompts but {len(answers)} answers")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    pairs = []
    for i, (prompt, answer) in enumerate(zip(prompts, answers)):
        p = tokenizer(prompt)["input_ids"]
        a = tokenizer(answer, add_special_tokens=False)["input_ids"]
        if not p or not a:
            raise ValueError(f"prompt {i} or its answer {answer!r} has no tokens")
        pairs.append((p, a))
    correct = torch.zeros(len(pairs), dtype=torch.bool)
    mean_lp = torch.zeros(len(pairs))
    device = device or torch.device("cpu")
    for start in range(0, len(pairs), batch_size):
        rows = list(range(start, min(start + batch_size, len(pairs))))
        p_len = torch.tensor([len(pairs[i][0]) for i in rows])
        a_len = torch.tensor([len(pairs[i][1]) for i in rows])
        width = int((p_len + a_len).max())
        ids = torch.full((len(rows), width), int(pad), dtype=torch.long)
        for r, i in enumerate(rows):
            ids[r, :p_len[r] + a_len[r]] = torch.tensor(pairs[i][0] + pairs[i][1])
        cols = torch.arange(width)
        mask = (cols < (p_len + a_len)[:, None]).long()
        prompt_mask = (cols < p_len[:, None]).long()
        logits = logits_fn(ids.to(device), mask.to(device), prompt_mask.to(device), rows).float().cpu()
        labels = ids.masked_fill(prompt_mask.bool() | ~mask.bool(), -100)  # the answer's own columns
        positions, targets, valid = label_positions(labels)
        token_lp = continuation_logprobs(logits, positions, targets, valid).token_logprobs
        # on the logits themselves, not their log-softmax, whose rounding could tie two near-equal maxima
        hits = (logits.argmax(-1).gather(1, positions) == targets) | ~valid
        correct[rows] = hits.all(1)
        mean_lp[rows] = token_lp.sum(1) / a_len
    return correct, mean_lp
