"""Writes tutorials/07_tfew_and_policy_gradient.ipynb; with ``--execute`` also runs it with the full parameters
and stores the outputs, as committed."""
import nbformat as nbf
from notebook_writer import write

nb = nbf.v4.new_notebook()
md, code = nbf.v4.new_markdown_cell, nbf.v4.new_code_cell
nb["cells"] = [
md("""# 07 — T-Few on ReFT and IA3, prompt ensembles, and Transformer²'s policy gradient

Three training objectives beyond plain next-token cross entropy, on the embedded **SmolLM2-135M-Instruct**:

1. **Multiple choice as rank classification** (Liu et al. 2022, T-Few, §3.2): score every answer choice by
   its log-probability given the prompt and pick the best — `reftkit.analysis.multiple_choice`.
2. **T-Few's recipe**: the unlikelihood and length-normalised losses added to the LM loss
   (`ReftTrainer(loss_terms=...)` on `make_multiple_choice_data_module`), for IA3 — written as reftkit
   interventions — and for LoReFT.
3. **Prompt-tuning ensembles** (Lester et al. 2021): N soft prompts on one frozen model, trained in one batch
   with the same losses, combined by majority vote — `reftkit.analysis.prompt_ensemble`.
4. **Policy gradient** (Sun et al. 2025, Transformer², §3.1): REINFORCE on an SVF expert with a ±1 reward for
   the right first word, with and without a KL penalty — `reftkit.experts.train_policy_gradient`.

The tasks are two of `reftkit.data.datasets.task_families`: **sentiment** (a Rotten Tomatoes snippet →
` negative` / ` positive`) and **topic** (the start of a BBC News article → ` business`, ` entertainment`,
` politics`, ` sports`, ` tech`). Budgets are small so the notebook runs in under half an hour on one CPU thread: read
every number below as one seed of a few optimiser steps, not as a benchmark."""),
code("""# Parameters: the stored outputs come from these; the test suite runs a tiny version
N_TRAIN = 20           # training examples per family (sentiment, topic)
N_EVAL = 20            # held-out examples per family
MAX_WORDS = 16         # words of each review / article kept in the prompt
EPOCHS = 1             # passes over the multiple-choice training data (sections 2 and 3)
BATCH_SIZE = 4         # examples per step (each is one row per answer choice)
NUM_VIRTUAL_TOKENS = 5 # soft-prompt length of each ensemble member
PG_STEPS = 12          # policy-gradient steps per run
PG_BATCH = 8           # prompts sampled per policy-gradient step
KL_COEF = 1.0          # λ of the KL-penalised run
SVF_TARGETS = "mlp"    # the linears SVF adapts: every MLP matrix, as the released code
MAX_NEW_TOKENS = 3     # tokens generated per answer in section 4
THREADS = 1""", metadata={"tags": ["parameters"]}),
code("""import re
import time
import warnings
from collections import Counter

warnings.filterwarnings("ignore", message="IProgress not found")
warnings.filterwarnings("ignore", category=FutureWarning)
warnings.filterwarnings("ignore", category=UserWarning)
import matplotlib.pyplot as plt
import pandas as pd
import torch
from transformers import PrinterCallback, TrainingArguments
from transformers.utils import logging as hf_logging

import reftkit
from reftkit.analysis.baselines import get_weight_space_model
from reftkit.analysis.multiple_choice import accuracy, rank_classify
from reftkit.analysis.prompt_ensemble import ensemble_rank_classify, get_prompt_ensemble
from reftkit.data.multiple_choice import make_multiple_choice_data_module
from reftkit.data.datasets import task_families
from reftkit.experts.policy_gradient import train_policy_gradient
from reftkit.interventions.scaling import ia3_representations
from reftkit.training import ReftTrainer

hf_logging.disable_progress_bar()
hf_logging.set_verbosity_error()
if THREADS:
    torch.set_num_threads(THREADS)
pd.set_option("display.width", 200)
pd.set_option("display.max_colwidth", 120)
started = time.time()
model, tokenizer = reftkit.load_model("smollm2", dtype=torch.float32)
families = task_families(n_train=N_TRAIN, n_eval=N_EVAL, seed=0, max_words=MAX_WORDS)
TASKS = ("sentiment", "topic")


def as_multiple_choice(task, split):
    \"\"\"prompts, choices (the family's labels with a leading space) and the index of the right one\"\"\"
    choices = [" " + label for label in families[task]["labels"]]
    rows = families[task][split]
    return [r["prompt"] for r in rows], [choices] * len(rows), [choices.index(r["answer"]) for r in rows]


train = {task: as_multiple_choice(task, "train") for task in TASKS}
held_out = {task: as_multiple_choice(task, "eval") for task in TASKS}
# one training set with both families: 2 choices for sentiment, 5 for topic
train_prompts = [p for task in TASKS for p in train[task][0]]
train_choices = [c for task in TASKS for c in train[task][1]]
train_correct = [k for task in TASKS for k in train[task][2]]
print(train_prompts[-1], "->", repr(train_choices[-1][train_correct[-1]]))
print({task: len(train[task][0]) for task in TASKS}, "training /", {task: len(held_out[task][0]) for task in TASKS},
      "held-out examples")"""),
md("""## 1. Multiple choice as rank classification

Instead of generating an answer and parsing it, score each answer choice `y` under the model given the prompt
`x`, and pick the best. T-Few (§3.2) scores a choice by its **length-normalised** log-probability, the mean
over its `T(y)` tokens,

$$\\beta(x, y) = \\frac{1}{T(y)} \\sum_{t=1}^{T(y)} \\log p(y_t \\mid x, y_{<t}), \\qquad
\\hat y = \\arg\\max_n \\beta(x, y^{(n)}),$$

so that long choices are not penalised for their length. `rank_classify` does this; `choice_logprobs` gives
the scores. The choices carry their leading space (` positive`), because they are tokenized on their own and
appended to the prompt. Every label here is a single token, so the normalisation changes nothing in this
notebook — it matters for multi-token choices.

For a `ReftModel`, the intervention positions are resolved on the *prompt alone*, the tokens that
`generate` would edit, so every choice of an example is scored under the same edit.

Accuracy of the untrained model on the held-out items, next to the share of the most frequent label (what a
constant answer would score):"""),
code("""def held_out_accuracy(adapted):
    \"\"\"rank-classification accuracy per family, and how often each choice was picked\"\"\"
    out = {}
    for task in TASKS:
        prompts, choices, correct = held_out[task]
        predicted = rank_classify(adapted, tokenizer, prompts, choices, batch_size=16)
        out[task] = accuracy(predicted, correct)
        out[task + " picks"] = dict(sorted(Counter(choices[0][i].strip() for i in predicted).items()))
    return out


t0 = time.time()
base_scores = held_out_accuracy(model)
pd.DataFrame([{"family": task, "choices": len(held_out[task][1][0]),
               "base accuracy": base_scores[task],
               "most frequent label": max(Counter(held_out[task][2]).values()) / len(held_out[task][2]),
               "base model picks": base_scores[task + " picks"]} for task in TASKS]).round(3)"""),
md("""## 2. T-Few's recipe on IA3 and LoReFT

**The losses** (Liu et al. 2022, §3.2). Besides the usual LM loss on the right answer,
$L_{LM} = -\\frac{1}{T(y)}\\sum_t \\log p(y_t \\mid x, y_{<t})$, T-Few adds

* an **unlikelihood** loss that pushes the tokens of the *wrong* choices down:
  $$L_{UL} = -\\frac{\\sum_{n \\ne c} \\sum_{t=1}^{T(\\hat y^{(n)})}
  \\log\\bigl(1 - p(\\hat y^{(n)}_t \\mid x, \\hat y^{(n)}_{<t})\\bigr)}
  {\\sum_{n \\ne c} T(\\hat y^{(n)})}$$
* a **length-normalised** loss, a softmax cross entropy over the choices' scores $\\beta$ of section 1 — the very
  quantity rank classification compares:
  $$L_{LN} = -\\log \\frac{\\exp \\beta(x, y^{(c)})}{\\sum_n \\exp \\beta(x, \\hat y^{(n)})}$$

and trains on $L = L_{LM} + L_{UL} + L_{LN}$. `make_multiple_choice_data_module` builds the batches (an example
with C choices becomes C prompt+choice rows; a batch is padded to its largest C) and `ReftTrainer(...,
loss_terms=...)` weighs the terms: `{"lm": 1}` is the LM loss alone, `{"lm": 1, "ul": 1, "ln": 1}` T-Few's sum
(`reftkit.training.objectives.tfew_loss` computes it; `check_loss_terms` validates the weights).

**The two adaptations.**

* **IA3** (T-Few §3.3) rescales activations with learned vectors initialised to ones:
  $\\mathrm{softmax}\\bigl(Q(l_k \\odot K^\\top)/\\sqrt{d_k}\\bigr)(l_v \\odot V)$ in attention and
  $(l_{ff} \\odot \\gamma(W_1 x))W_2$ in the MLP. Here it is a reftkit intervention (`IA3`, $h \\mapsto l \\odot h$)
  at positions `"all"`; `ia3_representations(model)` writes the config entries at peft's default sites for
  Llama-style models — the outputs of `k_proj` and `v_proj` and the input of `down_proj` in every layer.
* **LoReFT** (Wu et al. 2024), $\\Phi(h) = h + R^\\top(Wh + b - Rh)$ with a rank-4 $R$, at the last prompt token
  of layers 8, 16 and 24 — the recipe of tutorials 02 and 05.

Each is trained twice on the same mixed sentiment + topic data, same seed and steps, once per loss. The
learning rates (IA3 1e-2, LoReFT 4e-3) are raised from T-Few's 3e-3 / reftkit's 2e-3 because the budget is a
handful of steps, not a thousand; they were not tuned. Every adapted model is detached before the next is
built, so each starts from the same base."""),
code("""ia3_config = ia3_representations(model)
loreft_config = {"layer": [8, 16, 24], "component": "block_output", "positions": "l1",
                 "intervention": "loreft", "low_rank_dimension": 4}
print(pd.DataFrame(ia3_config).to_string(index=False))


def fit(adapted, loss_terms, learning_rate, positions=None):
    \"\"\"train on the multiple-choice data with ReftTrainer; returns (seconds, mean training loss)\"\"\"
    data = make_multiple_choice_data_module(tokenizer, adapted, train_prompts, train_choices, train_correct,
                                            positions=positions)
    args = TrainingArguments(output_dir="tmp_07", num_train_epochs=EPOCHS, per_device_train_batch_size=BATCH_SIZE,
                             learning_rate=learning_rate, lr_scheduler_type="linear", weight_decay=0.0,
                             save_strategy="no", report_to=[], use_cpu=True, seed=0, disable_tqdm=True)
    trainer = ReftTrainer(adapted, args, loss_terms=loss_terms, train_dataset=data["train_dataset"],
                          data_collator=data["data_collator"])
    trainer.remove_callback(PrinterCallback)  # keep the per-step log dicts out of the notebook
    t = time.time()
    result = trainer.train()
    adapted.eval()
    return time.time() - t, result.training_loss


LOSSES = {"LM only": {"lm": 1}, "T-Few: LM + UL + LN": {"lm": 1, "ul": 1, "ln": 1}}
rows = [{"method": "base", "loss": "-", "trainable params": 0, "train time (s)": 0.0, "mean train loss": None,
         **base_scores}]
for method, config, learning_rate in [("IA3", ia3_config, 1e-2), ("LoReFT", loreft_config, 4e-3)]:
    for loss_name, terms in LOSSES.items():
        torch.manual_seed(0)   # the same initial LoReFT for both losses
        adapted = reftkit.get_reft_model(model, config)
        seconds, train_loss = fit(adapted, terms, learning_rate)
        trainable = adapted.parameter_counts()["trainable"]
        rows.append({"method": method, "loss": loss_name, "trainable params": trainable, "train time (s)": seconds,
                     "mean train loss": train_loss, **held_out_accuracy(adapted)})
        model = adapted.detach()   # the base is bit-identical again
        print(f"{method:7s} {loss_name:20s} trained in {seconds:5.1f} s")
tfew = pd.DataFrame(rows)
tfew["mean accuracy"] = tfew[list(TASKS)].mean(axis=1)
tfew[["method", "loss", "trainable params", "train time (s)", "mean train loss", "sentiment", "topic",
      "mean accuracy", "sentiment picks", "topic picks"]].round(3)"""),
md("""The mean training losses of the two rows of a method are not comparable (T-Few's sum has two more
terms); the held-out accuracies are. `picks` shows how often each label was chosen — a model that always
answers the same label scores the share of that label and nothing more."""),
md("""## 3. Prompt-tuning ensembles

**Prompt tuning** (Lester et al. 2021, §2) prepends $n$ trainable "virtual token" embeddings $P \\in
\\mathbb{R}^{n\\times d}$ to the embedded input, $[P; E(x)]$, and trains only $P$ (initialised here from the
embeddings of random frequent tokens). Their **prompt ensembling** trains $N$ prompts on one frozen model in a
single batch — each example is replicated $N$ times, row $r\\cdot B + b$ being example $b$ under prompt $r$ —
so one step trains all of them, the loss being the mean over prompts; at inference each prompt ranks the
choices and the ensemble takes the **majority vote** (ties: the highest mean score $\\beta$ over prompts).

`get_prompt_ensemble(model, num_prompts=3, ...)` builds it; it trains in `ReftTrainer` with the same T-Few
losses and data, and `ensemble_rank_classify` scores every choice under every prompt in one forward and
votes. A prompt ensemble has no intervention positions; `make_multiple_choice_data_module` still asks for a
`positions` string when the model is not a `ReftModel`, so one is given (`"l1"`) and the ensemble ignores the
locations it produces. Learning rate 3e-2 (reftkit's prompt-tuning default)."""),
code("""ensemble = get_prompt_ensemble(model, num_prompts=3, num_virtual_tokens=NUM_VIRTUAL_TOKENS, seed=0)
ensemble.print_trainable_parameters()
seconds, train_loss = fit(ensemble, LOSSES["T-Few: LM + UL + LN"], 3e-2, positions="l1")
print(f"trained in {seconds:.1f} s, mean training loss {train_loss:.3f}")
votes = {}
for task in TASKS:
    prompts, choices, correct = held_out[task]
    votes[task] = ensemble_rank_classify(ensemble, tokenizer, prompts, choices, batch_size=8)
model = ensemble.detach()


def scored(name, predictions):
    row = {"predictor": name}
    for task in TASKS:
        labels = held_out[task][1][0]
        row[task] = accuracy(predictions[task], held_out[task][2])
        row[task + " picks"] = dict(sorted(Counter(labels[i].strip() for i in predictions[task]).items()))
    return row


ensemble_table = pd.DataFrame(
    [scored(f"prompt {r}", {task: votes[task].per_prompt[r] for task in TASKS}) for r in range(3)]
    + [scored("majority vote", {task: votes[task].predictions for task in TASKS}),
       {"predictor": "base model", **base_scores}])
ensemble_table["mean accuracy"] = ensemble_table[list(TASKS)].mean(axis=1)
ensemble_table[["predictor", "sentiment", "topic", "mean accuracy", "sentiment picks", "topic picks"]].round(3)"""),
code("""# how often the three prompts agree on a held-out example
for task in TASKS:
    per = votes[task].per_prompt
    unanimous = sum(len({row[e] for row in per}) == 1 for e in range(len(per[0]))) / len(per[0])
    print(f"{task:9s}: the three prompts agree on {unanimous:.0%} of the held-out examples")"""),
md("""## 4. Transformer²'s policy gradient on an SVF expert

**SVF** (Sun et al. 2025, §3.1) adapts each MLP matrix $W = U\\,\\mathrm{diag}(\\sigma)\\,V^\\top$ through one vector
$z$ that rescales its singular values, $W' = U\\,\\mathrm{diag}(\\sigma \\odot z)\\,V^\\top$ (renormalised to keep
$\\sum\\sigma$, as the released code does; $z$ starts at 1, the unchanged model). `get_weight_space_model(model,
"svf")` builds it.

Transformer² trains its experts by **REINFORCE**: sample a completion $y_j \\sim \\pi(\\cdot \\mid x_j)$ for each
prompt, reward it with $r_j = +1$ if it is right and $-1$ otherwise, and minimise

$$L = -\\frac{1}{N}\\sum_j r_j \\sum_t \\log \\pi(y_{jt} \\mid x_j, y_{j,<t})
\\;+\\; \\lambda\\,\\frac{1}{N}\\sum_j \\sum_t \\mathrm{KL}\\bigl(\\pi_{ref}(\\cdot \\mid x_j, y_{j,<t}) \\,\\|\\,
\\pi(\\cdot \\mid x_j, y_{j,<t})\\bigr),$$

where $\\pi_{ref}$ is the base model (SVF switched off) and
$\\mathrm{KL}(\\pi_{ref}\\|\\pi) = \\sum_v \\pi_{ref}(v)\\,(\\log\\pi_{ref}(v) - \\log\\pi(v))$ keeps the policy
near it. `train_policy_gradient` runs it with the released code's defaults (AdamW, learning rate 2e-3, gradient norm
clipped to 1e-3); the reward here is +1 when the **first generated word** of the answer to a sentiment prompt
is the right label (case and punctuation ignored), −1 otherwise. Held-out accuracy uses the same rule on a
greedy answer."""),
code("""answer_of = {r["prompt"]: r["answer"].strip()
             for split in ("train", "eval") for r in families["sentiment"][split]}


def first_word(text):
    match = re.search(r"[A-Za-z]+", text)
    return match.group(0).lower() if match else ""


def reward_fn(prompts, completions):
    return [1.0 if first_word(c) == answer_of[p] else -1.0 for p, c in zip(prompts, completions)]


@torch.no_grad()
def first_word_accuracy(policy, rows):
    \"\"\"greedy answers to the held-out sentiment prompts: (accuracy, counts of the first words)\"\"\"
    words = []
    for start in range(0, len(rows), 16):
        batch = tokenizer([r["prompt"] for r in rows[start:start + 16]], return_tensors="pt", padding=True,
                          padding_side="left")
        out = policy.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                              max_new_tokens=MAX_NEW_TOKENS, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        words += [first_word(t) for t in tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:],
                                                                skip_special_tokens=True)]
    right = sum(w == r["answer"].strip() for w, r in zip(words, rows))
    return right / len(rows), dict(Counter(words).most_common(4))


pg_prompts = [r["prompt"] for r in families["sentiment"]["train"]]
print("training labels:", dict(Counter(r["answer"].strip() for r in families["sentiment"]["train"])),
      "| held-out labels:", dict(Counter(r["answer"].strip() for r in families["sentiment"]["eval"])))
base_pg = first_word_accuracy(model, families["sentiment"]["eval"])
print(f"base model: held-out first-word accuracy {base_pg[0]:.3f}, first words {base_pg[1]}")"""),
code("""pg_rows = [{"model": "base", "KL coefficient": "-", "trainable params": 0, "train time (s)": 0.0,
            "mean reward, last 4 steps": None, "held-out accuracy": base_pg[0], "first words": base_pg[1]}]
curves = {}
for kl_coef in (0.0, KL_COEF):
    expert = get_weight_space_model(model, "svf", target_modules=SVF_TARGETS)
    expert.eval()   # no dropout: log π must be the sampling policy's
    t = time.time()
    log = train_policy_gradient(expert, tokenizer, pg_prompts, reward_fn, steps=PG_STEPS, batch_size=PG_BATCH,
                                kl_coef=kl_coef, max_new_tokens=MAX_NEW_TOKENS, seed=0, progress=False)
    seconds = time.time() - t
    curves[kl_coef] = log
    acc, words = first_word_accuracy(expert, families["sentiment"]["eval"])
    pg_rows.append({"model": "SVF + REINFORCE", "KL coefficient": kl_coef,
                    "trainable params": expert.parameter_counts()["trainable"], "train time (s)": seconds,
                    "mean reward, last 4 steps": log["reward_mean"].tail(4).mean(), "held-out accuracy": acc,
                    "first words": words})
    model = expert.detach()   # SVF's original linears put back
pd.DataFrame(pg_rows).round(3)"""),
code("""fig, (ax_reward, ax_kl) = plt.subplots(1, 2, figsize=(11, 3.6))
for kl_coef, log in curves.items():
    label = f"λ = {kl_coef:g}"
    line, = ax_reward.plot(log["step"], log["reward_mean"], marker="o", alpha=0.45, label=f"{label} (per step)")
    ax_reward.plot(log["step"], log["reward_mean"].rolling(3, min_periods=1).mean(), color=line.get_color(),
                   label=f"{label} (mean of 3)")
    if kl_coef > 0:   # the KL term is computed only when it is in the loss
        ax_kl.plot(log["step"], log["kl"], marker="o", color=line.get_color(), label=label)
ax_reward.axhline(0, color="grey", lw=0.6)
ax_reward.set(xlabel="step", ylabel="mean reward (+1 right / −1 wrong)", title="REINFORCE on an SVF expert")
ax_reward.legend(fontsize=8)
ax_kl.set(xlabel="step", ylabel="KL(π_ref ‖ π) per completion", title="distance from the base model")
ax_kl.legend(fontsize=8)
fig.tight_layout()"""),
code("""print(pd.concat({f"λ = {k:g}": v.set_index("step")[["reward_mean", "pg", "kl", "completion_tokens"]]
                 for k, v in curves.items()}, axis=1).round(3).to_string())"""),
md("""## What the numbers show

* **The base model answers one label.** Ranked over the choices, SmolLM2 picks ` negative` for every review
  (0.50, the share of negatives) and ` business` for every article (0.25, below the 0.35 that always answering
  the most frequent label, ` politics`, would score). Rank classification makes this prior visible at once.
* **T-Few's recipe.** After one pass over 40 examples (10 steps) every adapted model beats the base. T-Few's
  `lm + ul + ln` scored at least as well as the LM loss alone for both adaptations — mean accuracy 0.575 →
  0.600 for IA3, 0.550 → 0.575 for LoReFT — but that is one more right answer out of 40, well inside the
  noise of 20 held-out items per family (one item is 0.05; the standard error near 0.5 is about 0.11). What
  the extra terms visibly changed for IA3 is the *spread* of the answers: with the LM loss alone it answers
  ` positive` 17 times in 20 and ` politics` 14 times in 20; with `ul + ln` the picks are 14/6, ` politics`
  9 times, and all five topics appear. That fits $L_{LN}$, which trains the contrast between the choices
  rather than the likelihood of the right one. LoReFT's sentiment picks were 11/9 under both losses; with
  `ul + ln` a fourth topic appeared and its accuracy moved from sentiment (0.65 → 0.55) to topic (0.45 → 0.60).
* **IA3 against LoReFT.** Sentiment stays near chance for all four (0.55–0.65): a 16-word snippet, a 135M
  model and 10 steps are not enough. Topic separated them only under the LM loss — IA3 0.60, LoReFT 0.45;
  with T-Few's losses both reach 0.60 — and IA3 leads in mean accuracy by one answer in 40 under either loss.
  IA3 trains 4× the parameters (57,600 against 13,836) and takes 1.5–1.6× as long per step: it edits every
  token in every layer, LoReFT one token in three layers (and the backward pass stops at layer 8).
* **Prompt ensemble.** The three prompts each lift topic above the base (0.30–0.45) but none moves sentiment
  off ` negative`, so they agree on every review; on topic they are unanimous on only 30 % of the articles, and the vote
  (0.35) lands between the best prompt (0.45) and the worst (0.30) — no better than their average. Voting
  pays when the members are each decent and err differently; ten steps of prompt tuning on a 135M model give
  neither, and prompt tuning trails IA3 and LoReFT here, as Lester et al. find for small models. It was also
  the costliest training in the notebook: three prompts are three copies of every row.
* **Policy gradient.** Greedy answers of the base model start with the label only 10 % of the time (mostly
  "A positive review..."). Without the KL term the mean reward climbs from −1 to +0.375 over the last four
  steps and held-out accuracy reaches 0.50 — but by answering ` positive` to every review: REINFORCE taught
  the answer *format* (say the label first) and the majority label of the training prompts (12 of 20), not
  sentiment; a constant ` positive` already earns a mean reward of +0.2 on them. With λ = 1 the KL term
  (0.32–0.56 nats per completion after the first step) holds the policy near the base model and the reward
  never rises above 0 (−0.625 over the last four steps), although its greedy answers drift to ` positive` too
  (17 of 20). At twelve steps the KL penalty mostly slowed learning down; its purpose — not drifting far from the base
  model over long training — cannot show in a run this short.
* **Cost.** A multiple-choice batch is B·C rows, each holding the whole prompt, padded to the largest C in the
  batch, so a review next to an article costs five rows; with one-token labels almost all of that compute
  re-reads the same prompt. Times were measured on one thread of a machine shared with other jobs. One seed
  throughout: rerun with other seeds, more steps and more held-out items before drawing conclusions."""),
code("""print(f"notebook ran in {time.time() - started:.0f} s")"""),
]
write(nb, "07_tfew_and_policy_gradient.ipynb")
