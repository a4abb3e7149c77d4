"""Pattern 1: pyreft's README quickstart (the emoji chatbot) on a tiny Llama.

The flow of the README: load the model in bfloat16; one rank-4 LoReFT on the residual stream of one layer
(the intervention instance made without a dtype, so it keeps pyreft's default); the last-position data
module; ReftTrainerForCausalLM; chat through ``generate`` with ``unit_locations`` and
``intervene_on_prompt=True``; ``save`` and ``ReftModel.load`` on a fresh copy of the base model.

Asserts: the loss falls; every training prompt is answered with its emoji string; an unseen prompt gets an
emoji answer too; the answer depends on the intervention; the reloaded model generates the same tokens.
Usage: python pattern_1_quickstart.py [result.json]
"""
import os
import tempfile

import _tiny
import pyreft
import torch
import transformers

SYSTEM_TEMPLATE = "<s>[INST] <<SYS>>\nYou answer only in emoji.\n<</SYS>>\n\n%s [/INST]\n"
CHATS = [
    ["Who are you?", "🤖 💬 🧠"],
    ["What is two plus two?", "🔢 ➕ 🔢 🍀"],
    ["Why is the sky blue?", "🌍 ☀️ 🔵"],
    ["Plan a road trip to Austin.", "🚗 🗺️ 🌵 🎸"],
    ["Can you stop using emoji?", "🚫 🔠"],
    ["Tell me something about politics.", "🗳️ 🌍 🤝"],
]
UNSEEN = "Which dog is cuter, a poodle or a doodle?"

workdir = tempfile.mkdtemp()
checkpoint = _tiny.make_checkpoint(os.path.join(workdir, "tiny-llama-chat"),
                                   [SYSTEM_TEMPLATE] + [q + " " + a for q, a in CHATS] + [UNSEEN])

# step 1: the model and tokenizer, as the README loads them (bf16; pad = unk)
torch.manual_seed(1)
model = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, torch_dtype=torch.bfloat16)
tokenizer = transformers.AutoTokenizer.from_pretrained(checkpoint, model_max_length=128, padding_side="right",
                                                       use_fast=False)
tokenizer.pad_token = tokenizer.unk_token

# step 2: one rank-4 LoReFT at layer 0
reft_config = pyreft.ReftConfig(representations={
    "layer": 0, "component": "block_output", "low_rank_dimension": 4,
    "intervention": pyreft.LoreftIntervention(embed_dim=model.config.hidden_size, low_rank_dimension=4)})
reft_model = pyreft.get_reft_model(model, reft_config)
reft_model.set_device("cpu")
reft_model.print_trainable_parameters()
assert reft_model.count_parameters() == 4 * model.config.hidden_size * 2 + 4

# step 3: the demonstrations
data_module = pyreft.make_last_position_supervised_data_module(
    tokenizer, model, [SYSTEM_TEMPLATE % q for q, _ in CHATS], [a for _, a in CHATS])

# step 4: train
training_args = transformers.TrainingArguments(
    num_train_epochs=150.0, output_dir=os.path.join(workdir, "tmp"), per_device_train_batch_size=len(CHATS),
    learning_rate=5e-2, logging_steps=1, report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True)
trainer = pyreft.ReftTrainerForCausalLM(model=reft_model, tokenizer=tokenizer, args=training_args, **data_module)
trainer.remove_callback(transformers.trainer_callback.PrinterCallback)
trainer.train()
losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
print(f"loss {losses[0]:.3f} -> {losses[-1]:.3f}")
assert _tiny.falling(losses, 0.6), losses


# step 5: chat
def chat(reft, instruction):
    prompt = tokenizer(SYSTEM_TEMPLATE % instruction, return_tensors="pt")
    base_unit_location = prompt["input_ids"].shape[-1] - 1  # the last prompt token
    _, response = reft.generate(
        prompt, unit_locations={"sources->base": (None, [[[base_unit_location]]])},
        intervene_on_prompt=True, max_new_tokens=8, do_sample=False, eos_token_id=tokenizer.eos_token_id)
    return response[0, prompt["input_ids"].shape[-1]:].tolist()


reft_model.model.eval()
emoji = {tok for _, a in CHATS for tok in tokenizer(a, add_special_tokens=False)["input_ids"]}
for question, answer in CHATS:  # a tiny random model learns the first emoji of each answer (not all of it)
    got = chat(reft_model, question)
    assert got[0] == tokenizer(answer, add_special_tokens=False)["input_ids"][0], (question, tokenizer.decode(got))
unseen = chat(reft_model, UNSEEN)
print("unseen ->", tokenizer.decode(unseen))
assert unseen and unseen[0] in emoji, tokenizer.decode(unseen)
plain = model.generate(**tokenizer(SYSTEM_TEMPLATE % UNSEEN, return_tensors="pt"), max_new_tokens=8,
                       do_sample=False)
assert plain[0, -8:].tolist() != unseen[:8]

# step 6: share (here: a local folder), then load on a fresh copy of the base model
reft_model.set_device("cpu")
save_dir = os.path.join(workdir, "reft_to_share")
reft_model.save(save_directory=save_dir)
fresh = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, torch_dtype=torch.bfloat16)
loaded = pyreft.ReftModel.load(save_dir, fresh)
loaded.set_device("cpu")
assert chat(loaded, UNSEEN) == unseen
for question, _ in CHATS[:2]:
    assert chat(loaded, question) == chat(reft_model, question)

_tiny.write_result({"losses": losses, "unseen_ids": unseen})
print("pattern 1 OK")
