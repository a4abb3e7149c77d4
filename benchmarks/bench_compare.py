#!/usr/bin/env python
"""ReFT against weight-space and prompt methods on the 1k WordNet recipe, with ``reftkit.analysis.compare``.

Every method trains SmolLM2-135M-Instruct (float32, CPU) on the same 1,000 "Define the word X." ->
gloss examples (chat template), with the recipe's budget: batch 8, AdamW, linear decay after 10
warm-up steps, length-grouped batches, seed 0, ``--epochs`` epochs (default 1; the recipe itself
runs 3). Each is scored by greedy generation (48 new tokens) on the recipe's 200 held-out words.

Methods and their options (learning rates are :mod:`reftkit.analysis.methods`' defaults, untuned):
LoReFT and DiReFT as the recipe (rank 4, layers 8/16/24, last prompt token); LoRA r 8 on every
linear layer; IA3 peft's defaults; SVF on every MLP matrix; prompt tuning, P-Tuning v2, prefix tuning
and P-tuning with 10 virtual tokens; full fine-tuning; and the untrained base model.

Each method runs in a fresh process (``--worker``), one after the other, so its peak RSS and time
are its own.

    python benchmarks/bench_compare.py --write                  # full (~1 h on 2 cores, 1 thread)
    python benchmarks/bench_compare.py --n-train 32 --n-eval 8  # smoke run
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

RECIPE_REPRESENTATION = {"layer": [8, 16, 24], "component": "block_output", "positions": "l1",
                         "low_rank_dimension": 4}
METHODS = {
    "base": {}, "loreft": RECIPE_REPRESENTATION, "direft": RECIPE_REPRESENTATION, "lora": {}, "ia3": {},
    "svf": {}, "prompt_tuning": {}, "p_tuning_v2": {}, "prefix_tuning": {}, "p_tuning": {}, "fpft": {},
}
OUT = Path(__file__).resolve().parent / "compare_1k.csv"


def worker(method: str, args: argparse.Namespace, out: Path) -> None:
    import torch

    import reftkit
    from reftkit.analysis import Method, compare
    from reftkit.data.datasets import define_word_dataset

    torch.set_num_threads(args.threads)
    model, tokenizer = reftkit.load_model("smollm2", dtype=torch.float32)
    data = define_word_dataset(n_train=args.n_train, n_eval=args.n_eval, seed=0, min_count=3)
    training = {"num_train_epochs": args.epochs, "per_device_train_batch_size": 8, "lr_scheduler_type": "linear",
                "warmup_steps": 10, "weight_decay": 0.0, "train_sampling_strategy": "group_by_length",
                "logging_steps": 10, "disable_tqdm": True}
    frame = compare(model, tokenizer, [r["prompt"] for r in data["train"]], [r["response"] for r in data["train"]],
                    [r["prompt"] for r in data["eval"]], [r["response"] for r in data["eval"]],
                    [Method(method, METHODS[method])], training=training, seed=0, chat_template=True,
                    max_new_tokens=48, eval_batch_size=16, progress=False)
    out.write_text(frame.to_json(orient="records"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-train", type=int, default=1000)
    parser.add_argument("--n-eval", type=int, default=200)
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker (1: see RESULTS.md)")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--write", action="store_true", help="write the table into benchmarks/RESULTS.md")
    parser.add_argument("--update", action="store_true",
                        help="with --write: replace only the rows of --methods in compare_1k.csv, keep the others "
                             "(each row's `measured` date says when it was run)")
    parser.add_argument("--from-csv", help="write RESULTS.md from a CSV of an earlier run instead of running")
    parser.add_argument("--note", default="", help="a sentence about the run's conditions, added to RESULTS.md")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker, args, Path(args.out))

    import pandas as pd

    if args.from_csv:
        frame = pd.read_csv(args.from_csv)
        frame.to_csv(OUT, index=False)
        return write_results(frame, args)
    methods = args.methods.split(",")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        parser.error(f"unknown methods {unknown}; choose from {list(METHODS)}")
    rows = []
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false",
           "PYTHONWARNINGS": "ignore"}
    with tempfile.TemporaryDirectory(prefix="reftkit-bench-compare-") as tmp:
        for method in methods:
            out = Path(tmp) / f"{method}.json"
            start = time.perf_counter()
            cmd = [sys.executable, __file__, "--worker", method, "--out", str(out), "--n-train", str(args.n_train),
                   "--n-eval", str(args.n_eval), "--epochs", str(args.epochs), "--threads", str(args.threads)]
            subprocess.run(cmd, env=env, check=True)
            rows += [{**row, "measured": time.strftime("%Y-%m-%d")} for row in json.loads(out.read_text())]
            print(f"{method}: done in {time.perf_counter() - start:.0f} s", flush=True)
    frame = pd.DataFrame(rows)
    print(frame.to_string())
    if args.update:
        if not args.write:
            parser.error("--update merges into compare_1k.csv and RESULTS.md; give --write with it")
        kept = pd.read_csv(OUT)
        kept = kept[~kept["method"].isin(methods)]
        order = {name: i for i, name in enumerate(METHODS)}
        frame = pd.concat([kept, frame], ignore_index=True).sort_values("method", key=lambda c: c.map(order))
        frame = frame.reset_index(drop=True)
    if args.write:
        frame.to_csv(OUT, index=False)
        write_results(frame, args)


def write_results(frame, args: argparse.Namespace) -> None:
    from results_md import cpu_model, md_table, write_section

    begin, end = "<!-- bench_compare:BEGIN -->", "<!-- bench_compare:END -->"
    table = frame.assign(
        params=frame["num_trainable_params"].map(lambda n: f"{n:,}"),
        share=frame["trainable_percent"].map(lambda v: f"{v:.4f}%"),
        file_kb=(frame["file_size"] / 1024).round(1),
        train_s=frame["train_time"].round(1),
        peak_rss_mb=frame["peak_rss_mb"].round(0),
        loss=frame["train_loss"].round(3),
        latency_s=frame["inference_latency_s"].round(2),
        tok_s=frame["tokens_per_s"].round(1),
        learning_rate=frame["learning_rate"].map(lambda v: f"{v:.0e}" if v else "–"),
        measured=frame["measured"] if "measured" in frame else None,
    ).astype(object).fillna("–")[["method", "params", "share", "file_kb", "train_s", "loss", "peak_rss_mb", "bleu4",
                                  "rouge1", "rouge2", "rougeL", "exact_match", "latency_s", "tok_s", "learning_rate",
                                  "measured"]]
    command = "python benchmarks/bench_compare.py --write" + (
        "" if (args.n_train, args.n_eval, args.epochs) == (1000, 200, 1.0)
        else f" --n-train {args.n_train} --n-eval {args.n_eval} --epochs {args.epochs}")
    if args.update:
        command += f" --methods {args.methods} --update"
    lines = [
        begin, "## bench_compare: ReFT vs weight-space and prompt methods on the 1k WordNet recipe", "",
        f"Command: `{command}` (CPU: {cpu_model()}, {args.threads} torch thread per method, each method in a "
        "fresh process). Also written to `benchmarks/compare_1k.csv`.", "",
        f"SmolLM2-135M-Instruct float32; {args.n_train} training examples, {args.epochs:g} epoch(s), batch 8, "
        f"AdamW with linear decay, seed 0; scores on {args.n_eval} held-out words, greedy, 48 new tokens, "
        "batch 16. `params`: trainable parameters (share of the base model's); `file_kb`: the saved weights; "
        "`train_s`: wall time of `train()`; `peak_rss_mb`: peak resident memory while training; `latency_s`: "
        "mean wall time of one generate call (16 prompts); `tok_s`: generated tokens (to each row's EOS) per "
        "second.", *([args.note] if args.note else []), "",
        md_table(table), "", end]
    write_section(begin, end, "\n".join(lines))


if __name__ == "__main__":
    main()
