#!/usr/bin/env python
"""Where does reftkit's time go, relative to the minimal hook (train) and the bare model (generate)?

Companion of ``bench_core.py`` (same models, batches, weights; pyreft not involved). It reports

1. micro-timings (min / median over many calls, microseconds) of the pieces reftkit adds to a call:
   the positions (``ReftModel._call_state``), one reftkit block hook vs one minimal hook on the same
   tensor, the inactive hook a decode step pays, and the shared LoReFT module for scale;
2. the per-step overhead those pieces add up to, as a share of a measured step;
3. a ``torch.profiler`` op table of N reftkit steps minus N minimal-hook steps (self CPU time per
   step, ops with the largest difference), and the same for ``reft.generate`` vs ``model.generate``.

    python benchmarks/profile_core.py --sizes tiny,smollm2 --steps 3
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import timing  # noqa: E402
from minimal_hook import gather_index  # noqa: E402
from step_variants import prepare_size  # noqa: E402
from synthetic_batches import make_step_batches  # noqa: E402

from reftkit.structure import resolve_site  # noqa: E402


def micro(fn: Callable[[], object], n: int) -> tuple[float, float]:
    """(min, median) of ``n`` calls of ``fn``, microseconds."""
    return micro_pair(fn, None, n)[0]


def micro_pair(fa: Callable[[], object], fb: Callable[[], object] | None, n: int) -> tuple:
    """Interleaved calls of ``fa`` and ``fb`` (if given): ((min, median) of a, (min, median) of b), us."""
    fns = [f for f in (fa, fb) if f is not None]
    for _ in range(min(20, n)):
        for f in fns:
            f()
    ts = [[] for _ in fns]
    for _ in range(n):
        for f, t in zip(fns, ts):
            t0 = time.perf_counter()
            f()
            t.append((time.perf_counter() - t0) * 1e6)
    out = [(min(t), statistics.median(t)) for t in ts]
    return out if fb is not None else (out[0], None)


def op_table(fn: Callable[[], object], steps: int) -> dict[str, tuple[float, int]]:
    """{op: (self CPU ms per step, calls per step)} over ``steps`` runs of ``fn``."""
    from torch.profiler import ProfilerActivity, profile
    fn()  # warm
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            fn()
    out = {}
    for e in prof.key_averages():
        out[e.key] = (e.self_cpu_time_total / 1e3 / steps, e.count // steps)
    return out


def diff_ops(a: dict, b: dict, label_a: str, label_b: str, top: int) -> int:
    """Print the totals, the ops whose call counts differ (the extra work), the largest time differences;
    return the number of extra aten calls."""
    tot_a, tot_b = sum(v[0] for v in a.values()), sum(v[0] for v in b.values())
    print(f"  self-CPU per call: {label_a} {tot_a:.2f} ms, {label_b} {tot_b:.2f} ms "
          "(totals are noisy on a shared machine; the call counts are exact)")
    extra = {k: a.get(k, (0, 0))[1] - b.get(k, (0, 0))[1] for k in set(a) | set(b)}
    extra = {k: n for k, n in extra.items() if n}
    listed = ", ".join(f"{k.replace('aten::', '')} {n:+d}" for k, n in sorted(extra.items(), key=lambda kv: -kv[1]))
    print(f"  extra op calls per call in {label_a} ({sum(extra.values()):+d} in all): {listed}")
    keys = set(a) | set(b)
    rows = sorted(((k, a.get(k, (0, 0)), b.get(k, (0, 0))) for k in keys), key=lambda r: -abs(r[1][0] - r[2][0]))
    print("  largest self-CPU differences (noise unless the call counts differ):")
    for k, (ta, ca), (tb, cb) in rows[:top]:
        print(f"    {k[:52]:<52} {ta:9.3f} ms {tb:9.3f} ms  calls {ca}/{cb}")
    return sum(extra.values())


def profile_size(size: str, args: argparse.Namespace) -> None:
    """Print the micro-timings, the per-step overhead and the op tables of one size."""
    ns = argparse.Namespace(quick=False, repeats=None, warmup=None, threads=args.threads, new_tokens=32,
                            no_pyreft=True)
    b = prepare_size(size, ns, None)
    reft, model, use, p = b["reft"], b["model"], b["use"], b["params"]
    pad = 0 if size == "tiny" else model.config.pad_token_id
    train, gen = make_step_batches(model.config.vocab_size, pad, p)  # same seed -> same batches as the bench
    ids, mask, labels = train["input_ids"], train["attention_mask"], train["labels"]
    d = model.config.hidden_size
    k = len(p["layers"])
    print(f"\n===== {size}: train batch {tuple(ids.shape)}, {k} interventions, threads {args.threads}")

    # -- 1. micro-timings
    state = reft._call_state(ids, None, mask, None)
    t_pos = micro(lambda: reft._call_state(ids, None, mask, None), args.n)
    layer = model.get_submodule(resolve_site(model, p["layers"][0], "block_output").module_path)
    use("reft")
    reft_hook = next(iter(layer._forward_hooks.values()))
    use("hook")
    min_hook = next(iter(layer._forward_hooks.values()))
    use("reft")
    h = torch.randn(ids.shape[0], ids.shape[1], d, requires_grad=True)
    iv = next(iter(reft.interventions.values()))
    g = gather_index(train["locs"], d)[0]
    reft._hooks.state = state
    t_rh, t_mh = micro_pair(lambda: reft_hook(layer, (), h), lambda: min_hook(layer, (), h), args.n)
    t_iv = micro(lambda: iv(h.gather(1, g)), args.n)
    t_rot = micro(lambda: iv.rotation(), args.n)
    state.active = False
    t_inactive = micro(lambda: reft_hook(layer, (), h), args.n * 5)
    reft._hooks.state = None
    print("micro-timings, us (min / median):")
    for name, (lo, med) in [("positions: ReftModel._call_state (once per call)", t_pos),
                            ("reftkit block hook (gather + LoReFT + scatter)", t_rh),
                            ("minimal block hook (same math)", t_mh),
                            ("  of which LoReFT module (shared)", t_iv),
                            ("  of which Orthonormal.rotation() QR (shared)", t_rot),
                            ("inactive reftkit hook (each decode step, each layer)", t_inactive)]:
        print(f"  {name:<55} {lo:9.1f} / {med:9.1f}")

    # -- 2. measured steps, interleaved, min of N
    timing.GAP_S = 0.0
    tv = b["train_variants"]
    steps = {"hook": [], "reftkit": []}
    for i in range(args.steps * 2):
        for name in (("hook", "reftkit") if i % 2 else ("reftkit", "hook")):
            steps[name].append(tv[name]())
    step_ms = min(steps["hook"])
    extra_us = t_pos[0] + k * (t_rh[0] - t_mh[0])
    print(f"train step, ms (min of {len(steps['hook'])}): hook {min(steps['hook']):.1f}, "
          f"reftkit {min(steps['reftkit']):.1f} -> ratio of mins {min(steps['reftkit']) / step_ms:.3f}")
    print(f"reftkit's own forward work per step from the micro-timings (minima): positions {t_pos[0]:.0f} us + "
          f"{k} x hook bookkeeping {t_rh[0] - t_mh[0]:.0f} us (negative = below noise) = {extra_us:.0f} us = "
          f"{100 * extra_us / 1e3 / step_ms:.3f}% of a step")

    # -- 3. op tables
    reft.train()

    def reft_step() -> None:
        use("reft")
        reft(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()

    def hook_step() -> None:
        use("hook")
        model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()

    print("torch.profiler, train forward + backward (no optimizer step):")
    diff_ops(op_table(reft_step, args.steps), op_table(hook_step, args.steps), "reftkit", "hook", args.top)

    reft.eval()
    gids, gmask = gen["input_ids"], gen["attention_mask"]
    extra_calls = {}
    for new_tokens in (4, 32):
        kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=pad)

        def gen_reft() -> None:
            use("reft", "gen")
            reft.generate(input_ids=gids, attention_mask=gmask, **kw)

        def gen_bare() -> None:
            use("bare", "gen")
            with torch.no_grad():
                model.generate(input_ids=gids, attention_mask=gmask, **kw)

        print(f"torch.profiler, generate ({new_tokens} new tokens):")
        extra_calls[new_tokens] = diff_ops(op_table(gen_reft, args.gen_steps), op_table(gen_bare, args.gen_steps),
                                           "reftkit", "bare", args.top if new_tokens == 32 else 0)
    print(f"extra aten calls of reft.generate: {extra_calls[4]} with 4 new tokens, {extra_calls[32]} with 32 "
          f"-> {'independent of' if extra_calls[4] == extra_calls[32] else 'GROWING with'} the decode steps")
    per_gen_us = t_pos[0] + k * t_rh[0] + 32 * k * t_inactive[0]
    print(f"reftkit's work per generate call from the micro-timings: positions {t_pos[0]:.0f} us + {k} prefill "
          f"interventions {k * t_rh[0]:.0f} us (the edit itself) + 32 x {k} inactive hooks "
          f"{32 * k * t_inactive[0]:.0f} us = {per_gen_us / 1e3:.2f} ms")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="tiny,smollm2")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=3, help="profiled / measured train steps per variant")
    ap.add_argument("--gen-steps", type=int, default=1, help="profiled generate calls per variant")
    ap.add_argument("--n", type=int, default=300, help="calls per micro-timing")
    ap.add_argument("--top", type=int, default=12)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    for size in args.sizes.split(","):
        profile_size(size, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
