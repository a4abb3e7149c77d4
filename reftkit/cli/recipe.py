"""``reftkit train CONFIG.yaml`` / ``reftkit eval CONFIG.yaml``: a whole run from one config file.

A config names the model, the data, the representations and ``transformers.TrainingArguments``;
a run writes ``<output_dir>/interventions`` (``ReftModel.save_pretrained``) and
``<output_dir>/metrics.json`` (trainable parameters, wall times, peak memory, scores before and after,
the loss curve); a generation run also writes ``<output_dir>/predictions.jsonl``, one held-out example
per line with its prompt, reference and the greedy answers before and after training. See
``configs/wordnet_1k.yaml``.
"""
from __future__ import annotations

import json
import resource
import time
from pathlib import Path
from typing import Any

import torch

TASKS = ("generation", "classification")


class RecipeError(ValueError):
    """A config field with an invalid value; names the field."""


def read_config(path: str | Path) -> dict[str, Any]:
    import yaml

    config = yaml.safe_load(Path(path).read_text())
    if not isinstance(config, dict):
        raise RecipeError(f"{path}: the config must be a mapping")
    for field in ("model", "data", "representations", "output_dir"):
        if field not in config:
            raise RecipeError(f"{path}: field {field!r} is missing")
    task = config.get("task", "generation")
    if task not in TASKS:
        raise RecipeError(f"{path}: task={task!r}; choose one of {TASKS}")
    return config


def load_examples(data: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """``{train, eval}`` lists of examples from a packaged source or a JSONL file."""
    source = data.get("source")
    if source == "wordnet":
        from reftkit.data.datasets import define_word_dataset
        return define_word_dataset(n_train=data.get("n_train", 1000), n_eval=data.get("n_eval", 200),
                                   seed=data.get("seed", 0), min_count=data.get("min_count", 0))
    if source in ("rotten_tomatoes", "bbc_news"):
        from reftkit.data.datasets import labelled_texts
        sets = labelled_texts(source, seed=data.get("seed", 0))
        n_train, n_eval = data.get("n_train"), data.get("n_eval")  # None slices keep everything
        return {"train": sets["train"][:n_train], "eval": sets["eval"][:n_eval], "labels": sets["labels"]}
    if source == "jsonl":
        out = {}
        for split in ("train", "eval"):
            path = data.get(split)
            if path is None:
                raise RecipeError(f"data.{split} is missing: give a JSONL file with prompt/response fields")
            out[split] = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
        return out
    raise RecipeError(f"data.source={source!r}; choose wordnet, rotten_tomatoes, bbc_news or jsonl")


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _reset_peak_rss() -> bool:
    """Restart the kernel's peak-RSS counter (``VmHWM``), so a later reading covers training only, not the
    float32 load a quantized base starts from. glibc's heap is trimmed first: the allocator otherwise keeps the pages
    of the freed float32 weights resident, and the reading would count them. False where that is impossible (not
    Linux)."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc: the reading may include freed heap
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _vm_hwm_mb(field: str = "VmHWM") -> float | None:
    """``/proc/self/status``'s ``field`` in MB (``VmHWM``: peak resident memory; ``VmRSS``: current), or None."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


#: ``quantization:`` values: torchao configs for the base model's linear layers (the interventions stay float32)
QUANTIZATIONS = ("int8_weight_only", "int4_weight_only")


def quantize_base(model: Any, scheme: str | None) -> Any:
    """Quantize the base model's linear layers in place with torchao (``int8_weight_only``: per-channel int8;
    ``int4_weight_only``: int4 in groups of 32), or leave it as it is for ``None``."""
    if scheme is None:
        return model
    if scheme not in QUANTIZATIONS:
        raise RecipeError(f"quantization={scheme!r}; choose one of {QUANTIZATIONS} or leave it out")
    try:
        from torchao.quantization import Int8WeightOnlyConfig, IntxWeightOnlyConfig, quantize_
        from torchao.quantization.granularity import PerGroup
    except ImportError:
        raise RecipeError(f"quantization={scheme!r} needs torchao: pip install 'reftkit[quantized]'") from None
    if scheme == "int8_weight_only":
        config = Int8WeightOnlyConfig()
    else:  # torchao's Int4WeightOnlyConfig needs CUDA kernels (mslk); the intx layout runs anywhere
        config = IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(32))
    quantize_(model, config)
    # The float32 checkpoint is memory-mapped: while any tensor still points into the map (the embedding, the
    # norms), the pages quantization read stay resident, and the quantized base holds more memory than the float
    # one. Owning copies of what stayed float release the map.
    with torch.no_grad():
        for param in model.parameters():
            if param.is_floating_point() and not type(param).__module__.startswith("torchao"):
                param.data = param.data.clone()
    return model


