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

The same file is the pyreft worker (``--worker DIR``), run with the pyreft venv's python; that code
path imports only torch, transformers and pyreft.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections import OrderedDict
from pathlib import Path

import torch

PYREFT_PYTHON = os.environ.get("PYREFT_PYTHON", "/tmp/pyreft_golden_venv/bin/python")
RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
GAP_S = 0.03            # sleep before each timed call: lets the other process's OpenMP threads go idle
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


# ===================================================================================== shared helpers
def _timed(fn) -> float:
    gc.collect()
    time.sleep(GAP_S)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def _layer_output(output):
    return output[0] if isinstance(output, tuple) else output


def _with_layer_output(output, h):
    return (h, *output[1:]) if isinstance(output, tuple) else h


def make_minimal_hook(intervention, gidx_ref: dict, k: int):
    """The minimal hook: gather the rows, apply the intervention, scatter back (out of place)."""
    def hook(module, args, output):
        h = _layer_output(output)
        g = gidx_ref[k]
        return _with_layer_output(output, h.scatter(1, g, intervention(h.gather(1, g))))
    return hook


def gather_index(locs: torch.Tensor, width: int) -> dict:
    """``[B, K, P]`` locations -> {k: ``[B, P, width]`` index for gather/scatter}."""
    return {k: locs[:, k, :, None].expand(-1, -1, width).contiguous() for k in range(locs.shape[1])}


