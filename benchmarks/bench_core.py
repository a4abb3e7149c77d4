#!/usr/bin/env python
"""Core speed benchmark of reftkit: one training step and greedy generation, on CPU in float32.

Compared on the same base weights, the same LoReFT weights and the same positions:

train (forward + backward + AdamW step on the intervention parameters, one fixed right-padded batch)
  bare_fwd     the frozen base model, forward with the loss only (no graph: nothing requires grad)
  bare_fwdbwd  the frozen base model, forward + backward from ``inputs_embeds`` that require grad
               (backward runs through *all* layers, slightly more than a ReFT step, which stops at
               the first intervened layer) -- a floor/ceiling pair, not a target
  hook         a minimal hand-written ``register_forward_hook`` per layer that applies reftkit's own
               LoReFT modules at precomputed gather/scatter indices ("the same math, no framework")
  reftkit      ``reft(input_ids, attention_mask, labels)`` (positions computed per call, as users do)
  pyreft       pyreft 0.1.0 / pyvene 0.1.8 / transformers 4.45.1 in their own venv (a worker
               subprocess driven step by step over a pipe, so the measurements interleave)
  hook@4.45    the same minimal hook inside the pyreft worker, applying pyreft's LoreftIntervention
               modules: pyreft / hook@4.45 isolates pyvene's overhead from the transformers version

generate (greedy, 32 new tokens, exactly: ``min_new_tokens=max_new_tokens``; left-padded prompts)
  bare         ``model.generate``            reftkit   ``reft.generate``
  bare@4.45    ``model.generate`` in 4.45.1  pyreft    ``reft_model.generate(intervene_on_prompt=True)``

Measurement: warm-up rounds, then N rounds; every round runs every variant once, in an order rotated
each round (ABC, BCA, CAB, ...), each after ``gc.collect()`` and a short sleep, so drift on a shared
machine hits all variants alike. Reported: the median and quartiles per variant, and for ratios the
median of the per-round (paired) ratios. Before timing, the logits of reftkit, the hook and pyreft on
the benchmark batch must agree to 1e-4 (real tokens), and reftkit's and the hook's intervention
gradients must agree, so the numbers compare the same computation.

    python benchmarks/bench_core.py                 # tiny + smollm2, prints the tables
    python benchmarks/bench_core.py --write         # ... and records them in benchmarks/RESULTS.md
    python benchmarks/bench_core.py --quick         # smoke run (< 1 min)

The pieces live in this folder: ``step_variants.py`` builds, checks and times the variants,
``step_report.py`` makes the tables and the RESULTS.md section, ``pyreft_step_worker.py`` is the
pyreft side (run with the pyreft venv's python; ``--worker DIR`` here runs it too), ``minimal_hook.py``
is the hand-written baseline and ``timing.py`` the interleaved timing.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

import step_report
import torch
from pyreft_step_worker import worker_main
from pyreft_venv import PYREFT_PYTHON
from results_md import RESULTS, cpu_model
from step_variants import SIZES, bench_size


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default=None, help="comma list of: tiny, smollm2 (default both; --quick: tiny)")
    ap.add_argument("--repeats", type=int, default=None, help="timed rounds (default per size: tiny 30, smollm2 5)")
    ap.add_argument("--warmup", type=int, default=None, help="warm-up rounds (default per size)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads in both processes (default 1: on a shared 2-core machine, 2 threads "
                         "turn any background job into 10-40x stalls at OpenMP barriers)")
    ap.add_argument("--new-tokens", type=int, default=None, help="generated tokens (default 32; --quick: 8)")
    ap.add_argument("--no-pyreft", action="store_true", help="skip the pyreft 0.1.0 worker")
    ap.add_argument("--quick", action="store_true", help="smoke run: small batches, few rounds (< 1 min)")
    ap.add_argument("--write", action="store_true", help=f"record the results in {RESULTS}")
    ap.add_argument("--worker", metavar="DIR", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker_main(args.worker)
        return 0

    import pandas as pd
    from tqdm.auto import tqdm

    t0 = time.time()
    torch.set_num_threads(args.threads)
    if args.new_tokens is None:
        args.new_tokens = 8 if args.quick else 32
    sizes = (args.sizes or ("tiny" if args.quick else "tiny,smollm2")).split(",")
    for s in sizes:
        if s not in SIZES:
            ap.error(f"--sizes: unknown size {s!r}; choose from {sorted(SIZES)}")
    if not args.no_pyreft and not Path(PYREFT_PYTHON).exists():
        ap.error(f"{PYREFT_PYTHON} not found: run `bash tests/goldens/make_pyreft_goldens.sh` "
                 "(or set PYREFT_PYTHON), or pass --no-pyreft")
    header = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "cpu": cpu_model(),
              "load": " / ".join(f"{x:.2f}" for x in os.getloadavg()),
              "command": "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(__file__)] +
                                             list(sys.argv[1:] if argv is None else argv))}
    results = []
    with tempfile.TemporaryDirectory(prefix="bench_core_") as tmp:
        for size in sizes:
            results.append(bench_size(size, args, Path(tmp), tqdm))
    header["wall"] = time.time() - t0
    header["load"] += " (start), " + " / ".join(f"{x:.2f}" for x in os.getloadavg()) + " (end)"
    w = next((r["worker"] for r in results if r["worker"]), None)
    header["worker"] = None if w is None else \
        f"pyreft {w['pyreft']}, pyvene {w['pyvene']}, transformers {w['transformers']}, torch {w['torch']}"

    df, ratios = step_report.tables(results)
    with pd.option_context("display.width", 200, "display.max_columns", 20,
                           "display.float_format", "{:.3f}".format):
        for res in results:
            print(f"\n[{res['size']}] checks:", json.dumps(res["checks"], default=str))
        print("\n", df.to_string(index=False), "\n", sep="")
        print(ratios.to_string(index=False), "\n")
    if args.quick:
        print("(--quick is a smoke run: tiny batches and 2-3 rounds; its ratios are not measurements)")
    for line in step_report.interpretation(results, ratios):
        print("-", line.replace("**", ""))
    print(f"\nwall time {header['wall']:.0f} s")
    if args.write:
        step_report.write_results(results, df, ratios, args, header)
    return 0


if __name__ == "__main__":
    sys.exit(main())
