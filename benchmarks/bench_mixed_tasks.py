#!/usr/bin/env python
"""Mixed-task batches: the cost of serving k tasks in one batch against one task.

Every task owns its own LoReFT interventions (rank 4, ``block_output`` of four layers, positions
``f1+l1``) and, in the ``ia3`` setting, its own IA3 vectors on keys, values and the FFN input at
every position of every layer. One batch of 16 rows is routed round-robin to k = 1, 4 or 16 tasks
(``tasks=[...]``); k = 1 is the one-task baseline, with the same batch and the same per-row work.
Phases: a training step (forward + backward + AdamW on the interventions) and greedy generation.

Before timing, each row of the k = 16 batch is checked against running its task's model alone
(<= 1e-5), so the times compare correct computations.

    python benchmarks/bench_mixed_tasks.py --write      # smollm2 + tiny, records RESULTS.md
    python benchmarks/bench_mixed_tasks.py --quick      # smoke run
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from base_models import build_step_model  # noqa: E402
from results_md import cpu_model, write_section  # noqa: E402
from timing import interleaved, paired_ratio, quartiles, timed_ms  # noqa: E402

KS = (1, 4, 16)
BATCH = 16


def representations(model, k: int, setting: str, layers: list[int]) -> list[dict]:
    from reftkit.interventions.scaling import ia3_representations

    reps = []
    for t in range(k):
        reps += [{"layer": layers, "component": "block_output", "positions": "f1+l1", "intervention": "loreft",
                  "low_rank_dimension": 4, "task": f"task{t}"}]
        if setting == "ia3":
            reps += [{**r, "task": f"task{t}"} for r in ia3_representations(model)]
    return reps


def randomise(reft, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in reft.interventions.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))


def make_batch(vocab: int, pad: int, lengths: tuple[int, int], seed: int = 7, left: bool = False):
    g = torch.Generator().manual_seed(seed)
    n = torch.randint(lengths[0], lengths[1] + 1, (BATCH,), generator=g)
    width = int(n.max())
    ids = torch.full((BATCH, width), pad, dtype=torch.long)
    mask = torch.zeros((BATCH, width), dtype=torch.long)
    for i, length in enumerate(n.tolist()):
        span = slice(width - length, width) if left else slice(0, length)
        ids[i, span] = torch.randint(3, vocab, (length,), generator=g)
        mask[i, span] = 1
    labels = torch.where(mask.bool(), ids, -100)
    return ids, mask, labels


def check_rows_match_single_task(base_fn, k: int, setting: str, layers, ids, mask) -> float:
    """max |mixed - alone| over real tokens, every row of a k-task batch."""
    import reftkit

    model = base_fn()
    mixed = reftkit.get_reft_model(model, representations(model, k, setting, layers))
    randomise(mixed, 0)
    tasks = [f"task{i % k}" for i in range(BATCH)]
    with torch.no_grad():
        out = mixed(input_ids=ids, attention_mask=mask, tasks=tasks).logits
    state = {key: v.clone() for key, v in mixed.interventions.state_dict().items()}
    mixed.detach()
    worst = 0.0
    for t in range(k):
        alone_model = base_fn()
        alone = reftkit.get_reft_model(alone_model, representations(alone_model, 1, setting, layers))
        # task t's weights: the keys of the mixed model that belong to task t, in order
        keys = [key for key, task in zip(state, mixed_tasks(mixed)) if task == f"task{t}"]
        renamed = {new: state[old] for old, new in zip(keys, alone.interventions.state_dict())}
        alone.interventions.load_state_dict(renamed)
        rows = [i for i in range(BATCH) if tasks[i] == f"task{t}"]
        with torch.no_grad():
            ref = alone(input_ids=ids[rows], attention_mask=mask[rows], tasks=["task0"] * len(rows)).logits
        keep = mask[rows].bool()
        worst = max(worst, float((out[rows][keep] - ref[keep]).abs().max()))
        alone.detach()
    return worst


def mixed_tasks(mixed) -> list[str]:
    """The task of each tensor of ``mixed.interventions.state_dict()``, in order."""
    tasks = []
    for key, task in zip(mixed.interventions, mixed._slot_tasks):
        tasks += [task] * len(mixed.interventions[key].state_dict())
    return tasks


def bench(size: str, setting: str, args, pbar) -> list[dict]:
    import reftkit

    base_fn = (lambda: build_step_model(size)[0]) if size == "tiny" else _smollm2_factory()
    model = base_fn()
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else model.config.eos_token_id
    n_layers = model.config.num_hidden_layers
    layers = [n_layers // 8, n_layers // 3, (2 * n_layers) // 3, n_layers - 1]
    vocab = model.config.vocab_size
    lengths = (24, 48) if args.quick else ((64, 128) if size == "tiny" else (40, 80))
    ids, mask, labels = make_batch(vocab, pad, lengths)
    gen_ids, gen_mask, _ = make_batch(vocab, pad, (12, 24), seed=8, left=True)
    gen_ids, gen_mask = gen_ids[:4], gen_mask[:4]
    new_tokens = 8 if args.quick else 16
    worst = check_rows_match_single_task(base_fn, max(KS), setting, layers, ids[:, :32], mask[:, :32])
    if worst > 1e-4:
        raise RuntimeError(f"{size}/{setting}: mixed-task rows differ from single-task runs by {worst:.2e}")
    variants, models = {}, {}
    for k in KS:
        reft = reftkit.get_reft_model(model, representations(model, k, setting, layers))
        randomise(reft, k)
        models[k] = reft
        opt = torch.optim.AdamW([p for p in reft.interventions.parameters() if p.requires_grad], lr=1e-4)
        tasks = [f"task{i % k}" for i in range(BATCH)]

        def step(reft=reft, opt=opt, tasks=tasks):
            active(reft)
            reft.train()
            opt.zero_grad(set_to_none=True)
            reft(input_ids=ids, attention_mask=mask, labels=labels, tasks=tasks).loss.backward()
            opt.step()

        def gen(reft=reft, tasks=tasks):
            active(reft)
            reft.eval()
            reft.generate(input_ids=gen_ids, attention_mask=gen_mask, tasks=tasks[:4], max_new_tokens=new_tokens,
                          min_new_tokens=new_tokens, do_sample=False, pad_token_id=pad)
        variants[f"train k={k}"] = lambda step=step: timed_ms(step)
        variants[f"generate k={k}"] = lambda gen=gen: timed_ms(gen)
        reft._hooks.remove()  # one model's hooks at a time: `active` swaps them in
    model.requires_grad_(False)
    rounds, warmup = (2, 1) if args.quick else ((10, 2) if size == "tiny" else (5, 1))
    times = interleaved(variants, rounds, warmup, pbar)
    rows = []
    for phase in ("train", "generate"):
        for k in KS:
            lo, med, hi = quartiles(times[f"{phase} k={k}"])
            ratio = paired_ratio(times, f"{phase} k={k}", f"{phase} k=1")
            rows.append({"size": size, "setting": setting, "phase": phase, "k": k, "median_ms": med,
                         "p25_ms": lo, "p75_ms": hi, "ratio_vs_k1": ratio[1], "ratio_p25": ratio[0],
                         "ratio_p75": ratio[2], "check_max_diff": worst,
                         "trainable": sum(p.numel() for p in models[k].interventions.parameters())})
    return rows


hooks: dict = {}


def active(reft) -> None:
    """Attach ``reft``'s hooks (and only its) to the shared base model for the next call."""
    current = hooks.get("current")
    if current is reft:
        return
    if current is not None:
        current._hooks.remove()
    reft._hooks.attach()
    reft._detached = False
    hooks["current"] = reft


