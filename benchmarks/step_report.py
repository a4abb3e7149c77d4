"""The step benchmark's report (``bench_core.py``): tables of times and paired ratios, the targets they
are held to, a reading of them in words, and its section of ``benchmarks/RESULTS.md``.
"""
from __future__ import annotations

import argparse
import os
import platform

import torch
from results_md import md_table, write_section
from step_variants import RANK
from timing import paired_ratio, quartiles

# the ratios held to a target: (phase, numerator, denominator) -> upper bound
TARGETS = {("train", "reftkit", "hook"): 1.02, ("generate", "reftkit", "bare"): 1.02}
# the rows of the ratio table, in order; a ratio with a variant that did not run is left out
RATIOS = [("train", "reftkit", "hook"), ("train", "reftkit", "pyreft"), ("train", "pyreft", "hook@4.45"),
          ("train", "hook", "hook@4.45"), ("train", "reftkit", "bare_fwdbwd"),
          ("generate", "reftkit", "bare"), ("generate", "reftkit", "pyreft"), ("generate", "pyreft", "bare@4.45"),
          ("generate", "bare", "bare@4.45")]


def tables(results: list[dict]) -> tuple:
    """``(times, ratios)`` DataFrames: per variant the quartiles of its times, per ratio of ``RATIOS`` the
    quartiles of the per-round paired ratios and the verdict against its target."""
    import pandas as pd
    rows, ratios = [], []
    for res in results:
        tf = {"pyreft": "4.45.1", "hook@4.45": "4.45.1", "bare@4.45": "4.45.1"}
        for phase in ("train", "generate"):
            for name, xs in res[phase].items():
                q1, med, q3 = quartiles(xs)
                rows.append({"size": res["size"], "phase": phase, "variant": name,
                             "transformers": tf.get(name, transformers_version()), "median_ms": med,
                             "p25_ms": q1, "p75_ms": q3, "min_ms": min(xs), "n": len(xs)})
        for phase, a, b in RATIOS:
            r = paired_ratio(res[phase], a, b)
            if r is None:
                continue
            target = TARGETS.get((phase, a, b))
            if target is None:
                verdict = ""
            else:
                verdict = "met" if r[1] <= target else f"MISSED by {100 * (r[1] - target):.1f} pts"
            ratios.append({"size": res["size"], "phase": phase, "ratio": f"{a} / {b}", "median": r[1],
                           "p25": r[0], "p75": r[2], "of_mins": min(res[phase][a]) / min(res[phase][b]),
                           "target": "" if target is None else f"<= {target:.2f}",
                           "verdict": verdict})
    return pd.DataFrame(rows), pd.DataFrame(ratios)


def transformers_version() -> str:
    import transformers
    return transformers.__version__


