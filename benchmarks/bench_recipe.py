#!/usr/bin/env python
"""One epoch of the 1k WordNet recipe, reftkit against pyreft's own data module and trainer.

Both sides train the same thing: SmolLM2-135M-Instruct (float32, CPU), LoReFT rank 4 on
``block_output`` of layers 8, 16 and 24 at the last prompt token, on the same 1,000
"Define the word X." -> gloss examples rendered with the model's chat template, batch 8, AdamW at
lr 2e-3 with linear decay and 10 warm-up steps, one epoch (125 steps), seed 0.

  pyreft            pyreft 0.1.0 / pyvene 0.1.8 / transformers 4.45.1, in their own venv:
                    ``make_last_position_supervised_data_module`` + ``ReftTrainerForCausalLM``
  reftkit           ``make_last_position_supervised_data_module(chat_template=True)`` + ``ReftTrainer``
                    with the recipe's settings (``configs/wordnet_1k.yaml``: length-grouped batches)
  reftkit_shuffled  the same with plain shuffled batches, as pyreft samples them: separates what
                    length grouping buys from what the trainer and hooks buy
  pyreft_bf16, reftkit_bf16
                    the same two pipelines with ``TrainingArguments(bf16=True)`` (bf16 autocast on CPU;
                    the model's weights stay float32 on both sides, like for like)

Every variant runs in a fresh process (the same saved model folder and the same example strings),
one after the other, in an order rotated per repeat; each reports the wall time of its phases, its
peak RSS, the tokens it padded and trained on, and its mean training loss.
End to end = data module + trainer construction + ``train()``; loading the model is reported apart.

    python benchmarks/bench_recipe.py --write          # full: 1,000 examples, one epoch (~15 min)
    python benchmarks/bench_recipe.py --n-train 48     # smoke run

The same file is the worker (``--worker NAME DIR``); the pyreft worker runs with the pyreft venv's
python (``PYREFT_PYTHON``, made by ``bash tests/goldens/make_pyreft_goldens.sh``) and imports only
torch, transformers and pyreft there.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# this folder's helpers, imported on the parent side only: the pyreft worker imports nothing from them
sys.path.insert(0, str(Path(__file__).resolve().parent))
PYREFT_PYTHON = os.environ.get("PYREFT_PYTHON", "/tmp/pyreft_golden_venv/bin/python")
VARIANTS = ("pyreft", "reftkit", "reftkit_full", "reftkit_shuffled", "pyreft_bf16", "reftkit_bf16")
DEFAULT_VARIANTS = ("pyreft", "reftkit", "reftkit_full")
LAYERS, RANK = [8, 16, 24], 4
TRAINING = dict(per_device_train_batch_size=8, learning_rate=2e-3, lr_scheduler_type="linear",
                warmup_steps=10, weight_decay=0.0, seed=0, logging_steps=10, save_strategy="no", report_to=[],
                use_cpu=True, dataloader_num_workers=0, disable_tqdm=True)


def _peak_rss_mb() -> float:
    """This process's peak RSS. ``VmHWM`` rather than ``ru_maxrss``: the latter survives ``exec``, so a
    worker started by a large parent (the suite, with models loaded) would report the parent's peak."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _batch_shape(batch) -> list:
    """``[rows, width, labelled, prefix, suffix]`` for ``flop_count.batch_flops``: ``prefix`` / ``suffix`` are the
    widths suffix training runs the batch at (the max over rows of the split ``s`` = first intervened or
    supervised position, and of ``e - s`` with ``e`` one past the last supervised prediction, as
    ``reftkit.training.suffix`` cuts it). Plain torch: pyreft's worker runs it too."""
    import torch

    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    rows, width = ids.shape
    lengths = mask.sum(1)
    located = batch["intervention_locations"].reshape(rows, -1)
    first_located = torch.where(located >= 0, located, torch.full_like(located, width)).amin(1)
    supervised = labels[:, 1:] != -100
    columns = torch.arange(width - 1).expand(rows, -1)
    first_supervised = torch.where(supervised, columns, torch.full_like(columns, width)).amin(1)
    split = torch.minimum(torch.minimum(first_located, first_supervised), lengths - 1)
    last_supervised = torch.where(supervised, columns, torch.full_like(columns, -1)).amax(1)
    ends = torch.minimum(torch.maximum(last_supervised + 1, split + 1), lengths)
    return [rows, width, int(supervised.sum()), int(split.max()), int((ends - split).max())]


