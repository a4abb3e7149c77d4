"""Golden batches of pyreft 0.1.0's data layer, for ``tests/pyreft_compat/test_data.py``.

Run ONLY inside the throwaway venv with the real pyreft (pyreft==0.1.0, transformers==4.45.1; see
``make_pyreft_goldens.sh``, which builds it):

    /tmp/pyreft_golden_venv/bin/python tests/goldens/make_pyreft_data_goldens.py

Writes ``tests/goldens/pyreft_data/``:

    tokenizer.json      a word-level tokenizer built offline (both sides load this very file)
    goldens.json        every case: its inputs (strings, kwargs) and what real pyreft produced
                        (``parse_positions`` tuples, ``get_intervention_locations`` lists, dataset
                        items and collated batches, values and dtypes)
    training/<case>/    base/ (a tiny Llama, safetensors), reft/ (pyreft's own save of the LoReFT
                        interventions), golden.json (the collated batch, the loss of pyreft's trainer
                        ``compute_loss`` on it and the gradients of each intervention's W and b)

The test replays each case through ``reftkit.pyreft`` and compares exactly. The two dataset
subclasses below (GLUE-style classification with ``pad_mode="last"``; LoReFT-style supervised with
``last_position = prompt length``) follow the pattern of pyreft's ``examples/loreft/dataset.py``;
the test defines the same two classes against ``reftkit.pyreft.ReftDataset``.
"""
from __future__ import annotations

import json
import os
import sys

import torch

try:
    import datasets
    import pyreft
    import transformers
    from pyreft.dataset import IGNORE_INDEX, ReftDataset
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
except ImportError as exc:  # pragma: no cover - guidance only
    sys.exit(f"import failed ({exc}); run with /tmp/pyreft_golden_venv/bin/python (see make_pyreft_goldens.sh)")

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "pyreft_data")

PROMPTS = ["what is the capital of france ?", "define dog .", "a", "tell me about the sky colour", "how many legs ?"]
ANSWERS = ["paris .", "an animal that barks .", "n dog", " blue !", "eight"]  # "a" + "n dog" merges into "an"
CHAT_TEMPLATE = ("{% for m in messages %}<s> {{ m['role'] }} : {{ m['content'] }} </s> {% endfor %}"
                 "{% if add_generation_prompt %}<s> assistant : {% endif %}")


def build_tokenizer(path: str) -> transformers.PreTrainedTokenizerFast:
    words = sorted({w for text in PROMPTS + ANSWERS + [pyreft.dataset.prompt_input, pyreft.dataset.prompt_no_input,
                                                        "user assistant good bad great awful movie yes no"]
                    for w in text.replace("%s", " ").replace(":", " ").replace("#", " ").split()})
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    for w in words + ["?", ".", "!", ",", ":", "#", "##", "###"]:
        vocab.setdefault(w, len(vocab))
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    core.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    core.save(path)
    return load_tokenizer(path)


def load_tokenizer(path: str, model_max_length: int | None = None) -> transformers.PreTrainedTokenizerFast:
    """As a pretrained tokenizer: a finite ``model_max_length`` (pyreft truncates to it)."""
    tok = transformers.PreTrainedTokenizerFast(tokenizer_file=path, bos_token="<s>", eos_token="</s>",
                                               unk_token="<unk>", pad_token="<pad>", padding_side="right",
                                               model_max_length=model_max_length or 128)
    tok.chat_template = CHAT_TEMPLATE
    return tok


def plain(value):
    """JSON form: tensors -> {"values", "dtype"}; containers recursively."""
    if isinstance(value, torch.Tensor):
        return {"values": value.tolist(), "dtype": str(value.dtype)}
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


