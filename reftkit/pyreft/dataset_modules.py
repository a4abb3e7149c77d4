"""pyreft 0.1.0's ready-made datasets and data modules, on :mod:`reftkit.pyreft.dataset_base`.

* ``make_last_position_supervised_data_module`` / ``make_multiple_position_supervised_data_module``: the
  README's one-call data modules (pyreft's signatures and defaults); examples are dicts of lists, the
  collator is ``ReftDataCollator(DataCollatorForSeq2Seq(tokenizer, model, label_pad_token_id=-100,
  padding="longest"))``, as pyreft's.
* ``ReftSupervisedDataset`` (Alpaca prompts), ``ReftGenerationDataset``, ``ReftClassificationDataset``,
  ``ReftPreferenceDataset``, ``ReftRewardDataset`` (+ ``ReftRewardCollator``) and ``ReftRawDataset``.

One deliberate difference: where pyreft's own arguments give no intervention locations at all
(``positions="f1+l1"`` untied, i.e. ``share_weights=False``, with an odd ``num_interventions`` such as the
default 1), pyreft builds examples with empty locations and trains nothing at the intended positions;
here the data module raises instead.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch.utils.data import Dataset
from transformers import DataCollatorForSeq2Seq

from .dataset_base import (
    IGNORE_INDEX,
    ReftDataCollator,
    ReftDataset,
    Rows,
    get_intervention_locations,
    load_rows,
    pad_token_id,
    parse_positions,
    prompt_input,
    prompt_no_input,
    subspaces_for,
    tokenize_text,
)


def _seq2seq_collator(tokenizer: Any, model: Any) -> ReftDataCollator:
    return ReftDataCollator(data_collator=DataCollatorForSeq2Seq(tokenizer=tokenizer, model=model,
                                                                 label_pad_token_id=IGNORE_INDEX, padding="longest"))


def _prompt_and_full(tokenizer: Any, prompt: str, response: str, nonstop: bool) -> tuple[int, torch.Tensor,
                                                                                         torch.Tensor]:
    """pyreft's tokenisation: ``prompt`` and ``prompt + response (+ eos)`` separately; labels -100 on the
    first ``len(prompt ids)`` tokens of the full sequence."""
    if not nonstop and tokenizer.eos_token is None:
        raise ValueError("the tokenizer has no eos_token, which pyreft appends to each response; set one or pass "
                         "nonstop=True")
    prompt_length = len(tokenize_text(tokenizer, prompt))
    full = tokenize_text(tokenizer, prompt + response + ("" if nonstop else tokenizer.eos_token))
    labels = full.clone()
    labels[:prompt_length] = IGNORE_INDEX
    return prompt_length, full, labels


def _check_pairs(inputs: Sequence[str], outputs: Sequence[str]) -> None:
    if len(inputs) != len(outputs):
        raise ValueError(f"inputs has {len(inputs)} examples, outputs has {len(outputs)}; they must match")


def make_last_position_supervised_data_module(tokenizer: Any, model: Any, inputs: Sequence[str],
                                              outputs: Sequence[str], num_interventions: int = 1,
                                              nonstop: bool = False) -> dict[str, Any]:
    """pyreft's module: every intervention at the last prompt token (``prompt length - 1``); loss on the
    response (and eos unless ``nonstop``). ``model`` only feeds the collator, as in pyreft."""
    _check_pairs(inputs, outputs)
    rows = Rows()
    for prompt, response in zip(inputs, outputs):
        length, full, labels = _prompt_and_full(tokenizer, prompt, response, nonstop)
        rows.append({"input_ids": full.tolist(), "intervention_locations": [[length - 1]] * num_interventions,
                     "labels": labels.tolist()})
    return {"train_dataset": rows, "eval_dataset": None, "data_collator": _seq2seq_collator(tokenizer, model)}


#: pyreft 0.1.0 ships this name too; it is the same module.
make_last_position_supervised_chat_data_module = make_last_position_supervised_data_module


def make_multiple_position_supervised_data_module(tokenizer: Any, model: Any, inputs: Sequence[str],
                                                  outputs: Sequence[str], positions: str = "f1+l1",
                                                  num_interventions: int = 1, nonstop: bool = False,
                                                  share_weights: bool = False) -> dict[str, Any]:
    """pyreft's module: ``positions`` over each prompt (``get_intervention_locations`` with
    ``last_position = prompt length``, ``pad_mode="last"``, so short prompts pad with the first response
    token's position, as pyreft)."""
    _check_pairs(inputs, outputs)
    first_n, last_n = parse_positions(positions)
    rows = Rows()
    for i, (prompt, response) in enumerate(zip(inputs, outputs)):
        length, full, labels = _prompt_and_full(tokenizer, prompt, response, nonstop)
        locations = get_intervention_locations(last_position=length, first_n=first_n, last_n=last_n, pad_mode="last",
                                               num_interventions=num_interventions, share_weights=share_weights)
        if not locations:
            raise ValueError(f"positions={positions!r} with share_weights=False splits the interventions into a first "
                             f"half and a last half, so num_interventions={num_interventions} leaves none; pyreft "
                             "would silently intervene nowhere. Pass an even num_interventions (two per layer: "
                             "first and last) or share_weights=True")
        rows.append({"input_ids": full.tolist(), "intervention_locations": locations, "labels": labels.tolist()})
    return {"train_dataset": rows, "eval_dataset": None, "data_collator": _seq2seq_collator(tokenizer, model)}


