"""``compare(...)``: ReFT interventions and weight-space methods on the same model, data, seed and budget.

One row per method, with the fields of peft's ``method_comparison`` results where they fit
(``num_trainable_params``, ``num_total_params``, ``file_size``, ``train_time``, ``train_loss``,
``accelerator_memory_max``) plus reftkit's: the trainable share, the peak resident memory during
training (CPU runs have no accelerator counter), the generation scores (BLEU-4, ROUGE-1/2/L, exact
match) and the inference latency and throughput of that evaluation. ``inference_latency_s`` is the mean
wall time of one ``generate`` call (one batch of ``eval_batch_size`` prompts); ``tokens_per_s`` counts each
row's tokens up to and including its EOS, so a method that answers briefly while another row of its batch
runs on to ``max_new_tokens`` scores fewer useful tokens per second than the raw decoding speed.

Each method is built on the base model, trained with :class:`reftkit.ReftTrainer` on the same
last-position supervised data module (same order: the seed is reset before each method), evaluated by
greedy generation, saved (only what it trained), then detached, so the next method starts from the
bit-identical base.
"""
from __future__ import annotations

import json
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Sequence

import pandas as pd
import torch
from torch import nn

from .baselines import saved_weights_size
from .common import check_tokenizer_fits
from .methods import Method, as_method

SCORE_COLUMNS = ("bleu4", "rouge1", "rouge2", "rougeL", "exact_match")


class _PeakMemory:
    """Peak resident set size (MB) of this process while the block runs, sampled every 10 ms from
    ``/proc/self/statm`` (``ru_maxrss`` cannot be reset between methods); CUDA's own peak counter too."""

    def __init__(self) -> None:
        self.peak_rss_mb = float("nan")
        self.accelerator_mb = float("nan")
        self._stop = threading.Event()

    @staticmethod
    def _rss_mb() -> float:
        try:
            pages = int(Path("/proc/self/statm").read_text().split()[1])
        except (OSError, ValueError, IndexError):
            return float("nan")
        import os

        return pages * os.sysconf("SC_PAGE_SIZE") / 2 ** 20

    def _sample(self) -> None:
        while not self._stop.wait(0.01):
            self.peak_rss_mb = max(self.peak_rss_mb, self._rss_mb())

    def __enter__(self) -> "_PeakMemory":
        self.peak_rss_mb = self._rss_mb()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_rss_mb = max(self.peak_rss_mb, self._rss_mb())
        if torch.cuda.is_available():
            self.accelerator_mb = torch.cuda.max_memory_allocated() / 2 ** 20


class _TimedGenerate:
    """Wraps a model's ``generate`` to time every call and count the new tokens up to each row's EOS."""

    def __init__(self, model: Any, eos_ids: set[int]) -> None:
        self.model, self.eos_ids = model, eos_ids
        self.seconds, self.calls, self.tokens = 0.0, 0, 0

    @property
    def device(self) -> torch.device:
        return self.model.device

    def generate(self, input_ids: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = self.model.generate(input_ids=input_ids, **kwargs)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.seconds += time.perf_counter() - start
        self.calls += 1
        new = out[:, input_ids.shape[1]:]
        is_eos = torch.zeros_like(new, dtype=torch.bool)
        for eos in self.eos_ids:
            is_eos |= new == eos
        # tokens until and including the first EOS (generation stops there; the rest is padding)
        first = torch.where(is_eos.any(1), is_eos.float().argmax(1) + 1, torch.full_like(new[:, 0], new.shape[1]))
        self.tokens += int(first.sum())
        return out


def _eos_ids(model: nn.Module, tokenizer: Any) -> set[int]:
    ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None) or tokenizer.eos_token_id
    return set(ids) if isinstance(ids, (list, tuple)) else ({ids} if ids is not None else set())


def _build(model: nn.Module, method: Method, tokenizer: Any) -> Any:
    import reftkit

    from .baselines import get_weight_space_model

    if method.kind == "reft":
        return reftkit.get_reft_model(model, method.representations())
    if method.kind == "template":
        from .ptuning import get_ptuning_model

        return get_ptuning_model(model, tokenizer, **method.options)
    return get_weight_space_model(model, method.name, **method.options)


