"""pyreft 0.1.0's data layer, part 1: position parsing, pyreft's location lists, the collator wrapper,
loading and the ``ReftDataset`` base class that pyreft's examples subclass. (The ready-made datasets and
data modules are in :mod:`reftkit.pyreft.dataset_modules`; :mod:`reftkit.pyreft.dataset` has both, as
``pyreft.dataset`` does.)

Everything here reproduces pyreft's outputs exactly (``tests/goldens/pyreft_data`` holds real pyreft's
results; ``tests/pyreft_compat/test_data.py`` compares), including its conventions:

* **Locations are pyreft's lists, not reftkit's ``-1`` slots.** A request longer than the prompt is
  shrunk to ``last_position // 2`` on each side and the missing slots are *padded with a real
  position*: ``pad_mode="first"`` pads with ``-1`` and then shifts everything by the one pad token
  pyreft prepends, so padding lands on that (masked) pad token; ``pad_mode="last"`` pads with
  ``last_position`` itself. Duplicate positions are harmless (the edit at a position is the same).
* ``share_weights=False`` with both first and last positions splits the interventions into a first
  half (first positions) and a second half (last positions), as pyreft's untied layout.
* Tokenisation is pyreft's: the prompt and ``prompt + response`` are tokenised as two strings (so a
  token that merges across the boundary is labelled as pyreft labels it).

Loading: ``dataset=`` (a list of dicts, or a ``datasets.Dataset``) always works; ``data_path`` to a local
``.json`` / ``.jsonl`` file works without the ``datasets`` package; anything else (the Hugging Face
Hub) goes through ``datasets.load_dataset`` exactly as pyreft does, when that package is installed.
reftkit's native data layer is :mod:`reftkit.data.supervised`; its positions use ``-1`` for empty slots.
"""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

IGNORE_INDEX = -100

no_header_prompt_template = """\
### Instruction:
%s

### Response:
"""

prompt_input = """Below is an instruction that \
describes a task, paired with an input that provides \
further context. Write a response that appropriately \
completes the request.

### Instruction:
%s

### Input:
%s

### Response:
"""

prompt_no_input = """Below is an instruction that \
describes a task. Write a response that appropriately \
completes the request.

### Instruction:
%s

### Response:
"""


def _count(text: str, strip: str, positions: str) -> int:
    try:
        return int(text.strip(strip))
    except ValueError:
        raise ValueError(f"positions={positions!r} is not pyreft's grammar: give 'f<n>', 'l<n>' or 'f<n>+l<n>' "
                         f"(first n / last n tokens), e.g. 'f1+l1'") from None


def parse_positions(positions: str) -> tuple[int, int]:
    """pyreft's ``(first_n, last_n)`` for ``"f<n>+l<n>"``, ``"f<n>"`` or ``"l<n>"``.

    pyreft's parser, quirks included: a string with neither ``f`` nor ``l`` is ``(0, 0)`` and letters are
    stripped from both ends (``"ff2"`` is ``(2, 0)``); a malformed number raises ``ValueError``."""
    if not isinstance(positions, str):
        raise ValueError(f"positions={positions!r} must be a string such as 'f1+l1'")
    if "+" in positions:
        first, last = positions.split("+")[:2]
        return _count(first, "f", positions), _count(last, "l", positions)
    if "f" in positions:
        return _count(positions, "f", positions), 0
    if "l" in positions:
        return 0, _count(positions, "l", positions)
    return 0, 0


def _required(kwargs: dict[str, Any], name: str) -> Any:
    if name not in kwargs:
        raise TypeError(f"get_intervention_locations() needs {name}=...; it takes last_position, num_interventions "
                        "and either positions='f1+l1' or first_n/last_n (optional: share_weights, pad_mode)")
    return kwargs[name]