# -- the two example-style subclasses (the test defines the same against reftkit.pyreft) ------------
class GlueStyleDataset(ReftDataset):
    def preprocess(self, kwargs):
        self.pad_mode = "last"
        self.fields_to_pad = ["input_ids"]
        self.sentence1_key, self.sentence2_key = kwargs["keys"]

    def postprocess(self, kwargs):
        self.num_labels = len({item["label"] for item in self.task_dataset})

    def tokenize(self, data_item):
        args = ((data_item[self.sentence1_key],) if self.sentence2_key is None
                else (data_item[self.sentence1_key], data_item[self.sentence2_key]))
        ids = self.tokenizer(*args, max_length=self.tokenizer.model_max_length, truncation=True,
                             return_tensors="pt")["input_ids"][0]
        return {"input_ids": ids, "labels": data_item["label"]}, len(ids)


class LoReftStyleDataset(ReftDataset):
    def preprocess(self, kwargs):
        self.template = kwargs.get("template", "%s")
        self.trigger = kwargs.get("trigger", "")

    def tokenize(self, data_item):
        prompt = self.template % data_item["instruction"]
        full = prompt + self.trigger + data_item["output"] + self.tokenizer.eos_token
        prompt_ids = self.tokenizer(prompt, max_length=self.tokenizer.model_max_length, truncation=True,
                                    return_tensors="pt")["input_ids"][0]
        result = {}
        if self.data_split == "train":
            ids = self.tokenizer(full, max_length=self.tokenizer.model_max_length, truncation=True,
                                 return_tensors="pt")["input_ids"][0]
            labels = ids.clone()
            labels[:len(prompt_ids)] = IGNORE_INDEX
            result["input_ids"], result["labels"] = ids, labels
        else:
            result["input_ids"] = prompt_ids
        return result, len(prompt_ids)


# -- cases ------------------------------------------------------------------------------------
POSITIONS = ["f1", "l1", "f1+l1", "f3+l3", "f7+l7", "f10+l3", "l12", "f2+l0", "f0+l2", "ff2", "f1+l1l", "1",
             "all", "x", "f+l1", "l1+f1", ""]


def position_cases():
    out = []
    for text in POSITIONS:
        try:
            out.append({"positions": text, "result": list(pyreft.parse_positions(text))})
        except Exception as err:  # noqa: BLE001 - the golden records which inputs pyreft rejects
            out.append({"positions": text, "error": type(err).__name__})
    return out


def location_cases():
    out = []
    for last in range(0, 9):
        for first_n, last_n in [(1, 1), (3, 3), (2, 0), (0, 2), (5, 2), (1, 4)]:
            for pad_mode in ("first", "last"):
                for share in (False, True):
                    for count in (1, 2, 4):
                        kwargs = {"last_position": last, "first_n": first_n, "last_n": last_n, "pad_mode": pad_mode,
                                  "share_weights": share, "num_interventions": count}
                        out.append({"kwargs": kwargs, "result": pyreft.get_intervention_locations(**kwargs)})
    for kwargs in [{"last_position": 6, "positions": "f2+l2", "num_interventions": 2},
                   {"last_position": 3, "positions": "f3+l3", "num_interventions": 2, "first_n": 9, "last_n": 9},
                   {"last_position": 5, "first_n": 1, "last_n": 2, "num_interventions": 2}]:
        out.append({"kwargs": kwargs, "result": pyreft.get_intervention_locations(**kwargs)})
    return out


def seq2seq(tok):
    return transformers.DataCollatorForSeq2Seq(tokenizer=tok, model=None, label_pad_token_id=-100, padding="longest")