# ===================================================================================== pyreft worker
def worker_main(setup_dir: str) -> None:
    """Runs inside the pyreft venv. Protocol: one JSON command per stdin line, one JSON reply per
    line on the original stdout; everything else anyone prints goes to stderr."""
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr

    setup = torch.load(Path(setup_dir) / "setup.pt", weights_only=False)
    torch.set_num_threads(setup["threads"])
    torch.manual_seed(0)
    import pyreft
    import transformers

    model = transformers.LlamaForCausalLM.from_pretrained(
        Path(setup_dir) / "model", torch_dtype=torch.float32, attn_implementation="sdpa").eval()
    d = model.config.hidden_size
    layers = setup["layers"]
    reps = [{"layer": layer, "component": "block_output", "low_rank_dimension": RANK,
             "intervention": pyreft.LoreftIntervention(embed_dim=d, low_rank_dimension=RANK,
                                                       dtype=torch.float32, dropout=0.0)}
            for layer in layers]
    reft_model = pyreft.get_reft_model(model, pyreft.ReftConfig(representations=reps), set_device=False)
    ivs = list(reft_model.interventions.values())
    with torch.no_grad():
        for iv, w in zip(ivs, setup["weights"]):
            iv.rotate_layer.weight = w["R"]              # through torch's orthogonal parametrization
            iv.learned_source.weight.copy_(w["W"])
            iv.learned_source.bias.copy_(w["b"])
            assert torch.allclose(iv.rotate_layer.weight, w["R"], atol=1e-5)

    def set_mode(train: bool) -> None:
        reft_model.model.train(train)                     # pyvene's train()/eval() skip interventions
        for iv in ivs:
            iv.train(train)

    tr, ge = setup["train"], setup["gen"]
    ids, mask, labels, locs = tr["input_ids"], tr["attention_mask"], tr["labels"], tr["locs"]
    gidx = gather_index(locs, d)
    blocks = [model.model.layers[layer] for layer in layers]

    def pyreft_forward(with_labels: bool):
        # exactly what pyreft's ReftTrainer.compute_loss does per step
        unit_locations = {"sources->base": (None, locs.permute(1, 0, 2).tolist())}
        _, cf = reft_model({"input_ids": ids, "attention_mask": mask}, unit_locations=unit_locations,
                           labels=labels if with_labels else None)
        return cf

    class Hooks:  # pyvene removes every forward hook of the model at each call: register per use
        def __enter__(self):
            self.handles = [b.register_forward_hook(make_minimal_hook(iv, gidx, k))
                            for k, (b, iv) in enumerate(zip(blocks, ivs))]

        def __exit__(self, *exc):
            for h in self.handles:
                h.remove()

    gen_kwargs = dict(max_new_tokens=setup["new_tokens"], min_new_tokens=setup["new_tokens"],
                      do_sample=False, pad_token_id=setup["pad_token_id"])

    def pyreft_generate():
        _, out = reft_model.generate(
            {"input_ids": ge["input_ids"], "attention_mask": ge["attention_mask"]},
            unit_locations={"sources->base": (None, ge["locs"].permute(1, 0, 2).tolist())},
            intervene_on_prompt=True, **gen_kwargs)
        return out

    def bare_generate():
        return model.generate(input_ids=ge["input_ids"], attention_mask=ge["attention_mask"], **gen_kwargs)

    # ---- reference outputs for the parent's correctness check
    set_mode(False)
    with torch.no_grad():
        ref = {"pyreft_logits": pyreft_forward(False).logits.clone()}
        reft_model._cleanup_states()
        with Hooks():
            ref["hook445_logits"] = model(input_ids=ids, attention_mask=mask).logits.clone()
        ref["bare445_logits"] = model(input_ids=ids, attention_mask=mask).logits.clone()
        ref["pyreft_loss"] = float(pyreft_forward(True).loss)
        ref["pyreft_generate"] = pyreft_generate().clone()
        ref["bare445_generate"] = bare_generate().clone()
    torch.save(ref, Path(setup_dir) / "pyreft_ref.pt")

    # ---- timed steps
    params = [p for iv in ivs for p in iv.parameters() if p.requires_grad]
    opts = {"pyreft": torch.optim.AdamW(params, lr=1e-4), "hook@4.45": torch.optim.AdamW(params, lr=1e-4)}

    def step_pyreft():
        opts["pyreft"].zero_grad(set_to_none=True)
        pyreft_forward(True).loss.backward()
        opts["pyreft"].step()

    def step_hook():
        opts["hook@4.45"].zero_grad(set_to_none=True)
        model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        opts["hook@4.45"].step()

    def run(cmd: dict) -> float:
        phase, variant = cmd["phase"], cmd["variant"]
        if phase == "train":
            set_mode(True)
            if variant == "pyreft":
                return _timed(step_pyreft)
            with Hooks():
                return _timed(step_hook)
        set_mode(False)
        with torch.no_grad():
            return _timed(pyreft_generate if variant == "pyreft" else bare_generate)

    from importlib.metadata import version
    proto.write(json.dumps({"ready": True, "transformers": transformers.__version__, "pyreft": version("pyreft"),
                            "pyvene": version("pyvene"), "torch": torch.__version__}) + "\n")
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd.get("quit"):
            break
        try:
            proto.write(json.dumps({"ms": run(cmd)}) + "\n")
        except Exception as err:  # report, let the parent decide
            proto.write(json.dumps({"error": f"{type(err).__name__}: {err}"}) + "\n")


# ===================================================================================== parent side
_HOOK_ATTRS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
               "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs")


def capture_hooks(model: torch.nn.Module) -> list:
    """The live hook dicts of every module (the objects themselves)."""
    return [(m, {a: getattr(m, a) for a in _HOOK_ATTRS}) for m in model.modules()]


def copy_hooks(snapshot: list) -> list:
    return [(m, {a: OrderedDict(d) for a, d in attrs.items()}) for m, attrs in snapshot]


def install_hooks(snapshot: list) -> None:
    """Make ``snapshot``'s dicts the live hook dicts. Handles keep working: they point at the dicts."""
    for m, attrs in snapshot:
        for a, d in attrs.items():
            object.__setattr__(m, a, d)