def _alpaca_prompt(data_item: Any, instruction_field: str, input_field: str) -> str:
    if input_field not in data_item or data_item[input_field] == "":
        return prompt_no_input % data_item[instruction_field]
    return prompt_input % (data_item[instruction_field], data_item[input_field])


class ReftSupervisedDataset(ReftDataset):
    """Alpaca-style instruction data: pass ``input_field``, ``output_field`` and ``instruction_field``.
    Locations over the prompt with ``last_position = prompt length - 1`` (pyreft's choice here, one token
    earlier than the data modules')."""

    def __init__(self, task: str, data_path: str | None, tokenizer: Any, data_split: str = "train",
                 dataset: Any = None, seed: int = 42, max_n_example: int | None = None, no_stop: bool = False,
                 **kwargs: Any) -> None:
        self.no_stop = no_stop
        super().__init__(task=task, data_path=data_path, tokenizer=tokenizer, data_split=data_split, dataset=dataset,
                         seed=seed, max_n_example=max_n_example, **kwargs)

    def preprocess(self, kwargs: dict[str, Any]) -> None:
        self.input_field = kwargs["input_field"]
        self.output_field = kwargs["output_field"]
        self.instruction_field = kwargs["instruction_field"]

    def tokenize(self, data_item: Any) -> tuple[dict[str, Any], int]:
        prompt = _alpaca_prompt(data_item, self.instruction_field, self.input_field)
        length, full, labels = _prompt_and_full(self.tokenizer, prompt, data_item[self.output_field], self.no_stop)
        return {"input_ids": full, "labels": labels}, length - 1


class ReftGenerationDataset(ReftDataset):
    """``prompt_field`` + ``completion_field`` (+ eos); locations over the prompt only."""

    def preprocess(self, kwargs: dict[str, Any]) -> None:
        self.prompt_field = kwargs["prompt_field"]
        self.completion_field = kwargs["completion_field"]

    def tokenize(self, data_item: Any) -> tuple[dict[str, Any], int]:
        length, full, labels = _prompt_and_full(self.tokenizer, data_item[self.prompt_field],
                                                data_item[self.completion_field], False)
        return {"input_ids": full, "labels": labels}, length - 1


class ReftClassificationDataset(ReftDataset):
    """One text field (``input_field``); ``label_field`` equal to it gives language-model labels, another
    field is tokenised as the labels, ``None`` gives no labels."""

    def preprocess(self, kwargs: dict[str, Any]) -> None:
        self.input_field = kwargs["input_field"]
        self.label_field = kwargs["label_field"]

    def tokenize(self, data_item: Any) -> tuple[dict[str, Any], int]:
        input_ids = tokenize_text(self.tokenizer, data_item[self.input_field])
        result = {"input_ids": input_ids}
        if self.label_field == self.input_field:
            result["labels"] = input_ids.clone()
        elif self.label_field is not None:
            result["labels"] = tokenize_text(self.tokenizer, data_item[self.label_field])
        return result, len(input_ids) - 1


