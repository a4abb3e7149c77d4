"""The step benchmark's variants (``bench_core.py``): one training step and one greedy generation each
of the bare model, the minimal hook, reftkit and (optionally) pyreft, on the same base weights, the same
LoReFT weights and the same positions.

``prepare_size`` builds them and checks, before anything is timed, that they compute the same thing
(logits, loss, intervention gradients, generated tokens); ``bench_size`` times them interleaved.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Callable

import torch
from base_models import build_step_model
from hook_sets import capture_hooks, copy_hooks, install_hooks
from minimal_hook import gather_index, make_minimal_hook
from pyreft_step_worker import PyreftWorker
from pyreft_venv import save_for_445
from synthetic_batches import make_step_batches
from timing import interleaved, timed_ms

LOGIT_ATOL = 1e-4
RANK = 4

# per size: base model, layers, batch shapes (overridden by --quick)
SIZES = {
    "tiny": dict(layers=[0, 1, 2, 3], train_batch=8, train_len=(64, 128), gen_batch=4, gen_len=(16, 32),
                 repeats=30, warmup=3),
    # smollm2's batch is shorter than tiny's to keep the full run under ~10 min on 2 busy cores
    "smollm2": dict(layers=[3, 9, 18, 24], train_batch=8, train_len=(40, 80), gen_batch=4, gen_len=(24, 48),
                    repeats=5, warmup=1),
}
QUICK = {
    "tiny": dict(train_batch=4, train_len=(24, 48), gen_batch=2, gen_len=(12, 20), repeats=3, warmup=1),
    "smollm2": dict(train_batch=2, train_len=(16, 32), gen_batch=2, gen_len=(12, 20), repeats=2, warmup=1),
}


def max_diff(x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor) -> float:
    """Largest absolute difference over the real (unmasked) tokens."""
    keep = mask.bool()
    return float((x[keep] - y[keep]).abs().max())


def prepare_size(size: str, args: argparse.Namespace, workroot: Path | None) -> dict:
    """Build the model, reftkit, the minimal hooks and (optionally) the pyreft worker; check that they
    compute the same thing; return the timed callables."""
    import reftkit
    from reftkit.structure import resolve_site

    p = dict(SIZES[size])
    if args.quick:
        p.update(QUICK[size])
    if args.repeats:
        p["repeats"] = args.repeats
    if args.warmup is not None:
        p["warmup"] = args.warmup
    model, pad = build_step_model(size)
    d = model.config.hidden_size
    train, gen = make_step_batches(model.config.vocab_size, pad, p)

    # -- hook sets: bare (no hooks at all), reftkit's hooks only, the minimal hooks only
    live = capture_hooks(model)
    bare_set = copy_hooks(live)
    reft = reftkit.get_reft_model(model, {
        "layer": p["layers"], "component": "block_output", "positions": "f5+l5", "intervention": "loreft",
        "low_rank_dimension": RANK, "share_weights": True})
    reft_set = live
    ivs = list(reft.interventions.values())
    assert len(ivs) == len(p["layers"])
    torch.manual_seed(7)
    with torch.no_grad():  # non-trivial edit, so the agreement check means something
        for iv in ivs:
            iv.source.weight.normal_(0.0, d ** -0.5)
            iv.source.bias.normal_(0.0, 0.5)
    hook_set = copy_hooks(bare_set)
    install_hooks(hook_set)
    gidx = {"train": gather_index(train["locs"], d), "gen": gather_index(gen["locs"], d)}
    current = {}  # the hook reads the index of the batch in flight
    for k, (layer, iv) in enumerate(zip(p["layers"], ivs)):
        module = model.get_submodule(resolve_site(model, layer, "block_output").module_path)
        module.register_forward_hook(make_minimal_hook(iv, current, k))
    install_hooks(reft_set)

    def use(which: str, batch: str = "train") -> None:
        install_hooks({"bare": bare_set, "reft": reft_set, "hook": hook_set}[which])
        current.update(gidx[batch])

    ids, mask, labels = train["input_ids"], train["attention_mask"], train["labels"]
    checks: dict = {}

    # -- correctness, eval mode
    reft.eval()
    with torch.no_grad():
        use("bare")
        bare_logits = model(input_ids=ids, attention_mask=mask).logits
        use("hook")
        hook_logits = model(input_ids=ids, attention_mask=mask).logits
        hook_loss = float(model(input_ids=ids, attention_mask=mask, labels=labels).loss)
        use("reft")
        reft_out = reft(input_ids=ids, attention_mask=mask, labels=labels)
    reft_logits = reft_out.logits
    checks["reftkit_vs_hook"] = max_diff(reft_logits, hook_logits, mask)
    checks["reftkit_vs_bare (edit size)"] = max_diff(reft_logits, bare_logits, mask)
    checks["loss reftkit - hook"] = abs(float(reft_out.loss) - hook_loss)
    assert checks["reftkit_vs_hook"] <= LOGIT_ATOL, checks
    assert checks["reftkit_vs_bare (edit size)"] > 1e-3, "the interventions do not change the logits"

    # gradients of the intervention parameters, one step each from the same weights
    reft.train()
    grads = {}
    for which in ("hook", "reft"):
        use(which)
        for prm in reft.interventions.parameters():
            prm.grad = None
        out = reft(input_ids=ids, attention_mask=mask, labels=labels) if which == "reft" else \
            model(input_ids=ids, attention_mask=mask, labels=labels)
        out.loss.backward()
        grads[which] = [prm.grad.clone() for prm in reft.interventions.parameters()]
    checks["grad reftkit_vs_hook (rel)"] = max(float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))
                                               for a, b in zip(grads["reft"], grads["hook"]))
    assert checks["grad reftkit_vs_hook (rel)"] <= 1e-4, checks
    for prm in reft.interventions.parameters():
        prm.grad = None

    # -- the pyreft worker: same weights, same positions
    worker = None
    if not args.no_pyreft:
        wdir = workroot / size
        (wdir / "model").mkdir(parents=True)
        use("bare")
        save_for_445(model, wdir / "model")
        torch.save({
            "threads": args.threads, "layers": p["layers"], "rank": RANK, "new_tokens": args.new_tokens,
            "pad_token_id": pad,
            "weights": [{"R": iv.rotation().detach().clone(), "W": iv.source.weight.detach().clone(),
                         "b": iv.source.bias.detach().clone()} for iv in ivs],
            "train": {k: train[k] for k in ("input_ids", "attention_mask", "labels", "locs")},
            "gen": {k: gen[k] for k in ("input_ids", "attention_mask", "locs")},
        }, wdir / "setup.pt")
        worker = PyreftWorker(wdir)
        ref = torch.load(wdir / "pyreft_ref.pt", weights_only=False)
        checks["reftkit_vs_pyreft"] = max_diff(reft_logits, ref["pyreft_logits"], mask)
        checks["hook@4.45_vs_pyreft"] = max_diff(ref["hook445_logits"], ref["pyreft_logits"], mask)
        checks["bare_vs_bare@4.45"] = max_diff(bare_logits, ref["bare445_logits"], mask)
        checks["loss reftkit - pyreft"] = abs(float(reft_out.loss) - ref["pyreft_loss"])
        if checks["reftkit_vs_pyreft"] > LOGIT_ATOL:
            worker.close()
            raise AssertionError(f"reftkit and pyreft disagree on the benchmark batch: {checks}")

    gen_kwargs = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False,
                      pad_token_id=pad)
    gids, gmask = gen["input_ids"], gen["attention_mask"]
    reft.eval()
    use("reft", "gen")
    reft_tokens = reft.generate(input_ids=gids, attention_mask=gmask, **gen_kwargs)
    use("bare", "gen")
    with torch.no_grad():
        bare_tokens = model.generate(input_ids=gids, attention_mask=gmask, **gen_kwargs)
    assert reft_tokens.shape[1] == gids.shape[1] + args.new_tokens, reft_tokens.shape
    checks["generate: tokens changed by the edit"] = int((reft_tokens != bare_tokens).sum())
    if worker is not None:
        checks["generate: reftkit == pyreft tokens"] = bool(torch.equal(reft_tokens, ref["pyreft_generate"]))
        checks["generate: bare == bare@4.45 tokens"] = bool(torch.equal(bare_tokens, ref["bare445_generate"]))

    # -- timing: training step
    reft.train()
    params = list(reft.interventions.parameters())
    opt = {"hook": torch.optim.AdamW(params, lr=1e-4), "reftkit": torch.optim.AdamW(params, lr=1e-4)}
    emb = model.get_input_embeddings()(ids).detach().requires_grad_(True)

    def bare_fwd() -> float:
        use("bare")
        return timed_ms(lambda: model(input_ids=ids, attention_mask=mask, labels=labels))

    def bare_fwdbwd() -> float:
        use("bare")
        emb.grad = None
        return timed_ms(lambda: model(inputs_embeds=emb, attention_mask=mask, labels=labels).loss.backward())

    def hook_step() -> float:
        use("hook")

        def step():
            opt["hook"].zero_grad(set_to_none=True)
            model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
            opt["hook"].step()
        return timed_ms(step)

    def reft_step() -> float:
        use("reft")

        def step():
            opt["reftkit"].zero_grad(set_to_none=True)
            reft(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
            opt["reftkit"].step()
        return timed_ms(step)

    train_variants = {"bare_fwd": bare_fwd, "bare_fwdbwd": bare_fwdbwd, "hook": hook_step, "reftkit": reft_step}
    if worker is not None:
        train_variants["pyreft"] = lambda: worker.timed("train", "pyreft")
        train_variants["hook@4.45"] = lambda: worker.timed("train", "hook@4.45")

    def gen_bare() -> float:
        use("bare", "gen")
        with torch.no_grad():
            return timed_ms(lambda: model.generate(input_ids=gids, attention_mask=gmask, **gen_kwargs))

    def gen_reft() -> float:
        use("reft", "gen")
        return timed_ms(lambda: reft.generate(input_ids=gids, attention_mask=gmask, **gen_kwargs))

    gen_variants = {"bare": gen_bare, "reftkit": gen_reft}
    if worker is not None:
        gen_variants["pyreft"] = lambda: worker.timed("generate", "pyreft")
        gen_variants["bare@4.45"] = lambda: worker.timed("generate", "bare@4.45")

    return {"size": size, "params": p, "checks": checks, "train_variants": train_variants,
            "gen_variants": gen_variants, "worker": worker, "reft": reft, "model": model,
            "reft_set": reft_set, "use": use,
            "shapes": {"train": list(ids.shape), "train_tokens": int(mask.sum()), "gen": list(gids.shape)},
            "n_params": sum(x.numel() for x in model.parameters())}


def bench_size(size: str, args: argparse.Namespace, workroot: Path, pbar_factory: Callable) -> dict:
    """Prepare ``size``'s variants, then time the training steps and the generations, each interleaved."""
    b = prepare_size(size, args, workroot)
    p, worker, reft = b["params"], b["worker"], b["reft"]
    train_variants, gen_variants = b["train_variants"], b["gen_variants"]
    rounds, warm = p["repeats"], p["warmup"]
    try:
        with pbar_factory(total=(rounds + warm) * len(train_variants), desc=f"{size} train") as bar:
            reft.train()
            t_train = interleaved(train_variants, rounds, warm, bar)
        with pbar_factory(total=(rounds + warm) * len(gen_variants), desc=f"{size} generate") as bar:
            reft.eval()
            t_gen = interleaved(gen_variants, rounds, warm, bar)
    finally:
        if worker is not None:
            worker.close()
        install_hooks(b["reft_set"])
    return {"size": size, "params": p, "checks": b["checks"], "train": t_train, "generate": t_gen,
            "worker": worker.info if worker is not None else None, "shapes": b["shapes"],
            "n_params": b["n_params"]}

