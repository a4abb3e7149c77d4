#!/usr/bin/env python
"""reftkit's benchmark suite: one entry point, one table, ratios measured in the same run.

    python benchmarks/suite.py                      # tiny + smollm2 on CPU: prints the table
    python benchmarks/suite.py --write              # ... and records it in benchmarks/RESULTS.md
    python benchmarks/suite.py --write --recipe     # + the 1k WordNet recipe end to end against pyreft
    python benchmarks/suite.py --sizes llama7b      # Llama-2-7B shape, bf16, needs a CUDA device
    python benchmarks/suite.py --smoke              # the CI guard: reftkit / minimal hook <= 1.10 (< 1 min)

Parts, each against its references in the same process and the same run:
  step     one training step and greedy generation: reftkit vs the bare model, a minimal hand-written
           hook and pyreft 0.1.0 in its own venv (``bench_core.py``; CPU sizes)
  epoch    whole epochs over examples with a realistic length spread: reftkit vs bare forward+backward,
           the minimal hook and peft LoRA; tokens/s; peak memory; generation; each optimisation of
           reftkit switched off (or the opt-in one on) to show what it is worth (``bench_epoch.py``)
  recipe   (``--recipe``) the 1k-example WordNet recipe, one epoch end to end, reftkit's pipeline vs
           pyreft's (``bench_recipe.py``; its data module, trainer and model loading included)

Every run also appends its headline rows to ``benchmarks/suite_history.csv`` (with ``--write``).
"""
from __future__ import annotations

import argparse
import csv
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_epoch  # noqa: E402
import step_report  # noqa: E402
from flop_count import H100_BF16_DENSE_FLOPS, training_flops  # noqa: E402
from pyreft_venv import PYREFT_PYTHON  # noqa: E402
from results_md import cpu_model, md_table, write_section  # noqa: E402
from step_variants import bench_size  # noqa: E402

HISTORY = Path(__file__).resolve().parent / "suite_history.csv"
GUARD_LIMIT = 1.10
TARGETS = {"reftkit / hook (train)": 1.02, "reftkit / bare (generate)": 1.02, "peak reftkit / bare": 1.05,
           "reftkit / hook (epoch)": 1.02, "reftkit / bare (generate, epoch part)": 1.02,
           "pyreft / reftkit (recipe end to end)": ("min", 2.0), "llama7b recipe minutes": 4.0}


# -- the CI guard ------------------------------------------------------------------------------
def smoke_guard(rounds: int = 9, limit: float = GUARD_LIMIT, retry: bool = True) -> dict:
    """Tiny model, one epoch of 12 batches, reftkit against the minimal hook, interleaved. Passes when the
    median of the per-round ratios is <= ``limit``. A loose guard against a gross regression (the real
    figure is in the table): on a shared 2-core machine a single epoch scatters by ~10 %, so a first
    failure is measured again with twice the rounds before it counts."""
    s = bench_epoch.prepare("tiny", "cpu", variants=["hook", "reftkit"])
    checks = bench_epoch.check_agreement(s)
    result = {}
    for attempt in range(2 if retry else 1):
        times = bench_epoch.run_epochs(s, rounds=rounds * (attempt + 1), warmup=1)
        ratios = [a / b for a, b in zip(times["reftkit"], times["hook"])]
        ratio = statistics.median(ratios)
        result = {"ratio": ratio, "limit": limit, "passed": ratio <= limit, "rounds": len(ratios),
                  "attempts": attempt + 1, "reftkit_s": statistics.median(times["reftkit"]),
                  "hook_s": statistics.median(times["hook"]), **checks}
        if result["passed"]:
            break
    return result


# -- parts -------------------------------------------------------------------------------------
def part_step(sizes: list[str], args: argparse.Namespace) -> tuple:
    """bench_core's step + generate measurements (pyreft included unless --no-pyreft)."""
    from tqdm.auto import tqdm
    core_args = argparse.Namespace(quick=False, repeats=None, warmup=None, threads=args.threads, new_tokens=32,
                                   no_pyreft=args.no_pyreft)
    results = []
    with tempfile.TemporaryDirectory(prefix="suite_core_") as tmp:
        for size in sizes:
            results.append(bench_size(size, core_args, Path(tmp), tqdm))
    df, ratios = step_report.tables(results)
    return results, df, ratios, core_args