def _padding_counter(collator):
    """Wrap a collator to count the tokens it emits (padded) and the real ones, and keep each batch's shape
    (for the FLOP count)."""
    counts = {"padded_tokens": 0, "real_tokens": 0, "labelled_tokens": 0, "batches": 0, "shapes": []}

    def collate(features):
        batch = collator(features)
        counts["padded_tokens"] += batch["input_ids"].numel()
        counts["real_tokens"] += int(batch["attention_mask"].sum())
        counts["labelled_tokens"] += int((batch["labels"] != -100).sum())
        counts["batches"] += 1
        counts["shapes"].append(_batch_shape(batch))
        return batch

    return collate, counts


def _epoch_clock():
    """A TrainerCallback recording the seconds since ``train()`` began at the end of each epoch, and the loss
    logged every ``logging_steps``."""
    import transformers

    class Clock(transformers.TrainerCallback):
        def __init__(self):
            self.start, self.epochs, self.losses = None, [], []

        def on_train_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_epoch_end(self, args, state, control, **kwargs):
            self.epochs.append(time.perf_counter() - self.start)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.losses.append([state.global_step, logs["loss"]])

    return Clock()


# ===================================================================================== workers
def _phases(load, build_data, build_trainer) -> dict:
    """Time the phases of one run: load the model, build the data module, the trainer, train."""
    t0 = time.perf_counter()
    loaded = load()
    t1 = time.perf_counter()
    module = build_data(*loaded)
    t2 = time.perf_counter()
    collate, counts = _padding_counter(module["data_collator"])
    trainer = build_trainer(*loaded, module, collate)
    clock = _epoch_clock()
    trainer.add_callback(clock)
    t3 = time.perf_counter()
    result = trainer.train()
    t4 = time.perf_counter()
    suffix = getattr(trainer, "suffix_training", None)
    return {"load_s": t1 - t0, "data_s": t2 - t1, "trainer_s": t3 - t2, "train_s": t4 - t3,
            "epoch_s": clock.epochs, "loss_curve": clock.losses, "train_loss": result.training_loss,
            "steps": result.global_step, "suffix": suffix.summary() if suffix is not None else None, **counts}


def _load(workdir: Path, **dtype) -> tuple:
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(workdir / "model", attn_implementation="sdpa", **dtype)
    return model, transformers.AutoTokenizer.from_pretrained(workdir / "model")


def worker_pyreft(workdir: Path, extra: dict) -> dict:
    from importlib.metadata import version

    import pyreft
    import torch
    import transformers

    setup = json.loads((workdir / "setup.json").read_text())
    torch.manual_seed(0)

    def build_data(model, tokenizer):
        d = model.config.hidden_size
        reps = [{"layer": layer, "component": "block_output", "low_rank_dimension": RANK,
                 "intervention": pyreft.LoreftIntervention(embed_dim=d, low_rank_dimension=RANK, dropout=0.0,
                                                           dtype=torch.float32)} for layer in LAYERS]
        built["reft"] = pyreft.get_reft_model(model, pyreft.ReftConfig(representations=reps), set_device=False)
        # The rendered response already ends with the chat template's end token: nonstop=True adds no eos.
        return pyreft.make_last_position_supervised_data_module(
            tokenizer, model, setup["prompt_texts"], setup["response_texts"], num_interventions=len(LAYERS),
            nonstop=True)

    def build_trainer(model, tokenizer, module, collate):
        args = transformers.TrainingArguments(output_dir=str(workdir / "out"), **TRAINING, **extra)
        return pyreft.ReftTrainerForCausalLM(model=built["reft"], tokenizer=tokenizer, args=args,
                                             train_dataset=module["train_dataset"], data_collator=collate)
    built: dict = {}
    out = _phases(lambda: _load(workdir, torch_dtype=torch.float32), build_data, build_trainer)
    out["software"] = (f"pyreft {version('pyreft')}, pyvene {version('pyvene')}, "
                       f"transformers {transformers.__version__}, torch {torch.__version__}")
    return out