def _counts(adapted: Any, model: nn.Module) -> tuple[int, int]:
    if adapted is None:
        return 0, sum(p.numel() for p in model.parameters())
    counts = adapted.parameter_counts()
    return counts["trainable"], counts["model"]


def _train(adapted: Any, tokenizer: Any, method: Method, inputs: Sequence[str], outputs: Sequence[str],
           training: dict[str, Any], chat_template: bool, max_length: int | None,
           output_dir: str) -> tuple[float, float, _PeakMemory]:
    from transformers import TrainingArguments

    import reftkit
    from reftkit.training import ReftTrainer

    if method.kind == "reft":
        # each intervention at the positions of its own config entry
        module = reftkit.make_multiple_position_supervised_data_module(
            tokenizer, adapted, inputs, outputs, positions=None, chat_template=chat_template, max_length=max_length)
    else:
        module = reftkit.make_last_position_supervised_data_module(
            tokenizer, adapted, inputs, outputs, chat_template=chat_template, max_length=max_length)
    defaults = {"report_to": [], "save_strategy": "no", "logging_steps": 10, "use_cpu": not torch.cuda.is_available(),
                "disable_tqdm": False}
    args = TrainingArguments(**{**defaults, **training, "output_dir": output_dir,
                                "learning_rate": method.learning_rate})
    trainer = ReftTrainer(model=adapted, args=args, train_dataset=module["train_dataset"],
                          data_collator=module["data_collator"])
    with _PeakMemory() as memory:
        start = time.perf_counter()
        result = trainer.train()
        seconds = time.perf_counter() - start
    return seconds, float(result.training_loss), memory


def compare(model: nn.Module, tokenizer: Any, train_inputs: Sequence[str], train_outputs: Sequence[str],
            eval_inputs: Sequence[str], eval_outputs: Sequence[str] | Sequence[Sequence[str]],
            methods: Sequence[str | Method | tuple | dict], *, training: dict[str, Any] | None = None,
            seed: int = 0, chat_template: bool = False, max_length: int | None = None, max_new_tokens: int = 32,
            eval_batch_size: int = 16, output_dir: str | Path | None = None, progress: bool = True) -> pd.DataFrame:
    """Train and evaluate each of ``methods`` on ``model`` with one shared budget.

    ``methods``: names (``"loreft"``, ``"direft"``, ``"lora"``, ``"ia3"``, ``"svf"``, ``"prompt_tuning"``,
    ``"prefix_tuning"``, ``"p_tuning_v2"``, ``"p_tuning"``, ``"p_tuning_template"``, ``"fpft"``, ``"base"``),
    ``(name, options)`` tuples or :class:`~reftkit.analysis.methods.Method` objects (which also carry a learning rate).
    ``training``: ``TrainingArguments`` fields shared by every method (epochs, batch size, schedule, ...;
    ``seed`` defaults to ``seed``). With ``output_dir`` each method's trained weights are kept in
    ``output_dir/<label>/`` and the table is written to ``compare.csv`` and ``compare.json`` there.

    Returns one row per method; see the module docstring for the columns.
    """
    from tqdm.auto import tqdm

    from reftkit.analysis.text_metrics import generate_predictions, text_scores

    specs = [as_method(m) for m in methods]
    labels = [m.label for m in specs]
    if not specs:
        raise ValueError("methods is empty: name at least one method")
    if len(set(labels)) != len(labels):
        raise ValueError(f"method labels must be unique, got {labels}; give Method(..., label=...) to tell "
                         "two runs of one method apart")
    if len(train_inputs) != len(train_outputs) or len(eval_inputs) != len(eval_outputs):
        raise ValueError(f"inputs and outputs differ in length: train {len(train_inputs)} vs {len(train_outputs)}, "
                         f"eval {len(eval_inputs)} vs {len(eval_outputs)}")
    if getattr(model, "peft_config", None) is not None or hasattr(model, "interventions"):
        raise ValueError(f"model is already adapted ({type(model).__name__}); pass the base model")
    check_tokenizer_fits(model, tokenizer)
    training = {"seed": seed, **(training or {})}
    eos = _eos_ids(model, tokenizer)
    rows = []
    keep = Path(output_dir) if output_dir is not None else None
    for method in tqdm(specs, desc="compare", disable=not progress):
        torch.manual_seed(seed)
        adapted = None if method.kind == "base" else _build(model, method, tokenizer)
        trainable, total = _counts(adapted, model)
        row: dict[str, Any] = {"method": method.label, "name": method.name, "kind": method.kind,
                               "num_trainable_params": trainable, "num_total_params": total,
                               "trainable_percent": 100.0 * trainable / max(total, 1),
                               "learning_rate": method.learning_rate}
        try:
            with tempfile.TemporaryDirectory() as scratch:
                if adapted is not None:
                    seconds, loss, memory = _train(adapted, tokenizer, method, train_inputs, train_outputs, training,
                                                   chat_template, max_length, scratch)
                    folder = (keep / method.label) if keep is not None else Path(scratch) / "saved"
                    adapted.save_pretrained(folder)
                    row.update(train_time=seconds, train_loss=loss, peak_rss_mb=memory.peak_rss_mb,
                               accelerator_memory_max_mb=memory.accelerator_mb,
                               file_size=saved_weights_size(folder))
                    adapted.eval()
                runner = _TimedGenerate(adapted if adapted is not None else model, eos)
                predictions = generate_predictions(runner, tokenizer, list(eval_inputs), max_new_tokens=max_new_tokens,
                                                   batch_size=eval_batch_size, chat_template=chat_template,
                                                   progress=progress)
        finally:
            if adapted is not None:
                adapted.detach()
        row.update(text_scores(predictions, eval_outputs))
        row.update(inference_latency_s=runner.seconds / max(runner.calls, 1),
                   tokens_per_s=runner.tokens / runner.seconds if runner.seconds else float("nan"))
        rows.append(row)
    frame = pd.DataFrame(rows)
    columns = ["method", "name", "kind", "num_trainable_params", "num_total_params", "trainable_percent",
               "file_size", "train_time", "train_loss", "peak_rss_mb", "accelerator_memory_max_mb",
               *SCORE_COLUMNS, "inference_latency_s", "tokens_per_s", "learning_rate"]
    frame = frame.reindex(columns=columns + [c for c in frame.columns if c not in columns])
    frame.attrs["budget"] = training
    if keep is not None:
        keep.mkdir(parents=True, exist_ok=True)
        frame.to_csv(keep / "compare.csv", index=False)
        (keep / "compare.json").write_text(json.dumps({"budget": training, "rows": json.loads(
            frame.to_json(orient="records"))}, indent=2))
    return frame


