"""The synthetic inputs the benchmarks time: random token ids (with random or frozen weights the cost is
the real one) in padded batches, with labels and the f5+l5 intervention positions of every row.

Step benchmark: one right-padded training batch and one left-padded batch of prompts.
Epoch benchmark: examples with lognormal prompt and response lengths, collated in a given order.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def make_step_batches(vocab: int, pad: int, p: dict, seed: int = 1234) -> tuple[dict, dict]:
    """Right-padded training batch with labels; left-padded prompts; f5+l5 locations [B, K, 10]."""
    g = torch.Generator().manual_seed(seed)
    k = len(p["layers"])

    def batch(n, lo_hi, left):
        lengths = torch.randint(lo_hi[0], lo_hi[1] + 1, (n,), generator=g)
        width = int(lengths.max())
        ids = torch.full((n, width), pad, dtype=torch.long)
        mask = torch.zeros((n, width), dtype=torch.long)
        labels = torch.full((n, width), -100, dtype=torch.long)
        locs = torch.empty((n, k, 10), dtype=torch.long)
        for i, length in enumerate(lengths.tolist()):
            start = width - length if left else 0
            ids[i, start:start + length] = torch.randint(3, vocab, (length,), generator=g)
            mask[i, start:start + length] = 1
            labels[i, start:start + length] = ids[i, start:start + length]
            pos = list(range(start, start + 5)) + list(range(start + length - 5, start + length))
            locs[i] = torch.tensor(pos)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels, "locs": locs, "lengths": lengths}

    return batch(p["train_batch"], p["train_len"], left=False), batch(p["gen_batch"], p["gen_len"], left=True)


@dataclass
class Batch:
    """One right-padded epoch batch; labels cover the response only."""
    ids: torch.Tensor
    mask: torch.Tensor
    labels: torch.Tensor
    locs: torch.Tensor  # [B, K, 10]: first 5 and last 5 prompt positions, per intervention
    real_tokens: int


def make_examples(p: dict, vocab: int, seed: int = 0) -> list[tuple[list[int], int]]:
    """``(token ids, prompt length)`` per example; lengths lognormal around the preset's medians."""
    g = torch.Generator().manual_seed(seed)

    def lognormal(median: float, sigma: float) -> float:
        return median * math.exp(sigma * float(torch.randn(1, generator=g)))

    out = []
    for _ in range(p["n"]):
        lp = int(max(10, min(p["max_len"] - 4, lognormal(*p["prompt"]))))
        lr = int(max(4, min(p["max_len"] - lp, lognormal(*p["response"]))))
        out.append((torch.randint(3, vocab, (lp + lr,), generator=g).tolist(), lp))
    return out


def collate_examples(examples: list[tuple[list[int], int]], order: list[int], p: dict, pad: int, k: int,
                     device: str) -> list[Batch]:
    """Batches of ``p["batch"]`` examples taken in ``order``, each padded to its longest example."""
    batches = []
    for s in range(0, len(order), p["batch"]):
        chunk = [examples[i] for i in order[s:s + p["batch"]]]
        width = max(len(ids) for ids, _ in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        labels = torch.full_like(ids, -100)
        locs = torch.empty((len(chunk), k, 10), dtype=torch.long)
        for r, (toks, lp) in enumerate(chunk):
            ids[r, :len(toks)] = torch.tensor(toks)
            mask[r, :len(toks)] = 1
            labels[r, lp:len(toks)] = ids[r, lp:len(toks)]
            locs[r] = torch.tensor(list(range(5)) + list(range(lp - 5, lp)))
        batches.append(Batch(ids.to(device), mask.to(device), labels.to(device), locs.to(device), int(mask.sum())))
    return batches
