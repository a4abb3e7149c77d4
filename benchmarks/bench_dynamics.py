#!/usr/bin/env python
"""Learning dynamics of LoReFT's ``R``: real pyreft against reftkit, from identical initial weights,
on identical batches, with pyreft's hyperparameters (issue 15, item 4).

Tasks (SmolLM2-135M-Instruct, float32, LoReFT rank 4 at ``block_output``, last prompt token):

  quickstart  pyreft's README emoji chat: the ten pairs in one batch, layer 8, lr 4e-3, linear decay
              over the README's 100 steps; the first 50 are run (8 is the issue's reading)
  recipe      the 1k WordNet recipe (``configs/wordnet_1k.yaml``): layers 8, 16, 24, batch 8, lr 2e-3,
              10 warm-up steps, linear decay over its 375 steps; the first 100 are run, and the loss on
              64 held-out words is taken before and after
  decay       AdamW weight decay 0.1 at a constant lr 4e-3 for 300 steps, on a random 2-layer Llama as wide
              as SmolLM2 (cheap): is ``R`` still orthonormal, and how far does a step move it at the end?

Methods: ``pyreft`` (pyreft 0.1.0's ``LoreftIntervention`` in its own venv, run by
``dynamics_pyreft_worker.py``), ``reftkit`` (the default ``Orthonormal``), ``reftkit_unit`` (``raw``
with unit columns: reftkit's parametrisation before the fix; ``R`` is the same, the step is not).
For each seed, ``R`` (``orthogonal_``), ``W`` and ``b`` (``nn.Linear``) are drawn once and loaded
into both libraries; both run ``dynamics_loop.run_job`` (``transformers.Trainer``'s defaults written out).
pyreft runs in a second process at the same time as reftkit (one torch thread each).

    python benchmarks/bench_dynamics.py --write                 # 3 seeds, all tasks (~20 min)
    python benchmarks/bench_dynamics.py --tasks quickstart --seeds 1
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch  # noqa: E402
from dynamics_data import initial_weights, quickstart_batches, recipe_batches, recipe_examples  # noqa: E402
from dynamics_loop import run_job  # noqa: E402
from dynamics_report import METHODS  # noqa: E402
from pyreft_venv import PYREFT_PYTHON, save_for_445  # noqa: E402

RANK = 4
#: how to read the section (the cause and the fix are in the docstring of reftkit's ``Orthonormal``)
READING = [
    "Same model, batches, learning rate, schedule and initial weights on both sides: for each seed, R "
    "(`orthogonal_`), W and b (`nn.Linear`) are drawn once and loaded into pyreft 0.1.0's `LoreftIntervention` "
    "(its own venv) and into reftkit's LoReFT; both train with `benchmarks/dynamics_loop.py` "
    "(`transformers.Trainer`'s defaults written out: AdamW, clipping at 1.0, linear schedule). pyreft's own "
    "forward and loss run on its side. `vs pyreft`: the difference of the loss, paired by seed.",
    "",
    "- `pyreft`: R through `torch.nn.utils.parametrizations.orthogonal` (Householder reflectors around a "
    "`d x d` base, from A = 0, where a change dA moves R by 2 dA).",
    "- `reftkit`: the default, R = QR(raw) with raw's columns stored at length 1/2: QR ignores the length, "
    "so R is the same, but a step of raw moves R by twice as much (gain 1/|column|): to first order torch's "
    "map, up to a fixed rotation of the parameter's coordinates.",
    "- `reftkit_unit`: the same QR with unit columns, as reftkit stored raw before this fix (gain 1): "
    "its first step moves R half as far (‖dR‖ of step 1 in the decay table), and with pyreft's "
    "hyperparameters it learns slower.",
    "- `reftkit_frame` (diagnostic, not an option): R = QR(B raw) with B a `d x d` orthogonal completion of "
    "the initial R, as torch's base: Adam then works in pyreft's coordinates. It shows what is left between "
    "`reftkit` and `pyreft` in the first steps: Adam normalises each coordinate, and in the model's "
    "coordinates its first steps follow the gradient less well than in a random frame (at layer 8's output "
    "of SmolLM2, at the intervened token, 2 of the 576 dimensions hold 67 % of the squared norm: their rows of "
    "R's gradient dominate, and Adam gives every row the same step). By step 8 that is inside the seeds' "
    "spread; a `d x d` frame per intervention (64 MiB at d=4096) is what the QR parametrisation avoids.",
    "- `decay`: pyreft's R reads its sign diagonal with `.int()`; decayed from -1 to -(1 - lr wd) it reads 0, "
    "so R is 0 from the first step on (max abs(RᵀR − I) = 1) and the intervention edits nothing. reftkit's QR "
    "is exact at any scale of raw; decay shortens raw's columns, which cannot change R, only its step, and "
    "Adam's steps (nearly orthogonal to the columns) lengthen them: after 300 decayed steps the columns are "
    "longer than at the start (1/2) and the step per update has not grown.",
]
TASKS = {
    "quickstart": dict(model="smollm2", layers=[8], lr=4e-3, warmup=0, total=100, steps=8, weight_decay=0.0),
    "recipe": dict(model="smollm2", layers=[8, 16, 24], lr=2e-3, warmup=10, total=375, steps=100, weight_decay=0.0),
    "decay": dict(model="random", layers=[1], lr=4e-3, warmup=0, total=None, steps=300, weight_decay=0.1),
}


def build_jobs(tokenizer, args: argparse.Namespace, d: int) -> list[dict]:
    """The jobs of every task and seed, with their batches, order, initial weights and methods; the
    first ``--long-seeds`` quickstart seeds run ``--long-steps`` for ``--long-methods``."""
    quick = quickstart_batches(tokenizer)
    recipe = recipe_examples(tokenizer) if "recipe" in args.tasks else None
    jobs = []
    for task in args.tasks.split(","):
        spec = TASKS[task]
        for seed in range(args.decay_seeds if task == "decay" else args.seeds):
            methods = getattr(args, f"{task}_methods").split(",")
            groups = [(spec["steps"], methods)]
            if task == "quickstart" and seed < args.long_seeds:
                longer = [m for m in methods if m in args.long_methods.split(",")]
                groups = [(args.long_steps, longer), (spec["steps"], [m for m in methods if m not in longer])]
            for steps, group in groups:
                if group:
                    jobs.append(_job(task, seed, steps, group, quick, recipe, tokenizer.pad_token_id, d))
    return jobs


def _job(task: str, seed: int, steps: int, methods: list[str], quick, recipe, pad_id: int, d: int) -> dict:
    spec = {**TASKS[task], "steps": steps}
    job = {"name": f"{task}/{seed}", "task": task, "seed": seed, "max_grad_norm": 1.0, "methods": methods, **spec,
           "init": initial_weights(seed, spec["layers"], RANDOM["hidden_size"] if task == "decay" else d, RANK),
           "eval": [], "eval_at": []}
    if task == "recipe":
        job["batches"], job["order"], job["eval"] = recipe_batches(*recipe, seed, steps, pad_id)
        job["eval_at"] = [0, steps]
    else:
        job["batches"] = quick if task == "quickstart" else random_batches(seed)
        job["order"] = [0] * (steps + 1)
    return job


#: the weight-decay run's model: a random 2-layer Llama as wide as SmolLM2 (d = 576), cheap enough for
#: 300 steps; what decay does to R is a property of the parametrisation, not of the model
RANDOM = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=2, num_attention_heads=9,
              num_key_value_heads=3, vocab_size=512, max_position_embeddings=128)


def random_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1234)
    return LlamaForCausalLM(LlamaConfig(**RANDOM, pad_token_id=0, bos_token_id=1, eos_token_id=2)).float().eval()


def random_batches(seed: int) -> list[list[dict]]:
    """One batch of 8 random sequences of 48 tokens; the last 16 are labelled; LoReFT at token 31."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, RANDOM["vocab_size"], (8, 48), generator=g)
    labels = ids.clone()
    labels[:, :32] = -100
    return [[{"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels,
              "locs": torch.full((8, 1), 31)}]]


