"""Pattern 6: composable ReFT on disjoint subspaces (pyreft's examples/composition, "compreft").

The notebook's recipe: a LoReFT subclass whose ``forward`` applies the edit only on the rank rows that each
example names in ``subspaces`` (it reads ``rotate_layer``, ``learned_source``, ``act_fn`` and ``dropout`` of
pyreft's LoReFT); two tasks share one rank-4 intervention, task A on rows [0, 1] and task B on rows [2, 3];
a pyreft dataset whose rows carry a ``subspaces`` column; ``ReftDataCollator``; ReftTrainerForCausalLM; then
``generate`` with ``subspaces=[[rows]]`` picks the task at inference. Both tasks answer the same instructions,
task A in English ("english : ...") and task B in German ("deutsch : ..."), so only the subspace tells them
apart.

The notebook's ``ReftSupervisedDataset`` (alpaca template) is built and checked, but training uses a
``ReftDataset`` subclass with short prompts: pyreft's ReftSupervisedDataset puts "l1" on the second-to-last
prompt token, and a tiny random model cannot be steered from there within a few seconds.

Asserts: the collated batch carries the subspaces; the ReftSupervisedDataset row (pad sink, location on the
second-to-last prompt token, subspaces column); the loss falls; for every instruction rows [0, 1] start the
English answer and rows [2, 3] the German one.
Usage: python pattern_6_composition.py [result.json]
"""
import os
import tempfile

import _tiny
import pyreft
import torch
import transformers

PROMPT = "Q: %s A:"
ENGLISH_SUBSPACE = [0, 1]
GERMAN_SUBSPACE = [2, 3]
ANSWERS = [  # instruction, English answer, German answer
    ("what colour is the sky?", "blue", "blau"),
    ("name an animal that barks.", "dog", "hund"),
    ("how many legs has a spider?", "eight", "acht"),
    ("where is paris?", "france", "frankreich"),
]

workdir = tempfile.mkdtemp()
checkpoint = _tiny.make_checkpoint(os.path.join(workdir, "tiny-llama"),
                                   [" ".join(row) for row in ANSWERS] + ["english deutsch", PROMPT])
model = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, torch_dtype=torch.float32)
tokenizer = transformers.AutoTokenizer.from_pretrained(checkpoint, model_max_length=128, padding_side="right",
                                                       use_fast=False)
tokenizer.pad_token = tokenizer.unk_token
transformers.set_seed(43)

english = [{"instruction": q, "input": "", "output": "english : " + en + tokenizer.eos_token,
            "subspaces": ENGLISH_SUBSPACE} for q, en, _ in ANSWERS]
german = [{"instruction": q, "input": "", "output": "deutsch : " + de + tokenizer.eos_token,
           "subspaces": GERMAN_SUBSPACE} for q, _, de in ANSWERS]
subspace_dataset = english + german


class SubloreftIntervention(pyreft.LoreftIntervention):
    """LoReFT restricted, per example, to the rank rows listed in ``subspaces``."""

    def forward(self, base, source=None, subspaces=None):
        assert subspaces is not None
        rotated_base = self.rotate_layer(base)
        diff = self.act_fn(self.learned_source(base)) - rotated_base
        batched_subspace, batched_weights = [], []
        for example_i in range(len(subspaces)):
            batched_subspace.append(diff[example_i, :, subspaces[example_i]])
            batched_weights.append(self.rotate_layer.weight[..., subspaces[example_i]].T)
        output = base + torch.bmm(torch.stack(batched_subspace, dim=0), torch.stack(batched_weights, dim=0))
        return self.dropout(output.to(base.dtype))


reft_config = pyreft.ReftConfig(representations={
    "layer": 0, "component": "block_output",
    "intervention": SubloreftIntervention(embed_dim=model.config.hidden_size, low_rank_dimension=4,
                                          dtype=torch.float32)})
reft_model = pyreft.get_reft_model(model, reft_config)
reft_model.print_trainable_parameters()



