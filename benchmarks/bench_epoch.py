#!/usr/bin/env python
"""Epoch-level benchmark: whole epochs over examples with a realistic length spread, peak memory,
tokens/s, generation, peft LoRA on the same data, and each of reftkit's optimisations switched off.

Every variant trains on the same examples (random token ids: with random weights, the cost is the
real one), with the same LoReFT weights at the start and one AdamW step per ``accum`` batches:

  bare               the frozen base model, forward + HF loss + backward from ``inputs_embeds`` that
                     require grad (backward runs through every layer): what a training step of the
                     model costs without any PEFT method
  hook               minimal hand-written forward hooks applying reftkit's own LoReFT modules at
                     precomputed gather/scatter indices, and a hand-written label-only loss
  reftkit            ``reftkit.training.causal_lm_loss`` (what ``ReftTrainer`` runs), length-grouped batches
  peft_lora          peft LoRA (r=8 on q_proj and v_proj, the ReFT paper's LoRA baseline placement) on a
                     copy of the model, HF's loss, the same batches
  -- ablations of reftkit, one optimisation off (or the opt-in one on) each --
  reftkit_full_logits      ``reft(..., labels=...)``: vocabulary logits for every position
  reftkit_unsorted         batches in random order instead of length-grouped (more padding)
  reftkit_bf16_autocast    under ``torch.autocast(bfloat16)`` (float32 models only); interventions stay fp32
  reftkit_prefix_cache     ``FrozenPrefixCache`` warm (every epoch after the first): layers below the
                           earliest intervention are not run again

Peak memory is measured on the longest batch: on CUDA ``max_memory_allocated`` above what was allocated
before the step; on CPU the same quantity from ``torch.profiler``'s memory timeline (every allocation
and free of the step, exact). Epochs are interleaved across variants (rotated order each round) and the
median is reported. ``suite.py`` is the entry point that runs this with the other benchmarks.

Its pieces: ``synthetic_batches.py`` (the examples and their batches), ``base_models.py``,
``minimal_hook.py`` (the hook and its loss), ``peak_memory.py``, and ``flop_count.py`` (the MFU of the
llama7b recipe, computed by ``suite.py``).
"""
from __future__ import annotations

import copy
import gc
import statistics
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

import torch
from base_models import build_epoch_model
from hook_sets import capture_hooks, copy_hooks, install_hooks
from minimal_hook import gather_index, label_only_loss, make_minimal_hook
from peak_memory import peak_step_bytes
from synthetic_batches import Batch, collate_examples, make_examples
from timing import quartiles

if TYPE_CHECKING:
    import pandas as pd

RANK = 4
PRESETS = {
    # n examples; lognormal prompt/response lengths (median, sigma) truncated to max_len
    "tiny": dict(n=96, batch=8, accum=1, prompt=(40, 0.6), response=(48, 0.6), max_len=256, layers=[1, 2],
                 rounds=5, warmup=1, gen_batch=4, new_tokens=32, gen_rounds=15, epochs=1),
    "smollm2": dict(n=48, batch=8, accum=1, prompt=(32, 0.6), response=(40, 0.6), max_len=192,
                    layers=[3, 9, 18, 24], rounds=3, warmup=1, gen_batch=4, new_tokens=32, gen_rounds=3,
                    epochs=1),
    # the ReFT paper's 1k recipe on Llama-2 7B: layers 3;9;18;24, rank 4, f5+l5 untied, batch 4 x accum 32,
    # max length 768, 9 epochs; instruction-tuning lengths (prompt median ~90, response ~200 tokens)
    "llama7b": dict(n=1000, batch=4, accum=32, prompt=(90, 0.8), response=(200, 0.8), max_len=768,
                    layers=[3, 9, 18, 24], rounds=1, warmup=0, gen_batch=8, new_tokens=64, gen_rounds=5,
                    epochs=9),
}


@dataclass
class Setup:
    """One size's epoch benchmark, ready to run: its model, batches and a training step per variant."""
    size: str
    p: dict
    device: str
    model: torch.nn.Module
    reft: object
    pad: int
    grouped: list[Batch]
    unsorted: list[Batch]
    use: Callable[[str], None]
    steps: dict = field(default_factory=dict)  # variant -> (batches, step(batch) -> None)
    losses: dict = field(default_factory=dict)  # "hook" / "reftkit" -> loss(batch)
    info: dict = field(default_factory=dict)


