#!/usr/bin/env python
"""The README's figure and results table, made from the measurements stored in this folder.

* ``benchmarks/compare_1k.csv`` (``bench_compare.py --write``): every method trained on the 1k WordNet
  recipe for one epoch and scored on 200 held-out words;
* ``benchmarks/wordnet_1k_metrics.json`` (stored by ``tutorials/_make/make_02.py --execute``, the full
  recipe: 3 epochs): scores before and after, parameters, time.

    python benchmarks/readme_results.py           # write docs/images/compare_1k.png and README's table
    python benchmarks/readme_results.py --check   # exit 1 if README or the figure is not what the files give
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
COMPARE = ROOT / "benchmarks" / "compare_1k.csv"
RECIPE = ROOT / "benchmarks" / "wordnet_1k_metrics.json"
FIGURE = ROOT / "docs" / "images" / "compare_1k.png"
README = ROOT / "README.md"
BEGIN, END = "<!-- results:BEGIN -->", "<!-- results:END -->"
# the rows of the method table: ReFT against the weight-space methods people know and full fine-tuning
# (their times were measured back to back; the figure shows every method)
SHOWN = {"base": "bare model", "loreft": "LoReFT r4 (reftkit)", "lora": "LoRA r8 (peft)", "fpft": "full fine-tuning"}


def _parameters(n: float) -> str:
    if n == 0:
        return "0"
    return f"{n / 1e6:.1f} M" if n >= 1e6 else f"{n:,.0f}"


def _size(n_bytes: float) -> str:
    return f"{n_bytes / 2 ** 20:,.0f} MB" if n_bytes >= 2 ** 20 else f"{n_bytes / 1024:.0f} KB"


def results_block(compare: pd.DataFrame, recipe: dict) -> str:
    """The markdown between README's results markers."""
    before, after = recipe["before"], recipe["after"]
    steps = recipe["train_steps"]
    lines = [
        BEGIN,
        "**The 1k recipe** (tutorial 02, `reftkit train configs/wordnet_1k.yaml`): SmolLM2-135M-Instruct, "
        f"{recipe['n_train']:,} WordNet definitions, LoReFT r4 at layers 8/16/24 on the last prompt token "
        f"({recipe['trainable_parameters']:,} parameters, "
        f"{100 * recipe['trainable_parameters'] / recipe['model_parameters']:.3f} % of the model), "
        f"{steps} steps in {recipe['train_seconds'] / 60:.0f} min of training on a shared 2-core CPU; "
        f"{recipe['n_eval']} held-out words:",
        "",
        "| held-out words | bare model | after LoReFT |",
        "| --- | --- | --- |",
        f"| ROUGE-L | {before['rougeL']:.1f} | **{after['rougeL']:.1f}** |",
        f"| BLEU-4 | {before['bleu4']:.2f} | **{after['bleu4']:.2f}** |",
        "",
        "**LoReFT against weight-space methods** (`benchmarks/bench_compare.py`, one epoch of the same data, "
        "each method's default learning rate, one seed; train time on one CPU thread, the three measured back to "
        "back, see `benchmarks/RESULTS.md`):",
        "",
        "| method | trainable parameters | saved weights | ROUGE-L | BLEU-4 | train time |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name, label in SHOWN.items():
        row = compare[compare["method"] == name]
        if row.empty:
            raise SystemExit(f"{COMPARE.name} has no row for method {name!r}; run bench_compare.py with it")
        row = row.iloc[0]
        size = "–" if pd.isna(row["file_size"]) else _size(row["file_size"])
        time_s = "–" if pd.isna(row["train_time"]) else f"{row['train_time'] / 60:.1f} min"
        lines.append(f"| {label} | {_parameters(row['num_trainable_params'])} | {size} | {row['rougeL']:.1f} | "
                     f"{row['bleu4']:.2f} | {time_s} |")
    lines += ["", "Made by `python benchmarks/readme_results.py` from `benchmarks/compare_1k.csv` and "
              "`benchmarks/wordnet_1k_metrics.json`.", END]
    return "\n".join(lines)


def figure(compare: pd.DataFrame):
    from reftkit.analysis import plot_comparison

    fig = plot_comparison(compare, metric="rougeL")
    fig.suptitle("1k WordNet recipe, one epoch: held-out ROUGE-L against trainable parameters, and training time")
    return fig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="compare README with the files instead of writing")
    args = parser.parse_args()
    compare, recipe = pd.read_csv(COMPARE), json.loads(RECIPE.read_text())
    block = results_block(compare, recipe)
    readme = README.read_text()
    if readme.count(BEGIN) != 1 or readme.count(END) != 1:
        raise SystemExit(f"README.md needs exactly one {BEGIN} ... {END} section")
    head, rest = readme.split(BEGIN)
    current = BEGIN + rest.split(END)[0] + END
    if args.check:
        problems = [] if current == block else ["README's results table differs from what the files give"]
        if not FIGURE.is_file():
            problems.append(f"{FIGURE.relative_to(ROOT)} is missing")
        if problems:
            sys.exit("; ".join(problems) + "; run python benchmarks/readme_results.py")
        return
    README.write_text(readme.replace(current, block))
    FIGURE.parent.mkdir(parents=True, exist_ok=True)
    figure(compare).savefig(FIGURE, dpi=110)
    print(f"wrote {FIGURE.relative_to(ROOT)} and README's results table")


if __name__ == "__main__":
    main()
