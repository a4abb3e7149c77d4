"""`reftkit train` / `reftkit eval` from a YAML config, on a tiny local model and JSONL data."""
from __future__ import annotations

import json

import pytest
import torch
import yaml
from conftest import tiny_llama, tiny_tokenizer

from reftkit.cli import main

PAIRS = [("what is the capital of france ?", "paris ."), ("define dog .", "an animal that barks ."),
         ("define cat .", "an animal that meows ."), ("how many legs spider ?", "eight .")]


def _setup(tmp_path):
    model_dir = tmp_path / "model"
    model = tiny_llama()
    # at the default init (std 0.02) an RMS-normed tiny model's logits stay within about +-0.6, so
    # nothing can make its predictions sharp; a wider unembedding gives the test something to learn
    torch.nn.init.normal_(model.lm_head.weight, std=0.5)
    model.save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    for split in ("train", "eval"):
        lines = [json.dumps({"prompt": p, "response": r}) for p, r in PAIRS]
        (tmp_path / f"{split}.jsonl").write_text("\n".join(lines))
    config = {
        "model": str(model_dir), "output_dir": str(tmp_path / "run"), "seed": 0,
        "data": {"source": "jsonl", "train": str(tmp_path / "train.jsonl"), "eval": str(tmp_path / "eval.jsonl"),
                 "chat_template": False},
        "representations": [{"layer": [0, 1], "component": "block_output", "positions": "l1",
                             "intervention": "loreft", "low_rank_dimension": 2}],
        "training": {"num_train_epochs": 20, "per_device_train_batch_size": 4, "learning_rate": 0.3,
                     "lr_scheduler_type": "constant",
                     "logging_steps": 1},
        "eval": {"max_new_tokens": 6, "batch_size": 4},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_train_then_eval_from_config(tmp_path, capsys):
    config = _setup(tmp_path)
    assert main(["train", str(config), "--set", "training.num_train_epochs=40"]) == 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["trainable_parameters"] == 2 * (32 * 2 + 2 * 32 + 2)
    assert metrics["n_train"] == 4 and metrics["train_seconds"] > 0 and metrics["peak_rss_mb"] > 0
    curve = [loss for _, loss in metrics["loss_curve"]]
    assert len(curve) == 40 and curve[-1] < 0.8 * curve[0]
    assert metrics["after"]["rougeL"] > metrics["before"]["rougeL"]   # it learned the training answers
    assert (tmp_path / "run" / "interventions" / "interventions.safetensors").is_file()
    assert metrics["total_seconds"] >= metrics["train_seconds"] and metrics["train_steps"] == 40
    # predictions.jsonl holds the very answers that were scored, one per held-out example, in order
    from reftkit.analysis.text_metrics import text_scores

    lines = [json.loads(line) for line in (tmp_path / "run" / "predictions.jsonl").read_text().splitlines()]
    held_out = [json.loads(line) for line in (tmp_path / "eval.jsonl").read_text().splitlines()]
    assert [(r["prompt"], r["reference"]) for r in lines] == [(r["prompt"], r["response"]) for r in held_out]
    for when in ("before", "after"):
        assert text_scores([r[when] for r in lines], [r["reference"] for r in lines]) == metrics[when]
    # eval of the saved interventions reproduces the trained model's scores
    assert main(["eval", str(config), "--interventions", str(tmp_path / "run" / "interventions")]) == 0
    evaluated = json.loads((tmp_path / "run" / "eval_metrics.json").read_text())
    assert evaluated["rougeL"] == metrics["after"]["rougeL"] and evaluated["bleu4"] == metrics["after"]["bleu4"]


def test_classification_recipe_on_minilm(tmp_path):
    """MiniLM + LoReFT + a head on the packaged Rotten Tomatoes snippets (tiny budget)."""
    from pathlib import Path

    config = Path(__file__).resolve().parents[1] / "configs" / "rotten_tomatoes_minilm.yaml"
    assert main(["train", str(config), "--set", "data.n_train=96", "--set", "data.n_eval=32",
                 "--set", "training.num_train_epochs=2", "--set", "training.logging_steps=1",
                 "--set", f"output_dir={tmp_path / 'rt'}"]) == 0
    metrics = json.loads((tmp_path / "rt" / "metrics.json").read_text())
    assert metrics["task"] == "classification" and metrics["n_train"] == 96
    assert metrics["trainable_parameters"] == 6 * (384 * 4 * 2 + 4) + 384 * 2 + 2  # 6 layers of LoReFT + head
    assert 0.0 <= metrics["after"]["accuracy"] <= 100.0
    assert len(metrics["loss_curve"]) == 6
    saved = {p.name for p in (tmp_path / "rt" / "interventions").iterdir()}
    assert {"interventions.safetensors", "head.safetensors"} <= saved


def test_cache_frozen_prefix_in_a_recipe_changes_nothing_but_the_work(tmp_path):
    """`cache_frozen_prefix: true` (interventions from layer 1 on, suffix training off): the same loss curve as
    without it."""
    config = _setup(tmp_path)
    curves = {}
    for cache in (False, True):
        settings = yaml.safe_load(config.read_text())
        settings["representations"][0]["layer"] = [1, 2]
        settings["output_dir"] = str(tmp_path / f"run_{cache}")
        settings["cache_frozen_prefix"] = cache
        settings["suffix_training"] = False
        settings["eval"]["before"] = False
        path = tmp_path / f"config_{cache}.yaml"
        path.write_text(yaml.safe_dump(settings))
        assert main(["train", str(path), "--set", "training.num_train_epochs=3"]) == 0
        metrics = json.loads((tmp_path / f"run_{cache}" / "metrics.json").read_text())
        curves[cache] = [loss for _, loss in metrics["loss_curve"]]
    # epochs 2 and 3 ran from the cache: 4 examples, one batch per epoch
    assert metrics["prefix_cache"]["layer"] == 1 and metrics["prefix_cache"]["cached_steps"] == 2
    assert metrics["prefix_cache"]["hits"] == 8 and metrics["prefix_cache"]["misses"] == 4
    assert len(curves[True]) == 3 and curves[True][0] != curves[True][-1]
    assert curves[True] == pytest.approx(curves[False], rel=1e-5)


def test_suffix_training_is_the_recipes_default_and_changes_nothing_but_the_work(tmp_path):
    """Left out (auto), suffix training takes every batch of a generation recipe; the loss curve equals
    `suffix_training: false`; a value other than auto/true/false is refused."""
    config = _setup(tmp_path)
    curves = {}
    for suffix in ("auto", False):
        settings = yaml.safe_load(config.read_text())
        settings["representations"][0]["layer"] = [1, 2]
        settings["output_dir"] = str(tmp_path / f"run_{suffix}")
        settings.pop("suffix_training", None)
        if suffix is False:
            settings["suffix_training"] = False
        settings["eval"]["before"] = False
        path = tmp_path / f"config_{suffix}.yaml"
        path.write_text(yaml.safe_dump(settings))
        assert main(["train", str(path), "--set", "training.num_train_epochs=3"]) == 0
        metrics = json.loads((tmp_path / f"run_{suffix}" / "metrics.json").read_text())
        curves[suffix] = [loss for _, loss in metrics["loss_curve"]]
        if suffix == "auto":
            used = metrics["suffix_training"]
    assert "suffix_training" not in metrics  # off: no counters
    assert used["suffix_steps"] == 1 and used["cached_steps"] == 2 and used["full_steps"] == 0
    assert used["layer"] == 1 and used["prefix_tokens"] > 0
    assert curves["auto"] == pytest.approx(curves[False], rel=1e-5)
    settings["suffix_training"] = "sometimes"
    path.write_text(yaml.safe_dump(settings))
    with pytest.raises(ValueError, match="suffix_training='sometimes'"):
        main(["train", str(path)])


def test_eval_convention_reaches_the_scores_and_unknown_names_fail_before_loading(tmp_path, monkeypatch):
    pytest.importorskip("jieba")
    from reftkit.analysis import text_metrics

    config = _setup(tmp_path)
    seen = []
    real = text_metrics.text_scores

    def spy(predictions, references, **kwargs):
        seen.append((list(predictions), list(references), kwargs.get("convention")))
        return real(predictions, references, **kwargs)

    monkeypatch.setattr(text_metrics, "text_scores", spy)
    assert main(["eval", str(config), "--set", "eval.convention=chatglm"]) == 0
    scored = json.loads((tmp_path / "run" / "eval_metrics.json").read_text())
    (predictions, references, convention), = seen
    assert convention == "chatglm" and references == [r for _, r in PAIRS]
    expected = real(predictions, references, convention="chatglm")
    assert {k: scored[k] for k in expected} == expected
    assert main(["eval", str(config)]) == 0 and seen[-1][2] == "reftkit"
    with pytest.raises(ValueError, match=r"eval.convention='ChatGLM': choose one of 'reftkit', 'chatglm'"):
        main(["train", str(config), "--set", "eval.convention=ChatGLM", "--set", "model=/nonexistent"])
