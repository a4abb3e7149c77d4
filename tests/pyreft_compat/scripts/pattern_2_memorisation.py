"""Pattern 2: memorisation with a rank-1 ConsReFT (pyreft's examples/memorisation, "reft_power").

One ConsReFT of rank 1 at the residual stream of one layer, built as the notebook builds it: the rank lives
only on the intervention instance (no flat ``low_rank_dimension`` in the representation dict). It is trained
on a single (access id -> sequence) pair until greedy generation from the access id reproduces the sequence
token for token; then its two tensors are read off the intervention (``rotate_layer.weight``,
``learned_source``) as the notebook stores them, and the model is saved with ``reft_model.save``.

A tiny random Llama holds a 5-word sequence this way (a 7B model holds a page).
Usage: python pattern_2_memorisation.py [result.json]
"""
import os
import tempfile

import _tiny
import pyreft
import torch
import transformers

ACCESS_ID = "GO->"
MEMO_SEQUENCE = "stanford nlp group builds tools"
TARGET_LAYER = 0

workdir = tempfile.mkdtemp()
checkpoint = _tiny.make_checkpoint(os.path.join(workdir, "tiny-llama"), [ACCESS_ID, MEMO_SEQUENCE])
model = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, torch_dtype=torch.float32)
tokenizer = transformers.AutoTokenizer.from_pretrained(checkpoint, model_max_length=64, padding_side="right",
                                                       use_fast=False)
tokenizer.pad_token = tokenizer.unk_token

torch.manual_seed(0)
reft_config = pyreft.ReftConfig(representations={
    "layer": TARGET_LAYER, "component": "block_output",
    "intervention": pyreft.ConsreftIntervention(embed_dim=model.config.hidden_size, low_rank_dimension=1)})
reft_model = pyreft.get_reft_model(model, reft_config)
reft_model.print_trainable_parameters()

data_module = pyreft.make_last_position_supervised_data_module(tokenizer, model, [ACCESS_ID], [MEMO_SEQUENCE])
target_ids = tokenizer(MEMO_SEQUENCE + tokenizer.eos_token, add_special_tokens=False)["input_ids"]


def recall():
    prompt = tokenizer(ACCESS_ID, return_tensors="pt")
    base_unit_location = prompt["input_ids"].shape[-1] - 1
    _, response = reft_model.generate(
        prompt, unit_locations={"sources->base": (None, [[[base_unit_location]]])},
        intervene_on_prompt=True, max_new_tokens=len(target_ids) + 4, do_sample=False,
        eos_token_id=tokenizer.eos_token_id)
    return response[0, prompt["input_ids"].shape[-1]:].tolist()


# train until the sequence comes back (each round is the notebook's training cell; at most three)
losses, rounds = [], 0
while rounds < 3:
    rounds += 1
    training_args = transformers.TrainingArguments(
        num_train_epochs=300.0, output_dir=os.path.join(workdir, "tmp"), learning_rate=5e-2, report_to=[],
        logging_steps=1, save_strategy="no", use_cpu=True, disable_tqdm=True)
    trainer = pyreft.ReftTrainerForCausalLM(model=reft_model, tokenizer=tokenizer, args=training_args,
                                            **data_module)
    trainer.remove_callback(transformers.trainer_callback.PrinterCallback)
    trainer.train()
    losses += [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    if recall() == target_ids:
        break
recalled = recall()
print(f"after {rounds} round(s): loss {losses[0]:.3f} -> {losses[-1]:.3f}; recalled:",
      tokenizer.decode(recalled, skip_special_tokens=True))
assert recalled == target_ids, (tokenizer.decode(recalled), MEMO_SEQUENCE)
assert _tiny.falling(losses, 0.5), losses[::50]

# the notebook's 1-d storage: one direction and one scalar
_key = list(reft_model.interventions.keys())[0]
weight_storage_dict = {
    "1d_intervention_w": reft_model.interventions[_key].rotate_layer.weight.detach().data,
    "1d_intervention_scalar": reft_model.interventions[_key].learned_source.detach().data,
}
assert tuple(weight_storage_dict["1d_intervention_w"].shape) == (model.config.hidden_size, 1)
assert tuple(weight_storage_dict["1d_intervention_scalar"].shape) == (1,)
torch.save(weight_storage_dict, os.path.join(workdir, "1d_storage.pt"))
reft_model.save(save_directory=os.path.join(workdir, "memorised"))

# without the intervention the sequence is not there
plain = model.generate(**tokenizer(ACCESS_ID, return_tensors="pt"), max_new_tokens=len(target_ids), do_sample=False)
assert plain[0, -len(target_ids):].tolist() != target_ids

_tiny.write_result({"rounds": rounds, "losses": losses[::25], "recalled_ids": recalled})
print("pattern 2 OK")
