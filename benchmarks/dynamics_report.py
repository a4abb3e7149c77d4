"""The tables of ``bench_dynamics.py``: per task and method, mean ± sd over seeds, the difference to
pyreft paired by seed (same initial weights, same batches), loss curves; printed, and written to
``benchmarks/RESULTS.md`` between this benchmark's markers."""
from __future__ import annotations

import statistics

METHODS = ("pyreft", "reftkit", "reftkit_unit", "reftkit_frame")


def _ms(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def summarise(results: dict) -> dict[str, list[dict]]:
    """Rows per task: per method, mean ± sd over seeds; ``vs pyreft``: the difference paired by seed."""
    tables: dict[str, list[dict]] = {}
    methods = [m for m in METHODS if m in results] + [m for m in results if m not in METHODS]
    names = sorted({n for m in results.values() for n in m})
    for task in ("quickstart", "recipe", "decay"):
        seeds = [n for n in names if n.startswith(task + "/")]
        if not seeds:
            continue
        rows = []
        for method in methods:
            runs = [results[method][n] for n in seeds if n in results[method]]
            if not runs:
                continue
            ref = [results["pyreft"][n] for n in seeds if n in results.get("pyreft", {})]
            rows.append(_row(task, method, runs, ref if method != "pyreft" and len(ref) == len(runs) else None))
        tables[task] = rows
    return tables


def _row(task: str, method: str, runs: list[dict], ref: list[dict] | None) -> dict:
    row = {"method": method, "seeds": len(runs)}
    if task == "quickstart":
        row["loss@0"] = _ms([r["loss"][0] for r in runs])
        for n in (8, 50):
            have = [i for i, r in enumerate(runs) if len(r["loss"]) > n]
            if not have:
                continue
            row[f"loss@{n}"] = _ms([runs[i]["loss"][n] for i in have])
            if ref:
                row[f"vs pyreft @{n}"] = _ms([runs[i]["loss"][n] - ref[i]["loss"][n] for i in have])
            row[f"‖R{n} − R0‖"] = _ms([runs[i]["dR"][n - 1] for i in have])
    elif task == "recipe":
        end = len(runs[0]["loss"]) - 1
        row["held-out@0"] = _ms([r["eval"][0] for r in runs])
        row[f"held-out@{end}"] = _ms([r["eval"][end] for r in runs])
        if ref:
            row["vs pyreft"] = _ms([r["eval"][end] - p["eval"][end] for r, p in zip(runs, ref)])
        row[f"train {end - 9}-{end}"] = _ms([statistics.mean(r["loss"][end - 10:end]) for r in runs])
        row[f"‖R{end} − R0‖"] = _ms([r["dR"][-1] for r in runs])
    else:
        row["max abs(RᵀR − I)"] = f"{max(r['orth'] for r in runs):.1e}"
        row["loss@300"] = _ms([r["loss"][-1] for r in runs])
        row["‖R300 − R0‖"] = _ms([r["dR"][-1] for r in runs])
        row["‖dR‖ of step 1"] = _ms([r["step_dR"][0] for r in runs])
        row["‖dR‖ per step, 291-300"] = _ms([statistics.mean(r["step_dR"][-10:]) for r in runs])
        if runs[0]["probe"]:
            row["raw column norms (end)"] = f"{min(r['probe'][-1]['raw_min'] for r in runs):.2f}–" \
                                            f"{max(r['probe'][-1]['raw_max'] for r in runs):.2f}"
    return row


def curves(results: dict, task: str, points: list[int]) -> list[dict]:
    """Mean loss over seeds at the given steps, per method (quickstart: the batch's loss)."""
    rows = []
    for method, by_job in results.items():
        runs = [r for n, r in by_job.items() if n.startswith(task + "/")]
        if runs:
            rows.append({"method": method, **{
                f"{t}": f"{statistics.mean(r['loss'][t] for r in runs if len(r['loss']) > t):.3f}"
                for t in points if any(len(r["loss"]) > t for r in runs)}})
    return rows


def windows(results: dict, task: str, width: int = 10) -> list[dict]:
    """Mean training loss over seeds and over windows of ``width`` steps (the recipe's batches differ)."""
    rows = []
    for method, by_job in results.items():
        runs = [r for n, r in by_job.items() if n.startswith(task + "/")]
        if runs:
            steps = len(runs[0]["loss"]) - 1
            rows.append({"method": method, **{
                f"{a + 1}-{a + width}": f"{statistics.mean(x for r in runs for x in r['loss'][a:a + width]):.3f}"
                for a in range(0, steps, width)}})
    return rows




def verdicts(results: dict) -> list[str]:
    """Per task, ``reftkit`` against ``pyreft`` paired by seed: met when the mean difference of the loss
    is <= 0 or within two standard errors of 0 (noise), as issue 15 asks."""
    lines = []
    for task, step in (("quickstart", 8), ("quickstart", 50), ("recipe", None)):
        pairs = []
        for name, ours in results.get("reftkit", {}).items():
            ref = results.get("pyreft", {}).get(name)
            if not name.startswith(task + "/") or ref is None:
                continue
            if step is None:
                end = len(ours["loss"]) - 1
                pairs.append(ours["eval"][end] - ref["eval"][end])
            elif len(ours["loss"]) > step and len(ref["loss"]) > step:
                pairs.append(ours["loss"][step] - ref["loss"][step])
        if not pairs:
            continue
        mean = statistics.mean(pairs)
        se = statistics.stdev(pairs) / len(pairs) ** 0.5 if len(pairs) > 1 else float("nan")
        what = f"{task} loss after {step} steps" if step else f"{task} held-out loss after the last step"
        met = mean <= 0 or (se == se and mean <= 2 * se)
        spread = f"standard error {se:.3f}, {len(pairs)} seeds" if len(pairs) > 1 else "1 seed, no spread"
        lines.append(f"- {what}: reftkit − pyreft = {mean:+.3f} ({spread}, paired): {'met' if met else 'NOT met'}")
    return lines


def _tables(results: dict) -> list[str]:
    import pandas as pd
    from results_md import md_table

    out = []
    titles = {"quickstart": "README quickstart (loss of the batch after N steps)",
              "recipe": "1k WordNet recipe (loss on 64 held-out words; training loss over the last 10 steps)",
              "decay": "AdamW weight decay 0.1, constant lr 4e-3, 300 steps (random 2-layer Llama, d = 576)"}
    for task, rows in summarise(results).items():
        out += [f"**{titles[task]}**", "", md_table(pd.DataFrame(rows).fillna("")), ""]
    if any(n.startswith("quickstart/") for m in results.values() for n in m):
        out += ["Quickstart loss curve (mean over seeds; step 50: the long seeds only):", "",
                md_table(pd.DataFrame(curves(results, "quickstart", [0, 1, 2, 3, 4, 6, 8, 12, 16, 25, 50])).fillna("")),
                ""]
    if any(n.startswith("recipe/") for m in results.values() for n in m):
        out += ["Recipe training loss, mean over seeds and 10-step windows:", "",
                md_table(pd.DataFrame(windows(results, "recipe"))), ""]
    return out


def print_report(results: dict, header: dict) -> None:
    print("\n".join(_tables(results) + verdicts(results)))
    print(f"wall time {header['wall']:.0f} s")


def write_results(results: dict, header: dict, reading: list[str]) -> None:
    """The section of ``RESULTS.md`` between ``bench_dynamics`` markers (a re-run replaces it)."""
    import os

    from results_md import cpu_model, write_section

    begin, end = "<!-- bench_dynamics:BEGIN -->", "<!-- bench_dynamics:END -->"
    (l1, l5, _), (e1, e5, _) = header["load"]
    section = "\n".join([
        begin, "## bench_dynamics: how fast LoReFT learns per step, reftkit against pyreft (issue 15)", "",
        f"- date: {header['date']}",
        f"- machine: {cpu_model()}, {os.cpu_count()} logical CPUs, torch threads = {header['threads']} per process "
        f"(pyreft's and reftkit's run side by side); load average (1/5 min) {l1:.2f} / {l5:.2f} (start), "
        f"{e1:.2f} / {e5:.2f} (end)",
        f"- software: {header['software']}",
        f"- command: `{header['command']}` (wall time {header['wall']:.0f} s)", "",
        *reading, "", *_tables(results), *verdicts(results), end])
    write_section(begin, end, section)
