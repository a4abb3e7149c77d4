#!/usr/bin/env python
"""ReFT on a quantized base: the WordNet recipe's subset on SmolLM2-135M-Instruct with its linear layers in
float32, torchao int8 weight-only and int4 weight-only (groups of 32); the interventions stay float32.

Each variant is ``reftkit train configs/wordnet_1k.yaml`` with ``quantization:`` set, in a fresh process, on the
same examples (``--n-train`` training words, ``--n-eval`` held-out words, ``--epochs`` epochs): it reports the
final training loss, the held-out ROUGE-L (greedy answers against the WordNet glosses), the base's weight bytes,
the peak RSS while training (the counter is reset after the float32 load and quantization) and the time.

    python benchmarks/bench_quantized.py --write       # 200 words, 3 epochs (~10 min on 2 CPUs)
    python benchmarks/bench_quantized.py --n-train 16 --n-eval 8 --epochs 1    # smoke run

Needs torchao (``pip install -e .[quantized]``).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
ROOT = Path(__file__).resolve().parents[1]
SCHEMES = ("float32", "int8_weight_only", "int4_weight_only")


def run_variant(scheme: str, workdir: Path, args: argparse.Namespace) -> dict:
    out = workdir / scheme
    sets = [f"output_dir={out}", f"data.n_train={args.n_train}", f"data.n_eval={args.n_eval}",
            f"training.num_train_epochs={args.epochs}", "eval.before=false",
            f"quantization={'null' if scheme == 'float32' else scheme}"]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false",
           "PYTHONWARNINGS": "ignore"}
    command = [sys.executable, "-m", "reftkit", "train", str(ROOT / "configs" / "wordnet_1k.yaml")]
    for item in sets:
        command += ["--set", item]
    log = workdir / f"{scheme}.log"
    with open(log, "w") as fh:
        rc = subprocess.call(command, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    if rc != 0:
        raise RuntimeError(f"{scheme} failed (rc={rc}); its log ends with:\n{log.read_text()[-3000:]}")
    metrics = json.loads((out / "metrics.json").read_text())
    curve = metrics["loss_curve"]
    return {"variant": scheme, "final_loss": curve[-1][1], "first_loss": curve[0][1],
            "rougeL": metrics["after"]["rougeL"], "rouge1": metrics["after"]["rouge1"],
            "base_weight_mb": metrics["base_weight_mb"], "train_peak_rss_mb": metrics.get("train_peak_rss_mb"),
            "train_added_mb": metrics["train_peak_rss_mb"] - metrics["train_start_rss_mb"],
            "train_s": metrics["train_seconds"], "total_s": metrics["total_seconds"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-train", type=int, default=200)
    parser.add_argument("--n-eval", type=int, default=50)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--variants", default=",".join(SCHEMES))
    parser.add_argument("--write", action="store_true", help="record the result in benchmarks/RESULTS.md")
    args = parser.parse_args(argv)
    import pandas as pd
    from tqdm.auto import tqdm

    started, load_start, wall = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), os.getloadavg(), \
        time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory(prefix="reftkit-bench-quantized-") as tmp:
        for scheme in tqdm(args.variants.split(","), desc="bases"):
            rows.append(run_variant(scheme, Path(tmp), args))
            tqdm.write(json.dumps(rows[-1]))
    table = pd.DataFrame(rows)
    base = table.set_index("variant").loc["float32"] if "float32" in set(table.variant) else None
    if base is not None:
        table["weights_vs_fp32"] = table.base_weight_mb / base.base_weight_mb
        table["train_peak_vs_fp32"] = table.train_peak_rss_mb / base.train_peak_rss_mb
        table["train_added_vs_fp32"] = table.train_added_mb / base.train_added_mb
        table["time_vs_fp32"] = table.train_s / base.train_s
    print(table.to_string(index=False))
    if args.write:
        write_results(table, args, started, load_start, time.perf_counter() - wall)
    return 0


def write_results(table, args: argparse.Namespace, started: str, load_start, wall: float) -> None:
    from importlib.metadata import version

    import torch
    import transformers
    from results_md import cpu_model, md_table, write_section

    begin, end = "<!-- bench_quantized:BEGIN -->", "<!-- bench_quantized:END -->"
    (l1, l5, _), (e1, e5, _) = load_start, os.getloadavg()
    command = "python benchmarks/bench_quantized.py --write" + \
        ("" if (args.n_train, args.n_eval, args.epochs) == (200, 50, 3) else
         f" --n-train {args.n_train} --n-eval {args.n_eval} --epochs {args.epochs}")
    section = "\n".join([
        begin, "## bench_quantized: ReFT on a quantized SmolLM2 (the recipe's subset)", "",
        f"- date: {started}; machine: {cpu_model()}, {os.cpu_count()} logical CPUs, torch threads = {args.threads}; "
        f"load average (1/5 min) {l1:.2f} / {l5:.2f} (start), {e1:.2f} / {e5:.2f} (end)",
        f"- software: torch {torch.__version__}, transformers {transformers.__version__}, torchao {version('torchao')}",
        f"- command: `{command}` (wall time {wall:.0f} s)",
        f"- task: `configs/wordnet_1k.yaml` (LoReFT r=4 at layers 8/16/24, last prompt token, suffix training) on "
        f"{args.n_train} training words for {args.epochs} epochs, scored on {args.n_eval} held-out words (greedy, "
        "48 new tokens); the base's linear layers in float32, torchao int8 weight-only (per channel) or int4 "
        "weight-only (groups of 32, torchao's intx layout: its Int4WeightOnlyConfig needs CUDA kernels); the "
        "interventions float32 in every variant.", "",
        md_table(table.round(3)), "",
        "- `base_weight_mb`: bytes of the base's weights (int data and scales for quantized layers; the 49,152 x 576 "
        "embedding, tied to the LM head, stays float32 and is most of what remains). `train_peak_rss_mb`: the "
        "process's peak resident memory while training, counted from after the load and quantization (the counter is "
        "reset then); `train_added_mb`: that peak minus the resident memory when training began, i.e. what training "
        "itself added (activations, saved tensors, the suffix-training store, optimizer state). The peak also holds "
        "the process itself: a quantized run begins training with more resident (torchao's import is about 40 MB of "
        "it; the recipe trims the heap and releases the float32 checkpoint's memory map after quantizing, without "
        "which the map's pages stayed resident), so compare `train_added_mb` for what training needs.",
        "- Backward keeps torchao weights quantized (`reftkit.training.quantized_linear`): torchao's own `F.linear` "
        "saves a dequantized float32 copy of every weight the gradient crosses.",
        "- On CPU torchao dequantizes weight-only layers in each matmul, so the quantized bases train slower here. "
        "Gradients through them equal the dequantized float32 model's (`tests/test_quantized.py`).", end])
    write_section(begin, end, section)


if __name__ == "__main__":
    sys.exit(main())
