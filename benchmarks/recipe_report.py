"""The RESULTS.md section of ``bench_recipe.py`` (kept apart: the parent side only, never the pyreft worker)."""
from __future__ import annotations

import os


def write_results(summary, ratios, header: dict, rank: int, layers: list[int]) -> None:
    """Record one bench_recipe run in RESULTS.md (its own section; a partial run keeps the full run's)."""
    from results_md import cpu_model, md_table, write_section

    names = list(summary["variant"])
    key = "" if "pyreft" in names else " " + ",".join(names)  # a partial run keeps the full run's section
    begin, end = f"<!-- bench_recipe:BEGIN{key} -->", f"<!-- bench_recipe:END{key} -->"
    (l1, l5, _), (e1, e5, _) = header["load"]
    epochs = header["epochs"]
    targets = {"pyreft / reftkit": (2.5, 4.0)}
    ratio_lines = []
    for r in ratios.itertuples():
        line = (f"- **{r.ratio}: {r.first_epoch:.2f}x for the first epoch, {r.end_to_end:.2f}x for {epochs} "
                f"epoch(s)** end to end (train loop {r.train:.2f}x, data module {r.data:.2f}x, FLOPs "
                f"{r.flops:.2f}x fewer); peak RSS {r.peak_rss:.2f}x the reference's")
        if r.ratio in targets:
            one, three = targets[r.ratio]
            line += f"; targets >= {one}x (one epoch): {'met' if r.first_epoch >= one else 'not met'}"
            if epochs == 3:
                line += f", >= {three}x (three epochs): {'met' if r.end_to_end >= three else 'not met'}"
        ratio_lines.append(line)
    gap = header["curve_gap"]
    curve_line = [] if gap is None else [
        f"- Loss curve (every 10 steps) of `reftkit` (suffix training) against `reftkit_full` (the full path), same "
        f"batches in the same order: max |difference| {gap:.2e} over {len(header['curves']['reftkit'])} points."]
    section = "\n".join([
        begin, f"## bench_recipe{key}: the 1k WordNet recipe against pyreft ({epochs} epoch(s))", "",
        f"- date: {header['date']}",
        f"- machine: {cpu_model()}, {os.cpu_count()} logical CPUs, torch threads = {header['setup']['torch_threads']}; "
        f"load average (1/5 min) {l1:.2f} / {l5:.2f} (start), {e1:.2f} / {e5:.2f} (end)",
        "- software: " + "; ".join(f"{k}: {v}" for k, v in header["software"].items()),
        f"- command: `{header['command']}` (wall time {header['wall']:.0f} s)",
        f"- task: SmolLM2-135M-Instruct float32 (`_bf16` variants: bf16 autocast), LoReFT r={rank} at block_output "
        f"of layers {layers}, last prompt token; {header['setup']['n_train']} WordNet examples (chat template), "
        f"batch 8, {epochs} epoch(s), AdamW lr 2e-3 with linear decay",
        "- variants: `pyreft` (its data module and ReftTrainerForCausalLM); `reftkit` (ReftTrainer's defaults: "
        "suffix training, length-grouped batches); `reftkit_full` (the same with `suffix_training=False`); "
        "`reftkit_shuffled` (suffix training, shuffled batches as pyreft's)",
        "", "Seconds, TFLOPs, peak RSS (MB) and token counts per variant (median over repeats):", "",
        md_table(summary.round(3)), "", *ratio_lines, *curve_line, "",
        "- `first_epoch_end_to_end_s` = data module + trainer construction + the first epoch of `train()` (its end "
        "is timed by a callback); `end_to_end_s` the same with every epoch.",
        "- `tflops` counts, per batch, the shapes each path computes (`flop_count.batch_flops`): pyreft runs every "
        "padded position through all 30 layers and the 49,152-wide LM head, backward from layer 8; "
        "`reftkit_full` the same with the head on labelled rows only; suffix training runs each prompt up to its "
        "last token without autograd (epoch 1) or reads its keys/values and layer 8's input from the store "
        "(epochs 2+), and only the rest up to the last supervised prediction (not the final token, whose "
        "prediction nobody reads) forward and backward from layer 8. `gflop_per_s` = tflops / train_s: "
        "what each path achieves against the same floor.",
        "- `cached_steps`: batches run from the per-example store; `fallback_steps`: batches suffix training "
        "passed to the full path (0 here).",
        "- `train_loss` is the mean training loss; pyreft sees the same tokens (`labelled_tokens`) in another order.",
        "- Timings with 2 torch threads are unreliable here: when another process is busy, OpenMP threads wait "
        "on each other (a pyreft epoch took 873 s at 2 threads, 322 s at 1); hence `--threads 1`.", end])
    write_section(begin, end, section)
