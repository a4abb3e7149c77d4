"""Writes tutorials/06_experts_and_dispatch.ipynb; with ``--execute`` also runs it with the full parameters
and stores the outputs, as committed."""
import nbformat as nbf
from notebook_writer import write

nb = nbf.v4.new_notebook()
md, code = nbf.v4.new_markdown_cell, nbf.v4.new_code_cell
nb["cells"] = [
md("""# 06 — Experts, mixing and dispatch: Transformer²'s self-adaptation with ReFT

Transformer² (Sun, Cetin & Tang 2025, *Transformer²: Self-adaptive LLMs*) keeps one small **expert** per
skill and answers each request in **two passes**: the first pass decides which expert (or which mixture of
experts) fits the request, the second pass answers with it. Its experts are SVF vectors; here they are ReFT
interventions on a frozen **SmolLM2-135M-Instruct** — 13,836 parameters each — and the same code serves SVF
and IA3 experts.

`reftkit.experts` provides:

| piece | what it does |
|---|---|
| `ExpertLibrary` | named experts of one shape, saved as one folder (`library.json` + `experts.safetensors`) |
| `ExpertRouter` | the experts and any mixtures on one model; **each row of a batch takes its own route** |
| `prompt_dispatch` | strategy (a): the base model *generates* a request's category ("other" → base) |
| `train_dispatch_expert`, `expert_dispatch` | strategy (b): an expert trained to answer that question (SVF or ReFT) |
| `few_shot_weights` | strategy (c): CEM searches mixing weights on a few labelled examples of a task |
| `two_pass_generate` | dispatch a whole batch, then generate every row with its route, in one batch |
| `train_expert(objective="reinforce")` | a library expert trained with Transformer²'s REINFORCE objective |

**How experts mix.** SVF vectors scale the same singular directions, and IA3 vectors the same coordinates, so
a weighted sum of their *parameters* is a meaningful new expert (`z' = Σ αₖ zₖ`, as Transformer² does).
LoReFT's rotations are different: each expert's `R` spans its own subspace, and a sum of orthonormal matrices
is not orthonormal — so reftkit mixes LoReFT experts' *outputs*, `h' = h + Σ αₖ (fₖ(h) − h)` (the `Mixture`
intervention). With weights `(1, 0, 0)` both give expert 1 exactly; with all weights 0, the base model.

The three task families come from data that ships in packages (`reftkit.data.datasets.task_families`):
**sentiment** (Rotten Tomatoes snippets → positive / negative), **topic** (BBC News articles → business,
entertainment, politics, sports, tech) and **pos** (a WordNet word → noun, verb, adjective or adverb)."""),
code("""# Parameters: the stored outputs come from these; the test suite runs a tiny version
N_TRAIN = 64        # training examples per task
N_EVAL = 16         # held-out prompts per task
N_OTHER = 16        # prompts of no task (define-the-word): half train the dispatcher's "other", half test routing
EPOCHS = 1
SHOTS = 4           # labelled examples per task for the few-shot strategy
POPULATION = 8      # CEM (Transformer²'s defaults: population 32, elite ratio 0.2, 50 iterations)
ITERATIONS = 5
N_SVF = 16          # training prompts per task (and no-task prompts) for the SVF classification expert
SVF_EPOCHS = 3      # REINFORCE passes over them
RL_EPOCHS = 1       # REINFORCE passes for the sentiment expert of section 6
THREADS = 1""", metadata={"tags": ["parameters"]}),
code("""%matplotlib inline
import tempfile
import warnings
from pathlib import Path

warnings.filterwarnings("ignore", message="IProgress not found")
warnings.filterwarnings("ignore", category=FutureWarning)
import pandas as pd
import torch
from transformers.utils import logging as hf_logging

import reftkit
from reftkit.data.datasets import define_word_dataset, task_families
from reftkit.experts import (ExpertLibrary, ExpertRouter, expert_dispatch, few_shot_weights, parse_category,
                             prompt_dispatch, train_dispatch_expert, train_expert, two_pass_generate)
from reftkit.analysis.svf import svf_modules
from reftkit.experts.study import first_word

hf_logging.disable_progress_bar()
hf_logging.set_verbosity_error()
if THREADS:
    torch.set_num_threads(THREADS)
pd.set_option("display.max_colwidth", 60)

model, tokenizer = reftkit.load_model("smollm2", dtype=torch.float32)
families = task_families(N_TRAIN, N_EVAL, seed=0)
other = [r["prompt"] for r in define_word_dataset(n_train=N_OTHER, n_eval=N_OTHER, seed=0)["eval"]]
TASKS = list(families)
for task in TASKS:
    row = families[task]["train"][0]
    print(f"--- {task} ({', '.join(families[task]['labels'])})\\n{row['prompt']}{row['answer']}")"""),
md("""## 1. Three experts and a library

Each expert is a LoReFT of rank 4 on the residual stream of layers 6, 12 and 18, at the first and last
prompt tokens, trained on its own task's examples. `ExpertLibrary.add` takes a trained `ReftModel`; the first
expert fixes the shape every later one must match."""),
code("""CONFIG = {"layer": [6, 12, 18], "component": "block_output", "positions": "f1+l1",
          "intervention": "loreft", "low_rank_dimension": 4}
library = ExpertLibrary()
for task in TASKS:
    rows = families[task]["train"]
    reft = train_expert(model, tokenizer, [r["prompt"] for r in rows], [r["answer"] for r in rows], CONFIG,
                        epochs=EPOCHS, learning_rate=4e-3, progress=False)
    library.add(task, reft)
    reft.detach()                      # the base model is bit-identical again
print(library, "| trainable parameters per expert:",
      sum(t.numel() for t in library[TASKS[0]].values()))

folder = Path(tempfile.mkdtemp()) / "experts"
library.save(folder)
print(sorted(p.name for p in folder.iterdir()))
library = ExpertLibrary.load(folder)"""),
md("""Asking for a shape the library does not hold is an error at `add` time, not deep in a forward pass:"""),
code("""wide = reftkit.get_reft_model(model, {**CONFIG, "low_rank_dimension": 8})
try:
    library.add("wide", wide)
except ValueError as err:
    print(type(err).__name__, "-", err)
wide.detach();"""),
md("""## 2. Routes: experts and mixtures, one per row

An `ExpertRouter` attaches every route to the model at once — here the three experts, an even blend, and a
one-hot "mixture" — as one mixed-task `ReftModel`, so a batch whose rows take different routes runs in one
forward. A route of `None` is the base model. The one-hot mixture reproduces its expert bit for bit:"""),
code("""router = ExpertRouter(model, library, {**{t: t for t in TASKS}, "blend": [1 / 3] * 3,
                                       "one-hot": [1.0, 0.0, 0.0]})
enc = tokenizer([families["sentiment"]["eval"][0]["prompt"]] * 2, return_tensors="pt")
with torch.no_grad():
    both = router.reft(**enc, tasks=["sentiment", "one-hot"]).logits
print("max |expert − one-hot mixture| =", float((both[0] - both[1]).abs().max()))

prompts = [families[t]["eval"][0]["prompt"] for t in TASKS]
answers = [families[t]["eval"][0]["answer"] for t in TASKS]
pd.DataFrame({"task": TASKS, "label": answers,
              "base (None)": router.generate(tokenizer, prompts, [None] * 3, max_new_tokens=3),
              "own expert": router.generate(tokenizer, prompts, TASKS, max_new_tokens=3),
              "blend": router.generate(tokenizer, prompts, ["blend"] * 3, max_new_tokens=3)})"""),
md("""## 3. The three dispatch strategies

**(a) Prompt-based**, as published: the base model gets an *adaptation prompt* listing the categories (and
"other") and **generates** the category; `parse_category` reads the first category name in the generated text
(whole word, case-insensitive), and text that names none goes to the base model, counted as *unparsed*. The
prompt is reftkit's wording of the paper's (which describes each category); SmolLM2 is an instruct model, so
it is asked in its chat format. `method="rank"` is a reftkit option beside it: rank classification over the
names (one forward per candidate; never unparseable).

**(b) Classification expert**: a model trained to answer that same prompt. As in the paper, an **SVF vector**
`z_c` trained with **REINFORCE** on the model's own sampled answers — reward +1 when the generated category is
right, −1 otherwise (`kind="svf"`; here on the MLP matrices of the upper 15 layers, to keep the run short on
CPU). Beside it, a small **ReFT intervention** trained with cross entropy on the category names (`kind="reft"`).
Define-the-word prompts are the "other" examples of both."""),
code("""TEMPLATE = ("Classify the request below into exactly one of these categories: {categories}.\\n"
            "- sentiment: a movie review to judge positive or negative\\n"
            "- topic: a news article to file under a topic\\n"
            "- pos: a single word whose part of speech is asked\\n"
            "- other: anything else\\n"
            "Answer with the category name only.\\nRequest: {prompt}\\nCategory:")
held_out = [(t, r) for t in TASKS for r in families[t]["eval"]]
eval_prompts = [r["prompt"] for _, r in held_out]
gold = [t for t, _ in held_out]
routing_prompts = eval_prompts + other[:N_OTHER // 2]
routing_gold = gold + [None] * (N_OTHER // 2)

by_generation = prompt_dispatch(model, tokenizer, routing_prompts, TASKS, template=TEMPLATE, chat_template=True)
by_rank = prompt_dispatch(model, tokenizer, routing_prompts, TASKS, method="rank", template=TEMPLATE)
pd.DataFrame({"gold": [g or "other" for g in routing_gold], "generated": by_generation.generations,
              "parsed": [parse_category(g, TASKS) or "(unparsed)" for g in by_generation.generations],
              "rank": [c or "other" for c in by_rank]}).iloc[::max(1, N_EVAL // 2)]"""),
code("""train_rows = [(t, r["prompt"]) for t in TASKS for r in families[t]["train"]]
dispatcher = train_dispatch_expert(model, tokenizer, [p for _, p in train_rows] + other[N_OTHER // 2:],
                                   [t for t, _ in train_rows] + [None] * (N_OTHER - N_OTHER // 2), TASKS,
                                   kind="reft", template=TEMPLATE, epochs=EPOCHS, progress=False)
by_reft = expert_dispatch(dispatcher, tokenizer, routing_prompts, TASKS, template=TEMPLATE)

svf_rows = [(t, r["prompt"]) for t in TASKS for r in families[t]["train"][:N_SVF]]
svf_other = define_word_dataset(n_train=N_SVF, n_eval=1, seed=1)["train"]
svf_dispatcher = train_dispatch_expert(
    model, tokenizer, [p for _, p in svf_rows] + [r["prompt"] for r in svf_other],
    [t for t, _ in svf_rows] + [None] * len(svf_other), TASKS, kind="svf",
    config={"target_modules": r"layers\\.(1[5-9]|2[0-9])\\.mlp"}, template=TEMPLATE, chat_template=True,
    epochs=SVF_EPOCHS, batch_size=8, learning_rate=1e-2, max_new_tokens=4, seed=0, progress=False)
print(svf_dispatcher, "| SVF layers on the model outside expert_dispatch:", len(svf_modules(model)))
by_svf = expert_dispatch(svf_dispatcher, tokenizer, routing_prompts, TASKS, template=TEMPLATE, chat_template=True)
ax = svf_dispatcher.history.plot(x="step", y="reward_mean", marker="o", figsize=(5, 2.6), legend=False,
                                 title="SVF classification expert: REINFORCE reward per step")
ax.set_ylabel("mean reward (±1)");"""),
code("""def routing_table(chosen):
    frame = pd.DataFrame({"gold": [g or "other" for g in routing_gold], "routed": [c or "other" for c in chosen]})
    return pd.crosstab(frame.gold, frame.routed)

dispatchers = {"prompt (generate)": by_generation, "prompt (rank)": by_rank, "classifier (ReFT)": by_reft,
               "classifier (SVF)": by_svf}
pd.DataFrame([{"dispatcher": name, "routing accuracy (%)": 100 * sum(c == g for c, g in zip(chosen, routing_gold))
               / len(routing_gold), "unparsed": chosen.unparsed if chosen.generations is not None else None}
              for name, chosen in dispatchers.items()]).round(1)"""),
code("""for name in ("prompt (generate)", "classifier (SVF)"):
    print(name)
    display(routing_table(dispatchers[name]))"""),
md("""**(c) Few-shot**: for a task with a handful of labelled examples, the cross-entropy method searches the
mixing weights `α`, scoring each candidate by how many of the examples greedy decoding answers correctly
(ties broken by the answers' likelihood)."""),
code("""few_shot = {}
for task in TASKS:
    shots = families[task]["train"][:SHOTS]
    result = few_shot_weights(library, model, tokenizer, [r["prompt"] for r in shots], [r["answer"] for r in shots],
                              population=POPULATION, iterations=ITERATIONS, seed=0, progress=False)
    few_shot[task] = result.best.tolist()
    print(f"{task:9s} α = {[round(a, 2) for a in few_shot[task]]}  best (accuracy, mean log-lik) on the shots:",
          tuple(round(s, 3) for s in result.best_score))
ax = result.history.plot(x="iteration", y=["best_score", "population_mean_score"], marker="o",
                         title=f"CEM on the '{task}' shots", figsize=(5, 3))
ax.set_ylabel("accuracy on the shots");"""),
md("""## 4. Two passes over one mixed batch

The first pass dispatches every prompt; the second generates each row with its own route — different experts
(and few-shot mixtures) side by side in the same batches."""),
code("""router.detach()
router = ExpertRouter(model, library, {**{t: t for t in TASKS}, **{f"{t}/few-shot": w for t, w in few_shot.items()}})
mixed_batch = [families[t]["eval"][i]["prompt"] for i in range(min(2, N_EVAL)) for t in TASKS]
table = two_pass_generate(router, tokenizer, mixed_batch,
                          lambda p: expert_dispatch(dispatcher, tokenizer, p, TASKS, template=TEMPLATE),
                          max_new_tokens=3)
table["prompt"] = table.prompt.str.slice(0, 50).str.replace("\\n", " ")
table"""),
md("""## 5. Accuracy per strategy, beside the oracle

`reftkit.experts.study.dispatch_study` runs all of the above end to end (here reusing this notebook's experts,
dispatchers and few-shot weights; by default it trains its own) and answers every held-out prompt with each
strategy: the base model, **one multi-task intervention** of the same shape trained on all three tasks at once,
**oracle** routing (each prompt with its own task's expert — the ceiling for a dispatcher), the two prompt-based
dispatchers, the two classification experts, and few-shot mixing (which is told each prompt's task, as in
Transformer²'s few-shot setting). Accuracy: the first generated word is the label; `routing_accuracy` also counts
the no-task prompts (right when sent to the base model); `vs oracle` is the mean accuracy minus the oracle's."""),
code("""router.detach()
from reftkit.experts.study import dispatch_study

study = dispatch_study(
    model, tokenizer, families, CONFIG, other_prompts=other, epochs=EPOCHS, library=library, dispatcher=dispatcher,
    few_shot=few_shot, prompt_options={"template": TEMPLATE, "chat_template": True}, progress=False,
    dispatchers={"classifier (SVF)": lambda p: expert_dispatch(svf_dispatcher, tokenizer, p, TASKS, template=TEMPLATE,
                                                               chat_template=True)})
dispatcher.detach()
table = study.table.drop(columns=["generate_s"])
table["vs oracle"] = table["mean"] - table.set_index("strategy").loc["oracle", "mean"]
table.round(1)"""),
code("""ax = study.table.set_index("strategy")[TASKS + ["mean"]].plot.bar(figsize=(9, 3.2), rot=20)
ax.set_ylabel("accuracy (%)"); ax.set_title("held-out accuracy per strategy (this notebook's run)")
ax.legend(ncol=4, fontsize=8);"""),
md("""## 6. Library experts trained with REINFORCE

Transformer² trains its experts with REINFORCE rather than cross entropy: sample an answer, reward it +1 when
right and −1 when wrong, and follow `−(1/N) Σ r log π(y|x) + λ KL(π_ref ‖ π)`. `train_expert(...,
objective="reinforce")` trains a library expert that way (`reward=` takes any scorer; the default rewards a
completion that starts with the answer). Here a sentiment expert of the library's shape, from scratch, with a
small KL term, beside the cross-entropy expert — the oracle for this task — and the base model:"""),
code("""rows = families["sentiment"]["train"]
rl_expert, rl_history = train_expert(model, tokenizer, [r["prompt"] for r in rows], [r["answer"] for r in rows], CONFIG,
                                     objective="reinforce", epochs=RL_EPOCHS, learning_rate=4e-3, progress=False,
                                     return_history=True, training={"max_new_tokens": 3, "kl_coef": 0.05})
sentiment = families["sentiment"]["eval"]
labels = [first_word(r["answer"]) for r in sentiment]
prompts = [r["prompt"] for r in sentiment]

def accuracy(completions):
    return 100 * sum(first_word(c) == lab for c, lab in zip(completions, labels)) / len(labels)

from reftkit.analysis.text_metrics import generate_predictions

rl_completions = generate_predictions(rl_expert, tokenizer, prompts, max_new_tokens=3, progress=False)
rl_expert.detach()
router = ExpertRouter(model, library, {"sentiment": "sentiment"})
rl_table = pd.DataFrame({
    "sentiment expert": ["none (base model)", "cross entropy (the oracle's)", "REINFORCE"],
    "accuracy (%)": [accuracy(router.generate(tokenizer, prompts, [None] * len(prompts), max_new_tokens=3)),
                     accuracy(router.generate(tokenizer, prompts, ["sentiment"] * len(prompts), max_new_tokens=3)),
                     accuracy(rl_completions)]})
router.detach()
print(rl_history[["step", "reward_mean", "kl"]].round(3).to_string(index=False))
rl_table.round(1)"""),
md("""## 7. The full-size run

`python benchmarks/bench_experts.py --write` runs the same study with 256 training examples per task, 64
held-out prompts per task, 32 no-task prompts for routing and CEM with Transformer²'s population 32 and elite
ratio 0.2 on 8 shots, for 10 iterations (its 50 would take hours on two CPU cores; `few_shot_weights` keeps 50
as its default). It writes the table to `benchmarks/RESULTS.md` and
`benchmarks/experts_dispatch.csv`, shown here when present (a run from before generated dispatch: its
`prompt` and `classifier` rows rank-classify the names):"""),
code("""csv = Path(reftkit.__file__).resolve().parents[1] / "benchmarks" / "experts_dispatch.csv"
full = pd.read_csv(csv) if csv.is_file() else None
full.round(1) if full is not None else print(
    "benchmarks/experts_dispatch.csv not found (installed without the repo)")"""),
md("""**Reading the tables.** The oracle row is what the experts can do when every prompt reaches its own
expert; a dispatcher can at best match it, and its routing accuracy says how much it loses on the way. In this
notebook's run (64 training and 16 held-out prompts per task, 8 no-task prompts for routing):

* **prompt (generate)**, the paper's strategy (a), routes only 28.6%: SmolLM2-135M mostly answers the request
  itself ("positive", "business") instead of naming its category, so 48 of the 56 routing prompts are unparsed
  and go to the base model — 43.8 points under the oracle. A model this small does not follow the adaptation
  prompt; the paper's models have 8B-70B parameters.
* **prompt (rank)**, the same question rank-classified over the names (a reftkit option), routes 57.1% and ends
  10.4 points under the oracle, most of it on pos.
* **classifier (SVF)**, strategy (b) as published — an SVF vector trained with REINFORCE for 24 steps on 64
  prompts — learns to name sentiment and topic (all of them routed right) but not pos, and sends the no-task
  prompts to sentiment: 57.1% routing, 14.6 points under the oracle.
* **classifier (ReFT)**, a LoReFT intervention trained with cross entropy on all 200 dispatch prompts, routes
  85.7%, and its misses cost nothing here: it matches the oracle on every task.
* **few-shot** mixing (told each prompt's task, 4 shots, a 5-iteration CEM) ends 6.2 points under the oracle.
* the single **multi-task** intervention — the same 13,836 parameters trained on all three tasks' examples at
  once — beats the oracle by 14.6 points: for three short-answer tasks that share a format, pooling the data
  beat splitting it.

The REINFORCE sentiment expert of section 6 reaches 56.2% after one pass (8 steps) from the base model's 12.5%;
the cross-entropy expert, trained on the same 64 examples, 68.8%. The full-size benchmark of section 7 predates
generated dispatch: there the classification expert routed every held-out prompt and matched the oracle, and
rank-classified prompt dispatch routed 55.4%; `benchmarks/RESULTS.md` has its reading."""),
]
write(nb, "06_experts_and_dispatch.ipynb")