def plot_comparison(frame: pd.DataFrame, metric: str = "rougeL") -> Any:
    """Two panels: ``metric`` against the trainable parameters (log scale; one labelled point per
    method), and training time per method as bars. Returns the matplotlib Figure."""
    from matplotlib.figure import Figure

    for column in (metric, "num_trainable_params", "method"):
        if column not in frame.columns:
            raise ValueError(f"frame has no column {column!r}; its columns are {list(frame.columns)}")
    fig = Figure(figsize=(11, 4.2), layout="constrained")
    quality, cost = fig.subplots(1, 2)
    trained = frame[frame["num_trainable_params"] > 0]
    for _, row in trained.iterrows():
        quality.scatter(row["num_trainable_params"], row[metric], label=row["method"])
        quality.annotate(row["method"], (row["num_trainable_params"], row[metric]), fontsize=8,
                         xytext=(3, 3), textcoords="offset points")
    for _, row in frame[frame["num_trainable_params"] == 0].iterrows():
        quality.axhline(row[metric], color="grey", linestyle="--", linewidth=1, label=f"{row['method']} (untrained)")
        # the line has no point to annotate: name it at the left edge, just above it
        quality.annotate(f"{row['method']} (untrained)", (0.01, row[metric]), xycoords=("axes fraction", "data"),
                         xytext=(0, 3), textcoords="offset points", fontsize=8, color="grey")
    quality.set_xscale("log")
    quality.set_xlabel("trainable parameters")
    quality.set_ylabel(metric)
    quality.set_title(f"{metric} vs trainable parameters")
    times = trained["train_time"] if "train_time" in trained else pd.Series([0.0] * len(trained))
    cost.barh(list(trained["method"]), list(times))
    cost.set_xlabel("train time [s]")
    cost.set_ylabel("method")
    cost.set_title("training time")
    fig.suptitle(f"methods compared on {metric}")
    return fig