def worker_reftkit(workdir: Path, sampling: str, extra: dict, suffix: bool = True) -> dict:
    import torch
    import transformers

    import reftkit
    from reftkit.training import ReftTrainer

    setup = json.loads((workdir / "setup.json").read_text())
    torch.manual_seed(0)

    def build_data(model, tokenizer):
        reps = [{"layer": layer, "component": "block_output", "positions": "l1", "intervention": "loreft",
                 "low_rank_dimension": RANK} for layer in LAYERS]
        built["reft"] = reftkit.get_reft_model(model, reps)
        return reftkit.make_last_position_supervised_data_module(tokenizer, built["reft"], setup["prompts"],
                                                                 setup["responses"], chat_template=True)

    def build_trainer(model, tokenizer, module, collate):
        args = transformers.TrainingArguments(output_dir=str(workdir / "out"), train_sampling_strategy=sampling,
                                              **TRAINING, **extra)
        return ReftTrainer(model=built["reft"], args=args, train_dataset=module["train_dataset"],
                           data_collator=collate, suffix_training="auto" if suffix else False)
    built: dict = {}
    out = _phases(lambda: _load(workdir, dtype=torch.float32), build_data, build_trainer)
    out["software"] = f"reftkit, transformers {transformers.__version__}, torch {torch.__version__}"
    return out


def worker_main(name: str, workdir: str) -> None:
    folder = Path(workdir)
    extra = {"bf16": True} if name.endswith("_bf16") else {}
    extra["num_train_epochs"] = json.loads((folder / "setup.json").read_text())["epochs"]
    if name.startswith("pyreft"):
        out = worker_pyreft(folder, extra)
    else:
        out = worker_reftkit(folder, "random" if name == "reftkit_shuffled" else "group_by_length", extra,
                             suffix=name != "reftkit_full")
    out["end_to_end_s"] = out["data_s"] + out["trainer_s"] + out["train_s"]
    out["first_epoch_end_to_end_s"] = out["data_s"] + out["trainer_s"] + out["epoch_s"][0]
    out["peak_rss_mb"] = _peak_rss_mb()
    (folder / f"result_{name}.json").write_text(json.dumps(out))


# ===================================================================================== parent side
def prepare(workdir: Path, n_train: int, epochs: int = 1) -> dict:
    """Save the embedded SmolLM2 where transformers 4.45 can read it; render the examples."""
    import torch
    from flop_count import model_dims
    from pyreft_venv import save_for_445

    import reftkit
    from reftkit.data.datasets import define_word_dataset

    model, tokenizer = reftkit.load_model("smollm2")
    dims = model_dims(model)
    save_for_445(model.float(), workdir / "model")
    tokenizer.save_pretrained(workdir / "model")
    # transformers 5 names its fast-tokenizer class TokenizersBackend; 4.45 knows it by its old name
    tok_cfg = workdir / "model" / "tokenizer_config.json"
    tok_cfg.write_text(json.dumps({**json.loads(tok_cfg.read_text()), "tokenizer_class": "PreTrainedTokenizerFast"}))
    rows = define_word_dataset(n_train=n_train, n_eval=200, seed=0, min_count=3)["train"]
    prompts = [r["prompt"] for r in rows]
    responses = [r["response"] for r in rows]
    prompt_texts, response_texts = [], []
    for p, r in zip(prompts, responses):
        head = tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                             add_generation_prompt=True)
        full = tokenizer.apply_chat_template([{"role": "user", "content": p}, {"role": "assistant", "content": r}],
                                             tokenize=False)
        prompt_texts.append(head)
        response_texts.append(full[len(head):])
    setup = {"prompts": prompts, "responses": responses, "prompt_texts": prompt_texts,
             "response_texts": response_texts, "n_train": n_train, "epochs": epochs, "dims": dims,
             "torch_threads": torch.get_num_threads()}
    (workdir / "setup.json").write_text(json.dumps(setup))
    return setup