def interpretation(results: list[dict], ratios) -> list[str]:
    """The ratios in sentences, one per size and phase: the verdicts, and where reftkit / pyreft comes from."""
    out = []
    for res in results:
        size = res["size"]
        sub = ratios[ratios["size"] == size]

        def get(phase, name):
            row = sub[(sub.phase == phase) & (sub.ratio == name)]
            return None if row.empty else row.iloc[0]

        for phase, a, b in TARGETS:
            r = get(phase, f"{a} / {b}")
            if r is None:
                continue
            target = TARGETS[(phase, a, b)]
            spread = f"paired-ratio quartiles {r.p25:.3f}-{r.p75:.3f}, ratio of minima {r.of_mins:.3f}"
            if r["median"] <= target:
                verdict = f"target <= {target:.2f} met"
            else:
                verdict = (f"target <= {target:.2f} MISSED by {100 * (r['median'] - target):.1f} percentage points "
                           f"({100 * (r['median'] - 1):.1f}% overhead)")
            note = ""
            if r.p25 <= target < r.p75 or r.p25 < 1.0 < r.p75:
                note = (" The quartiles straddle the target/1.0: at this noise level the measurement cannot "
                        "resolve a difference of a few percent either way.")
            if (r["median"] <= target) != (r.of_mins <= target):
                note += " The ratio of the minima points the other way."
            out.append(f"**{size}, {phase}: {a}/{b} = {r['median']:.3f} ({spread}) -- {verdict}.**{note}")
        r = get("train", "reftkit / pyreft")
        if r is not None:
            h, pv = get("train", "hook / hook@4.45"), get("train", "pyreft / hook@4.45")
            rk = get("train", "reftkit / hook")
            out.append(f"{size}, train: reftkit/pyreft = {r['median']:.2f}. Split (approximately multiplicative): "
                       f"reftkit over its minimal hook {rk['median']:.3f}x; pyreft (pyvene) over the same minimal "
                       f"hook in 4.45.1 {pv['median']:.3f}x; minimal hook on transformers 5.23 vs 4.45.1 "
                       f"{h['median']:.3f}x (base model code and LoReFT implementation: QR vs torch's orthogonal "
                       f"parametrization of R).")
        r = get("generate", "reftkit / pyreft")
        if r is not None:
            pv, bb, rk = get("generate", "pyreft / bare@4.45"), get("generate", "bare / bare@4.45"), \
                get("generate", "reftkit / bare")
            out.append(f"{size}, generate: reftkit/pyreft = {r['median']:.2f}. reftkit over bare 5.23 "
                       f"{rk['median']:.3f}x; pyreft over bare 4.45.1 {pv['median']:.3f}x; bare 5.23 vs bare "
                       f"4.45.1 {bb['median']:.3f}x.")
    out.append("Resolution: on this shared machine single measurements scatter by roughly +-10 %, so a median ratio "
               "resolves a few percent at best; `python benchmarks/profile_core.py` measures reftkit's own work "
               "per call directly (micro-timings and exact op counts).")
    return out


def write_results(results: list[dict], df, ratios, args: argparse.Namespace, header: dict) -> None:
    """Record the run in RESULTS.md, in the section of its sizes and flags (a re-run replaces it)."""
    key = ",".join(r["size"] for r in results) + (" quick" if args.quick else "") + \
        (" no-pyreft" if args.no_pyreft else "")
    begin, end = f"<!-- bench_core:BEGIN {key} -->", f"<!-- bench_core:END {key} -->"
    lines = [begin, f"## bench_core: {key}", "",
             f"- date: {header['date']}",
             f"- machine: {header['cpu']}, {os.cpu_count()} logical CPUs, torch threads = {args.threads}; "
             f"load average (1/5/15 min) {header['load']}; the machine is shared with other jobs",
             f"- software: python {platform.python_version()}, torch {torch.__version__}, transformers "
             f"{transformers_version()}; pyreft side: {header['worker'] or 'not run'}",
             f"- command: `{header['command']}`",
             f"- wall time: {header['wall']:.0f} s", ""]
    for res in results:
        p, s = res["params"], res["shapes"]
        lines.append(f"- {res['size']} ({res['n_params'] / 1e6:.1f} M params): LoReFT r={RANK} at layers "
                     f"{p['layers']}, block_output, f5+l5, shared weights; train batch {s['train']} "
                     f"({s['train_tokens']} real tokens, right-padded); generate {s['gen']} prompts (left-padded), "
                     f"{args.new_tokens} new tokens; {p['warmup']} warm-up + {p['repeats']} interleaved rounds")
        lines.append("  - checks: " + ", ".join(f"{k} = {v:.2e}" if isinstance(v, float) else f"{k} = {v}"
                                                for k, v in res["checks"].items()))
    lines += ["", "Times (ms; median and quartiles over rounds):", "", md_table(df), "",
              "Ratios (median of per-round paired ratios):", "", md_table(ratios), "", "Interpretation:", ""]
    if args.quick:
        lines.append("- (--quick smoke run: tiny batches and 2-3 rounds; these ratios are not measurements)")
    lines += [f"- {t}" for t in interpretation(results, ratios)]
    lines += [end]
    write_section(begin, end, "\n".join(lines))