class PyreftWorker:
    def __init__(self, workdir: Path):
        self.log = open(workdir / "worker.log", "w")
        self.proc = subprocess.Popen([PYREFT_PYTHON, str(Path(__file__).resolve()), "--worker", str(workdir)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True,
                                     bufsize=1, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
        self.workdir = workdir
        self.info = self._read()

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            tail = (self.workdir / "worker.log").read_text()[-4000:]
            raise RuntimeError(f"pyreft worker died (rc={self.proc.returncode}); its log ends with:\n{tail}")
        reply = json.loads(line)
        if "error" in reply:
            raise RuntimeError(f"pyreft worker: {reply['error']}")
        return reply

    def timed(self, phase: str, variant: str) -> float:
        time.sleep(GAP_S)  # this process goes idle before the worker starts its clock
        self.proc.stdin.write(json.dumps({"phase": phase, "variant": variant}) + "\n")
        return self._read()["ms"]

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(json.dumps({"quit": True}) + "\n")
                self.proc.stdin.flush()
                self.proc.wait(timeout=30)
            except Exception:
                self.proc.kill()
        self.log.close()


def build_base(size: str):
    import transformers
    if size == "tiny":
        cfg = transformers.LlamaConfig(
            vocab_size=1024, hidden_size=64, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False, initializer_range=0.1,
            pad_token_id=0, bos_token_id=1, eos_token_id=2)
        torch.manual_seed(0)
        model = transformers.LlamaForCausalLM(cfg).eval()
        return model, 0
    import reftkit
    model, tok = reftkit.load_model("smollm2")
    return model.float().eval(), tok.pad_token_id


def make_batches(vocab: int, pad: int, p: dict, seed: int = 1234):
    """Right-padded training batch with labels; left-padded prompts; f5+l5 locations [B, K, 10]."""
    g = torch.Generator().manual_seed(seed)
    k = len(p["layers"])

    def batch(n, lo_hi, left):
        lengths = torch.randint(lo_hi[0], lo_hi[1] + 1, (n,), generator=g)
        width = int(lengths.max())
        ids = torch.full((n, width), pad, dtype=torch.long)
        mask = torch.zeros((n, width), dtype=torch.long)
        labels = torch.full((n, width), -100, dtype=torch.long)
        locs = torch.empty((n, k, 10), dtype=torch.long)
        for i, length in enumerate(lengths.tolist()):
            start = width - length if left else 0
            ids[i, start:start + length] = torch.randint(3, vocab, (length,), generator=g)
            mask[i, start:start + length] = 1
            labels[i, start:start + length] = ids[i, start:start + length]
            pos = list(range(start, start + 5)) + list(range(start + length - 5, start + length))
            locs[i] = torch.tensor(pos)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels, "locs": locs, "lengths": lengths}

    return batch(p["train_batch"], p["train_len"], left=False), batch(p["gen_batch"], p["gen_len"], left=True)


def save_for_445(model, folder: Path) -> None:
    """save_pretrained with transformers 5, then make config.json readable by 4.45.1."""
    model.save_pretrained(folder, safe_serialization=True)
    cfg_path = folder / "config.json"
    cfg = json.loads(cfg_path.read_text())
    rope = cfg.get("rope_parameters") or {}
    if rope.get("rope_type", "default") != "default":
        raise RuntimeError(f"rope {rope} not handled for transformers 4.45")
    cfg["rope_theta"] = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))
    cfg["rope_scaling"] = None
    cfg["torch_dtype"] = "float32"
    cfg.pop("rope_parameters", None)
    cfg.pop("dtype", None)
    cfg_path.write_text(json.dumps(cfg, indent=2))


def quartiles(xs: list[float]) -> tuple[float, float, float]:
    if len(xs) == 1:
        return xs[0], xs[0], xs[0]
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return q[0], statistics.median(xs), q[2]


def interleaved(variants: dict, rounds: int, warmup: int, pbar) -> dict[str, list[float]]:
    """Each round runs every variant once, order rotated per round; warm-up rounds are dropped."""
    names = list(variants)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(warmup + rounds):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            ms = variants[name]()
            if r >= warmup:
                times[name].append(ms)
            pbar.set_postfix_str(f"{name} {ms:.1f} ms")
            pbar.update(1)
    return times


