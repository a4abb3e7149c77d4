"""Pattern 4: examples/loreft/train.py's causal-LM flow, with the script's own ReftDataset subclass.

As train.py does it: a ``ReftDataset`` subclass overriding ``preprocess`` / ``postprocess`` / ``tokenize``,
reading a local json file per split (``<data_dir>/<split>.json``); positions "f1+l1" untied, so the layer list
is doubled; one intervention instance per layer with train.py's constructor arguments (``dropout``, ``dtype``,
``act_fn``, ``device``, ``add_bias``); ``ReftDataCollator(data_collator=DataCollatorForSeq2Seq(...))``;
``get_reft_model(..., set_device=...)``; ``count_parameters``; TrainingArguments with
``remove_unused_columns=False``; ``ReftTrainerForCausalLM``; ``save``; then compute_metrics.py's evaluation:
left-padded batches of the test split, locations shifted by each row's left padding (found from the BOS
token), ``generate`` with ``intervene_on_prompt=True``, exact match of the answer.

Asserts: the dataset's rows (the leading pad "sink" token, labels, locations shifted by one); the loss falls;
test accuracy is 1.0 after training while the base model scores below that.
Usage: python pattern_4_loreft_train_causal.py [result.json]
"""
import copy
import json
import os
import tempfile

import _tiny
import pyreft
import torch
import transformers
from torch.utils.data import DataLoader

IGNORE_INDEX = -100
PROMPT_TEMPLATE = "Please answer the following question with yes or no.\n\nQuestion: %s\n\nAnswer:"
QUESTIONS = [
    ("is the sky blue on a clear day?", "yes"), ("can a fish climb a tree?", "no"),
    ("is paris in france?", "yes"), ("does a spider have six legs?", "no"),
    ("is ice cold?", "yes"), ("is the sun a planet?", "no"),
    ("do dogs bark?", "yes"), ("can a stone swim?", "no"),
]


class YesNoDataset(pyreft.ReftDataset):
    """A commonsense-style task: the prompt ends at "Answer:", the answer word and EOS are supervised."""

    def preprocess(self, kwargs):
        self.raw_dataset, self.trigger_tokens, self.num_labels = None, "Answer:", None
        self.task_prompt_template = PROMPT_TEMPLATE
        self.original_data_split = self.data_split
        self.data_path = os.path.join(self.data_path, self.data_split + ".json")

    def postprocess(self, kwargs):
        self.raw_dataset = self.task_dataset

    def tokenize(self, data_item):
        result = {}
        base_prompt = self.task_prompt_template % data_item["instruction"]
        base_input = base_prompt + " " + data_item["answer"] + self.tokenizer.eos_token
        base_prompt_ids = self.tokenizer(base_prompt, max_length=self.tokenizer.model_max_length, truncation=True,
                                         return_tensors="pt")["input_ids"][0]
        base_prompt_length = len(base_prompt_ids)
        if self.original_data_split == "train":
            base_input_ids = self.tokenizer(base_input, max_length=self.tokenizer.model_max_length, truncation=True,
                                            return_tensors="pt")["input_ids"][0]
            output_ids = copy.deepcopy(base_input_ids)
            output_ids[:base_prompt_length] = IGNORE_INDEX
            result["input_ids"] = base_input_ids
            result["labels"] = output_ids
        else:
            result["input_ids"] = base_prompt_ids
        return result, base_prompt_length


workdir = tempfile.mkdtemp()
data_dir = os.path.join(workdir, "yesno")
os.makedirs(data_dir)
for split in ("train", "test"):
    with open(os.path.join(data_dir, split + ".json"), "w") as f:
        json.dump([{"instruction": q, "answer": a} for q, a in QUESTIONS], f)
checkpoint = _tiny.make_checkpoint(os.path.join(workdir, "tiny-llama"),
                                   [PROMPT_TEMPLATE] + [q + " " + a for q, a in QUESTIONS])

# --- train.py: arguments
layers, rank, position, share_weights, seed = "0;1", 4, "f1+l1", False, 42
transformers.set_seed(seed)
layers = [int(layer) for layer in layers.split(";")]
if "+" in position and not share_weights:
    layers += layers
tokenizer = transformers.AutoTokenizer.from_pretrained(checkpoint, model_max_length=128, padding_side="right",
                                                       use_fast=False)
tokenizer.pad_token = tokenizer.unk_token

dataset_kwargs = {"num_interventions": len(layers), "position": position, "share_weights": share_weights,
                  "test_split": "test"}
train_dataset = YesNoDataset("yesno", data_dir, tokenizer, data_split="train", seed=seed, max_n_example=None,
                             **dataset_kwargs)
eval_dataset = YesNoDataset("yesno", data_dir, tokenizer, data_split="test", seed=seed, max_n_example=None,
                            **dataset_kwargs)