def prepare(size: str, device: str = "cpu", variants: list[str] | None = None,
            layers_override: int | None = None, n: int | None = None,
            layers: list[int] | None = None) -> Setup:
    """Build the model, reftkit, the minimal hooks and peft LoRA, and a training step per variant
    (``variants``: a subset, by name); ``n`` examples and intervened ``layers`` override the preset."""
    import reftkit
    from reftkit.data.supervised import length_grouped_order
    from reftkit.structure import resolve_site
    from reftkit.training import causal_lm_loss

    p = dict(PRESETS[size])
    if n:
        p["n"] = n
    if layers:
        p["layers"] = list(layers)
    if layers_override:  # a shortened model for a path check: intervene where the layers exist
        p["layers"] = sorted({min(layer, layers_override - 1) for layer in p["layers"]})
    model, pad = build_epoch_model(size, device, layers_override)
    for prm in model.parameters():
        prm.requires_grad_(False)
    d, k = model.config.hidden_size, len(p["layers"])
    examples = make_examples(p, model.config.vocab_size)
    lengths = [len(ids) for ids, _ in examples]
    grouped = collate_examples(examples, length_grouped_order(lengths, p["batch"], seed=0), p, pad, k, device)
    shuffled = torch.randperm(len(examples), generator=torch.Generator().manual_seed(0)).tolist()
    unsorted = collate_examples(examples, shuffled, p, pad, k, device)

    lora_model = None
    if variants is None or "peft_lora" in variants:
        import peft
        lora_model = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(
            r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], lora_dropout=0.0, task_type="CAUSAL_LM"))

    bare_set = copy_hooks(capture_hooks(model))
    reft = reftkit.get_reft_model(model, {
        "layer": p["layers"], "component": "block_output", "positions": "f5+l5", "intervention": "loreft",
        "low_rank_dimension": RANK, "share_weights": False})  # the paper's "untied": prefix and suffix apart
    reft_set = capture_hooks(model)
    ivs = list(reft.interventions.values())
    hook_set = copy_hooks(bare_set)
    install_hooks(hook_set)
    current: dict = {}
    # untied f5+l5: two interventions per layer; the minimal hook applies them on the two halves
    for j, layer in enumerate(p["layers"]):
        module = model.get_submodule(resolve_site(model, layer, "block_output").module_path)
        for half, iv in enumerate(ivs[2 * j:2 * j + 2]):
            module.register_forward_hook(make_minimal_hook(iv, current, 2 * j + half))
    install_hooks(reft_set)

    def use(which: str) -> None:
        install_hooks({"bare": bare_set, "reft": reft_set, "hook": hook_set}[which])

    def reft_locs(b: Batch) -> torch.Tensor:
        # untied f5+l5 is two slots per layer, layer-major (layer0 first, layer0 last, ...): [B, 2K, 5]
        return b.locs.view(b.locs.shape[0], 2 * k, 5)

    def hook_locs(b: Batch) -> dict:
        return gather_index(reft_locs(b), d)

    params = list(reft.interventions.parameters())

    def trainer(loss_of: Callable[[Batch], torch.Tensor], prms: list[torch.nn.Parameter], which: str,
                batches: list[Batch], ctx: Callable | None = None) -> tuple[list[Batch], Callable[[Batch], None]]:
        opt = torch.optim.AdamW(prms, lr=1e-4) if prms else None
        counter = {"n": 0}

        def step(b: Batch) -> None:
            use(which)
            with (ctx() if ctx else torch.enable_grad()):
                loss = loss_of(b)
            (loss / p["accum"]).backward()
            counter["n"] += 1
            if opt is not None and counter["n"] % p["accum"] == 0:
                opt.step()
                opt.zero_grad(set_to_none=True)
        return batches, step

    def bare_loss(b: Batch) -> torch.Tensor:
        emb = model.get_input_embeddings()(b.ids).detach().requires_grad_(True)
        return model(inputs_embeds=emb, attention_mask=b.mask, labels=b.labels).loss

    def hook_loss(b: Batch) -> torch.Tensor:
        current.clear()
        current.update(hook_locs(b))
        return label_only_loss(model, b.ids, b.mask, b.labels)

    def reft_loss(b: Batch, **kw) -> torch.Tensor:
        return causal_lm_loss(reft, b.ids, b.mask, b.labels, intervention_locations=reft_locs(b), **kw)["loss"]

    def full_logits_loss(b: Batch) -> torch.Tensor:
        return reft(input_ids=b.ids, attention_mask=b.mask, labels=b.labels,
                    intervention_locations=reft_locs(b)).loss

    steps = {
        "bare": trainer(bare_loss, [], "bare", grouped),
        "hook": trainer(hook_loss, params, "hook", grouped),
        "reftkit": trainer(reft_loss, params, "reft", grouped),
        "reftkit_full_logits": trainer(full_logits_loss, params, "reft", grouped),
        "reftkit_unsorted": trainer(reft_loss, params, "reft", unsorted),
    }
    if lora_model is not None:
        lora_params = [x for x in lora_model.parameters() if x.requires_grad]

        def lora_loss(b: Batch) -> torch.Tensor:
            return lora_model(input_ids=b.ids, attention_mask=b.mask, labels=b.labels).loss
        steps["peft_lora"] = trainer(lora_loss, lora_params, "bare", grouped)
    if next(model.parameters()).dtype == torch.float32:
        steps["reftkit_bf16_autocast"] = trainer(
            reft_loss, params, "reft", grouped, ctx=lambda: torch.autocast(device, dtype=torch.bfloat16))
    try:
        from reftkit.training.frozen_prefix import FrozenPrefixCache
    except ImportError:
        FrozenPrefixCache = None
    if FrozenPrefixCache is not None:
        cache = FrozenPrefixCache(reft)
        steps["reftkit_prefix_cache"] = trainer(lambda b: reft_loss(b, prefix_cache=cache), params, "reft", grouped)
    if variants is not None:
        steps = {name: s for name, s in steps.items() if name in variants}
    setup = Setup(size, p, device, model, reft, pad, grouped, unsorted, use, steps,
                  {"hook": lambda b: (use("hook"), hook_loss(b))[1],
                   "reftkit": lambda b: (use("reft"), reft_loss(b))[1]})
    trainable_lora = sum(x.numel() for x in lora_model.parameters() if x.requires_grad) if lora_model else 0
    setup.info = {"params": sum(x.numel() for x in model.parameters()),
                  "trainable_reft": sum(x.numel() for x in params),
                  "trainable_lora": trainable_lora,
                  "examples": p["n"], "real_tokens": sum(b.real_tokens for b in grouped),
                  "labelled_tokens": sum(int((b.labels[:, 1:] != -100).sum()) for b in grouped),
                  "padded_tokens": {"grouped": sum(b.ids.numel() for b in grouped),
                                    "unsorted": sum(b.ids.numel() for b in unsorted)}}
    return setup


