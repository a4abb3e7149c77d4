"""Pattern 8: LoRA (peft) and ReFT trained together (pyreft's README and examples/peft, "reft_with_lora").

``get_peft_model`` with a rank-4 rsLoRA on ``o_proj`` of one layer, then ``get_reft_model`` on the PeftModel
with the README's string component ``"base_model.model.model.layers[l].output"``,
``reft_model.model.enable_adapter_layers()`` to give LoRA its gradients back, the last-position data module,
ReftTrainerForCausalLM, and ``generate`` with ``intervene_on_prompt=True`` for many tokens.

Asserts: both LoRA (its B matrix starts at zero) and the intervention moved; the loss falls; ``generate``
returns exactly the tokens of a greedy loop of full forward calls with the same prompt location (every token,
not just the first); LoRA is live in that forward (disabling the adapter changes the logits).
Usage: python pattern_8_peft_lora.py [result.json]
"""
import os
import tempfile

import _tiny
import pyreft
import torch
import transformers
from peft import LoraConfig, get_peft_model

TEMPLATE = "[INST] %s [/INST]\n"
CHATS = [["Who are you?", "🤖 💬 🧠"], ["What is two plus two?", "🔢 ➕ 🔢 🍀"], ["Why is the sky blue?", "🌍 ☀️ 🔵"],
         ["Can you stop using emoji?", "🚫 🔠"]]
UNSEEN = "Which dog is cuter, a poodle or a doodle?"
N_NEW = 8

workdir = tempfile.mkdtemp()
checkpoint = _tiny.make_checkpoint(os.path.join(workdir, "tiny-llama-chat"),
                                   [TEMPLATE, UNSEEN] + [q + " " + a for q, a in CHATS])
model = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, torch_dtype=torch.float32)
tokenizer = transformers.AutoTokenizer.from_pretrained(checkpoint, model_max_length=128, padding_side="right",
                                                       use_fast=False)
tokenizer.pad_token = tokenizer.unk_token

torch.manual_seed(0)
layers_to_transform = [1]
peft_config = LoraConfig(r=4, lora_alpha=32, target_modules=["o_proj"], layers_to_transform=layers_to_transform,
                         use_rslora=True, lora_dropout=0.05, bias="none", task_type="CAUSAL_LM")
model = get_peft_model(model, peft_config)

reft_config = pyreft.ReftConfig(representations=[{
    "layer": layer, "component": f"base_model.model.model.layers[{layer}].output", "low_rank_dimension": 4,
    "intervention": pyreft.LoreftIntervention(embed_dim=model.config.hidden_size, low_rank_dimension=4,
                                              dtype=torch.float32)} for layer in layers_to_transform])
reft_model = pyreft.get_reft_model(model, reft_config)
reft_model.model.enable_adapter_layers()  # get_reft_model froze the whole model, LoRA included
reft_model.print_trainable_parameters()
lora = {n: p for n, p in model.named_parameters() if "lora_" in n}
assert lora and all(p.requires_grad for p in lora.values())
lora_before = {n: p.detach().clone() for n, p in lora.items()}
key = list(reft_model.interventions.keys())[0]
rotation_before = reft_model.interventions[key].rotate_layer.weight.detach().clone()

data_module = pyreft.make_last_position_supervised_data_module(
    tokenizer, model, [TEMPLATE % q for q, _ in CHATS], [a for _, a in CHATS])
training_args = transformers.TrainingArguments(
    num_train_epochs=60.0, output_dir=os.path.join(workdir, "tmp"), per_device_train_batch_size=len(CHATS),
    learning_rate=2e-2, logging_steps=1, report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True)
trainer = pyreft.ReftTrainerForCausalLM(model=reft_model, tokenizer=tokenizer, args=training_args, **data_module)
trainer.remove_callback(transformers.trainer_callback.PrinterCallback)
trainer.train()
losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
print(f"loss {losses[0]:.3f} -> {losses[-1]:.3f}")
assert _tiny.falling(losses, 0.6), losses[::10]
assert all(n.endswith("lora_A.default.weight") or p.abs().max() > 0 for n, p in lora.items())  # B left zero
assert all(not torch.equal(p, lora_before[n]) for n, p in lora.items())
assert not torch.equal(reft_model.interventions[key].rotate_layer.weight, rotation_before)

# ensure everything is in eval mode
reft_model.model.eval()
for _, intervention in reft_model.interventions.items():
    intervention.eval()

prompt = tokenizer(TEMPLATE % UNSEEN, return_tensors="pt")
n = prompt["input_ids"].shape[-1]
base_unit_location = n - 1
_, reft_response = reft_model.generate(
    prompt, unit_locations={"sources->base": (None, [[[base_unit_location]]])}, intervene_on_prompt=True,
    max_new_tokens=N_NEW, min_new_tokens=N_NEW, do_sample=False, eos_token_id=tokenizer.eos_token_id)
generated = reft_response[0, n:].tolist()
print("unseen ->", tokenizer.decode(generated))
assert len(generated) == N_NEW

# the same continuation, one full forward per token, intervening on the same prompt position
ids = prompt["input_ids"]
with torch.no_grad():
    for _ in range(N_NEW):
        _, out = reft_model({"input_ids": ids, "attention_mask": torch.ones_like(ids)},
                            unit_locations={"sources->base": (None, [[[base_unit_location]]])})
        next_logits = out.logits[:, -1].clone()
        next_logits[:, tokenizer.eos_token_id] = float("-inf")  # what min_new_tokens does inside generate
        ids = torch.cat([ids, next_logits.argmax(-1, keepdim=True)], dim=-1)
    assert ids[0, n:].tolist() == generated, (ids[0, n:].tolist(), generated)
    with reft_model.model.disable_adapter():
        _, without_lora = reft_model({"input_ids": ids, "attention_mask": torch.ones_like(ids)},
                                     unit_locations={"sources->base": (None, [[[base_unit_location]]])})
    _, with_lora = reft_model({"input_ids": ids, "attention_mask": torch.ones_like(ids)},
                              unit_locations={"sources->base": (None, [[[base_unit_location]]])})
assert (with_lora.logits - without_lora.logits).abs().max() > 1e-3

_tiny.write_result({"losses": losses[::10], "generated_ids": generated})
print("pattern 8 OK")