def get_intervention_locations(**kwargs: Any) -> list[list[int]]:
    """pyreft's per-example locations: ``num_interventions`` lists of positions inside ``[0, last_position)``.

    ``first_n = min(last_position // 2, requested first)``, likewise ``last_n``; the shortfall is padded with
    ``-1`` (``pad_mode="first"``) or ``last_position`` (``pad_mode="last"``). Shared (``share_weights=True``, or
    only one side requested): every intervention gets ``range(first_n) + range(last - last_n, last) + pads``.
    Untied: the first ``num_interventions // 2`` get the first positions, the next ``num_interventions // 2``
    the last ones, each padded to the longer of the two (an odd count leaves one intervention out, as pyreft)."""
    share_weights = kwargs.get("share_weights", False)
    last_position = _required(kwargs, "last_position")
    if "positions" in kwargs:
        want_first, want_last = parse_positions(kwargs["positions"])
    else:
        want_first, want_last = _required(kwargs, "first_n"), _required(kwargs, "last_n")
    count = _required(kwargs, "num_interventions")
    pad = -1 if kwargs.get("pad_mode", "first") == "first" else last_position

    first_n = min(last_position // 2, want_first)
    last_n = min(last_position // 2, want_last)
    firsts = list(range(first_n))
    lasts = list(range(last_position - last_n, last_position))
    if share_weights or first_n == 0 or last_n == 0:
        shared = firsts + lasts + [pad] * ((want_first - first_n) + (want_last - last_n))
        return [list(shared) for _ in range(count)]
    left = firsts + [pad] * (want_first - first_n)
    right = lasts + [pad] * (want_last - last_n)
    width = max(len(left), len(right))
    left, right = left + [pad] * (width - len(left)), right + [pad] * (width - len(right))
    return [list(left) for _ in range(count // 2)] + [list(right) for _ in range(count // 2)]


def _shape(value: Any) -> tuple[int, ...] | str:
    try:
        return tuple(np.shape(value))
    except ValueError:  # numpy refuses nested lists of unequal lengths
        return "ragged"


@dataclass
class ReftDataCollator:
    """pyreft's collator: ``data_collator`` (e.g. ``DataCollatorForSeq2Seq(tokenizer, model,
    label_pad_token_id=-100, padding="longest")``) pads the batch, then ``intervention_locations`` is cut to
    the padded length on its last axis (pyreft's ``[..., :max_seq_length]``)."""

    data_collator: Callable[[Sequence[dict[str, Any]]], Any]

    def __call__(self, instances: Sequence[dict[str, Any]]) -> Any:
        shapes = {_shape(instance["intervention_locations"]) for instance in instances
                  if "intervention_locations" in instance}
        if len(shapes) > 1 or "ragged" in shapes:
            found = sorted(map(str, shapes))
            raise ValueError(f"the examples' intervention_locations have shapes {found}; pyreft batches need one "
                             "[num_interventions, positions] shape for all (pad with a repeated position, as "
                             "get_intervention_locations does)")
        batch = self.data_collator(instances)
        width = batch["input_ids"].shape[-1]
        batch["intervention_locations"] = batch["intervention_locations"][..., :width]
        return batch


class Rows(list):
    """A loaded table: a list of dict rows with the two ``datasets.Dataset`` methods pyreft relies on."""

    def shuffle(self, seed: int | None = None) -> "Rows":
        """The order ``datasets.Dataset.shuffle(seed=seed)`` gives (numpy's ``default_rng(seed).permutation``)."""
        return Rows(self[i] for i in np.random.default_rng(seed).permutation(len(self)))

    def select(self, indices: Iterable[int]) -> "Rows":
        return Rows(self[int(i)] for i in indices)

    @property
    def column_names(self) -> list[str]:
        return list(self[0]) if self else []


def read_json_rows(path: str | Path) -> Rows:
    """A local JSON file as rows: a list of objects, a dict of equal-length columns, or JSON lines."""
    text = Path(path).read_text()
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        try:
            return Rows(json.loads(line) for line in text.splitlines() if line.strip())
        except json.JSONDecodeError as err:
            raise ValueError(f"data_path={str(path)!r} is neither JSON nor JSON lines: {err}") from None
    if isinstance(data, dict) and data and all(isinstance(v, list) for v in data.values()):
        lengths = {len(v) for v in data.values()}
        if len(lengths) == 1:
            return Rows(dict(zip(data, values)) for values in zip(*data.values()))
    if isinstance(data, list) and all(isinstance(row, dict) for row in data):
        return Rows(data)
    raise ValueError(f"data_path={str(path)!r} holds a {type(data).__name__}; give a list of objects (one per "
                     "example), a dict of equal-length columns, or JSON lines")


def load_rows(task: str | None, data_path: str | None, split: str, *, raw: bool = False) -> Any:
    """pyreft's loading: a local ``.json``/``.jsonl`` file (read here, or by ``datasets`` when installed, as
    pyreft does), else ``datasets.load_dataset`` from the Hub.

    ``ReftDataset`` reads a JSON file's rows whatever ``split`` says (pyreft loads its ``train`` split) and
    ``load_dataset(task, data_path, split=split)`` from the Hub; ``raw=True`` is ``ReftRawDataset``'s rule:
    ``load_dataset(...)[split]``, so a JSON file has only the ``train`` split."""
    local = data_path is not None and str(data_path).endswith((".json", ".jsonl"))
    try:
        import datasets  # optional: reftkit does not depend on it
    except ImportError:
        datasets = None
    if datasets is None:
        if not local:
            where = task if data_path is None or raw else f"{task!r} / {data_path!r}"
            raise ImportError(f"loading {where} from the Hugging Face Hub needs the 'datasets' package "
                              "(pip install datasets); or pass dataset= (a list of dicts) or a local .json data_path")
        if raw and split != "train":
            raise KeyError(f"data_split={split!r}: a JSON file has one split, 'train'")
        return read_json_rows(data_path)
    if local:
        return datasets.load_dataset("json", data_files=data_path)[split] if raw else \
            datasets.load_dataset("json", data_files=data_path, split="train")
    if raw:
        return datasets.load_dataset(data_path)[split]
    if data_path is None:
        return datasets.load_dataset(task, split=split)
    return datasets.load_dataset(task, data_path, split=split)


def tokenize_text(tokenizer: Any, *text: str) -> torch.Tensor:
    """pyreft's ``tokenizer(text, max_length=model_max_length, truncation=True)["input_ids"][0]`` (no truncation
    when the tokenizer has no real limit: the fast tokenizers overflow on transformers' huge default)."""
    limit = getattr(tokenizer, "model_max_length", None)
    bounded = isinstance(limit, int) and limit < 10 ** 9
    kwargs = {"max_length": limit, "truncation": True} if bounded else {}
    return tokenizer(*text, return_tensors="pt", **kwargs)["input_ids"][0]


def pad_token_id(tokenizer: Any) -> int:
    value = getattr(tokenizer, "pad_token_id", None)
    if value is None:
        raise ValueError("the tokenizer has no pad_token; pyreft's datasets pad and mask with it: set one first, "
                         "e.g. tokenizer.pad_token = tokenizer.unk_token (as pyreft's examples do)")
    return int(value)


def subspaces_for(data_item: Any, kwargs: dict[str, Any]) -> list | None:
    """pyreft's ``subspaces`` column: the item's ``subspaces`` repeated ``num_interventions`` times (halved
    when ``share_weights``, as pyreft does)."""
    if not (hasattr(data_item, "keys") and "subspaces" in data_item):
        return None
    count = _required(kwargs, "num_interventions")
    if kwargs.get("share_weights", False):
        count //= 2
    return [data_item["subspaces"]] * count


class ReftDataset(Dataset):
    """pyreft's base class: load rows, ``tokenize`` each (subclasses override it, returning ``(result,
    last_position)``), then :meth:`compute_intervention_and_subspaces` adds the locations, a pad token
    (``pad_mode``), the attention mask and the subspaces. ``preprocess(kwargs)`` runs before loading and
    ``postprocess(kwargs)`` after, as in pyreft; both may set ``pad_mode``, ``fields_to_pad``, ``fields_to_mask``.

    ``kwargs`` must hold ``position`` (e.g. ``"f1+l1"``) and ``num_interventions``; ``share_weights`` is optional.
    """

    def __init__(self, task: str, data_path: str | None, tokenizer: Any, data_split: str = "train",
                 dataset: Any = None, seed: int = 42, max_n_example: int | None = None, **kwargs: Any) -> None:
        super().__init__()
        if "position" not in kwargs:
            raise TypeError(f"{type(self).__name__}(...) needs position=... (pyreft's grammar, e.g. 'f1+l1') and "
                            "num_interventions=... among its keyword arguments")
        self.tokenizer = tokenizer
        self.first_n, self.last_n = parse_positions(kwargs["position"])
        self.task, self.data_path, self.data_split = task, data_path, data_split
        self.dataset, self.seed, self.max_n_example = dataset, seed, max_n_example
        self.pad_mode = "first"
        self.fields_to_pad = ["input_ids", "labels"]
        self.fields_to_mask = ["input_ids"]

        self.preprocess(kwargs)
        self.task_dataset = self.load_dataset()
        self.postprocess(kwargs)

        self.result = []
        for i, data_item in enumerate(self.task_dataset):
            tokenized, last_position = self.tokenize(data_item)
            self.result.append(self.compute_intervention_and_subspaces(i, data_item, tokenized, last_position,
                                                                       **kwargs))

    def tokenize(self, data_item: Any, **kwargs: Any) -> tuple[dict[str, Any], int]:
        """Return ``(result, last_position)``: ``result`` holds ``input_ids`` (and ``labels``) tensors."""
        raise NotImplementedError(f"{type(self).__name__} must override tokenize(data_item) -> (result, last_position)")

    def preprocess(self, kwargs: dict[str, Any]) -> None:
        """Runs before loading (read fields from ``kwargs``, set ``pad_mode`` ...)."""

    def postprocess(self, kwargs: dict[str, Any]) -> None:
        """Runs after loading (``self.task_dataset`` is set)."""

    def __len__(self) -> int:
        return len(self.result)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return copy.deepcopy(self.result[i])

    def load_dataset(self) -> Any:
        """``dataset`` when given, else a local JSON file or the Hub (see :func:`load_rows`); then
        ``max_n_example`` rows after a seeded shuffle. Sets ``raw_dataset`` (``None`` for the train split)."""
        if self.dataset is None:
            task_dataset = load_rows(self.task, self.data_path, self.data_split)
        elif hasattr(self.dataset, "shuffle") and hasattr(self.dataset, "select"):
            task_dataset = self.dataset
        else:
            task_dataset = Rows(self.dataset)
        if self.max_n_example is not None:
            task_dataset = task_dataset.shuffle(seed=self.seed)
            task_dataset = task_dataset.select(range(self.max_n_example))
        self.raw_dataset = task_dataset if self.data_split != "train" else None
        return task_dataset

    def get_intervention_locations(self, **kwargs: Any) -> list[list[int]]:
        return get_intervention_locations(**kwargs)

    def compute_intervention_and_subspaces(self, id: int, data_item: Any, result: dict[str, Any],
                                           last_position: int, **kwargs: Any) -> dict[str, Any]:
        """pyreft's step: locations for ``last_position``; with ``pad_mode="first"`` one pad token (label -100)
        before each field of ``fields_to_pad`` and every location + 1; with ``"last"`` one pad token after;
        ``attention_mask = (input_ids != pad_token_id)`` (int32); the ``subspaces`` column."""
        locations = self.get_intervention_locations(last_position=last_position, first_n=self.first_n,
                                                    last_n=self.last_n, pad_mode=self.pad_mode, **kwargs)
        result["intervention_locations"] = locations
        result["id"] = id
        pad = pad_token_id(self.tokenizer)
        if self.pad_mode in ("first", "last"):
            for field in self.fields_to_pad:
                if field not in result:
                    continue
                fill = torch.tensor([IGNORE_INDEX if field == "labels" else pad])
                parts = (fill, torch.as_tensor(result[field])) if self.pad_mode == "first" else \
                    (torch.as_tensor(result[field]), fill)
                result[field] = torch.cat(parts)
            if self.pad_mode == "first":
                result["intervention_locations"] = (torch.IntTensor(locations) + 1).tolist()
        if len(self.fields_to_mask) == 1:
            result["attention_mask"] = (torch.as_tensor(result[self.fields_to_mask[0]]) != pad).int()
        else:
            for field in self.fields_to_mask:
                result[f"{field}_mask"] = (torch.as_tensor(result[field]) != pad).int()
        subspaces = subspaces_for(data_item, kwargs)
        if subspaces is not None:
            result["subspaces"] = subspaces
        return result