def _in_pyreft_frame(rotation, basis: torch.Tensor, seed: int) -> None:
    """Diagnostic ``reftkit_frame``: ``R = Q(B raw)`` with ``B`` a ``d x d`` orthogonal completion of the
    initial ``R`` (what torch's map keeps as ``base``), so Adam sees ``raw`` in pyreft's coordinates."""
    d, r = basis.shape
    noise = torch.randn(d, d - r, generator=torch.Generator().manual_seed(10_000 + seed))
    frame = torch.linalg.qr(torch.cat([basis, noise], 1))[0]
    frame[:, :r] *= torch.sign((frame[:, :r] * basis).sum(0))
    rotation.raw.copy_(rotation.scale * frame.T @ basis)

    def forward():
        q, u = torch.linalg.qr(frame @ rotation.raw.float())
        return q * torch.where(u.diagonal() < 0, -1.0, 1.0)
    rotation.forward = forward


def run_reftkit(model, job: dict, method: str) -> dict:
    """One job with reftkit's LoReFT; ``reftkit_unit`` stores ``raw = R`` (unit columns), as before the fix;
    ``reftkit_frame`` is the diagnostic of :func:`_in_pyreft_frame`."""
    import reftkit
    from reftkit.training.causal_lm import causal_lm_loss

    reft = reftkit.get_reft_model(model, [{"layer": layer, "component": "block_output", "positions": "l1",
                                           "intervention": "loreft", "low_rank_dimension": RANK}
                                          for layer in job["layers"]])
    ivs = list(reft.interventions.values())
    with torch.no_grad():
        for iv, w in zip(ivs, job["init"]):
            if method == "reftkit_unit":
                iv.rotation.raw.copy_(w["R"])
            elif method == "reftkit_frame":
                _in_pyreft_frame(iv.rotation, w["R"], job["seed"])
            else:
                iv.rotation.assign(w["R"])
            iv.source.weight.copy_(w["W"])
            iv.source.bias.copy_(w["b"])
    named = [(f"{k}.{n}", p) for k, iv in reft.interventions.items() for n, p in iv.named_parameters()]
    k = len(ivs)

    def loss_of(batch: dict) -> torch.Tensor:
        locs = batch["locs"].unsqueeze(1).expand(-1, k, -1)
        return causal_lm_loss(reft, batch["input_ids"], batch["attention_mask"], labels=batch["labels"],
                              intervention_locations=locs)["loss"]

    def probe() -> dict:
        norms = torch.cat([iv.rotation.raw.detach().norm(dim=0) for iv in ivs])
        return {"raw_min": float(norms.min()), "raw_max": float(norms.max())}

    try:
        return run_job(job, named, loss_of, lambda: [iv.rotation().detach().clone() for iv in ivs], probe)
    finally:
        reft.detach()


