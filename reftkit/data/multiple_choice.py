"""Multiple-choice data for T-Few's losses (Liu et al. 2022, "Few-Shot Parameter-Efficient Fine-Tuning is
Better and Cheaper than In-Context Learning", §3.2): each example is a prompt, its answer choices (their
number may differ between examples) and the index of the correct one.

Tokenisation is that of rank classification (:func:`reftkit.analysis.multiple_choice.choice_logprobs`):
the prompt with ``add_special_tokens``, each choice on its own without special tokens, concatenated — so
put any separating space in the choice (``" yes"``). Intervention positions are resolved on the *prompt
alone* (:meth:`reftkit.ReftModel.prompt_locations`), as rank classification does, so training and
evaluation edit the same tokens and every choice of an example is scored under the same edit (``all``
thus covers the prompt's tokens, not the choice's).

A batch of B examples with at most C choices is B·C rows, row ``b·C + c`` = prompt ``b`` + choice ``c``
(an example with fewer choices gets prompt-only rows there, masked out of the loss by ``choice_mask``)::

    input_ids, attention_mask   [B·C, L]    dynamic padding on the tokenizer's side
    intervention_locations      [B·C, K, P] the prompt's positions, shifted by any left padding
    choice_labels               [B·C, L]    the choice's token ids at its columns, -100 elsewhere (unshifted)
    choice_mask                 [B, C]      True for a real choice
    correct                     [B]         the correct choice's index
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from reftkit.anatomy import is_encoder_decoder
from reftkit.positions import locate_all

from .supervised import IGNORE_INDEX, DataError, ReftDataset, _context_limit, _pad_id, _specs_for, _stack_padded

__all__ = ["MultipleChoiceDataset", "MultipleChoiceDataCollator", "tokenize_choices",
           "make_multiple_choice_data_module"]


class MultipleChoiceDataset(ReftDataset):
    """Items ``{"input_ids": prompt ids, "choices": [choice ids, ...], "correct": int, "locations": [K, P]}``
    (``input_ids`` is the prompt, so length-grouped samplers see a sensible length)."""

    @property
    def lengths(self) -> list[int]:
        return [len(item["input_ids"]) + max(len(c) for c in item["choices"]) for item in self.items]


@dataclass
class MultipleChoiceDataCollator:
    """Pads a list of multiple-choice examples into B·C prompt+choice rows (see the module docstring).
    ``padding_side`` overrides the tokenizer's (``"left"`` / ``"right"``).

    ``encoder_decoder``: rows for a T5/BART-like model instead: ``input_ids`` / ``attention_mask`` the prompt
    alone (the encoder's input), ``choice_labels`` ``[B·C, T]`` the choice as the decoder's targets (right
    padded with -100), and no ``intervention_locations`` (the model takes each entry's positions over its own
    stack's input: the prompt, or the decoder's)."""

    tokenizer: Any
    pad_to_multiple_of: int | None = None
    padding_side: str | None = None
    encoder_decoder: bool = False

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        side = self.padding_side or getattr(self.tokenizer, "padding_side", "right")
        if side not in ("left", "right"):
            raise DataError(f"padding_side={side!r}; expected 'left' or 'right'")
        pad, left = _pad_id(self.tokenizer), side == "left"
        choices = max(len(f["choices"]) for f in features)
        if self.encoder_decoder:
            return self._seq2seq(features, choices, pad, left)
        # rows past an example's last choice hold its prompt alone: real tokens (no all-masked row, which
        # attention kernels can turn into NaN), no label, and choice_mask False
        rows = [f["input_ids"] + (f["choices"][c] if c < len(f["choices"]) else [])
                for f in features for c in range(choices)]
        width = max(len(r) for r in rows)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        shift = torch.zeros(len(rows), dtype=torch.long)
        for r, row in enumerate(rows):
            start = width - len(row) if left else 0
            ids[r, start:start + len(row)] = torch.as_tensor(row)
            mask[r, start:start + len(row)] = 1
            prompt = len(features[r // choices]["input_ids"])
            labels[r, start + prompt:start + len(row)] = ids[r, start + prompt:start + len(row)]
            shift[r] = start
        counts = torch.tensor([len(f["choices"]) for f in features])
        out = {"input_ids": ids, "attention_mask": mask, "choice_labels": labels,
               "choice_mask": torch.arange(choices)[None, :] < counts[:, None],
               "correct": torch.tensor([f["correct"] for f in features], dtype=torch.long)}
        if "locations" in features[0]:
            located = _stack_padded([torch.as_tensor(f["locations"]) for f in features])  # [B, K, P], prompt-relative
            located = located.repeat_interleave(choices, dim=0)
            out["intervention_locations"] = torch.where(located >= 0, located + shift[:, None, None], -1)
        return out

    def _seq2seq(self, features: Sequence[dict[str, Any]], choices: int, pad: int, left: bool) -> dict[str, Any]:
        prompts = [f["input_ids"] for f in features for _ in range(choices)]
        # a missing choice (an example with fewer) is one -100 label: scored nowhere, masked by choice_mask
        answers = [f["choices"][c] if c < len(f["choices"]) else [IGNORE_INDEX] for f in features
                   for c in range(choices)]
        width = max(len(p) for p in prompts)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        ids = torch.full((len(prompts), width), pad, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        labels = torch.full((len(prompts), max(len(a) for a in answers)), IGNORE_INDEX, dtype=torch.long)
        for r, (p, a) in enumerate(zip(prompts, answers)):
            start = width - len(p) if left else 0
            ids[r, start:start + len(p)] = torch.as_tensor(p)
            mask[r, start:start + len(p)] = 1
            labels[r, :len(a)] = torch.as_tensor(a)
        counts = torch.tensor([len(f["choices"]) for f in features])
        return {"input_ids": ids, "attention_mask": mask, "choice_labels": labels,
                "choice_mask": torch.arange(choices)[None, :] < counts[:, None],
                "correct": torch.tensor([f["correct"] for f in features], dtype=torch.long)}


def tokenize_choices(tokenizer: Any, prompts: Sequence[str], choices: Sequence[Sequence[str]],
                     correct: Sequence[int] | None = None, *, add_special_tokens: bool = True,
                     max_length: int | None = None, prefix: str = "") -> list[tuple[list[int], list[list[int]]]]:
    """(prompt ids, [choice ids, ...]) per example, checked; errors name the argument (``prefix`` +
    ``prompts`` / ``choices`` / ``correct``) and the example index. ``correct=None`` skips its checks."""
    names = {k: prefix + k for k in ("prompts", "choices", "correct")}
    if len(prompts) != len(choices):
        raise DataError(f"{names['choices']} has {len(choices)} entries, {names['prompts']} has {len(prompts)}; "
                        "they must match")
    if correct is not None and len(correct) != len(prompts):
        raise DataError(f"{names['correct']} has {len(correct)} entries, {names['prompts']} has {len(prompts)}; "
                        "they must match")
    if not prompts:
        raise DataError(f"{names['prompts']} is empty: give at least one example")
    out = []
    for i, (prompt, options) in enumerate(zip(prompts, choices)):
        if isinstance(options, str):
            raise DataError(f"{names['choices']}[{i}] is the string {options!r}; give a list of answer choices")
        if len(options) == 0:
            raise DataError(f"{names['choices']}[{i}] is empty: each example needs at least one answer choice")
        if correct is not None:
            k = correct[i]
            if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k < len(options):
                raise DataError(f"{names['correct']}[{i}]={k!r} is out of range for {len(options)} choices "
                                f"(0..{len(options) - 1})")
        prompt_ids = list(tokenizer(prompt, add_special_tokens=add_special_tokens)["input_ids"])
        if not prompt_ids:
            raise DataError(f"{names['prompts']}[{i}]={prompt!r} has no tokens: the first choice token would have "
                            "no context")
        choice_ids = []
        for k, option in enumerate(options):
            ids = list(tokenizer(option, add_special_tokens=False)["input_ids"])
            if not ids:
                raise DataError(f"{names['choices']}[{i}][{k}]={option!r} has no tokens")
            choice_ids.append(ids)
        longest = len(prompt_ids) + max(len(c) for c in choice_ids)
        if max_length is not None and longest > max_length:
            # never truncate: a cut choice is a different answer
            raise DataError(f"example {i} of {names['prompts']}: prompt + longest choice is {longest} tokens, the "
                            f"model's context is {max_length}; shorten it or raise max_length")
        out.append((prompt_ids, choice_ids))
    return out


def _choice_dataset(tokenizer: Any, model: Any, prompts: Sequence[str], choices: Sequence[Sequence[str]],
                    correct: Sequence[int], positions: str | None, num_interventions: int | None,
                    add_special_tokens: bool, max_length: int | None, prefix: str = "") -> MultipleChoiceDataset:
    from reftkit.model import ReftModel

    if positions is None and hasattr(model, "load_trained") and not isinstance(model, ReftModel):
        positions = "l1"  # a weight-space model or prompt ensemble ignores positions; any valid spec will do
    specs = _specs_for(model, positions, num_interventions, True)  # DataError when positions can't be known
    encoded = tokenize_choices(tokenizer, prompts, choices, correct, add_special_tokens=add_special_tokens,
                               max_length=_context_limit(tokenizer, model, max_length), prefix=prefix)
    lengths = torch.tensor([len(p) for p, _ in encoded])
    if positions is None and isinstance(model, ReftModel):
        locations = model.prompt_locations(lengths)  # the very call rank classification's positions follow
    else:
        locations = locate_all(specs, torch.zeros_like(lengths), lengths, int(lengths.max()))
    return MultipleChoiceDataset([{"input_ids": p, "choices": c, "correct": int(correct[i]),
                                   "locations": locations[i].tolist()} for i, (p, c) in enumerate(encoded)])


def make_multiple_choice_data_module(
        tokenizer: Any, model: Any, prompts: Sequence[str], choices: Sequence[Sequence[str]],
        correct: Sequence[int], *, positions: str | None = None, num_interventions: int | None = None,
        add_special_tokens: bool = True, max_length: int | None = None,
        eval_prompts: Sequence[str] | None = None, eval_choices: Sequence[Sequence[str]] | None = None,
        eval_correct: Sequence[int] | None = None, eval_fraction: float | None = None,
        seed: int = 0) -> dict[str, Any]:
    """Multiple-choice examples for :class:`reftkit.ReftTrainer` with T-Few's losses (``loss_terms``).

    ``positions=None`` takes each intervention's positions from the ReftModel's config (a weight-space
    model or prompt ensemble, which ignores positions, gets placeholder ones); a string
    (``"l1"``, ``"f3+l3"``) applies to every intervention, as in the other data modules. Evaluation
    data: ``eval_prompts`` / ``eval_choices`` / ``eval_correct``, or ``eval_fraction`` of the examples
    held out (a seeded random split). Returns ``dict(train_dataset, eval_dataset, data_collator)``;
    ``eval_dataset`` is None without evaluation data. For an encoder-decoder model (T5, BART) the collator
    gives the prompt to the encoder and each choice to the decoder (``MultipleChoiceDataCollator.encoder_decoder``),
    and every entry acts at its config's positions over its own stack's input; ``positions`` is refused there.
    """
    if positions is not None and is_encoder_decoder(getattr(model, "model", model)):
        raise DataError(f"positions={positions!r}: an encoder-decoder model's entries act at their config's positions "
                        "over their own stack's input (the prompt, or the choice the decoder reads); leave it out")
    given = [x is not None for x in (eval_prompts, eval_choices, eval_correct)]
    if any(given) and not all(given):
        raise DataError("eval_prompts, eval_choices and eval_correct go together: give all three or none")
    if all(given) and eval_fraction is not None:
        raise DataError(f"eval_fraction={eval_fraction!r} and eval_prompts were both given; choose one")
    build = dict(positions=positions, num_interventions=num_interventions, add_special_tokens=add_special_tokens,
                 max_length=max_length)
    if eval_fraction is not None:
        n = len(prompts)
        numeric = isinstance(eval_fraction, (int, float)) and not isinstance(eval_fraction, bool)
        held = round(n * eval_fraction) if numeric else -1
        if not numeric or not 0 < eval_fraction < 1 or not 0 < held < n:
            raise DataError(f"eval_fraction={eval_fraction!r} must hold out between 1 and {n - 1} of the {n} "
                            "examples (a number in (0, 1))")
        # built whole first, so errors name the index in the arguments as given
        items = _choice_dataset(tokenizer, model, prompts, choices, correct, **build).items
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
        train = MultipleChoiceDataset([items[i] for i in sorted(order[held:])])
        evaluation = MultipleChoiceDataset([items[i] for i in sorted(order[:held])])
    else:
        train = _choice_dataset(tokenizer, model, prompts, choices, correct, **build)
        evaluation = None if eval_prompts is None else \
            _choice_dataset(tokenizer, model, eval_prompts, eval_choices, eval_correct, prefix="eval_", **build)
    return {"train_dataset": train, "eval_dataset": evaluation,
            "data_collator": MultipleChoiceDataCollator(
                tokenizer, encoder_decoder=is_encoder_decoder(getattr(model, "model", model)))}