def part_epoch(size: str, args: argparse.Namespace) -> tuple:
    """bench_epoch's measurements of one size; for llama7b also the whole recipe, back to back, and its MFU."""
    from tqdm.auto import tqdm
    device = args.device
    s = bench_epoch.prepare(size, device, variants=args.variants, layers_override=args.layers_override,
                            n=args.n, layers=args.layers)
    checks = bench_epoch.check_agreement(s)
    peaks = bench_epoch.peak_memory(s)
    rounds, warmup = s.p["rounds"], s.p["warmup"]
    if "reftkit_prefix_cache" in s.steps and warmup == 0:
        warmup = 1  # the cache's first epoch fills it; the timed epochs are the warm ones
    with tqdm(total=(rounds + warmup) * len(s.steps), desc=f"{size} epochs") as bar:
        epochs = bench_epoch.run_epochs(s, rounds, warmup, bar)
    gen = bench_epoch.generation_times(s)
    if args.compile:
        # last, on its own: compiling is in place, so the other variants would run compiled too
        s.reft.train()
        s.reft.compile(backend="inductor", dynamic=True)
        s.info["compile_epoch_s"] = bench_epoch.one_epoch(s, "reftkit")  # compiles once per shape regime, runs
        epochs["reftkit_compiled"] = [bench_epoch.one_epoch(s, "reftkit") for _ in range(rounds)]
    table = bench_epoch.summarise(s, epochs, peaks, gen)
    extra = {}
    if size == "llama7b":
        # the recipe itself: every epoch of it, back to back, as a user would run it
        wall = sum(bench_epoch.one_epoch(s, "reftkit") for _ in tqdm(range(s.p["epochs"]), desc="llama7b recipe"))
        flops = training_flops(s.model, s.p["layers"], s.grouped) * s.p["epochs"]
        peak = H100_BF16_DENSE_FLOPS if device == "cuda" else float("nan")
        extra = {"recipe_epochs": s.p["epochs"], "recipe_minutes": wall / 60, "mfu": flops / wall / peak,
                 "recipe_tokens_per_s": s.info["real_tokens"] * s.p["epochs"] / wall,
                 "gpu": torch.cuda.get_device_name() if device == "cuda" else "cpu",
                 "path_check": device != "cuda" or bool(args.layers_override) or bool(args.n)}
    return s, table, checks, extra


def headline(step_ratios, epoch_tables: dict, recipe_ratios, gpu: dict, compile_s: dict | None = None):
    """The suite's table: one row per measure and size, with its target and verdict where it has one."""
    import pandas as pd
    rows = []

    def add(size: str, what: str, value: float, note: str = "") -> None:
        target = TARGETS.get(what)
        verdict = ""
        if isinstance(target, tuple):
            verdict = "met" if value >= target[1] else f"missed ({value:.2f} < {target[1]})"
            target = f">= {target[1]}"
        elif target is not None:
            verdict = "met" if value <= target else f"missed by {100 * (value - target):.1f} pts"
            target = f"<= {target}"
        rows.append({"size": size, "measure": what, "value": value, "target": target or "", "verdict": verdict,
                     "note": note})

    if step_ratios is not None:
        for r in step_ratios.itertuples(index=False):
            name = {("train", "reftkit / hook"): "reftkit / hook (train)",
                    ("generate", "reftkit / bare"): "reftkit / bare (generate)",
                    ("train", "reftkit / pyreft"): "reftkit / pyreft (train step)",
                    ("generate", "reftkit / pyreft"): "reftkit / pyreft (generate)"}.get((r.phase, r.ratio))
            if name:
                add(r.size, name, r.median, f"step part, quartiles {r.p25:.3f}-{r.p75:.3f}")
    for size, t in epoch_tables.items():
        v = t.set_index("variant")
        if "hook" in v.index:
            add(size, "reftkit / hook (epoch)", v.loc["reftkit", "epoch_s"] / v.loc["hook", "epoch_s"], "epoch part")
        if "bare" in v.index:
            add(size, "peak reftkit / bare", v.loc["reftkit", "peak_mb"] / v.loc["bare", "peak_mb"],
                f"{v.loc['reftkit', 'peak_mb']:.1f} MB vs {v.loc['bare', 'peak_mb']:.1f} MB")
            add(size, "reftkit / bare forward+backward (epoch)",
                v.loc["reftkit", "vs_reftkit"] / v.loc["bare", "vs_reftkit"])
        if "generate:bare" in v.index:
            add(size, "reftkit / bare (generate, epoch part)", 1 / v.loc["generate:bare", "vs_reftkit"])
        for name, what in (("peft_lora", "peft LoRA / reftkit (epoch)"),
                           ("reftkit_full_logits", "all-position logits / label-only (epoch)"),
                           ("reftkit_unsorted", "random-order / length-grouped batches (epoch)"),
                           ("reftkit_bf16_autocast", "bf16 autocast / float32 (epoch)"),
                           ("reftkit_prefix_cache", "warm prefix cache / none (epoch)"),
                           ("reftkit_compiled", "torch.compile (inductor) / eager (epoch, not interleaved)")):
            if name in v.index:
                add(size, what, v.loc[name, "vs_reftkit"],
                    f"first epoch, compiling included: {compile_s[size]:.0f} s" if name == "reftkit_compiled" else "")
        add(size, "reftkit tokens/s (epoch)", v.loc["reftkit", "tokens_per_s"])
    if recipe_ratios is not None and len(recipe_ratios):
        for r in recipe_ratios.itertuples(index=False):
            if r.ratio in ("pyreft / reftkit", "pyreft_bf16 / reftkit_bf16"):
                what = "pyreft / reftkit (recipe end to end)"
                add("smollm2", what, float(r.end_to_end), "bench_recipe, one epoch, " +
                    ("bf16 autocast on both sides" if "bf16" in r.ratio else "float32 on both sides"))
    if gpu:
        add("llama7b", "llama7b recipe minutes", gpu["recipe_minutes"], f"{gpu['recipe_epochs']} epochs, {gpu['gpu']}")
        add("llama7b", "llama7b MFU", gpu["mfu"], "model FLOPs (flop_count.training_flops) / H100 dense bf16 peak")
        add("llama7b", "llama7b recipe tokens/s", gpu["recipe_tokens_per_s"])
        if gpu["path_check"]:  # a shortened model, fewer examples or no GPU: it exercised the code, measured nothing
            for row in rows:
                if row["size"] == "llama7b":
                    row["verdict"] = "path check only (not the 7B shape on a GPU)"
    return pd.DataFrame(rows)