def _smollm2_factory():
    import reftkit

    cache = {}

    def build():
        if "sd" not in cache:
            model, _ = reftkit.load_model("smollm2")
            cache["sd"] = model.float().state_dict()
            cache["config"] = model.config
            return model.float().eval()
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_config(cache["config"], dtype=torch.float32)
        model.load_state_dict(cache["sd"])
        return model.eval()
    return build


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="tiny,smollm2")
    parser.add_argument("--settings", default="loreft,ia3")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--write", action="store_true")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: steady on a shared machine, where busy neighbours stall OpenMP)")
    args = parser.parse_args(argv)
    import pandas as pd
    from tqdm.auto import tqdm

    torch.set_num_threads(args.threads)
    started, load_start = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), os.getloadavg()
    wall = time.perf_counter()
    rows = []
    sizes, settings = args.sizes.split(","), args.settings.split(",")
    with tqdm(desc="timed calls") as pbar:
        for size in sizes:
            for setting in settings:
                torch.manual_seed(0)
                hooks.clear()
                rows += bench(size, setting, args, pbar)
    df = pd.DataFrame(rows)
    print(df.to_string(index=False))
    if args.write:
        write_results(df, started, load_start, time.perf_counter() - wall, args)
    return 0


def write_results(df, started, load_start, wall, args) -> None:
    import transformers

    begin, end = "<!-- bench_mixed_tasks:BEGIN -->", "<!-- bench_mixed_tasks:END -->"
    load_end = os.getloadavg()
    table = ["| size | setting | phase | k | median_ms | p25_ms | p75_ms | ratio vs k=1 (median, p25-p75) | "
             "check max diff | trainable params |", "| --- " * 10 + "|"]
    for r in df.itertuples():
        table.append(f"| {r.size} | {r.setting} | {r.phase} | {r.k} | {r.median_ms:.1f} | {r.p25_ms:.1f} | "
                     f"{r.p75_ms:.1f} | {r.ratio_vs_k1:.3f} ({r.ratio_p25:.3f}-{r.ratio_p75:.3f}) | "
                     f"{r.check_max_diff:.1e} | {r.trainable:,} |")
    verdicts = []
    for r in df[df.k == max(KS)].itertuples():
        verdicts.append(f"- {r.size}, {r.setting}, {r.phase}: k={r.k} costs **{r.ratio_vs_k1:.3f}x** one task "
                        f"(target <= 1.1: {'met' if r.ratio_vs_k1 <= 1.1 else 'NOT met'})")
    section = "\n".join([
        begin, "## bench_mixed_tasks: k tasks in one batch against one task", "",
        f"- date: {started}; machine: {cpu_model()}, {os.cpu_count()} logical CPUs, torch threads = "
        f"{torch.get_num_threads()}; load average (1/5 min) {load_start[0]:.2f}/{load_start[1]:.2f} (start), "
        f"{load_end[0]:.2f}/{load_end[1]:.2f} (end)",
        f"- software: torch {torch.__version__}, transformers {transformers.__version__}",
        "- command: `python benchmarks/bench_mixed_tasks.py --write"
        + (f" --sizes {args.sizes}" if args.sizes != "tiny,smollm2" else "") + f"` (wall time {wall:.0f} s)",
        f"- batch {BATCH} rows routed round-robin to k tasks; loreft = LoReFT r=4 at block_output of 4 layers, f1+l1, "
        "per task; ia3 = that plus IA3 on keys, values and FFN input at every position of every layer, per task. "
        "`check max diff`: every row of the k=16 batch against its task run alone (logits, real tokens).", "",
        *table, "", *verdicts, "",
        "- How routing works: each task's interventions run on that task's rows only, and the tasks at one "
        "tensor share one gather and one scatter (`HookManager._edit_tasks`); what k adds is the per-task "
        "call overhead (small kernels, a QR per LoReFT), which shows most on the tiny model, where the model's "
        "own work is smallest.", end])
    write_section(begin, end, section)


if __name__ == "__main__":
    sys.exit(main())