def paired_ratio(times: dict, a: str, b: str) -> tuple[float, float, float] | None:
    if a not in times or b not in times:
        return None
    return quartiles([x / y for x, y in zip(times[a], times[b])])


def max_diff(x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor) -> float:
    keep = mask.bool()
    return float((x[keep] - y[keep]).abs().max())


def prepare_size(size: str, args, workroot: Path) -> dict:
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
    model, pad = build_base(size)
    d = model.config.hidden_size
    train, gen = make_batches(model.config.vocab_size, pad, p)

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

    def use(which: str, batch: str = "train"):
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
            "threads": args.threads, "layers": p["layers"], "new_tokens": args.new_tokens, "pad_token_id": pad,
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

    def bare_fwd():
        use("bare")
        return _timed(lambda: model(input_ids=ids, attention_mask=mask, labels=labels))

    def bare_fwdbwd():
        use("bare")
        emb.grad = None
        return _timed(lambda: model(inputs_embeds=emb, attention_mask=mask, labels=labels).loss.backward())

    def hook_step():
        use("hook")

        def step():
            opt["hook"].zero_grad(set_to_none=True)
            model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
            opt["hook"].step()
        return _timed(step)

    def reft_step():
        use("reft")

        def step():
            opt["reftkit"].zero_grad(set_to_none=True)
            reft(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
            opt["reftkit"].step()
        return _timed(step)

    train_variants = {"bare_fwd": bare_fwd, "bare_fwdbwd": bare_fwdbwd, "hook": hook_step, "reftkit": reft_step}
    if worker is not None:
        train_variants["pyreft"] = lambda: worker.timed("train", "pyreft")
        train_variants["hook@4.45"] = lambda: worker.timed("train", "hook@4.45")

    def gen_bare():
        use("bare", "gen")
        with torch.no_grad():
            return _timed(lambda: model.generate(input_ids=gids, attention_mask=gmask, **gen_kwargs))

    def gen_reft():
        use("reft", "gen")
        return _timed(lambda: reft.generate(input_ids=gids, attention_mask=gmask, **gen_kwargs))

    gen_variants = {"bare": gen_bare, "reftkit": gen_reft}
    if worker is not None:
        gen_variants["pyreft"] = lambda: worker.timed("generate", "pyreft")
        gen_variants["bare@4.45"] = lambda: worker.timed("generate", "bare@4.45")

    return {"size": size, "params": p, "checks": checks, "train_variants": train_variants,
            "gen_variants": gen_variants, "worker": worker, "reft": reft, "model": model,
            "reft_set": reft_set, "use": use,
            "shapes": {"train": list(ids.shape), "train_tokens": int(mask.sum()), "gen": list(gids.shape)},
            "n_params": sum(x.numel() for x in model.parameters())}


def bench_size(size: str, args, workroot: Path, pbar_factory) -> dict:
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


# ===================================================================================== reporting
TARGETS = {("train", "reftkit", "hook"): 1.02, ("generate", "reftkit", "bare"): 1.02}
RATIOS = [("train", "reftkit", "hook"), ("train", "reftkit", "pyreft"), ("train", "pyreft", "hook@4.45"),
          ("train", "hook", "hook@4.45"), ("train", "reftkit", "bare_fwdbwd"),
          ("generate", "reftkit", "bare"), ("generate", "reftkit", "pyreft"), ("generate", "pyreft", "bare@4.45"),
          ("generate", "bare", "bare@4.45")]


def tables(results: list[dict]):
    import pandas as pd
    rows, ratios = [], []
    for res in results:
        tf = {"pyreft": "4.45.1", "hook@4.45": "4.45.1", "bare@4.45": "4.45.1"}
        for phase in ("train", "generate"):
            for name, xs in res[phase].items():
                q1, med, q3 = quartiles(xs)
                rows.append({"size": res["size"], "phase": phase, "variant": name,
                             "transformers": tf.get(name, _tf_version()), "median_ms": med,
                             "p25_ms": q1, "p75_ms": q3, "min_ms": min(xs), "n": len(xs)})
        for phase, a, b in RATIOS:
            r = paired_ratio(res[phase], a, b)
            if r is None:
                continue
            target = TARGETS.get((phase, a, b))
            verdict = "" if target is None else ("met" if r[1] <= target else f"MISSED by {100 * (r[1] - target):.1f} pts")
            ratios.append({"size": res["size"], "phase": phase, "ratio": f"{a} / {b}", "median": r[1],
                           "p25": r[0], "p75": r[2], "of_mins": min(res[phase][a]) / min(res[phase][b]),
                           "target": "" if target is None else f"<= {target:.2f}",
                           "verdict": verdict})
    return pd.DataFrame(rows), pd.DataFrame(ratios)


def _tf_version() -> str:
    import transformers
    return transformers.__version__


def md_table(df) -> str:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}"
        return str(v)
    cols = list(df.columns)
    lines = ["| " + " | ".join(cols) + " |", "| " + " | ".join("---" for _ in cols) + " |"]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def interpretation(results: list[dict], ratios) -> list[str]:
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
            h, pv, rk = get("train", "hook / hook@4.45"), get("train", "pyreft / hook@4.45"), get("train", "reftkit / hook")
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