def write(args: argparse.Namespace, header: dict, head, epoch_tables: dict, epoch_setups: dict, checks: dict,
          not_measured: list[str]) -> None:
    """The suite's section of RESULTS.md, and its headline rows appended to suite_history.csv."""
    import pandas as pd
    key = ",".join(args.sizes)
    if args.layers or args.variants:  # a focused run keeps the full run's section
        key += (f" layers={','.join(map(str, args.layers))}" if args.layers else "") + \
            (f" variants={','.join(args.variants)}" if args.variants else "")
    begin, end = f"<!-- suite:BEGIN {key} -->", f"<!-- suite:END {key} -->"
    lines = [begin, f"## suite: {key}", "",
             f"- date: {header['date']}; wall time {header['wall']:.0f} s",
             f"- machine: {header['machine']}; load average (1/5 min) {header['load']}",
             f"- software: python {platform.python_version()}, torch {torch.__version__}, transformers "
             f"{header['transformers']}, peft {header['peft']}",
             f"- command: `{header['command']}`", ""]
    for size, s in epoch_setups.items():
        info, p = s.info, s.p
        lines.append(f"- {size}: {info['params'] / 1e6:.1f} M params ({next(s.model.parameters()).dtype}), "
                     f"LoReFT r={bench_epoch.RANK} at layers {p['layers']}, block_output, f5+l5 untied "
                     f"({info['trainable_reft']:,} trainable; LoRA r=8 q,v: {info['trainable_lora']:,}); "
                     f"{info['examples']} examples, {info['real_tokens']:,} real tokens "
                     f"({info['labelled_tokens']:,} labelled), batch {p['batch']} x accum {p['accum']}; "
                     f"{p['warmup']} warm-up + {p['rounds']} interleaved epochs per variant; checks "
                     + ", ".join(f"{k} = {v:.1e}" for k, v in checks.get(size, {}).items()))
    for what in not_measured:
        lines.append(f"- not measured: {what}")
    lines += ["", "Headline (ratios measured in this run; `value` is a ratio unless the measure says otherwise):", "",
              md_table(head), ""]
    if epoch_tables:
        table = pd.concat(list(epoch_tables.values()), ignore_index=True)
        lines += ["Epoch part (seconds per epoch, median and quartiles over interleaved epochs; `vs_reftkit` is the "
                  "variant's time over reftkit's; `peak_mb` is the peak memory of one step on the longest batch "
                  "above what was allocated before it; generation rows: seconds per call, tokens/s of new tokens):",
                  "", md_table(table.fillna("")), ""]
    lines.append(end)
    write_section(begin, end, "\n".join(lines))
    new = not HISTORY.exists()
    with HISTORY.open("a", newline="") as fh:
        w = csv.writer(fh)
        if new:
            w.writerow(["date", "machine", "size", "measure", "value", "target", "verdict"])
        for r in head.itertuples(index=False):
            w.writerow([header["date"], header["machine"], r.size, r.measure, f"{r.value:.4g}", r.target, r.verdict])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="tiny,smollm2", help="comma list of tiny, smollm2, llama7b")
    ap.add_argument("--parts", default="step,epoch", help="comma list of step, epoch (and see --recipe)")
    ap.add_argument("--recipe", action="store_true",
                    help="also run the 1k recipe against pyreft, float32 and bf16 autocast (~15 min on CPU)")
    ap.add_argument("--no-pyreft", action="store_true", help="skip pyreft (no throwaway venv needed)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1: steadier on a shared machine)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--n", type=int, default=None, help="examples per epoch (default per size)")
    ap.add_argument("--layers", default=None, help="epoch part: intervened layers, e.g. 8,16,24 (default per size)")
    ap.add_argument("--variants", default=None, help="epoch part: comma list of variants (default all)")
    ap.add_argument("--layers-override", type=int, default=None, help="llama7b with fewer layers (a path check)")
    ap.add_argument("--compile", action="store_true",
                    help="also time reftkit under torch.compile (inductor; compiling takes minutes on CPU)")
    ap.add_argument("--smoke", action="store_true", help=f"the CI guard: fail if reftkit / hook > {GUARD_LIMIT}")
    ap.add_argument("--write", action="store_true", help="record the table in benchmarks/RESULTS.md")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.smoke:
        result = smoke_guard()
        print(result)
        return 0 if result["passed"] else 1

    t0 = time.time()
    args.sizes = args.sizes.split(",")
    args.layers = [int(x) for x in args.layers.split(",")] if args.layers else None
    args.variants = args.variants.split(",") if args.variants else None
    parts = args.parts.split(",")
    for size in args.sizes:
        if size not in bench_epoch.PRESETS:
            ap.error(f"--sizes: unknown size {size!r}; choose from {sorted(bench_epoch.PRESETS)}")
    not_measured = []
    cpu_sizes = [s for s in args.sizes if s != "llama7b"]
    if "llama7b" in args.sizes and not torch.cuda.is_available():
        not_measured.append("llama7b (Llama-2-7B shape, bf16, the 9-epoch 1k recipe): no CUDA device in this run")
    import peft
    import transformers
    header = {"date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
              "machine": f"{cpu_model()}, {os.cpu_count()} logical CPUs, torch threads {args.threads}"
              + (f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""),
              "load": " / ".join(f"{x:.2f}" for x in os.getloadavg()[:2]),
              "command": "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(__file__)] +
                                             list(sys.argv[1:] if argv is None else argv)),
              "transformers": transformers.__version__, "peft": peft.__version__}

    step_ratios = None
    core = None
    if "step" in parts and cpu_sizes:
        if not args.no_pyreft and not Path(PYREFT_PYTHON).exists():
            ap.error(f"{PYREFT_PYTHON} not found: run `bash tests/goldens/make_pyreft_goldens.sh`, "
                     "or pass --no-pyreft")
        core = part_step(cpu_sizes, args)
        step_ratios = core[2]
        print(core[2].to_string(index=False))
    epoch_tables, epoch_setups, checks, gpu = {}, {}, {}, {}
    if "epoch" in parts:
        for size in args.sizes:
            if size == "llama7b" and not torch.cuda.is_available() and args.layers_override is None:
                continue
            s, table, checks[size], extra = part_epoch(size, args)
            epoch_tables[size], epoch_setups[size] = table, s
            gpu.update(extra)
            print(table.to_string(index=False))
    recipe_ratios = None
    if args.recipe:
        import bench_recipe
        summary, recipe_ratios, rheader = bench_recipe.run(argparse.Namespace(
            n_train=1000, repeats=1, threads=args.threads, variants="pyreft,reftkit,pyreft_bf16,reftkit_bf16"))
        if args.write:
            bench_recipe.write_results(summary, recipe_ratios, rheader)
    head = headline(step_ratios, epoch_tables, recipe_ratios, gpu,
                    {size: st.info.get("compile_epoch_s", float("nan")) for size, st in epoch_setups.items()})
    header["wall"] = time.time() - t0
    header["load"] += " (start), " + " / ".join(f"{x:.2f}" for x in os.getloadavg()[:2]) + " (end)"
    print()
    print(head.to_string(index=False))
    for what in not_measured:
        print("not measured:", what)
    if args.write:
        if core is not None:
            results, df, ratios, core_args = core
            w = next((r["worker"] for r in results if r["worker"]), None)
            step_report.write_results(results, df, ratios, core_args, {
                **header, "cpu": cpu_model(),
                "worker": None if w is None else
                f"pyreft {w['pyreft']}, pyvene {w['pyvene']}, transformers {w['transformers']}, torch {w['torch']}"})
        write(args, header, head, epoch_tables, epoch_setups, checks, not_measured)
    return 0


if __name__ == "__main__":
    sys.exit(main())