def run(args: argparse.Namespace) -> tuple[dict, dict]:
    import reftkit

    if not Path(PYREFT_PYTHON).exists():
        raise SystemExit(f"no pyreft venv at {PYREFT_PYTHON}: run `bash tests/goldens/make_pyreft_goldens.sh` "
                         "or set PYREFT_PYTHON")
    torch.set_num_threads(args.threads)
    started, load_start, wall = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), os.getloadavg(), \
        time.perf_counter()
    smollm2, tokenizer = reftkit.load_model("smollm2")
    models = {"smollm2": smollm2.float().eval(), "random": random_model()}
    jobs = build_jobs(tokenizer, args, smollm2.config.hidden_size)
    results: dict = {}
    with tempfile.TemporaryDirectory(prefix="reftkit-bench-dynamics-") as tmp:
        workdir = Path(tmp)
        for name in {job["model"] for job in jobs}:
            save_for_445(models[name], workdir / name)
        torch.save({"threads": args.threads, "rank": RANK, "jobs": [j for j in jobs if "pyreft" in j["methods"]]},
                   workdir / "setup.pt")
        log = open(workdir / "pyreft.log", "w")
        worker = subprocess.Popen(
            [PYREFT_PYTHON, str(Path(__file__).resolve().parent / "dynamics_pyreft_worker.py"), str(workdir)],
            stdout=log, stderr=subprocess.STDOUT,
            env={**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONWARNINGS": "ignore"})
        for job in jobs:
            for method in job["methods"]:
                if method != "pyreft":
                    t0 = time.perf_counter()
                    results.setdefault(method, {})[job["name"]] = out = run_reftkit(models[job["model"]], job,
                                                                                    method)
                    print(f"{method} {job['name']}: loss {out['loss'][0]:.4f} -> {out['loss'][-1]:.4f}, "
                          f"|R-R0| {out['dR'][-1]:.3f}, orth {out['orth']:.1e} ({time.perf_counter() - t0:.0f} s)",
                          flush=True)
        rc = worker.wait()
        log.close()
        if rc != 0:
            raise RuntimeError(f"pyreft worker failed (rc={rc}):\n{(workdir / 'pyreft.log').read_text()[-4000:]}")
        pyreft_side = torch.load(workdir / "result_pyreft.pt", weights_only=False)
        results = {"pyreft": pyreft_side["results"], **results}
    import transformers

    header = {"date": started, "load": (load_start, os.getloadavg()), "wall": time.perf_counter() - wall,
              "threads": args.threads, "software": f"reftkit: transformers {transformers.__version__}, torch "
              f"{torch.__version__}; pyreft side: {pyreft_side['software']}",
              "command": command(sys.argv[1:])}
    return results, header


def command(argv: list[str]) -> str:
    """The command that reproduces a run and writes its section: its own options, less the file ones."""
    kept, skip = [], False
    for arg in argv:
        if skip or arg in ("--save", "--load"):
            skip = not skip
            continue
        if arg != "--write" and not arg.startswith(("--save=", "--load=")):
            kept.append(arg)
    return " ".join(["python benchmarks/bench_dynamics.py", *kept, "--write"])


def merge(saved: list[dict]) -> tuple[dict, dict]:
    """Results of several saved runs (e.g. a task re-run alone) as one; the header lists every command."""
    results: dict = {}
    for run_ in saved:
        for method, jobs in run_["results"].items():
            results.setdefault(method, {}).update(jobs)
    header = dict(saved[0]["header"])
    header["command"] = "; ".join(command(r["header"]["command"].split()[2:]) for r in saved)
    header["wall"] = sum(r["header"]["wall"] for r in saved)
    header["load"] = (saved[0]["header"]["load"][0], saved[-1]["header"]["load"][1])
    return results, header


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", default="quickstart,recipe,decay")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--long-seeds", type=int, default=1, help="quickstart seeds run for --long-steps")
    parser.add_argument("--long-steps", type=int, default=50)
    parser.add_argument("--long-methods", default="pyreft,reftkit")
    parser.add_argument("--decay-seeds", type=int, default=3, help="seeds of the 300-step weight-decay run")
    for task, methods in (("quickstart", METHODS), ("recipe", ("pyreft", "reftkit")),
                          ("decay", ("pyreft", "reftkit", "reftkit_unit"))):
        parser.add_argument(f"--{task}-methods", default=",".join(methods))
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process (two processes)")
    parser.add_argument("--write", action="store_true", help="record the result in benchmarks/RESULTS.md")
    parser.add_argument("--save", type=Path, help="also save the raw curves (torch.save) to this file")
    parser.add_argument("--load", type=Path, nargs="+",
                        help="report runs saved with --save instead of running (later files win per method and job)")
    args = parser.parse_args(argv)
    if args.load:
        results, header = merge([torch.load(f, weights_only=False) for f in args.load])
    else:
        results, header = run(args)
    if args.save:
        torch.save({"results": results, "header": header}, args.save)
    from dynamics_report import print_report, write_results

    print_report(results, header)
    if args.write:
        write_results(results, header, READING)
    return 0


if __name__ == "__main__":
    sys.exit(main())