def _score_generation(model: Any, tokenizer: Any, rows: list[dict[str, Any]], data: dict[str, Any],
                      evaluation: dict[str, Any], progress: bool = True) -> tuple[dict[str, float], list[str]]:
    """Greedy answers to the held-out prompts and their scores against the references."""
    from reftkit.analysis.text_metrics import generate_predictions, text_scores

    predictions = generate_predictions(model, tokenizer, [r["prompt"] for r in rows],
                                       max_new_tokens=evaluation.get("max_new_tokens", 48),
                                       batch_size=evaluation.get("batch_size", 16),
                                       chat_template=data.get("chat_template", True), progress=progress)
    return text_scores(predictions, [r["response"] for r in rows], convention=_convention(evaluation)), predictions


def _convention(evaluation: dict[str, Any]) -> str:
    """``eval.convention``: how ROUGE/BLEU are computed (``reftkit``, or ``chatglm``: the P-Tuning v2 seed's), checked
    before any model is loaded."""
    from reftkit.analysis.text_metrics import CONVENTIONS

    convention = evaluation.get("convention", "reftkit")
    if convention not in CONVENTIONS:
        raise ValueError(f"eval.convention={convention!r}: choose one of {', '.join(map(repr, CONVENTIONS))}")
    return convention


def run_train(config: dict[str, Any], progress: bool = True) -> dict[str, Any]:
    """Train (and evaluate before/after) as the config says; returns the metrics written.

    ``progress=False`` draws no progress bars and prints no training logs (for notebooks and scripts
    that report the returned metrics themselves); the loss curve is recorded either way."""
    from transformers import TrainingArguments
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    import reftkit
    from reftkit.training import ReftForSequenceClassification, ReftTrainer

    run_start = time.perf_counter()
    torch.manual_seed(config.get("seed", 0))
    out_dir = Path(config["output_dir"])
    out_dir.mkdir(parents=True, exist_ok=True)
    data, evaluation = config["data"], config.get("eval", {})
    metric_convention = _convention(evaluation)
    task = config.get("task", "generation")
    model, tokenizer = reftkit.load_model(config["model"], dtype=config.get("dtype"))
    quantize_base(model, config.get("quantization"))
    examples = load_examples(data)
    metrics: dict[str, Any] = {"model": config["model"], "task": task, "n_train": len(examples["train"]),
                               "n_eval": len(examples["eval"]), "quantization": config.get("quantization"),
                               "metric_convention": metric_convention,
                               "base_weight_mb": round(_weight_bytes(model) / 2 ** 20, 1)}
    answers: dict[str, list[str]] = {}
    if task == "generation" and evaluation.get("before", True):
        metrics["before"], answers["before"] = _score_generation(model, tokenizer, examples["eval"], data, evaluation,
                                                                 progress)

    reft = reftkit.get_reft_model(model, config["representations"])
    counts = reft.parameter_counts()
    if task == "classification":
        module = reftkit.make_classification_data_module(
            tokenizer, reft, [r["text"] for r in examples["train"]], [r["label"] for r in examples["train"]],
            label_names=examples["labels"], max_length=data.get("max_length"))
        trained = ReftForSequenceClassification(reft, num_labels=len(examples["labels"]),
                                                pooling=config.get("pooling", "last"))
    else:
        module = reftkit.make_last_position_supervised_data_module(
            tokenizer, reft, [r["prompt"] for r in examples["train"]], [r["response"] for r in examples["train"]],
            chat_template=data.get("chat_template", True), max_length=data.get("max_length"))
        trained = reft
    metrics["trainable_parameters"] = sum(p.numel() for p in trained.parameters() if p.requires_grad)
    metrics["model_parameters"] = counts["model"]
    defaults = {"output_dir": str(out_dir / "checkpoints"), "report_to": [], "save_strategy": "no",
                "logging_steps": 10, "use_cpu": not torch.cuda.is_available()}
    args = TrainingArguments(**{**defaults, **config.get("training", {})})
    cache = config.get("cache_frozen_prefix", False)
    if cache and task != "generation":
        raise ValueError(f"cache_frozen_prefix={cache!r} serves the causal-LM loss (task: generation), "
                         f"not task={task!r}")
    suffix = config.get("suffix_training", "auto")
    if suffix not in ("auto", True, False):
        raise ValueError(f"suffix_training={suffix!r}: give auto, true or false")
    if suffix is True and task != "generation":
        raise ValueError(f"suffix_training=true serves the causal-LM loss (task: generation), not task={task!r}")
    trainer = ReftTrainer(model=trained, args=args, train_dataset=module["train_dataset"],
                          data_collator=module["data_collator"], **({"cache_frozen_prefix": cache} if cache else {}),
                          **({"suffix_training": suffix} if task == "generation" else {}))
    if not progress:
        trainer.remove_callback(ProgressCallback)
        trainer.remove_callback(PrinterCallback)   # what transformers prints instead when disable_tqdm is set
    reset = _reset_peak_rss()
    resident = _vm_hwm_mb("VmRSS")
    start = time.perf_counter()
    trainer.train()
    metrics["train_seconds"] = round(time.perf_counter() - start, 1)
    peak = _vm_hwm_mb() if reset else None
    if peak is not None:  # the peak while training only (the load of a quantized base's float32 weights is before)
        metrics["train_peak_rss_mb"] = round(peak, 1)
        if resident is not None:  # what training added to what the process held when it began
            metrics["train_start_rss_mb"] = round(resident, 1)
    metrics["train_steps"] = trainer.state.global_step
    if trainer.prefix_cache is not None:
        pc = trainer.prefix_cache
        metrics["prefix_cache"] = {"layer": pc.layer, "hits": pc.hits, "misses": pc.misses,
                                   "cached_steps": pc.cached_steps, "bytes": pc.nbytes}
    if getattr(trainer, "suffix_training", None) is not None:
        metrics["suffix_training"] = trainer.suffix_training.summary()
    history = trainer.state.log_history
    # runs shorter than logging_steps log no step losses: fall back to the run's mean loss
    metrics["loss_curve"] = [(h["step"], h["loss"]) for h in history if "loss" in h] or \
        [(h["step"], h["train_loss"]) for h in history if "train_loss" in h]
    trained.eval()
    if task == "classification":
        metrics["after"] = {"accuracy": classification_accuracy(trained, tokenizer, examples, data)}
        trained.save_pretrained(out_dir / "interventions")
    else:
        metrics["after"], answers["after"] = _score_generation(reft, tokenizer, examples["eval"], data, evaluation,
                                                               progress)
        reft.save_pretrained(out_dir / "interventions")
        with open(out_dir / "predictions.jsonl", "w") as stream:
            for i, row in enumerate(examples["eval"]):
                line = {"prompt": row["prompt"], "reference": row["response"],
                        **{when: texts[i] for when, texts in answers.items()}}
                stream.write(json.dumps(line, ensure_ascii=False) + "\n")
    metrics["peak_rss_mb"] = round(_peak_rss_mb(), 1)
    metrics["total_seconds"] = round(time.perf_counter() - run_start, 1)   # loading, both evaluations, training
    if torch.cuda.is_available():
        metrics["peak_cuda_mb"] = round(torch.cuda.max_memory_allocated() / 2 ** 20, 1)
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics


@torch.no_grad()
def classification_accuracy(classifier: Any, tokenizer: Any, examples: dict[str, Any], data: dict[str, Any],
                            batch_size: int = 32) -> float:
    import reftkit

    module = reftkit.make_classification_data_module(
        tokenizer, classifier.reft, [r["text"] for r in examples["eval"]], [r["label"] for r in examples["eval"]],
        label_names=examples["labels"], max_length=data.get("max_length"))
    rows, correct = list(module["train_dataset"]), 0
    for start in range(0, len(rows), batch_size):
        batch = module["data_collator"](rows[start:start + batch_size])
        logits = classifier(**{k: v for k, v in batch.items() if k != "labels"}).logits
        correct += int((logits.argmax(-1) == batch["labels"]).sum())
    return 100.0 * correct / len(rows)


def run_eval(config: dict[str, Any], interventions: str | Path | None = None) -> dict[str, Any]:
    """Score the saved interventions of a run (or the bare model with ``interventions=None``)."""
    import reftkit

    data, evaluation = config["data"], config.get("eval", {})
    _convention(evaluation)
    model, tokenizer = reftkit.load_model(config["model"], dtype=config.get("dtype"))
    quantize_base(model, config.get("quantization"))
    examples = load_examples(data)
    target = model if interventions is None else reftkit.ReftModel.from_pretrained(model, interventions).eval()
    scores, _ = _score_generation(target, tokenizer, examples["eval"], data, evaluation)
    result = {"model": config["model"], "interventions": str(interventions) if interventions else None, **scores}
    out = Path(config["output_dir"])
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval_metrics.json").write_text(json.dumps(result, indent=2))
    return result


def _weight_bytes(model: Any) -> int:
    """Bytes the base model's weights hold (a quantized tensor counts its integer data and scales)."""
    total = 0
    for p in model.parameters():
        inner = [getattr(p, name) for name in getattr(p, "__tensor_flatten__", lambda: ([], None))()[0]]
        total += sum(t.numel() * t.element_size() for t in inner) if inner else p.numel() * p.element_size()
    return total
