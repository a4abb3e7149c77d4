"""reftkit.pyreft's data layer against real pyreft 0.1.0 (goldens from tests/goldens/make_pyreft_data_goldens.py).

Every case replays the golden's inputs through reftkit.pyreft and compares the dataset items and the
collated batch exactly (values, and dtypes of the items' tensors)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import DataCollatorForSeq2Seq, DataCollatorWithPadding, PreTrainedTokenizerFast

import reftkit.pyreft.dataset as pdata
from reftkit.pyreft.dataset_base import tokenize_text

GOLDENS = Path(__file__).resolve().parents[1] / "goldens" / "pyreft_data"
GOLDEN = json.loads((GOLDENS / "goldens.json").read_text())


def load_tokenizer(model_max_length: int | None = None) -> PreTrainedTokenizerFast:
    """The golden's tokenizer, configured as the golden maker configures it."""
    tok = PreTrainedTokenizerFast(tokenizer_file=str(GOLDENS / "tokenizer.json"), bos_token="<s>", eos_token="</s>",
                                  unk_token="<unk>", pad_token="<pad>", padding_side="right",
                                  model_max_length=model_max_length or 128)
    tok.chat_template = GOLDEN["chat_template"]
    return tok


def plain(value):
    if isinstance(value, torch.Tensor):
        return {"values": value.tolist(), "dtype": str(value.dtype)}
    if isinstance(value, dict) or hasattr(value, "keys"):
        return {k: plain(value[k]) for k in value.keys()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


def values(tree):
    """Drop dtypes (transformers 4.45's and 5.x's collators may differ in a tensor's dtype, not its values)."""
    if isinstance(tree, dict) and set(tree) == {"values", "dtype"}:
        return tree["values"]
    if isinstance(tree, dict):
        return {k: values(v) for k, v in tree.items() if v is not None}
    if isinstance(tree, list):
        return [values(v) for v in tree]
    return tree


# -- parse_positions / get_intervention_locations ---------------------------------------------------
@pytest.mark.parametrize("case", GOLDEN["parse_positions"], ids=lambda c: repr(c["positions"]))
def test_parse_positions_equals_pyreft(case):
    if "error" in case:
        with pytest.raises(ValueError, match="pyreft's grammar"):
            pdata.parse_positions(case["positions"])
    else:
        assert pdata.parse_positions(case["positions"]) == tuple(case["result"])


def test_get_intervention_locations_equals_pyreft_on_every_case():
    cases = GOLDEN["get_intervention_locations"]
    assert len(cases) > 600
    mismatches = [(c["kwargs"], c["result"], pdata.get_intervention_locations(**c["kwargs"])) for c in cases
                  if pdata.get_intervention_locations(**c["kwargs"]) != c["result"]]
    assert not mismatches, mismatches[:3]
    # the table covers the conventions that matter: short prompts padded with a real position, untied halves
    short = [c for c in cases if c["kwargs"].get("last_position") == 3 and c["kwargs"].get("first_n") == 3
             and c["kwargs"].get("pad_mode") == "last" and not c["kwargs"].get("share_weights")
             and c["kwargs"].get("num_interventions") == 2]
    assert short and short[0]["result"] == [[0, 3, 3], [2, 3, 3]]


def test_get_intervention_locations_names_a_missing_argument():
    with pytest.raises(TypeError, match="num_interventions"):
        pdata.get_intervention_locations(last_position=4, positions="f1+l1")


# -- the two data modules -----------------------------------------------------------------------------
@pytest.mark.parametrize("case", GOLDEN["modules"], ids=lambda c: f"{c['fn']}-{c['kwargs']}-{c['model_max_length']}")
def test_data_modules_equal_pyreft(case):
    tok = load_tokenizer(case["model_max_length"])
    maker = pdata.make_last_position_supervised_data_module if case["fn"] == "last" else \
        pdata.make_multiple_position_supervised_data_module
    if case["items"][0]["intervention_locations"] == []:  # pyreft's own defaults give no locations at all
        with pytest.raises(ValueError, match="even num_interventions"):
            maker(tok, None, case["inputs"], case["outputs"], **case["kwargs"])
        return
    module = maker(tok, None, case["inputs"], case["outputs"], **case["kwargs"])
    assert set(module) == {"train_dataset", "eval_dataset", "data_collator"} and module["eval_dataset"] is None
    items = [module["train_dataset"][i] for i in range(len(module["train_dataset"]))]
    assert plain(items) == case["items"]
    batch = module["data_collator"](items)
    assert values(plain(dict(batch))) == values(case["batch"])
    assert batch["intervention_locations"].dtype == torch.long


# -- the datasets, including two subclasses in the style of examples/loreft/dataset.py ----------------
class GlueStyleDataset(pdata.ReftDataset):
    """LoReftGLUEDataset's pattern: int labels, one pad token appended as the intervention sink."""

    def preprocess(self, kwargs):
        self.pad_mode = "last"
        self.fields_to_pad = ["input_ids"]
        self.sentence1_key, self.sentence2_key = kwargs["keys"]

    def postprocess(self, kwargs):
        self.num_labels = len({item["label"] for item in self.task_dataset})

    def tokenize(self, data_item):
        texts = [data_item[self.sentence1_key]] + ([data_item[self.sentence2_key]] if self.sentence2_key else [])
        ids = tokenize_text(self.tokenizer, *texts)
        return {"input_ids": ids, "labels": data_item["label"]}, len(ids)


class LoReftStyleDataset(pdata.ReftDataset):
    """LoReftSupervisedDataset's pattern: a task template and trigger, prompt-only for eval splits,
    last_position = prompt length."""

    def preprocess(self, kwargs):
        self.template = kwargs.get("template", "%s")
        self.trigger = kwargs.get("trigger", "")

    def tokenize(self, data_item):
        prompt = self.template % data_item["instruction"]
        prompt_ids = tokenize_text(self.tokenizer, prompt)
        if self.data_split != "train":
            return {"input_ids": prompt_ids}, len(prompt_ids)
        full = prompt + self.trigger + data_item["output"] + self.tokenizer.eos_token
        ids = tokenize_text(self.tokenizer, full)
        labels = ids.clone()
        labels[:len(prompt_ids)] = pdata.IGNORE_INDEX
        return {"input_ids": ids, "labels": labels}, len(prompt_ids)


CLASSES = {"GlueStyleDataset": GlueStyleDataset, "LoReftStyleDataset": LoReftStyleDataset}


def build(case, tok, rows=None):
    cls = CLASSES.get(case["class"]) or getattr(pdata, case["class"])
    given = [dict(r) for r in (rows if rows is not None else case["rows"])]
    return cls(case["task"], None, tok, data_split=case["data_split"], dataset=given, **case["kwargs"])


def collate(case, tok, items):
    if case["collator"] == "reward":
        return pdata.ReftRewardCollator(tokenizer=tok)(items)
    inner = DataCollatorWithPadding(tokenizer=tok, padding="longest") if case["collator"] == "padding" else \
        DataCollatorForSeq2Seq(tokenizer=tok, model=None, label_pad_token_id=-100, padding="longest")
    return pdata.ReftDataCollator(data_collator=inner)(items)


@pytest.mark.parametrize("case", GOLDEN["datasets"],
                         ids=lambda c: f"{c['class']}-{c['data_split']}-{c['kwargs'].get('position')}")
def test_datasets_equal_pyreft(case):
    tok = load_tokenizer()
    dataset = build(case, tok)
    items = [dataset[i] for i in range(len(dataset))]
    assert plain(items) == case["items"]  # dtypes too: int64 ids, int32 masks, lists of locations
    batch = collate(case, tok, items)
    assert values(plain(dict(batch))) == values(case["batch"])
    assert getattr(dataset, "num_labels", None) == case["num_labels"]
    raw = getattr(dataset, "raw_dataset", None)
    assert (None if raw is None else len(raw)) == case["raw_dataset_len"]


def test_subspaces_column_reaches_the_batch():
    case = next(c for c in GOLDEN["datasets"] if c["class"] == "ReftSupervisedDataset")
    tok = load_tokenizer()
    batch = collate(case, tok, [build(case, tok)[i] for i in range(2)])
    # [B, num_interventions, s]: each example's own subspaces, once per intervention
    assert batch["subspaces"].tolist() == [[[0, 1], [0, 1]], [[2, 3], [2, 3]]]


def test_dataset_loads_a_local_json_file_like_the_list(tmp_path):
    case = next(c for c in GOLDEN["datasets"] if "max_n_example" in c["kwargs"])
    tok = load_tokenizer()
    for name, text in [("rows.json", json.dumps(case["rows"])),
                       ("rows.jsonl", "\n".join(json.dumps(r) for r in case["rows"]))]:
        (tmp_path / name).write_text(text)
        from_file = pdata.ReftSupervisedDataset(case["task"], str(tmp_path / name), tok, **case["kwargs"])
        assert plain([from_file[i] for i in range(len(from_file))]) == case["items"]  # same seeded subset


def test_loading_from_the_hub_without_datasets_says_what_to_do():
    try:
        import datasets  # noqa: F401
        pytest.skip("the datasets package is installed: hub loading is pyreft's own")
    except ImportError:
        pass
    with pytest.raises(ImportError, match="dataset="):
        pdata.ReftSupervisedDataset("alpaca", None, load_tokenizer(), input_field="input", output_field="output",
                                    instruction_field="instruction", position="l1", num_interventions=1)


def test_dataset_without_position_or_pad_token_fails_clearly():
    case = next(c for c in GOLDEN["datasets"] if c["class"] == "GlueStyleDataset")
    with pytest.raises(TypeError, match="position="):
        GlueStyleDataset("glue", None, load_tokenizer(), dataset=case["rows"], keys=["sentence", None],
                         num_interventions=1)
    tok = load_tokenizer()
    tok.pad_token = None
    with pytest.raises(ValueError, match="pad_token"):
        build(case, tok)


def test_collator_refuses_ragged_locations_with_a_reason():
    tok = load_tokenizer()
    inner = DataCollatorForSeq2Seq(tokenizer=tok, label_pad_token_id=-100, padding="longest")
    items = [{"input_ids": [1, 5, 6], "labels": [-100, 5, 6], "intervention_locations": [[1, 2]]},
             {"input_ids": [1, 5], "labels": [-100, 5], "intervention_locations": [[1]]}]
    with pytest.raises(ValueError, match=r"shapes \['\(1, 1\)', '\(1, 2\)'\]"):
        pdata.ReftDataCollator(data_collator=inner)(items)
    items[1]["intervention_locations"] = [[1], [1, 2]]  # ragged inside one example
    with pytest.raises(ValueError, match="ragged"):
        pdata.ReftDataCollator(data_collator=inner)(items)


def test_a_tokenizer_without_eos_needs_nonstop():
    tok = load_tokenizer()
    tok.eos_token = None
    with pytest.raises(ValueError, match="nonstop=True"):
        pdata.make_last_position_supervised_data_module(tok, None, ["define dog ."], [" an animal"])
    module = pdata.make_last_position_supervised_data_module(tok, None, ["define dog ."], [" an animal"], nonstop=True)
    assert module["train_dataset"][0]["labels"][-1] != tok.convert_tokens_to_ids("</s>")


@pytest.mark.parametrize("case", GOLDEN["shuffle"], ids=lambda c: f"n{c['n']}-seed{c['seed']}")
def test_rows_shuffle_is_datasets_shuffle(case):
    """max_n_example takes pyreft's subset: datasets.Dataset.shuffle(seed) then select(range(n))."""
    rows = pdata.Rows({"i": i} for i in range(case["n"]))
    assert [r["i"] for r in rows.shuffle(seed=case["seed"])] == case["order"]