def check_agreement(s: Setup) -> dict:
    """reftkit's loss and intervention gradients against the minimal hook's on one batch: the timings
    compare the same computation."""
    b = s.grouped[0]
    s.reft.train()
    got = {}
    for name, loss_of in s.losses.items():
        for prm in s.reft.interventions.parameters():
            prm.grad = None
        loss = loss_of(b)
        loss.backward()
        got[name] = (float(loss.detach()), [prm.grad.detach().clone() for prm in s.reft.interventions.parameters()])
    for prm in s.reft.interventions.parameters():
        prm.grad = None
    (l_hook, g_hook), (l_reft, g_reft) = got["hook"], got["reftkit"]
    rel = max(float((a - c).abs().max() / c.abs().max().clamp_min(1e-12)) for a, c in zip(g_reft, g_hook))
    checks = {"loss reftkit - hook": abs(l_reft - l_hook), "grad reftkit vs hook (rel)": rel}
    if rel > 1e-3 or abs(l_reft - l_hook) > 1e-3 * max(1.0, abs(l_hook)):
        raise AssertionError(f"{s.size}: reftkit and the minimal hook disagree: {checks}")
    return checks


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def one_epoch(s: Setup, name: str) -> float:
    """Seconds of one epoch of variant ``name`` (device work included)."""
    batches, step = s.steps[name]
    gc.collect()
    _sync(s.device)
    t0 = time.perf_counter()
    for b in batches:
        step(b)
    _sync(s.device)
    return time.perf_counter() - t0