def run_variant(name: str, workdir: Path, threads: int | None = None) -> dict:
    python = PYREFT_PYTHON if name.startswith("pyreft") else sys.executable
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore"}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    if not name.startswith("pyreft"):
        env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])
    log = workdir / f"{name}.log"
    start = time.perf_counter()
    with open(log, "w") as fh:
        rc = subprocess.call([python, str(Path(__file__).resolve()), "--worker", name, str(workdir)],
                             stdout=fh, stderr=subprocess.STDOUT, env=env)
    if rc != 0:
        raise RuntimeError(f"{name} worker failed (rc={rc}); its log ends with:\n{log.read_text()[-4000:]}")
    out = json.loads((workdir / f"result_{name}.json").read_text())
    out["process_s"] = time.perf_counter() - start
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", nargs=2, metavar=("NAME", "DIR"), help=argparse.SUPPRESS)
    parser.add_argument("--n-train", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--epochs", type=int, default=1,
                        help="epochs per run (the recipe trains 3); each epoch's end is timed, so a 3-epoch run "
                             "also gives the first epoch's time")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads in every worker (default: torch's own choice); 1 is steadier on a "
                             "shared machine, where another busy process makes OpenMP threads wait on each other")
    parser.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                        help=f"comma-separated, from {', '.join(VARIANTS)}")
    parser.add_argument("--write", action="store_true", help="record the result in benchmarks/RESULTS.md")
    args = parser.parse_args(argv)
    if args.worker:
        worker_main(*args.worker)
        return 0
    summary, ratios, header = run(args)
    if args.write:
        from recipe_report import write_results
        write_results(summary, ratios, header, RANK, LAYERS)
    return 0


def _flops(result: dict, name: str, dims: dict, steps_per_epoch: int) -> float:
    """The variant's FLOPs over its run (flop_count.batch_flops on each batch it trained on)."""
    from flop_count import batch_flops

    path = "hf" if name.startswith("pyreft") else "label_only" if name == "reftkit_full" else "suffix"
    stored = result.get("suffix") or {}
    cached_from = steps_per_epoch if stored.get("cached_steps") else len(result["shapes"])
    return sum(batch_flops(dims, shape, min(LAYERS), path, cached=i >= cached_from)
               for i, shape in enumerate(result["shapes"]))