# the rows pyreft builds: a pad "sink" token in front, locations shifted by one
row = train_dataset[0]
prompt_len = len(tokenizer(PROMPT_TEMPLATE % QUESTIONS[0][0])["input_ids"])
assert int(row["input_ids"][0]) == tokenizer.pad_token_id and int(row["attention_mask"][0]) == 0
assert [int(x) for x in row["labels"][:prompt_len + 1]] == [IGNORE_INDEX] * (prompt_len + 1)
assert [[int(x) for x in r] for r in row["intervention_locations"]] == [[1]] * 2 + [[prompt_len]] * 2
assert len(train_dataset) == len(eval_dataset) == len(QUESTIONS)

model = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, torch_dtype=torch.float32)
config = model.config
data_collator_fn = transformers.DataCollatorForSeq2Seq(tokenizer=tokenizer, model=model, label_pad_token_id=-100,
                                                       padding="longest")
data_collator = pyreft.ReftDataCollator(data_collator=data_collator_fn)

representations = [{
    "layer": layer, "component": "block_output", "low_rank_dimension": rank,
    "intervention": pyreft.LoreftIntervention(embed_dim=config.hidden_size, low_rank_dimension=rank, dropout=0.0,
                                              dtype=torch.float32, act_fn=None, device="cpu", add_bias=False),
} for layer in layers]
reft_config = pyreft.ReftConfig(representations=representations)
reft_model = pyreft.get_reft_model(model, reft_config, set_device=True)
reft_model.print_trainable_parameters()
reft_model.model.train()
n_params = reft_model.count_parameters(include_model=False)
assert n_params == len(layers) * (2 * rank * config.hidden_size + rank), n_params

training_args = transformers.TrainingArguments(
    output_dir=os.path.join(workdir, "official_results"), run_name="tiny.yesno", num_train_epochs=40,
    per_device_train_batch_size=4, per_device_eval_batch_size=4, gradient_accumulation_steps=1,
    eval_strategy="no", save_strategy="no", logging_strategy="steps", save_total_limit=1, logging_steps=1,
    lr_scheduler_type="linear", learning_rate=2e-2, optim="adamw_torch", weight_decay=0.0,
    report_to="none", use_cpu=True, seed=seed, remove_unused_columns=False, disable_tqdm=True)
trainer = pyreft.ReftTrainerForCausalLM(model=reft_model, tokenizer=tokenizer, args=training_args,
                                        train_dataset=train_dataset, eval_dataset=None, data_collator=data_collator,
                                        compute_metrics=None)
trainer.remove_callback(transformers.trainer_callback.PrinterCallback)
trainer.train()
losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
print(f"loss {losses[0]:.3f} -> {losses[-1]:.3f} over {len(losses)} steps")
assert _tiny.falling(losses, 0.5), losses[::10]
reft_model.save(os.path.join(workdir, "official_results", "tiny.yesno"))

# --- compute_metrics.py: left-padded generation with locations shifted by the padding
reft_model.model.eval()
for _, intervention in reft_model.interventions.items():
    intervention.eval()


def accuracy(intervene: bool):
    tokenizer.padding_side = "left"
    loader = DataLoader(eval_dataset, batch_size=4, shuffle=False,
                        collate_fn=pyreft.ReftDataCollator(data_collator=transformers.DataCollatorForSeq2Seq(
                            tokenizer=tokenizer, model=model, label_pad_token_id=-100, padding="longest")))
    correct, generations = 0, []
    with torch.no_grad():
        for inputs in loader:
            intervention_locations = inputs["intervention_locations"].permute(1, 0, 2)
            left_padding = (inputs["input_ids"] == tokenizer.bos_token_id).nonzero(as_tuple=True)[1]
            intervention_locations = intervention_locations + left_padding.reshape(1, -1, 1) - 1
            base = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"]}
            if intervene:
                _, steered = reft_model.generate(
                    base, unit_locations={"sources->base": (None, intervention_locations.tolist())},
                    intervene_on_prompt=True, max_new_tokens=3, do_sample=False,
                    eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
            else:
                steered = model.generate(**base, max_new_tokens=3, do_sample=False,
                                         pad_token_id=tokenizer.pad_token_id)
            for example_id, output in zip(inputs["id"].tolist(), steered):
                answer = tokenizer.decode(output[inputs["input_ids"].shape[-1]:], skip_special_tokens=True)
                generations.append(answer)
                correct += answer.strip().split(" ")[0] == eval_dataset.raw_dataset[example_id]["answer"]
    tokenizer.padding_side = "right"
    return correct / len(eval_dataset), generations


acc, generations = accuracy(intervene=True)
base_acc, _ = accuracy(intervene=False)
print(f"test accuracy {acc:.3f} (base model {base_acc:.3f})")
assert acc == 1.0 and base_acc < 1.0, (acc, base_acc, generations)

_tiny.write_result({"losses": losses[::5], "accuracy": acc, "base_accuracy": base_acc, "n_params": n_params})
print("pattern 4 OK")