def run_epochs(s: Setup, rounds: int | None = None, warmup: int | None = None,
               pbar=None) -> dict[str, list[float]]:
    """Seconds per epoch for every variant, interleaved: each round runs every variant's epoch once."""
    rounds = s.p["rounds"] if rounds is None else rounds
    warmup = s.p["warmup"] if warmup is None else warmup
    names = list(s.steps)
    times = {name: [] for name in names}
    s.reft.train()
    for r in range(warmup + rounds):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            sec = one_epoch(s, name)
            if r >= warmup:
                times[name].append(sec)
            if pbar is not None:
                pbar.set_postfix_str(f"{name} {sec:.2f} s")
                pbar.update(1)
    return times


def peak_memory(s: Setup) -> dict[str, int]:
    """Peak bytes of one training step on the longest grouped batch, per variant."""
    longest = max(s.grouped, key=lambda b: b.ids.numel())
    s.reft.train()
    out = {}
    for name, (_, step) in s.steps.items():
        step(longest)  # warm: optimizer state and caches exist before the measured step
        out[name] = peak_step_bytes(lambda: step(longest), s.device)
    return out


def generation_times(s: Setup, rounds: int | None = None) -> dict[str, list[float]]:
    """Greedy generation of ``new_tokens`` for a left-padded batch of prompts: bare vs reftkit."""
    prompts = s.grouped[0]
    n = min(s.p["gen_batch"], prompts.ids.shape[0])
    lengths = [int(x) for x in (prompts.labels[:n] == -100).sum(1)]  # prompt lengths (labels start after)
    width = max(lengths)
    ids = torch.full((n, width), s.pad, dtype=torch.long, device=s.device)
    mask = torch.zeros_like(ids)
    for r, lp in enumerate(lengths):
        ids[r, width - lp:] = prompts.ids[r, :lp]
        mask[r, width - lp:] = 1
    kw = dict(max_new_tokens=s.p["new_tokens"], min_new_tokens=s.p["new_tokens"], do_sample=False,
              pad_token_id=s.pad)
    s.reft.eval()
    rounds = s.p["gen_rounds"] if rounds is None else rounds

    def bare() -> None:
        s.use("bare")
        with torch.no_grad():
            s.model.generate(input_ids=ids, attention_mask=mask, **kw)

    def reftkit_gen() -> None:
        s.use("reft")
        s.reft.generate(input_ids=ids, attention_mask=mask, **kw)
    times = {"bare": [], "reftkit": []}
    for r in range(rounds + 1):
        for name, fn in ([("bare", bare), ("reftkit", reftkit_gen)] if r % 2 == 0 else
                         [("reftkit", reftkit_gen), ("bare", bare)]):
            _sync(s.device)
            t0 = time.perf_counter()
            fn()
            _sync(s.device)
            if r > 0:
                times[name].append(time.perf_counter() - t0)
    s.use("reft")
    return times


def summarise(s: Setup, epochs: dict[str, list[float]], peaks: dict[str, int],
              gen: dict[str, list[float]]) -> pd.DataFrame:
    """The epoch part's table: a row per variant (time, tokens/s, padding, peak memory, each against
    reftkit or bare) and a row per generation variant."""
    import pandas as pd
    med = {k: statistics.median(v) for k, v in epochs.items() if v}
    rows = []
    for name, sec in med.items():
        padded = s.info["padded_tokens"]["unsorted" if name == "reftkit_unsorted" else "grouped"]
        peak_vs_bare = peaks.get(name, float("nan")) / peaks["bare"] if "bare" in peaks else float("nan")
        rows.append({"size": s.size, "variant": name, "epoch_s": sec,
                     "p25_s": quartiles(epochs[name])[0], "p75_s": quartiles(epochs[name])[2],
                     "vs_reftkit": sec / med["reftkit"] if "reftkit" in med else float("nan"),
                     "tokens_per_s": s.info["real_tokens"] / sec, "padded_tokens": padded,
                     "peak_mb": peaks.get(name, float("nan")) / 2 ** 20,
                     "peak_vs_bare": peak_vs_bare})
    for name, ts in gen.items():
        rows.append({"size": s.size, "variant": f"generate:{name}", "epoch_s": statistics.median(ts),
                     "p25_s": min(ts), "p75_s": max(ts),
                     "vs_reftkit": statistics.median(ts) / statistics.median(gen["reftkit"]),
                     "tokens_per_s": s.p["new_tokens"] * s.p["gen_batch"] / statistics.median(ts)})
    return pd.DataFrame(rows)