def module_cases(tok_path):
    specs = [
        ("last", {"num_interventions": 1}, None),
        ("last", {"num_interventions": 2, "nonstop": True}, None),
        ("last", {"num_interventions": 1}, 6),  # truncation at model_max_length
        ("multiple", {}, None),
        ("multiple", {"positions": "f3+l3", "num_interventions": 4, "share_weights": False}, None),
        ("multiple", {"positions": "f3+l3", "num_interventions": 2, "share_weights": True}, None),
        ("multiple", {"positions": "f2+l1", "num_interventions": 2, "nonstop": True}, None),
        ("multiple", {"positions": "l2", "num_interventions": 3}, None),
        ("multiple", {"positions": "f4", "num_interventions": 1}, None),
    ]
    out = []
    for fn, kwargs, max_len in specs:
        tok = load_tokenizer(tok_path, max_len)
        maker = (pyreft.make_last_position_supervised_data_module if fn == "last"
                 else pyreft.make_multiple_position_supervised_data_module)
        module = maker(tok, None, PROMPTS, ANSWERS, **kwargs)
        items = [module["train_dataset"][i] for i in range(len(module["train_dataset"]))]
        batch = module["data_collator"](items)
        out.append({"fn": fn, "kwargs": kwargs, "model_max_length": max_len, "inputs": PROMPTS, "outputs": ANSWERS,
                    "items": plain(items), "batch": plain(dict(batch)), "eval_dataset": module["eval_dataset"]})
    return out


ALPACA = [
    {"instruction": "define dog .", "input": "", "output": "an animal that barks .", "subspaces": [0, 1]},
    {"instruction": "how many legs ?", "input": "spider", "output": "eight", "subspaces": [2, 3]},
    {"instruction": "tell me about it", "input": "the sky", "output": "blue !", "subspaces": [0, 1]},
    {"instruction": "a", "input": "", "output": "n dog", "subspaces": [2, 3]},
]
GLUE = [{"sentence": "good movie !", "other": "yes", "label": 1}, {"sentence": "awful", "other": "no", "label": 0},
        {"sentence": "great great movie , yes", "other": "good", "label": 1}]
PAIRS = [{"prompt": "what is the capital of france ?", "completion": " paris ."},
         {"prompt": "define dog .", "completion": " an animal that barks"}]
PREFERENCE = [{"instruction": "define dog .", "input": "", "chosen_output": "an animal that barks .",
               "rejected_output": "a cat"},
              {"instruction": "how many legs ?", "input": "spider", "chosen_output": "eight",
               "rejected_output": "no no no"}]
REWARD = [{"prompt": "good movie ?", "a": "yes", "b": "no", "ra": 1.0, "rb": 3.0},
          {"prompt": "awful movie ?", "a": "yes great", "b": "no", "ra": 2.0, "rb": 0.5}]

DATASET_SPECS = [
    ("ReftSupervisedDataset", "alpaca", "train", ALPACA, "seq2seq",
     {"input_field": "input", "instruction_field": "instruction", "output_field": "output",
      "num_interventions": 2, "position": "f1+l1", "share_weights": False}),
    ("ReftSupervisedDataset", "alpaca", "train", ALPACA, "seq2seq",
     {"input_field": "input", "instruction_field": "instruction", "output_field": "output",
      "num_interventions": 1, "position": "l1", "share_weights": False, "no_stop": True}),
    ("ReftSupervisedDataset", "alpaca", "train", ALPACA, "seq2seq",
     {"input_field": "input", "instruction_field": "instruction", "output_field": "output",
      "num_interventions": 4, "position": "f2+l2", "share_weights": True, "max_n_example": 3, "seed": 7}),
    ("ReftSupervisedDataset", "alpaca", "train", ALPACA, "seq2seq",
     {"input_field": "input", "instruction_field": "instruction", "output_field": "output",
      "num_interventions": 2, "position": "f9+l9", "share_weights": False}),
    ("ReftGenerationDataset", "gen", "train", PAIRS, "seq2seq",
     {"prompt_field": "prompt", "completion_field": "completion", "num_interventions": 1, "position": "f1+l1",
      "share_weights": True}),
    ("ReftClassificationDataset", "cls", "train", PAIRS, "seq2seq",
     {"input_field": "prompt", "label_field": "prompt", "num_interventions": 1, "position": "l2"}),
    ("ReftRawDataset", "raw", "train", ALPACA, "seq2seq",
     {"num_interventions": 2, "position": "f1+l1", "share_weights": False}),
    ("ReftRawDataset", "raw", "test", ALPACA, "seq2seq", {"num_interventions": 1, "position": "l3"}),
    ("ReftPreferenceDataset", "pref", "train", PREFERENCE, "seq2seq",
     {"input_field": "input", "instruction_field": "instruction", "chosen_output_field": "chosen_output",
      "rejected_output_field": "rejected_output", "num_interventions": 1, "position": "f1+l1",
      "share_weights": True}),
    ("ReftRewardDataset", "reward", "train", REWARD, "reward",
     {"conv_A_field": "a", "conv_B_field": "b", "prompt_field": "prompt", "conv_A_reward_field": "ra",
      "conv_B_reward_field": "rb", "num_interventions": 1, "position": "l1"}),
    ("GlueStyleDataset", "glue", "train", GLUE, "padding",
     {"keys": ["sentence", None], "num_interventions": 2, "position": "f1+l1", "share_weights": False}),
    ("GlueStyleDataset", "glue", "validation", GLUE, "padding",
     {"keys": ["sentence", "other"], "num_interventions": 1, "position": "f3+l3", "share_weights": True}),
    ("LoReftStyleDataset", "commonsense", "train", ALPACA, "seq2seq",
     {"template": "### Instruction : %s ### Response :", "trigger": " the ", "num_interventions": 2,
      "position": "f1+l1", "share_weights": False}),
    ("LoReftStyleDataset", "commonsense", "test", ALPACA, "seq2seq",
     {"num_interventions": 1, "position": "l2"}),
]


