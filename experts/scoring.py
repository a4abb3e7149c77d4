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
        j = torch.arange(int(a_len.max()))
        valid = j < a_len[:, None]
        src = torch.where(valid, p_len[:, None] - 1 + j, 0)  # answer token j is predicted at p_len + j - 1
        picked = logits.gather(1, src[..., None].expand(-1, -1, logits.shape[-1]))
        targets = ids.gather(1, torch.where(valid, src + 1, 0))
        token_lp = picked.log_softmax(-1).gather(-1, targets[..., None]).squeeze(-1)
        hits = (picked.argmax(-1) == targets) | ~valid
        correct[rows] = hits.all(1)
        mean_lp[rows] = (token_lp * valid).sum(1) / a_len
    return correct, mean_lp
