"""Pattern 3: six untied LoReFTs at the first and last three prompt tokens (pyreft's examples/agent).

The agent notebook's set-up: rank-2 LoReFTs at layers [0, 1, 2, 0, 1, 2] (the first three read the first
prompt positions, the last three the last ones: ``share_weights=False``), positions "f3+l3", the
multiple-position data module with ``num_interventions`` and ``share_weights``, ReftTrainerForCausalLM, then
``generate`` with locations from ``get_intervention_locations`` exactly as the notebook builds them.

Asserts: ``parse_positions``; every row's intervention locations equal pyreft's rule (written out by hand
below, including a prompt shorter than six tokens, whose missing positions point at ``last_position``); the
loss falls; each training prompt's reply starts right; the interventions change the reply.
Usage: python pattern_3_untied_f3l3.py [result.json]
"""
import os
import tempfile

import _tiny
import pyreft
import torch
import transformers

TEMPLATE = "<s>[INST] <<SYS>>\nYou are the Golden Gate Bridge.\n<</SYS>>\n\n%s [/INST]\n"
DIALOGUE = [
    (TEMPLATE % "tell me about yourself.", "I am a bridge over the bay ."),
    (TEMPLATE % "how are you today?", "foggy but proud , thank you ."),
    (TEMPLATE % "where are you from?", "San Francisco , California ."),
    (TEMPLATE % "how tall are you?", "my towers rise high above the water ."),
    ("hi !", "hello from the bay ."),  # a prompt of three tokens: fewer than f3 + l3
]
NEW_QUESTION = "can you tell me how to improve my health?"

workdir = tempfile.mkdtemp()
checkpoint = _tiny.make_checkpoint(os.path.join(workdir, "tiny-llama-agent"),
                                   [TEMPLATE, NEW_QUESTION] + [p + " " + r for p, r in DIALOGUE])
model = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, torch_dtype=torch.float32)
tokenizer = transformers.AutoTokenizer.from_pretrained(checkpoint, model_max_length=128, padding_side="right",
                                                       use_fast=False)
tokenizer.pad_token = tokenizer.unk_token

torch.manual_seed(0)
reft_config = pyreft.ReftConfig(representations=[{
    "layer": layer, "component": "block_output", "low_rank_dimension": 2,
    "intervention": pyreft.LoreftIntervention(embed_dim=model.config.hidden_size, low_rank_dimension=2,
                                              dtype=torch.float32)} for layer in [0, 1, 2, 0, 1, 2]])
reft_model = pyreft.get_reft_model(model, reft_config)
reft_model.print_trainable_parameters()
assert len(reft_model.interventions) == 6

share_weights = False
positions = "f3+l3"
first_n, last_n = pyreft.parse_positions(positions)
assert (first_n, last_n) == (3, 3)

data_module = pyreft.make_multiple_position_supervised_data_module(
    tokenizer, model, [p for p, _ in DIALOGUE], [r for _, r in DIALOGUE],
    positions=positions, num_interventions=len(reft_config.representations), share_weights=share_weights,
    nonstop=False)


def expected_locations(n):
    """pyreft's rule for f3+l3 untied, pad_mode "last", for a prompt of n tokens."""
    f, ln = min(n // 2, 3), min(n // 2, 3)
    first = list(range(f)) + [n] * (3 - f)
    last = list(range(n - ln, n)) + [n] * (3 - ln)
    return [first] * 3 + [last] * 3


for i, (prompt, _) in enumerate(DIALOGUE):
    n = len(tokenizer(prompt)["input_ids"])
    got = [[int(x) for x in row] for row in data_module["train_dataset"][i]["intervention_locations"]]
    assert got == expected_locations(n), (i, got, expected_locations(n))
assert expected_locations(3) == [[0, 3, 3]] * 3 + [[2, 3, 3]] * 3

training_args = transformers.TrainingArguments(
    num_train_epochs=120.0, output_dir=os.path.join(workdir, "tmp"), per_device_train_batch_size=len(DIALOGUE),
    learning_rate=2e-2, report_to=[], logging_steps=1, save_strategy="no", use_cpu=True, disable_tqdm=True)
trainer = pyreft.ReftTrainerForCausalLM(model=reft_model, tokenizer=tokenizer, args=training_args, **data_module)
trainer.remove_callback(transformers.trainer_callback.PrinterCallback)
trainer.train()
losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
print(f"loss {losses[0]:.3f} -> {losses[-1]:.3f}")
assert _tiny.falling(losses, 0.5), losses[::10]


def reply(prompt_text, intervene=True):
    prompt = tokenizer(prompt_text, return_tensors="pt")
    unit_locations = torch.IntTensor([pyreft.get_intervention_locations(
        last_position=prompt["input_ids"].shape[-1], first_n=first_n, last_n=last_n, pad_mode="last",
        num_interventions=len(reft_config.representations), share_weights=share_weights,
    )]).permute(1, 0, 2).tolist()
    if not intervene:
        return model.generate(**prompt, max_new_tokens=6, do_sample=False)[0, prompt["input_ids"].shape[-1]:].tolist()
    _, response = reft_model.generate(
        prompt, unit_locations={"sources->base": (None, unit_locations)},
        intervene_on_prompt=True, max_new_tokens=6, do_sample=False, eos_token_id=tokenizer.eos_token_id)
    return response[0, prompt["input_ids"].shape[-1]:].tolist()


reft_model.model.eval()
for prompt_text, response in DIALOGUE[:4]:
    got = reply(prompt_text)
    assert got[0] == tokenizer(response, add_special_tokens=False)["input_ids"][0], (prompt_text, got)
new_reply = reply(TEMPLATE % NEW_QUESTION)
print("new question ->", tokenizer.decode(new_reply))
assert new_reply != reply(TEMPLATE % NEW_QUESTION, intervene=False)

reft_model.set_device("cpu")
reft_model.save(save_directory=os.path.join(workdir, "reft_to_share"))
assert len([f for f in os.listdir(os.path.join(workdir, "reft_to_share")) if f.startswith("intkey_")]) == 6

_tiny.write_result({"losses": losses[::10], "new_reply_ids": new_reply})
print("pattern 3 OK")
