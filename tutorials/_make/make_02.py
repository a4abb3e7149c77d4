"""Writes tutorials/02_instruction_tuning_1k.ipynb; with ``--execute`` also runs it with the full parameters
(1,000 examples, 3 epochs, 200 held-out words: about half an hour on 2 CPU cores) and stores the outputs."""
import nbformat as nbf
from notebook_writer import write

nb = nbf.v4.new_notebook()
md, code = nbf.v4.new_markdown_cell, nbf.v4.new_code_cell
nb["cells"] = [
md("""# 02 — Instruction tuning with ~1,000 examples

The ReFT recipe: a frozen model, rank-4 LoReFT at a few layers on the last prompt token, about a
thousand supervised examples. The data is real and ships in a package: **WordNet** glosses
("Define the word X." → the gloss), installed by the project's set-up (Debian `wordnet-base`).
Evaluation uses **held-out words** the model never saw in training, scored with ROUGE-L and BLEU-4
on greedy generations, before and after tuning.

The same run is one command: `reftkit train configs/wordnet_1k.yaml`."""),
code("""# Parameters: the stored outputs come from these; the test suite runs a tiny version
N_TRAIN = 1000
N_EVAL = 200
EPOCHS = 3
MAX_NEW_TOKENS = 48
OUTPUT_DIR = "runs/wordnet_1k_notebook"
THREADS = 1          # torch CPU threads (1 is steadiest when other jobs share the cores)""",
     metadata={"tags": ["parameters"]}),
code("""%matplotlib inline
import json
import time
import warnings
from pathlib import Path

warnings.filterwarnings("ignore", message="IProgress not found")
import pandas as pd
import torch
import yaml
from matplotlib.figure import Figure
from transformers.utils import logging as hf_logging

import reftkit
from reftkit.cli.recipe import read_config, run_train
from reftkit.data.datasets import define_word_dataset

hf_logging.disable_progress_bar()
hf_logging.set_verbosity_error()
if THREADS:
    torch.set_num_threads(THREADS)
pd.set_option("display.max_colwidth", None)
started = time.time()
# the recipe's config lives in the repository's configs/ folder (next to tutorials/)
repo = Path(reftkit.__file__).resolve().parents[1]
config = read_config(repo / "configs" / "wordnet_1k.yaml")
config["data"].update(n_train=N_TRAIN, n_eval=N_EVAL)
config["training"]["num_train_epochs"] = EPOCHS
config["eval"]["max_new_tokens"] = MAX_NEW_TOKENS
config["output_dir"] = OUTPUT_DIR
print(yaml.safe_dump({k: config[k] for k in ("model", "representations", "training")}, sort_keys=False))"""),
md("""## The data

Train and evaluation words are disjoint (and so are their synsets, so synonyms cannot leak a gloss)."""),
code("""sets = define_word_dataset(n_train=N_TRAIN, n_eval=N_EVAL, seed=0, min_count=config["data"]["min_count"])
for row in sets["train"][:3] + sets["eval"][:2]:
    print(f"{row['prompt']!r:40} -> {row['response']!r}")
assert not {r["word"] for r in sets["train"]} & {r["word"] for r in sets["eval"]}
print(f"{len(sets['train'])} training words, {len(sets['eval'])} held-out words")"""),
md("""## Train and evaluate

`run_train` scores the untuned model on the held-out words, trains with `ReftTrainer`
(a `transformers.Trainer`: checkpoints hold only the interventions; the loss computes vocabulary
logits only where there is a label; with `suffix_training: auto`, the config's default, each prompt up to its
intervened last token runs once without autograd and later epochs read its keys/values from a store, so only
the rest of each example runs forward and backward), scores again, and writes `metrics.json`,
`predictions.jsonl` (every held-out answer before and after) and the trained interventions."""),
code("""metrics = run_train(config, progress=False)   # no progress bars in the stored notebook
print(f"trainable parameters: {metrics['trainable_parameters']:,} of {metrics['model_parameters']:,} "
      f"({100 * metrics['trainable_parameters'] / metrics['model_parameters']:.4f} %)")
print(sorted(p.name for p in Path(OUTPUT_DIR).iterdir()))"""),
md("""## Scores on the held-out words

ROUGE-1/2/L (F-measure, ×100) and corpus BLEU-4 (sacrebleu) of the greedy answers against the WordNet
glosses of words never seen in training, before and after tuning."""),
code("""names = {"rouge1": "ROUGE-1", "rouge2": "ROUGE-2", "rougeL": "ROUGE-L", "bleu4": "BLEU-4",
         "exact_match": "exact match %"}
scores = pd.DataFrame({"before (bare model)": metrics["before"], "after LoReFT": metrics["after"]}).loc[list(names)]
scores["change"] = scores["after LoReFT"] - scores["before (bare model)"]
scores.rename(index=names).round(2)"""),
md("""## Before and after, side by side

The same held-out prompts, answered greedily by the bare model and by the tuned one."""),
code("""rows = [json.loads(line) for line in (Path(OUTPUT_DIR) / "predictions.jsonl").read_text().splitlines()]
side_by_side = pd.DataFrame(rows)[["prompt", "reference", "before", "after"]]
side_by_side.head(8)"""),
md("""## The loss curve and the time it took"""),
code("""steps, losses = zip(*metrics["loss_curve"])
fig = Figure(figsize=(6.5, 3.5))
ax = fig.subplots()
ax.plot(steps, losses, marker=".")
ax.set_xlabel("optimisation step (batch of 8)")
ax.set_ylabel("training loss (cross-entropy, nats/token)")
ax.set_title(f"LoReFT r4 on {N_TRAIN:,} WordNet definitions, {EPOCHS} epochs")
fig.tight_layout()
fig.savefig(Path(OUTPUT_DIR) / "loss_curve.png")
fig"""),
code("""n_steps = metrics["train_steps"]
print(f"training: {metrics['train_seconds']:.0f} s for {n_steps} steps "
      f"({metrics['train_seconds'] / n_steps:.2f} s/step, {torch.get_num_threads()} torch thread(s))")
print(f"the whole run (load, evaluate before, train, evaluate after): {metrics['total_seconds'] / 60:.1f} min; "
      f"peak RSS {metrics['peak_rss_mb']:,.0f} MB")
if "prefix_cache" in metrics:
    print("frozen-prefix cache:", metrics["prefix_cache"])
print(f"notebook ran in {time.time() - started:.0f} s")"""),
md("""## What this run shows

* **Tuning 13,836 parameters (0.01 % of the model) on 1,000 definitions doubles ROUGE-L on words the model
  never saw**: 10.07 → 19.69, BLEU-4 0.31 → 3.04, ROUGE-2 1.30 → 5.41. Two of the 200 held-out answers
  are now exactly WordNet's gloss (exact match 1 %).
* **The answers change form more than knowledge.** The bare model writes chatty paragraphs ("The word
  "solar" is derived from the Latin word ..."); after tuning it answers in WordNet's register — one short
  gloss, often "Of or belonging to ...", "The act of ...", "A person who ..." ("solar" → "Of or belonging
  to the sun.", "burial" → "The act of burying or disposing of human remains."). Where the bare model did
  not know the word ("upright", "strait") the tuned one is wrong too, only shorter: the intervention
  teaches the format, not new meanings.
* **The loss** falls fast in the first 30 steps (3.39 → 2.36) and then slowly: the mean logged loss is
  2.60, 2.44 and 2.40 in epochs 1, 2 and 3 — the third epoch adds little on this task.
* **Time.** Training took 1,453 s (3.9 s/step on one torch thread) and the whole notebook 32 min, while
  three other notebooks ran on the same 2 cores; `reftkit train configs/wordnet_1k.yaml` with both cores
  trained in 661 s (`benchmarks/RESULTS.md`, recipes section). Epochs 2 and 3 reuse the frozen layers 0–7 from a cache
  (2,000 hits, 107 MB)."""),
]
# the README's results table reads the stored run's metrics (benchmarks/readme_results.py)
write(nb, "02_instruction_tuning_1k.ipynb",
      keep={"runs/wordnet_1k_notebook/metrics.json": "benchmarks/wordnet_1k_metrics.json"})