class TwoTaskDataset(pyreft.ReftDataset):
    """Short "Q: ... A:" prompts; "l1" on the last prompt token (``last_position`` = prompt length, as train.py's
    LoReftSupervisedDataset returns it). ReftDataset adds the ``subspaces`` column from each row."""

    def tokenize(self, data_item):
        prompt = PROMPT % data_item["instruction"]
        prompt_ids = self.tokenizer(prompt, return_tensors="pt")["input_ids"][0]
        input_ids = self.tokenizer(prompt + " " + data_item["output"], return_tensors="pt")["input_ids"][0]
        labels = input_ids.clone()
        labels[:len(prompt_ids)] = -100
        return {"input_ids": input_ids, "labels": labels}, len(prompt_ids)


data_kwargs = {"num_interventions": 1, "position": "l1", "share_weights": False}
train_dataset = TwoTaskDataset("composition", None, tokenizer, dataset=subspace_dataset, **data_kwargs)
data_collator_fn = transformers.DataCollatorForSeq2Seq(tokenizer=tokenizer, model=model, label_pad_token_id=-100,
                                                       padding="longest")
data_collator = pyreft.ReftDataCollator(data_collator=data_collator_fn)
batch = data_collator([train_dataset[0], train_dataset[len(ANSWERS)]])
assert batch["subspaces"].tolist() == [[ENGLISH_SUBSPACE], [GERMAN_SUBSPACE]], batch["subspaces"]
n0 = len(tokenizer(PROMPT % ANSWERS[0][0])["input_ids"])
assert batch["intervention_locations"].tolist() == [[[n0]], [[n0]]]  # last prompt token, +1 for the pad sink

# the notebook's ReftSupervisedDataset (alpaca template) on the same rows: its "l1" is the second-to-last
# prompt token, because its last_position is already the last index and the locations count back from it
alpaca = pyreft.ReftSupervisedDataset(
    "Subloreft", None, tokenizer, dataset=subspace_dataset[:1], **data_kwargs,
    input_field="input", instruction_field="instruction", output_field="output", no_stop=True)
row = alpaca[0]
n_prompt = next(i for i, label in enumerate(row["labels"]) if int(label) != -100) - 1  # prompt tokens, no sink
assert int(row["input_ids"][0]) == tokenizer.pad_token_id and int(row["attention_mask"][0]) == 0
assert tokenizer.decode([int(t) for t in row["input_ids"][1:n_prompt + 1]]).endswith("Response :")
assert [[int(x) for x in r] for r in row["intervention_locations"]] == [[n_prompt - 1]]
assert [[int(x) for x in r] for r in row["subspaces"]] == [ENGLISH_SUBSPACE]

training_args = transformers.TrainingArguments(
    num_train_epochs=100.0, output_dir=os.path.join(workdir, "tmp"), learning_rate=2e-2, report_to=[],
    per_device_train_batch_size=8, logging_steps=1, save_strategy="no", use_cpu=True, disable_tqdm=True)
trainer = pyreft.ReftTrainerForCausalLM(model=reft_model, tokenizer=tokenizer, args=training_args,
                                        train_dataset=train_dataset, eval_dataset=None, data_collator=data_collator)
trainer.remove_callback(transformers.trainer_callback.PrinterCallback)
trainer.train()
losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
print(f"loss {losses[0]:.3f} -> {losses[-1]:.3f}")
assert _tiny.falling(losses, 0.8), losses[::10]



def respond(instruction_index, subspace):
    prompt = tokenizer(PROMPT % ANSWERS[instruction_index][0], return_tensors="pt")
    n = prompt["input_ids"].shape[-1]
    _, response = reft_model.generate(
        prompt, unit_locations={"sources->base": (None, [[[n - 1]]])}, subspaces=[[subspace]],
        intervene_on_prompt=True, max_new_tokens=6, do_sample=False, eos_token_id=tokenizer.eos_token_id)
    return response[0, n:].tolist()


reft_model.model.eval()
generations = {}
for i, (question, en, de) in enumerate(ANSWERS):
    got_en, got_de = respond(i, ENGLISH_SUBSPACE), respond(i, GERMAN_SUBSPACE)
    generations[question] = [got_en, got_de]
    assert tokenizer.decode(got_en[:1]) == "english", (question, tokenizer.decode(got_en))
    assert tokenizer.decode(got_de[:1]) == "deutsch", (question, tokenizer.decode(got_de))
both = respond(0, ENGLISH_SUBSPACE + GERMAN_SUBSPACE)
print("rows [0..3] together ->", tokenizer.decode(both))

_tiny.write_result({"losses": losses[::10], "generations": generations, "both_rows": both})
print("pattern 6 OK")