class ReftPreferenceDataset(ReftDataset):
    """(prompt, chosen, rejected): the input is prompt + rejected, the labels prompt + chosen (both padded to
    the longer); pass ``input_field``, ``instruction_field``, ``chosen_output_field``, ``rejected_output_field``."""

    def preprocess(self, kwargs: dict[str, Any]) -> None:
        self.input_field = kwargs["input_field"]
        self.instruction_field = kwargs["instruction_field"]
        self.chosen_output_field = kwargs["chosen_output_field"]
        self.rejected_output_field = kwargs["rejected_output_field"]

    def tokenize(self, data_item: Any) -> tuple[dict[str, Any], int]:
        prompt = _alpaca_prompt(data_item, self.instruction_field, self.input_field)
        prompt_ids = tokenize_text(self.tokenizer, prompt)
        if self.data_split != "train":
            return {"input_ids": prompt_ids}, len(prompt_ids)
        eos = self.tokenizer.eos_token
        inputs = tokenize_text(self.tokenizer, prompt + data_item[self.rejected_output_field] + eos)
        labels = tokenize_text(self.tokenizer, prompt + data_item[self.chosen_output_field] + eos)
        labels[:len(prompt_ids)] = IGNORE_INDEX
        width = max(len(inputs), len(labels))
        pad = pad_token_id(self.tokenizer)
        inputs = torch.cat((inputs, torch.full((width - len(inputs),), pad, dtype=torch.long)))
        labels = torch.cat((labels, torch.full((width - len(labels),), IGNORE_INDEX, dtype=torch.long)))
        return {"input_ids": inputs, "labels": labels}, len(prompt_ids)


class ReftRewardDataset(ReftDataset):
    """Two conversations (``conv_A_field``, ``conv_B_field``; with ``prompt_field`` they are the assistant
    turns after that user prompt), rendered by the chat template without the bos token; the better-rewarded
    one (``conv_A_reward_field`` / ``conv_B_reward_field``) becomes ``chosen_output``. Locations over the
    shared prefix of the two. Collate with :class:`ReftRewardCollator`."""

    def preprocess(self, kwargs: dict[str, Any]) -> None:
        self.conv_A_field = kwargs["conv_A_field"]
        self.conv_B_field = kwargs["conv_B_field"]
        self.prompt_field = kwargs.get("prompt_field")
        self.conv_A_reward_field = kwargs.get("conv_A_reward_field")
        self.conv_B_reward_field = kwargs.get("conv_B_reward_field")
        self.fields_to_pad = ["chosen_output", "rejected_output"]
        self.fields_to_mask = ["chosen_output", "rejected_output"]

    def _render(self, conversation: Any) -> str:
        text = self.tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=False)
        return text.replace(self.tokenizer.bos_token, "")

    def tokenize(self, data_item: Any) -> tuple[dict[str, Any], int]:
        item = dict(data_item)  # pyreft edits the row in place; a copy gives the same result
        if self.prompt_field is not None:
            for field in (self.conv_A_field, self.conv_B_field):
                item[field] = [{"role": "user", "content": item[self.prompt_field]},
                               {"role": "assistant", "content": item[field]}]
        chosen, rejected = self._render(item[self.conv_A_field]), self._render(item[self.conv_B_field])
        result: dict[str, Any] = {}
        if self.conv_A_reward_field is not None:
            result["chosen_reward"] = item[self.conv_A_reward_field]
            result["rejected_reward"] = item[self.conv_B_reward_field]
            if result["chosen_reward"] < result["rejected_reward"]:
                chosen, rejected = rejected, chosen
                result["chosen_reward"], result["rejected_reward"] = result["rejected_reward"], result["chosen_reward"]
        chosen_ids, rejected_ids = tokenize_text(self.tokenizer, chosen), tokenize_text(self.tokenizer, rejected)
        shared = 0
        for a, b in zip(chosen_ids.tolist(), rejected_ids.tolist()):
            shared += 1
            if a != b:
                break
        result["chosen_output"], result["rejected_output"] = chosen_ids, rejected_ids
        return result, shared - 1


