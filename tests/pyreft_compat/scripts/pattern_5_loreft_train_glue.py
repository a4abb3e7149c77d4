"""Pattern 5: examples/loreft/train.py's GLUE branch (sequence classification with a RoBERTa encoder).

As train.py does it for task "glue": a ``ReftDataset`` subclass shaped like ``LoReftGLUEDataset`` (pad token
appended at the end as the intervention sink, labels are class ids); ``AutoModelForSequenceClassification``
from a checkpoint whose config says ``RobertaForMaskedLM``, so the component comes from train.py's
``residual_stream_component_mapping``: pyvene's module-path form ``"roberta.encoder.layer[%s].output"`` with no
"layer" key; positions "f1+l1" untied; ``DataCollatorWithPadding`` inside ``ReftDataCollator``; the
classifier head made trainable through ``reft_model.model.classifier``; ``ReftTrainerForSequenceClassification``;
then compute_metrics.py's GLUE evaluation (a forward with the batch's locations, argmax). Data come in as a
list (``dataset=``), not from the hub. (train.py also evaluates every epoch inside the trainer; pyreft 0.1.0's
``ReftTrainerForSequenceClassification.evaluate`` indexes ``v[0]`` on pyvene 0.1.8's interventions and fails,
so that part is left out.)

Asserts: the sink token and locations; the loss falls; held-out accuracy ends at 1.0 and is above the accuracy
before training; three interventions moved and the fourth (last layer, last token: the head reads <s> only)
did not.
Usage: python pattern_5_loreft_train_glue.py [result.json]
"""
import os
import tempfile

import _tiny
import pyreft
import torch
import transformers

POSITIVE, NEGATIVE = ["good", "great", "lovely", "fine"], ["bad", "awful", "boring", "poor"]
SUBJECTS = ["the movie was", "that film is", "this show felt", "our dinner was"]
TRAIN = [{"sentence": f"{s} {w} .", "label": int(w in POSITIVE)} for s in SUBJECTS[:3] for w in POSITIVE + NEGATIVE]
VALIDATION = [{"sentence": f"{SUBJECTS[3]} {w} .", "label": int(w in POSITIVE)} for w in POSITIVE + NEGATIVE]
residual_stream_component_mapping = {"robertaformaskedlm": "roberta.encoder.layer[%s].output"}


class ToyGLUEDataset(pyreft.ReftDataset):
    def preprocess(self, kwargs):
        self.raw_dataset, self.trigger_tokens, self.num_labels = None, None, None
        self.pad_mode = "last"  # the pad token placed at the end is the intervention sink
        self.fields_to_pad = ["input_ids"]  # labels are class ids: nothing to pad
        self.sentence1_key, self.sentence2_key = "sentence", None

    def postprocess(self, kwargs):
        self.num_labels = len({item["label"] for item in self.task_dataset})

    def tokenize(self, data_item):
        result = {}
        base_input_ids = self.tokenizer(data_item[self.sentence1_key], max_length=self.tokenizer.model_max_length,
                                        truncation=True, return_tensors="pt")["input_ids"][0]
        result["input_ids"] = base_input_ids
        result["labels"] = data_item["label"]
        return result, len(base_input_ids)


workdir = tempfile.mkdtemp()
checkpoint = _tiny.make_checkpoint(os.path.join(workdir, "tiny-roberta"),
                                   [item["sentence"] for item in TRAIN + VALIDATION], arch="roberta", hidden=128,
                                   layers=2)
layers, rank, position, share_weights, seed = [0, 1], 4, "f1+l1", False, 42
transformers.set_seed(seed)
if "+" in position and not share_weights:
    layers += layers
tokenizer = transformers.AutoTokenizer.from_pretrained(checkpoint, model_max_length=64, padding_side="right",
                                                       use_fast=False)
tokenizer.pad_token = tokenizer.unk_token
dataset_kwargs = {"num_interventions": len(layers), "position": position, "share_weights": share_weights}
train_dataset = ToyGLUEDataset("glue", "toy", tokenizer, data_split="train", dataset=TRAIN, seed=seed,
                               **dataset_kwargs)
eval_dataset = ToyGLUEDataset("glue", "toy", tokenizer, data_split="validation", dataset=VALIDATION, seed=seed,
                              **dataset_kwargs)
