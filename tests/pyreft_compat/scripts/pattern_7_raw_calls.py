"""Pattern 7: pyvene-style calls in a hand-written torch loop (how pyreft's and pyvene's notebooks train
without the HF Trainer), on a tiny GPT-2.

``reft_model({"input_ids": ..., "attention_mask": ...}, unit_locations={"sources->base": (None, locs)},
labels=..., subspaces=None)`` returns pyvene's pair (base output or None, intervened output with ``.loss``);
``locs`` is [intervention][example][position], built per row for right-padded prompts of different lengths.
A NoReFT (with ``add_bias``) and a DiReFT at two layers; AdamW over ``reft_model.parameters()``.

Asserts: the loss falls; the trainable tensors of ``parameters()`` are ``get_trainable_parameters()``, and the
model's own weights are frozen and unchanged; with ``output_original_output=True`` the first element is the
plain model's output; positions before the first intervened token keep the plain model's logits (causality)
while the intervened positions change; the pair's first element is None by default.
Usage: python pattern_7_raw_calls.py [result.json]
"""
import os
import tempfile

import _tiny
import pyreft
import torch
import transformers

PAIRS = [("define dog :", "an animal that barks"), ("define cat :", "an animal that meows"),
         ("colour of the sky :", "blue"), ("legs of a spider :", "eight")]

workdir = tempfile.mkdtemp()
checkpoint = _tiny.make_checkpoint(os.path.join(workdir, "tiny-gpt2"), [p + " " + r for p, r in PAIRS],
                                   arch="gpt2", hidden=64, layers=3)
model = transformers.AutoModelForCausalLM.from_pretrained(checkpoint)
tokenizer = transformers.AutoTokenizer.from_pretrained(checkpoint, padding_side="right")
tokenizer.pad_token = tokenizer.unk_token
model_weights = {n: p.detach().clone() for n, p in model.named_parameters()}

torch.manual_seed(0)
reft_config = pyreft.ReftConfig(representations=[
    {"layer": 0, "component": "block_output", "low_rank_dimension": 4,
     "intervention": pyreft.NoreftIntervention(embed_dim=64, low_rank_dimension=4, add_bias=True,
                                               dtype=torch.float32)},
    {"layer": 1, "component": "block_output", "low_rank_dimension": 4,
     "intervention": pyreft.DireftIntervention(embed_dim=64, low_rank_dimension=4, dtype=torch.float32)},
])
reft_model = pyreft.get_reft_model(model, reft_config)
trainable = reft_model.get_trainable_parameters()
assert {id(p) for p in reft_model.parameters() if p.requires_grad} == {id(p) for p in trainable}
assert not any(p.requires_grad for p in model.parameters())

# a right-padded batch: prompt + response, labels on the response, locations = the last 2 prompt tokens per row
rows = [tokenizer(p)["input_ids"] for p, _ in PAIRS]
full = [tokenizer(p + " " + r + tokenizer.eos_token)["input_ids"] for p, r in PAIRS]
width = max(len(f) for f in full)
input_ids = torch.tensor([f + [tokenizer.pad_token_id] * (width - len(f)) for f in full])
attention_mask = torch.tensor([[1] * len(f) + [0] * (width - len(f)) for f in full])
labels = torch.tensor([[-100] * len(r) + f[len(r):] + [-100] * (width - len(f)) for r, f in zip(rows, full)])
locs = [[[len(r) - 2, len(r) - 1] for r in rows]] * 2  # [intervention][example][position]
unit_locations = {"sources->base": (None, locs)}
base = {"input_ids": input_ids, "attention_mask": attention_mask}

with torch.no_grad():
    plain = model(**base).logits
    first, out = reft_model(base, unit_locations=unit_locations, output_original_output=True)
    none_first, out_default = reft_model(base, unit_locations=unit_locations)
assert none_first is None
torch.testing.assert_close(first.logits, plain)
torch.testing.assert_close(out_default.logits, out.logits)
for i, r in enumerate(rows):
    torch.testing.assert_close(out.logits[i, :len(r) - 2], plain[i, :len(r) - 2])  # before the first location
    assert (out.logits[i, len(r) - 2:len(r)] - plain[i, len(r) - 2:len(r)]).abs().max() > 1e-3

optimizer = torch.optim.AdamW(reft_model.parameters(), lr=3e-2)
reft_model.train()
losses = []
for step in range(80):
    _, cf_outputs = reft_model(base, unit_locations=unit_locations, labels=labels, subspaces=None)
    cf_outputs.loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    losses.append(cf_outputs.loss.item())
print(f"loss {losses[0]:.3f} -> {losses[-1]:.3f}")
assert _tiny.falling(losses, 0.75), losses[::10]
assert all(torch.equal(p, model_weights[n]) for n, p in model.named_parameters())

reft_model.eval()
with torch.no_grad():
    _, out = reft_model(base, unit_locations=unit_locations, labels=labels)
assert abs(out.loss.item() - losses[-1]) < 0.5
_tiny.write_result({"losses": losses[::5], "eval_loss": out.loss.item(), "logits": out.logits[0, :3, :5].tolist()})
print("pattern 7 OK")