def dataset_cases(tok_path):
    classes = {"GlueStyleDataset": GlueStyleDataset, "LoReftStyleDataset": LoReftStyleDataset}
    out = []
    for name, task, split, rows, collate, kwargs in DATASET_SPECS:
        tok = load_tokenizer(tok_path)
        cls = classes.get(name) or getattr(pyreft, name, None) or getattr(pyreft.dataset, name)
        extra = dict(kwargs)
        given = datasets.Dataset.from_list(rows) if "max_n_example" in extra else [dict(r) for r in rows]
        dataset = cls(task, None, tok, data_split=split, dataset=given, **extra)
        items = [dataset[i] for i in range(len(dataset))]
        if collate == "reward":
            batch = pyreft.ReftRewardCollator(tokenizer=tok)(items)
        elif collate == "padding":
            batch = pyreft.ReftDataCollator(transformers.DataCollatorWithPadding(tokenizer=tok, padding="longest"))(
                items)
        else:
            batch = pyreft.ReftDataCollator(seq2seq(tok))(items)
        raw = getattr(dataset, "raw_dataset", None)
        out.append({"class": name, "task": task, "data_split": split, "rows": rows, "collator": collate,
                    "kwargs": kwargs, "items": plain(items), "batch": plain(dict(batch)),
                    "num_labels": getattr(dataset, "num_labels", None),
                    "raw_dataset_len": None if raw is None else len(raw)})
    return out


def tiny_llama(classes: int | None = None) -> torch.nn.Module:
    torch.manual_seed(1234)
    cfg = transformers.LlamaConfig(vocab_size=80, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                   initializer_range=0.3, tie_word_embeddings=False, pad_token_id=0, bos_token_id=1,
                                   eos_token_id=2, attn_implementation="eager", num_labels=classes or 2)
    if classes:
        return transformers.LlamaForSequenceClassification(cfg).eval()
    return transformers.LlamaForCausalLM(cfg).eval()


