"""Data modules: tokenised prompt/response examples, their intervention positions, and a collator
with dynamic padding.

Positions are resolved over the *prompt* of each example when the dataset is built and stored
with it (``[K, P]`` per example, -1 = empty), so the response appended after the prompt never
moves them; the collator only shifts them by the padding it adds on the left. The exception is
``all``: an every-position intervention (IA3, adapters) acts on every token of the example,
prompt and response, as those methods do.

Mixed-task data: give ``tasks`` (one task name, or None, per example) and a ReftModel whose
config assigns entries to tasks; the collator then adds ``tasks`` (``[B]`` indices into
``model.task_names``, -1 = none) and one batch can train every task at once.

**Which token is "last"?** reftkit intervenes at the last prompt token, index ``prompt_len - 1``:
the position whose state produces the first response token. This is what the ReFT paper's code
(``loreft/``, ``last_position = prompt_len`` with ``range(last - n, last)``) and pyreft's
``make_last_position_supervised_data_module`` do. pyreft's ``ReftDataset`` instead sets
``last_position = prompt_len - 1`` and then takes ``range(last - n, last)``, which for ``l1``
lands one token early (``prompt_len - 2``); to reproduce that, pass explicit locations.

**Tokenisation.** Prompt and response are tokenised separately and concatenated, so the
prompt/response boundary is exact (tokenising ``prompt + response`` as one string, as pyreft does,
can merge tokens across the boundary and mislabel one token). With ``chat_template=True`` the
prompt is the chat template up to the generation prompt and the response is the rest of the
rendered conversation (for SmolLM2 that includes ``<|im_end|>``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch.utils.data import Dataset

from reftkit.positions import PositionSpec, locate_all, parse_positions, split_untied, stack_locations

IGNORE_INDEX = -100


class DataError(ValueError):
    """Unusable data: names the argument and the example index at fault."""


class ReftDataset(Dataset):
    """Tokenised examples: ``input_ids``, ``labels`` (a list, or an int class id) and ``locations``."""

    def __init__(self, items: list[dict[str, Any]]) -> None:
        if not items:
            raise DataError("the dataset is empty: give at least one example")
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.items[index]

    @property
    def lengths(self) -> list[int]:
        return [len(item["input_ids"]) for item in self.items]


def _pad_id(tokenizer: Any) -> int:
    for name in ("pad_token_id", "eos_token_id"):  # eos is safe as padding: masked and unlabelled
        value = getattr(tokenizer, name, None)
        if value is not None:
            return int(value)
    raise DataError("the tokenizer has neither pad_token nor eos_token; set tokenizer.pad_token first")


@dataclass
class ReftDataCollator:
    """Pads a list of examples to the longest one (on ``tokenizer.padding_side``) and returns
    ``input_ids``, ``attention_mask``, ``labels`` and ``intervention_locations`` ``[B, K, P]``."""

    tokenizer: Any
    pad_to_multiple_of: int | None = None

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        pad, left = _pad_id(self.tokenizer), getattr(self.tokenizer, "padding_side", "right") == "left"
        width = max(len(f["input_ids"]) for f in features)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        ids = torch.full((len(features), width), pad, dtype=torch.long)
        mask = torch.zeros((len(features), width), dtype=torch.long)
        sequence_labels = not isinstance(features[0]["labels"], int)
        labels = torch.full((len(features), width), IGNORE_INDEX, dtype=torch.long) if sequence_labels else \
            torch.tensor([f["labels"] for f in features], dtype=torch.long)
        shift = torch.zeros(len(features), dtype=torch.long)
        for row, f in enumerate(features):
            n = len(f["input_ids"])
            span = slice(width - n, width) if left else slice(0, n)
            ids[row, span] = torch.as_tensor(f["input_ids"])
            mask[row, span] = 1
            if sequence_labels:
                labels[row, span] = torch.as_tensor(f["labels"])
            shift[row] = width - n if left else 0
        locations = _stack_padded([torch.as_tensor(f["locations"]) for f in features])
        locations = torch.where(locations >= 0, locations + shift[:, None, None], -1)
        batch = {"input_ids": ids, "attention_mask": mask, "labels": labels, "intervention_locations": locations}
        if "task" in features[0]:
            batch["tasks"] = torch.tensor([f["task"] for f in features], dtype=torch.long)
        return batch


def _stack_padded(per_example: list[torch.Tensor]) -> torch.Tensor:
    width = max(t.shape[-1] for t in per_example)
    return torch.stack([torch.nn.functional.pad(t, (0, width - t.shape[-1]), value=-1) for t in per_example])


def _specs_for(model: Any, positions: str | None, num_interventions: int | None,
               share_weights: bool) -> list[PositionSpec]:
    """One spec per intervention: from a ReftModel's config, or pyreft-style from the arguments."""
    from reftkit.model import ReftModel

    if positions is None:
        if not isinstance(model, ReftModel):
            raise DataError("positions=None needs model to be a ReftModel, whose config gives the positions")
        return list(model._specs)
    spec = parse_positions(positions)
    if isinstance(model, ReftModel) and num_interventions is None:
        count = len(model.interventions)
        untied = [key.endswith(("_first", "_last")) for key in model.interventions]
        if any(untied):  # the model has pyreft's untied layout: its own per-intervention split
            return [PositionSpec(first=spec.first) if key.endswith("_first") else
                    PositionSpec(last=spec.last) if key.endswith("_last") else spec for key in model.interventions]
        return [spec] * count
    count = num_interventions or 1
    split = None if share_weights else split_untied(spec)
    if split is None:
        return [spec] * count
    if count % 2:
        raise DataError(f"share_weights=False with positions={positions!r} needs an even num_interventions, "
                        f"got {count}")
    return [split[0]] * (count // 2) + [split[1]] * (count // 2)


def _context_limit(tokenizer: Any, model: Any, max_length: int | None) -> int:
    limits = [max_length, getattr(getattr(model, "config", None), "max_position_embeddings", None)]
    tok_max = getattr(tokenizer, "model_max_length", None)
    if tok_max and tok_max < 10 ** 8:
        limits.append(tok_max)
    return min(x for x in limits if x) if any(limits) else 10 ** 9


def tokenize_pairs(tokenizer: Any, inputs: Sequence[str], outputs: Sequence[str], *, chat_template: bool = False,
                   max_length: int, add_eos: bool = True) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, response ids) per example; errors name the example index."""
    if len(inputs) != len(outputs):
        raise DataError(f"inputs has {len(inputs)} examples, outputs has {len(outputs)}; they must match")
    if not inputs:
        raise DataError("inputs is empty: give at least one example")
    pairs = []
    for i, (prompt, response) in enumerate(zip(inputs, outputs)):
        if chat_template:
            prompt_text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                        add_generation_prompt=True)
            full = tokenizer.apply_chat_template([{"role": "user", "content": prompt},
                                                  {"role": "assistant", "content": response}], tokenize=False)
            if not full.startswith(prompt_text):
                raise DataError(f"example {i}: the chat template renders the conversation without the prompt "
                                "as a prefix; cannot find the prompt/response boundary")
            prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
            response_ids = tokenizer(full[len(prompt_text):], add_special_tokens=False)["input_ids"]
        else:
            prompt_ids = tokenizer(prompt)["input_ids"]
            eos = tokenizer.eos_token if add_eos and tokenizer.eos_token else ""
            response_ids = tokenizer(response + eos, add_special_tokens=False)["input_ids"]
        if len(prompt_ids) > max_length:
            raise DataError(f"example {i}: the prompt has {len(prompt_ids)} tokens, the model's context is "
                            f"{max_length}; shorten it or raise max_length")
        response_ids = response_ids[:max_length - len(prompt_ids)]
        if not response_ids:
            raise DataError(f"example {i}: the response is empty (after truncation to max_length={max_length})")
        pairs.append((list(prompt_ids), list(response_ids)))
    return pairs


def _example_locations(specs: list[PositionSpec], prompt_lengths: torch.Tensor,
                       full_lengths: torch.Tensor) -> torch.Tensor:
    """``[N, K, P]``: each spec over the prompt, except ``all`` over the whole example."""
    zeros = torch.zeros_like(prompt_lengths)
    located = locate_all(specs, zeros, prompt_lengths, int(prompt_lengths.max()))
    if not any(spec.every for spec in specs):
        return located
    whole = locate_all([PositionSpec(every=True)], zeros, full_lengths, int(full_lengths.max()))[:, 0]
    return stack_locations([whole if spec.every else located[:, k] for k, spec in enumerate(specs)])


def _task_ids(model: Any, tasks: Sequence[str | None] | None, count: int) -> list[int] | None:
    if tasks is None:
        return None
    from reftkit.model import ReftModel

    if not isinstance(model, ReftModel) or not model.task_names:
        raise DataError("tasks were given, but model is not a ReftModel whose config assigns entries to tasks")
    if len(tasks) != count:
        raise DataError(f"tasks has {len(tasks)} entries, inputs has {count}; they must match")
    ids = []
    for i, task in enumerate(tasks):
        if task is not None and task not in model.task_names:
            raise DataError(f"tasks[{i}]={task!r} is not a task of the model; its tasks are {model.task_names}")
        ids.append(-1 if task is None else model.task_names.index(task))
    return ids


def _supervised(tokenizer: Any, model: Any, inputs: Sequence[str], outputs: Sequence[str],
                specs: list[PositionSpec], chat_template: bool, max_length: int | None,
                tasks: Sequence[str | None] | None = None) -> ReftDataset:
    pairs = tokenize_pairs(tokenizer, inputs, outputs, chat_template=chat_template,
                           max_length=_context_limit(tokenizer, model, max_length))
    lengths = torch.tensor([len(p) for p, _ in pairs])
    locations = _example_locations(specs, lengths, torch.tensor([len(p) + len(r) for p, r in pairs]))
    task_ids = _task_ids(model, tasks, len(pairs))
    return ReftDataset([{"input_ids": p + r, "labels": [IGNORE_INDEX] * len(p) + r, "locations": locations[i].tolist(),
                         **({"task": task_ids[i]} if task_ids is not None else {})}
                        for i, (p, r) in enumerate(pairs)])


def make_last_position_supervised_data_module(
        tokenizer: Any, model: Any, inputs: Sequence[str], outputs: Sequence[str], *,
        num_interventions: int | None = None, chat_template: bool = False, max_length: int | None = None,
        eval_inputs: Sequence[str] | None = None, eval_outputs: Sequence[str] | None = None,
        tasks: Sequence[str | None] | None = None, eval_tasks: Sequence[str | None] | None = None) -> dict[str, Any]:
    """pyreft's module: intervene at the last prompt token (every intervention), loss on the
    response only. ``model`` may be a ReftModel (its intervention count is used) or the base model
    with ``num_interventions``. Returns ``dict(train_dataset, eval_dataset, data_collator)``."""
    return make_multiple_position_supervised_data_module(
        tokenizer, model, inputs, outputs, positions="l1", num_interventions=num_interventions,
        chat_template=chat_template, max_length=max_length, eval_inputs=eval_inputs, eval_outputs=eval_outputs,
        tasks=tasks, eval_tasks=eval_tasks)


def make_multiple_position_supervised_data_module(
        tokenizer: Any, model: Any, inputs: Sequence[str], outputs: Sequence[str], *,
        positions: str | None = "f1+l1", num_interventions: int | None = None, share_weights: bool = True,
        chat_template: bool = False, max_length: int | None = None, eval_inputs: Sequence[str] | None = None,
        eval_outputs: Sequence[str] | None = None, tasks: Sequence[str | None] | None = None,
        eval_tasks: Sequence[str | None] | None = None) -> dict[str, Any]:
    """Positions such as ``f7+l7`` over each prompt; ``positions=None`` takes each intervention's
    positions from the ReftModel's config (the natural choice). ``share_weights=False`` without a
    ReftModel gives pyreft's untied layout: the first half of the interventions get the first
    positions, the second half the last ones."""
    specs = _specs_for(model, positions, num_interventions, share_weights)
    train = _supervised(tokenizer, model, inputs, outputs, specs, chat_template, max_length, tasks)
    evaluation = None
    if eval_inputs is not None:
        evaluation = _supervised(tokenizer, model, eval_inputs, eval_outputs or [], specs, chat_template,
                                 max_length, eval_tasks)
    return {"train_dataset": train, "eval_dataset": evaluation, "data_collator": ReftDataCollator(tokenizer)}


def make_classification_data_module(
        tokenizer: Any, model: Any, texts: Sequence[str], labels: Sequence[int | str], *,
        label_names: Sequence[str] | None = None, positions: str | None = None,
        num_interventions: int | None = None, max_length: int | None = None) -> dict[str, Any]:
    """Sequence classification: ``labels`` are class ids (or names, mapped through ``label_names``);
    interventions act on the text at ``positions`` (default: the ReftModel's config, else ``l1``)."""
    if len(texts) != len(labels):
        raise DataError(f"texts has {len(texts)} examples, labels has {len(labels)}; they must match")
    names = list(label_names) if label_names is not None else None
    ids: list[int] = []
    for i, label in enumerate(labels):
        value = names.index(label) if names is not None and isinstance(label, str) and label in names else label
        if not isinstance(value, int) or isinstance(value, bool) or value < 0 or (names and value >= len(names)):
            bound = f"0..{len(names) - 1} (label_names={names})" if names else "a non-negative int"
            raise DataError(f"labels[{i}]={label!r} is out of range; expected {bound}")
        ids.append(value)
    from reftkit.model import ReftModel

    spec_text = positions if positions is not None or isinstance(model, ReftModel) else "l1"
    specs = _specs_for(model, spec_text, num_interventions, True)
    limit = _context_limit(tokenizer, model, max_length)
    items = []
    encoded = [tokenizer(t, truncation=True, max_length=limit)["input_ids"] for t in texts]
    lengths = torch.tensor([len(e) for e in encoded])
    if (lengths == 0).any():
        raise DataError(f"texts[{int((lengths == 0).nonzero()[0])}] tokenises to nothing")
    locations = locate_all(specs, torch.zeros_like(lengths), lengths, int(lengths.max()))
    for i, (enc, label) in enumerate(zip(encoded, ids)):
        items.append({"input_ids": list(enc), "labels": label, "locations": locations[i].tolist()})
    return {"train_dataset": ReftDataset(items), "eval_dataset": None, "data_collator": ReftDataCollator(tokenizer),
            "num_labels": len(names) if names else max(ids) + 1}


def length_grouped_order(lengths: Sequence[int], batch_size: int, seed: int = 0) -> list[int]:
    """Indices ordered so each batch holds examples of similar length (little padding), with the
    batches in a seeded random order — the same idea as transformers' ``group_by_length``."""
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(lengths), generator=generator).tolist()
    mega = batch_size * 50  # sort within large random chunks, as transformers does
    grouped = []
    for s in range(0, len(order), mega):
        chunk = sorted(order[s:s + mega], key=lambda i: -lengths[i])
        grouped.extend(chunk[b:b + batch_size] for b in range(0, len(chunk), batch_size))
    batch_order = torch.randperm(len(grouped), generator=generator).tolist()
    return [i for b in batch_order for i in grouped[b]]