def write_results(results, df, ratios, args, header: dict) -> None:
    key = ",".join(r["size"] for r in results) + (" quick" if args.quick else "") + \
        (" no-pyreft" if args.no_pyreft else "")
    begin, end = f"<!-- bench_core:BEGIN {key} -->", f"<!-- bench_core:END {key} -->"
    lines = [begin, f"## bench_core: {key}", "",
             f"- date: {header['date']}",
             f"- machine: {header['cpu']}, {os.cpu_count()} logical CPUs, torch threads = {args.threads}; "
             f"load average (1/5/15 min) {header['load']}; the machine is shared with other jobs",
             f"- software: python {platform.python_version()}, torch {torch.__version__}, transformers "
             f"{_tf_version()}; pyreft side: {header['worker'] or 'not run'}",
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


def write_section(begin: str, end: str, block: str) -> None:
    """Put ``block`` (which starts with ``begin`` and ends with ``end``) into RESULTS.md, replacing the
    previous run's section between those markers, or appending it."""
    text = RESULTS.read_text() if RESULTS.exists() else \
        "# reftkit benchmark results\n\nSections are written by the benchmark scripts in this folder " \
        "(`--write`); a re-run replaces its own section.\n\n"
    block = block.rstrip("\n") + "\n"
    if begin in text and end in text:
        pre, rest = text.split(begin, 1)
        post = rest.split(end, 1)[1].lstrip("\n")
        text = pre + block + ("\n" + post if post else "")
    else:
        text = text.rstrip("\n") + "\n\n" + block
    RESULTS.write_text(text)
    print(f"wrote {RESULTS}")


def main(argv=None) -> int:
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

    df, ratios = tables(results)
    with pd.option_context("display.width", 200, "display.max_columns", 20, "display.float_format", "{:.3f}".format):
        for res in results:
            print(f"\n[{res['size']}] checks:", json.dumps(res["checks"], default=str))
        print("\n", df.to_string(index=False), "\n", sep="")
        print(ratios.to_string(index=False), "\n")
    if args.quick:
        print("(--quick is a smoke run: tiny batches and 2-3 rounds; its ratios are not measurements)")
    for line in interpretation(results, ratios):
        print("-", line.replace("**", ""))
    print(f"\nwall time {header['wall']:.0f} s")
    if args.write:
        write_results(results, df, ratios, args, header)
    return 0


if __name__ == "__main__":
    sys.exit(main())