num_labels = train_dataset.num_labels
assert num_labels == 2
row, n = train_dataset[0], len(tokenizer(TRAIN[0]["sentence"])["input_ids"])
assert len(row["input_ids"]) == n + 1 and int(row["input_ids"][-1]) == tokenizer.pad_token_id
assert int(row["attention_mask"][-1]) == 0 and int(row["labels"]) == TRAIN[0]["label"]
assert [[int(x) for x in r] for r in row["intervention_locations"]] == [[0]] * 2 + [[n - 1]] * 2

config = transformers.AutoConfig.from_pretrained(checkpoint, num_labels=num_labels, finetuning_task="toy")
model = transformers.AutoModelForSequenceClassification.from_pretrained(checkpoint, config=config,
                                                                        torch_dtype=torch.float32)
data_collator = pyreft.ReftDataCollator(
    data_collator=transformers.DataCollatorWithPadding(tokenizer=tokenizer, padding="longest"))

model_arch = model.config.architectures[0].lower()
assert model_arch in residual_stream_component_mapping, model_arch
representations = [{
    "component": residual_stream_component_mapping[model_arch] % layer,
    "low_rank_dimension": rank,
    "intervention": pyreft.LoreftIntervention(embed_dim=config.hidden_size, low_rank_dimension=rank, dropout=0.0,
                                              dtype=torch.float32, act_fn=None, device="cpu", add_bias=False),
} for layer in layers]
task_type = pyreft.TaskType.SEQ_CLS
reft_config = pyreft.ReftConfig(representations=representations)
reft_model = pyreft.get_reft_model(model, reft_config, set_device=True)
for param in reft_model.model.classifier.parameters():
    param.requires_grad = True  # the HF trainer picks these up with the interventions
reft_model.print_trainable_parameters()
reft_model.model.train()
n_params = reft_model.count_parameters(include_model=False)
n_params_with_model = reft_model.count_parameters(include_model=True)
head = sum(p.numel() for p in model.classifier.parameters())
assert n_params == len(layers) * (2 * rank * config.hidden_size + rank) and n_params_with_model == n_params + head
before = {key: {k: v.clone() for k, v in iv.state_dict().items()} for key, iv in reft_model.interventions.items()}


def held_out_accuracy():
    logits = []
    with torch.no_grad():
        inputs = data_collator([eval_dataset[i] for i in range(len(eval_dataset))])
        _, cf_outputs = reft_model(
            {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"]},
            unit_locations={"sources->base": (None, inputs["intervention_locations"].permute(1, 0, 2).tolist())})
        logits = cf_outputs.logits
    return float((logits.argmax(-1) == inputs["labels"]).float().mean()), logits


reft_model.model.eval()
acc_before, _ = held_out_accuracy()
reft_model.model.train()
training_args = transformers.TrainingArguments(
    output_dir=os.path.join(workdir, "glue_results"), run_name="tiny.glue", num_train_epochs=80,
    per_device_train_batch_size=8, per_device_eval_batch_size=8, eval_strategy="no", save_strategy="no",
    logging_strategy="steps", logging_steps=1, learning_rate=5e-3, lr_scheduler_type="linear",
    optim="adamw_torch", weight_decay=0.0, report_to="none", use_cpu=True, seed=seed,
    remove_unused_columns=False, disable_tqdm=True)
trainer = pyreft.ReftTrainerForSequenceClassification(
    model=reft_model, tokenizer=tokenizer, args=training_args, train_dataset=train_dataset,
    eval_dataset=None, data_collator=data_collator, compute_metrics=None)
trainer.remove_callback(transformers.trainer_callback.PrinterCallback)
trainer.train()
history = trainer.state.log_history
losses = [entry["loss"] for entry in history if "loss" in entry]

reft_model.model.eval()
for _, intervention in reft_model.interventions.items():
    intervention.eval()
acc_after, logits = held_out_accuracy()
print(f"loss {losses[0]:.3f} -> {losses[-1]:.3f}; held-out accuracy {acc_before:.2f} -> {acc_after:.2f}")
assert _tiny.falling(losses, 0.5), losses
assert acc_after == 1.0 and acc_before < 1.0, (acc_before, acc_after)
# the head reads <s> only: the layer-1 intervention at the last token gets no gradient and stays put
moved = [any(not torch.equal(v, before[key][k]) for k, v in iv.state_dict().items())
         for key, iv in reft_model.interventions.items()]
assert moved == [True, True, True, False], moved

_tiny.write_result({"losses": losses, "accuracy": [acc_before, acc_after], "held_out_logits": logits[:2].tolist()})
print("pattern 5 OK")
