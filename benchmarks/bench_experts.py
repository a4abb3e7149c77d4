#!/usr/bin/env python
"""Experts and dispatch (issue 6): accuracy per strategy on three task families, full size.

Three LoReFT experts (rank 4, block_output of layers 6, 12, 18, positions f1+l1) are trained on
SmolLM2-135M-Instruct, one per task family of ``reftkit.data.datasets.task_families`` (sentiment: Rotten
Tomatoes; topic: BBC News; part of speech: WordNet); held-out prompts are answered by each strategy
of ``reftkit.experts.study.dispatch_study``: the base model, one multi-task intervention of the same
shape trained on all three tasks, oracle routing, prompt-based dispatch, a classification expert, and
few-shot CEM mixing (population 32 and elite ratio 0.2 as Transformer², 8 shots per task, 10 iterations
instead of its 50: on 2 CPU cores 50 iterations would take hours).
Define-the-word prompts (WordNet) belong to no task: half train the classification expert's "other"
class, half count towards routing accuracy (they should go to the base model).

    python benchmarks/bench_experts.py --write        # the full run (about 45 min, 1 thread)
    python benchmarks/bench_experts.py --n-train 16 --n-eval 4 --population 5 --iterations 1   # smoke
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_md import write_section  # noqa: E402

HERE = Path(__file__).resolve().parent
CSV = HERE / "experts_dispatch.csv"
CONFIG = {"layer": [6, 12, 18], "component": "block_output", "positions": "f1+l1", "intervention": "loreft",
          "low_rank_dimension": 4}
BEGIN, END = "<!-- bench_experts:begin -->", "<!-- bench_experts:end -->"


def run(args: argparse.Namespace):
    import reftkit
    from reftkit.data.datasets import define_word_dataset, task_families
    from reftkit.experts.study import dispatch_study

    torch.set_num_threads(args.threads)
    model, tokenizer = reftkit.load_model("smollm2", dtype=torch.float32)
    families = task_families(args.n_train, args.n_eval, seed=args.seed)
    no_task = define_word_dataset(n_train=args.n_other, n_eval=args.n_other, seed=args.seed)["eval"]
    other = [r["prompt"] for r in no_task]
    start = time.perf_counter()
    result = dispatch_study(model, tokenizer, families, CONFIG, other_prompts=other, epochs=args.epochs,
                            learning_rate=args.learning_rate, shots=args.shots, population=args.population,
                            iterations=args.iterations, seed=args.seed)
    return result, time.perf_counter() - start


def section(result, args: argparse.Namespace, seconds: float) -> str:
    table, few_shot = result.table, result.few_shot
    cols = ["sentiment", "topic", "pos", "mean", "routing_accuracy"]
    lines = [BEGIN, "## bench_experts — experts, dispatch and few-shot mixing (issue 6)", "",
             "Command: `python benchmarks/bench_experts.py --write` "
             f"(n_train {args.n_train} per task, n_eval {args.n_eval} per task, {args.n_other // 2} other prompts "
             f"for routing, {args.epochs:g} epoch, lr {args.learning_rate:g}, CEM population {args.population}, "
             f"{args.iterations} iterations, {args.shots} shots, {args.threads} thread; {seconds / 60:.0f} min). "
             f"Table also in `benchmarks/{CSV.name}`.", "",
             "Accuracy (%) of the first generated word on held-out prompts; routing accuracy (%) counts prompts "
             "sent to their own task's expert (and the no-task prompts sent to the base model).", "",
             "| strategy | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for _, row in table.iterrows():
        cells = ["–" if row[c] != row[c] else f"{row[c]:.1f}" for c in cols]
        lines.append(f"| {row['strategy']} | " + " | ".join(cells) + " |")
    weights = "; ".join(f"{t}: " + ", ".join(f"{w:.2f}" for w in ws) for t, ws in few_shot.items())
    steps = ", ".join(f"{k} {v / 60:.1f} min" for k, v in result.seconds.items())
    lines += ["", f"Few-shot CEM weights over the experts (sentiment, topic, pos): {weights}.", "",
              f"Wall time per step: {steps}.", END]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-train", type=int, default=256)
    parser.add_argument("--n-eval", type=int, default=64)
    parser.add_argument("--n-other", type=int, default=64, help="no-task prompts (half train, half route)")
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--learning-rate", type=float, default=4e-3)
    parser.add_argument("--shots", type=int, default=8)
    parser.add_argument("--population", type=int, default=32)
    parser.add_argument("--iterations", type=int, default=10,
                        help="CEM iterations (the API's default is the released code's 50; one iteration scores "
                             "32 candidates on 8 shots with SmolLM2, several minutes per task on 1 CPU thread)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--write", action="store_true", help="write the table into benchmarks/RESULTS.md and the CSV")
    args = parser.parse_args(argv)
    result, seconds = run(args)
    print(result.table.round(1).to_string(index=False))
    text = section(result, args, seconds)
    print(text)
    if args.write:
        result.table.to_csv(CSV, index=False)  # numbers only: the prompts are package data, not repo files
        write_section(BEGIN, END, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
