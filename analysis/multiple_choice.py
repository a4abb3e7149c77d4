"""Multiple choice by rank classification: score every answer choice by its log-probability under
the model given the prompt and pick the best one.

Source: Liu et al. 2022, "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than
In-Context Learning" (T-Few), sec. 3.2-3.3: rank classification, where length normalisation scores
a choice by the *mean* log-probability of its tokens so that long choices are not penalised for
their length (their sec. 3.3; Brown et al. 2020 use the same normalisation for GPT-3).

ReftModel. A ReftModel resolves its positions (``l1``, ``f7+l7``...) from the attention mask, so
running it on ``prompt + choice`` would put ``l1`` on the last *choice* token: each choice would be
scored under a different edit, and the choice tokens' own representations would be edited. Here the
positions are resolved on the *prompt alone* — the same tokens that ``ReftModel.generate`` edits —
through :meth:`reftkit.ReftModel.intervening` with a mask covering the prompt only, while the model
itself runs with the full mask. In a causal model the prompt's states do not depend on later tokens,
so the edited prompt states are those of generation, and every choice is scored under the same
edit. ``locations_fn`` overrides this (e.g. for a config with ``positions=None``).

Encoder-decoder models (T5, BART): the prompt is the encoder's input and each choice the decoder's targets,
scored by the decoder given the encoder input; a ReftModel's entries act at their positions over their own
stack's input (``locations_fn`` then indexes the prompt for encoder entries and the decoder's input for
decoder ones).
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from reftkit.anatomy import is_encoder_decoder
from reftkit.model import ReftModel
from reftkit.training.logprobs import continuation_logprobs, label_positions, predicting_states, seq2seq_logprobs

from .common import model_device

LocationsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _pad_id(tokenizer: Any) -> int:
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return int(tid)
    return 0  # any id works: padded columns are masked out and never scored


def _batch_scores(model: Any, prompt_ids: list[list[int]], choice_ids: list[list[int]], pad: int,
                  length_normalised: bool, locations_fn: LocationsFn | None) -> list[float]:
    """Scores of one batch of (prompt, choice) pairs, right-padded into one forward pass."""
    if is_encoder_decoder(model.model if isinstance(model, ReftModel) else model):
        return _seq2seq_scores(model, prompt_ids, choice_ids, pad, length_normalised, locations_fn)
    device = model_device(model)
    p_len = torch.tensor([len(p) for p in prompt_ids], device=device)
    c_len = torch.tensor([len(c) for c in choice_ids], device=device)
    width = int((p_len + c_len).max())
    ids = torch.full((len(prompt_ids), width), pad, dtype=torch.long, device=device)
    for row, (p, c) in enumerate(zip(prompt_ids, choice_ids)):
        ids[row, :len(p) + len(c)] = torch.tensor(p + c, device=device)
    cols = torch.arange(width, device=device)
    mask = (cols < (p_len + c_len)[:, None]).long()
    prompt_mask = (cols < p_len[:, None]).long()  # a ReftModel's positions are resolved on the prompt alone

    if isinstance(model, ReftModel):
        locations = locations_fn(p_len, mask) if locations_fn is not None else None
        with model.intervening(input_ids=ids, attention_mask=prompt_mask, intervention_locations=locations):
            states, head = predicting_states(model, ids, mask)
    else:
        states, head = model(input_ids=ids, attention_mask=mask).logits, None
    # the choice's own columns are its labels: choice token j is read where it is predicted, p_len + j - 1
    labels = ids.masked_fill(prompt_mask.bool() | ~mask.bool(), -100)
    total = continuation_logprobs(states, *label_positions(labels), head).token_logprobs.sum(1)
    return (total / c_len if length_normalised else total).tolist()


def _seq2seq_scores(model: Any, prompt_ids: list[list[int]], choice_ids: list[list[int]], pad: int,
                    length_normalised: bool, locations_fn: LocationsFn | None) -> list[float]:
    """An encoder-decoder model's scores: the prompt is the encoder's input, the choice the decoder's targets,
    so a ReftModel's encoder entries act on the prompt and its decoder entries over the decoder's input."""
    device = model_device(model)
    p_len = torch.tensor([len(p) for p in prompt_ids], device=device)
    ids = torch.full((len(prompt_ids), int(p_len.max())), pad, dtype=torch.long, device=device)
    labels = torch.full((len(choice_ids), max(len(c) for c in choice_ids)), -100, dtype=torch.long, device=device)
    for row, (p, c) in enumerate(zip(prompt_ids, choice_ids)):
        ids[row, :len(p)] = torch.tensor(p, device=device)
        labels[row, :len(c)] = torch.tensor(c, device=device)
    mask = (torch.arange(ids.shape[1], device=device) < p_len[:, None]).long()
    locations = locations_fn(p_len, mask) if locations_fn is not None else None
    out = seq2seq_logprobs(model, ids, mask, labels, locations)
    total = out.token_logprobs.sum(1)
    return (total / out.mask.sum(1) if length_normalised else total).tolist()


@torch.no_grad()
def choice_logprobs(model: Any, tokenizer: Any, prompts: Sequence[str], choices: Sequence[Sequence[str]], *,
                    length_normalised: bool = True, batch_size: int = 8, add_special_tokens: bool = True,
                    locations_fn: LocationsFn | None = None) -> list[list[float]]:
    """``out[i][k]``: log-probability of ``choices[i][k]`` given ``prompts[i]``, summed over the
    choice's tokens, or their mean when ``length_normalised`` (T-Few's rank classification).

    The prompt is tokenized with ``add_special_tokens`` (BOS for most causal LMs) and each choice
    on its own without special tokens, then appended — so put any separating space in the choice
    (``" yes"``), as the tokenizer would see it after the prompt. All (prompt, choice) pairs are
    scored ``batch_size`` at a time, longest first, right-padded, one forward pass per batch.

    ``model``: a causal LM returning ``.logits``, or a :class:`reftkit.ReftModel`, whose
    interventions apply at its configured positions resolved on the prompt alone (see the module
    docstring), or at ``locations_fn(prompt_lengths [B], attention_mask [B, T])`` — a LongTensor
    ``[B, P]`` or ``[B, K, P]`` of token indices (-1 = empty) in the right-padded prompt+choice batch.
    """
    if len(prompts) != len(choices):
        raise ValueError(f"{len(prompts)} prompts but {len(choices)} choice lists")
    if locations_fn is not None and not isinstance(model, ReftModel):
        raise ValueError("locations_fn applies to a reftkit ReftModel only")
    prompt_tok = [tokenizer(p, add_special_tokens=add_special_tokens)["input_ids"] for p in prompts]
    pairs: list[tuple[int, int, list[int], list[int]]] = []
    for i, (p, options) in enumerate(zip(prompt_tok, choices)):
        if not p:
            raise ValueError(f"prompt {i} has no tokens: the first choice token would have no context")
        for k, choice in enumerate(options):
            c = tokenizer(choice, add_special_tokens=False)["input_ids"]
            if not c:
                raise ValueError(f"choice {k} of prompt {i} ({choice!r}) has no tokens")
            pairs.append((i, k, p, c))
    # longest first: little padding within a batch, and an out-of-memory error shows up at once
    pairs.sort(key=lambda t: -(len(t[2]) + len(t[3])))
    out: list[list[float]] = [[0.0] * len(options) for options in choices]
    pad = _pad_id(tokenizer)
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start:start + batch_size]
        scores = _batch_scores(model, [t[2] for t in chunk], [t[3] for t in chunk], pad, length_normalised,
                               locations_fn)
        for (i, k, _, _), score in zip(chunk, scores):
            out[i][k] = score
    return out


def rank_classify(model: Any, tokenizer: Any, prompts: Sequence[str], choices: Sequence[Sequence[str]],
                  **kwargs: Any) -> list[int]:
    """Index of the highest-scoring choice per prompt (:func:`choice_logprobs` takes ``kwargs``);
    ties go to the first choice."""
    scores = choice_logprobs(model, tokenizer, prompts, choices, **kwargs)
    return [max(range(len(s)), key=s.__getitem__) for s in scores]


def accuracy(predicted: Sequence[int], gold: Sequence[int]) -> float:
    """Fraction (0-1) of ``predicted`` equal to ``gold``."""
    if len(predicted) != len(gold):
        raise ValueError(f"{len(predicted)} predictions but {len(gold)} gold labels")
    if not gold:
        raise ValueError("no examples")
    return sum(int(p) == int(g) for p, g in zip(predicted, gold)) / len(gold)