@dataclass
class ReftRewardCollator:
    """pyreft's reward collator: each example becomes two rows (chosen, then rejected, with their
    rewards, default 1.0 / 0.0), padded by ``tokenizer.pad``."""

    tokenizer: Any
    padding: bool | str = True
    max_length: int | None = None
    pad_to_multiple_of: int | None = None
    return_tensors: str = "pt"

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        merged = []
        for feature in features:
            for side, default in (("chosen", 1.0), ("rejected", 0.0)):
                merged.append({"input_ids": feature[f"{side}_output"], "attention_mask": feature[f"{side}_output_mask"],
                               "reward": feature.get(f"{side}_reward", default),
                               "intervention_locations": feature["intervention_locations"]})
        batch = self.tokenizer.pad(merged, padding=self.padding, max_length=self.max_length,
                                   pad_to_multiple_of=self.pad_to_multiple_of, return_tensors=self.return_tensors)
        batch = {key: batch[key] for key in ("input_ids", "attention_mask", "reward", "intervention_locations")}
        batch["intervention_locations"] = batch["intervention_locations"][..., :batch["input_ids"].shape[-1]]
        return batch


class ReftRawDataset(Dataset):
    """``instruction`` + ``output`` rows, pyreft's raw format: train split gives input ids and labels, any
    other split the prompt ids only; locations as ``ReftDataset`` with ``pad_mode="first"`` and
    ``last_position = prompt length``. ``kwargs`` need ``position`` and ``num_interventions``."""

    def __init__(self, task: str, data_path: str | None, tokenizer: Any, data_split: str = "train",
                 dataset: Any = None, seed: int = 42, max_n_example: int | None = None, **kwargs: Any) -> None:
        super().__init__()
        if dataset is None:
            rows = load_rows(task, data_path, data_split, raw=True)
        else:
            rows = dataset if hasattr(dataset, "shuffle") and hasattr(dataset, "select") else Rows(dataset)
        if max_n_example is not None:
            rows = rows.shuffle(seed=seed).select(range(max_n_example))
        self.raw_dataset = rows if data_split != "train" else None
        if "position" not in kwargs:
            raise TypeError("ReftRawDataset(...) needs position=... (e.g. 'f1+l1') and num_interventions=...")
        first_n, last_n = parse_positions(kwargs["position"])
        pad = pad_token_id(tokenizer)
        self.examples = []
        for i, data_item in enumerate(rows):
            prompt = data_item["instruction"]
            prompt_ids = tokenize_text(tokenizer, prompt)
            example: dict[str, Any] = {}
            if data_split == "train":
                full = tokenize_text(tokenizer, prompt + data_item["output"] + tokenizer.eos_token)
                labels = full.clone()
                labels[:len(prompt_ids)] = IGNORE_INDEX
                example["input_ids"] = torch.cat((torch.tensor([pad]), full))
                example["labels"] = torch.cat((torch.tensor([IGNORE_INDEX]), labels))
            else:
                example["input_ids"] = torch.cat((torch.tensor([pad]), prompt_ids))
            locations = self.get_intervention_locations(last_position=len(prompt_ids), first_n=first_n, last_n=last_n,
                                                        pad_mode="first", **kwargs)
            example["intervention_locations"] = (torch.IntTensor(locations) + 1).tolist()
            example["id"] = i
            example["attention_mask"] = (example["input_ids"] != pad).int()
            subspaces = subspaces_for(data_item, kwargs)
            if subspaces is not None:
                example["subspaces"] = subspaces
            self.examples.append(example)

    def get_intervention_locations(self, **kwargs: Any) -> list[list[int]]:
        return get_intervention_locations(**kwargs)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict[str, Any]:
        example = self.examples[i]
        keys = ["input_ids", "attention_mask", "intervention_locations", "id", "labels", "subspaces"]
        return {key: copy.copy(example[key]) for key in keys if key in example}