def run(args: argparse.Namespace):
    """One measurement: ``(summary per variant, ratios against pyreft, header)`` as DataFrames."""
    import pandas as pd
    from tqdm.auto import tqdm

    if not Path(PYREFT_PYTHON).exists():
        raise SystemExit(f"no pyreft venv at {PYREFT_PYTHON}: run `bash tests/goldens/make_pyreft_goldens.sh` "
                         "or set PYREFT_PYTHON")
    variants = args.variants.split(",")
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        raise SystemExit(f"--variants {unknown}: choose from {', '.join(VARIANTS)}")
    started, load_start = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), os.getloadavg()
    wall = time.perf_counter()
    rows, curves = [], {}
    with tempfile.TemporaryDirectory(prefix="reftkit-bench-recipe-") as tmp:
        workdir = Path(tmp)
        setup = prepare(workdir, args.n_train, args.epochs)
        if args.threads:
            setup["torch_threads"] = args.threads
        steps_per_epoch = -(-args.n_train // TRAINING["per_device_train_batch_size"])
        order = [variants[(r + i) % len(variants)] for r in range(args.repeats) for i in range(len(variants))]
        for i, name in enumerate(tqdm(order, desc=f"variants ({args.epochs} epoch(s) each)")):
            result = run_variant(name, workdir, args.threads)
            result["tflops"] = _flops(result, name, setup["dims"], steps_per_epoch) / 1e12
            suffix = result.pop("suffix") or {}
            result["cached_steps"] = suffix.get("cached_steps", 0)
            result["fallback_steps"] = suffix.get("full_steps", 0)
            curves.setdefault(name, result["loss_curve"])
            rows.append({"variant": name, "repeat": i // len(variants),
                         **{k: v for k, v in result.items() if k not in ("shapes", "loss_curve", "epoch_s")}})
            tqdm.write(f"{name}: end to end {result['end_to_end_s']:.1f} s (first epoch "
                       f"{result['first_epoch_end_to_end_s']:.1f} s), loss {result['train_loss']:.3f}")
    df = pd.DataFrame(rows)
    columns = ["first_epoch_end_to_end_s", "end_to_end_s", "data_s", "trainer_s", "train_s", "load_s", "tflops",
               "peak_rss_mb", "train_loss", "padded_tokens", "real_tokens", "labelled_tokens", "steps",
               "cached_steps", "fallback_steps"]
    summary = df.groupby("variant", sort=False)[columns].median().reset_index()
    summary["gflop_per_s"] = summary.tflops * 1e3 / summary.train_s
    print(summary.to_string(index=False))
    ratios = []
    table = summary.set_index("variant")
    for name in variants:
        ref = "pyreft_bf16" if name.endswith("_bf16") else "pyreft"
        if name.startswith("pyreft") or ref not in table.index:
            continue
        base, row = table.loc[ref], table.loc[name]
        ratios.append({"ratio": f"{ref} / {name}", "first_epoch": base.first_epoch_end_to_end_s /
                       row.first_epoch_end_to_end_s, "end_to_end": base.end_to_end_s / row.end_to_end_s,
                       "train": base.train_s / row.train_s, "data": base.data_s / row.data_s,
                       "flops": base.tflops / row.tflops, "peak_rss": row.peak_rss_mb / base.peak_rss_mb})
    if ratios:
        print(pd.DataFrame(ratios).to_string(index=False))
    curve_gap = None
    if "reftkit" in curves and "reftkit_full" in curves:
        a, b = curves["reftkit"], curves["reftkit_full"]
        curve_gap = max(abs(x[1] - y[1]) for x, y in zip(a, b)) if a and len(a) == len(b) else float("nan")
        print(f"loss curves, reftkit (suffix training) vs reftkit_full: {len(a)} points, max |difference| "
              f"{curve_gap:.2e}")
    header = {"date": started, "load": (load_start, os.getloadavg()), "wall": time.perf_counter() - wall,
              "command": "python benchmarks/bench_recipe.py --write" + ("" if args.n_train == 1000 else
                                                                         f" --n-train {args.n_train}")
              + (f" --epochs {args.epochs}" if args.epochs != 1 else "")
              + (f" --threads {args.threads}" if args.threads else "")
              + (f" --repeats {args.repeats}" if args.repeats != 1 else "")
              + (f" --variants {args.variants}" if args.variants != ",".join(DEFAULT_VARIANTS) else ""),
              "setup": setup, "software": dict(zip(df.variant, df.software)), "curves": curves,
              "curve_gap": curve_gap, "epochs": args.epochs}
    return summary, pd.DataFrame(ratios), header


if __name__ == "__main__":
    if "--worker" in sys.argv:
        i = sys.argv.index("--worker")
        worker_main(sys.argv[i + 1], sys.argv[i + 2])
        sys.exit(0)
    sys.exit(main())