def training_case(folder: str, base, layers, batch, trainer_class, head: bool = False) -> None:
    """pyreft's trainer ``compute_loss`` on ``batch`` and the gradients it gives W and b of each LoReFT."""
    os.makedirs(folder, exist_ok=True)
    base.save_pretrained(os.path.join(folder, "base"), safe_serialization=True)
    torch.manual_seed(99)
    config = pyreft.ReftConfig(representations=[
        {"layer": layer, "component": "block_output", "low_rank_dimension": 4,
         "intervention": pyreft.LoreftIntervention(embed_dim=32, low_rank_dimension=4, dtype=torch.float32)}
        for layer in layers])
    reft = pyreft.get_reft_model(base, config, set_device=False)
    if head:  # train.py's allow_cls_grad
        for param in reft.model.score.parameters():
            param.requires_grad = True
    reft.save(os.path.join(folder, "reft"))
    args = transformers.TrainingArguments(output_dir=os.path.join(folder, "tmp"), report_to=[], use_cpu=True)
    trainer = trainer_class(model=reft, tokenizer=None, args=args)
    loss = trainer.compute_loss(reft, dict(batch))
    loss.backward()
    grads = {key: {"weight": iv.learned_source.weight.grad.tolist(), "bias": iv.learned_source.bias.grad.tolist()}
             for key, iv in reft.interventions.items()}
    if head:
        grads["score"] = {"weight": reft.model.score.weight.grad.tolist()}
    with open(os.path.join(folder, "golden.json"), "w") as f:
        json.dump({"layers": list(layers), "keys": list(reft.interventions), "batch": plain(dict(batch)),
                   "loss": loss.item(), "grads": grads}, f)
    import shutil
    shutil.rmtree(os.path.join(folder, "tmp"), ignore_errors=True)


def training_cases(tok_path: str) -> None:
    tok = load_tokenizer(tok_path)
    layers = [0, 1, 0, 1]  # train.py's untied f1+l1 layout: first positions, then last positions
    module = pyreft.make_multiple_position_supervised_data_module(tok, None, PROMPTS, ANSWERS, positions="f1+l1",
                                                                  num_interventions=4, share_weights=False)
    batch = module["data_collator"]([module["train_dataset"][i] for i in range(len(PROMPTS))])
    training_case(os.path.join(OUT, "training", "causal_lm"), tiny_llama(), layers, batch,
                  pyreft.ReftTrainerForCausalLM)
    dataset = GlueStyleDataset("glue", None, tok, dataset=[dict(r) for r in GLUE], keys=["sentence", None],
                               num_interventions=2, position="f1+l1", share_weights=False)
    collator = pyreft.ReftDataCollator(transformers.DataCollatorWithPadding(tokenizer=tok, padding="longest"))
    batch = collator([dataset[i] for i in range(len(dataset))])
    batch.pop("id")
    training_case(os.path.join(OUT, "training", "classification"), tiny_llama(classes=2), [0, 1], batch,
                  pyreft.ReftTrainerForSequenceClassification, head=True)


def shuffled(n: int, seed: int) -> list[int]:
    """The row order ``datasets.Dataset.shuffle(seed)`` gives (pyreft's ``max_n_example`` subset)."""
    return list(datasets.Dataset.from_dict({"i": list(range(n))}).shuffle(seed=seed)["i"])


def main() -> None:
    os.makedirs(OUT, exist_ok=True)
    tok_path = os.path.join(OUT, "tokenizer.json")
    build_tokenizer(tok_path)
    goldens = {"versions": {"pyreft": "0.1.0", "transformers": transformers.__version__, "torch": torch.__version__},
               "chat_template": CHAT_TEMPLATE, "parse_positions": position_cases(),
               "get_intervention_locations": location_cases(), "modules": module_cases(tok_path),
               "datasets": dataset_cases(tok_path),
               "shuffle": [{"n": n, "seed": seed, "order": shuffled(n, seed)}
                           for n, seed in [(4, 7), (10, 42), (25, 0)]]}
    with open(os.path.join(OUT, "goldens.json"), "w") as f:
        json.dump(goldens, f, separators=(",", ":"))
    training_cases(tok_path)
    print(f"wrote {OUT}: {len(goldens['parse_positions'])} position strings, "
          f"{len(goldens['get_intervention_locations'])} location cases, {len(goldens['modules'])} modules, "
          f"{len(goldens['datasets'])} datasets")


if __name__ == "__main__":
    main()
