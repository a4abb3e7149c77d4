"""sweep(): a row per (layer, positions) cell, the base loss equal to the model's own loss, training
that helps on the data it was given, the model left untouched, the heat map, and errors."""
from __future__ import annotations

import pytest
import torch
from conftest import tiny_llama, tiny_tokenizer

import reftkit
from reftkit.analysis import plot_sweep, sweep

INPUTS = ["what is the capital of france ?", "define dog", "how many legs spider ?", "colour sky ?"]
OUTPUTS = ["paris .", "animal that barks .", "eight .", "blue ."]


@pytest.fixture(scope="module")
def swept():
    model, tok = tiny_llama(), tiny_tokenizer()
    reference = {k: v.clone() for k, v in model.state_dict().items()}
    frame = sweep(model, tok, INPUTS * 2, OUTPUTS * 2, INPUTS, OUTPUTS, layers=["all", 0, 2], positions=["l1", "f1+l1"],
                  low_rank_dimension=2, learning_rate=2e-2,
                  training={"num_train_epochs": 10, "per_device_train_batch_size": 4}, progress=False)
    return frame, model, reference


def test_rows_and_base_loss(swept):
    frame, model, reference = swept
    assert [(str(a), b) for a, b in zip(frame["layer"], frame["positions"])] == [
        ("all", "l1"), ("all", "f1+l1"), ("0", "l1"), ("0", "f1+l1"), ("2", "l1"), ("2", "f1+l1")]
    # the base loss is the model's own mean cross entropy over the response tokens
    tok = tiny_tokenizer()
    module = reftkit.make_last_position_supervised_data_module(tok, model, INPUTS, OUTPUTS)
    batch = module["data_collator"]([module["train_dataset"][i] for i in range(4)])
    with torch.no_grad():
        own = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
    assert frame["base_eval_loss"].iloc[0] == pytest.approx(float(own), rel=1e-5)
    assert all(torch.equal(reference[k], v) for k, v in model.state_dict().items())
    # trained on these very pairs, every cell lowers the loss; all layers has 3x the parameters of one
    assert (frame["improvement"] > 0).all()
    counts = dict(zip(zip(frame["layer"].astype(str), frame["positions"]), frame["num_trainable_params"]))
    assert counts[("all", "l1")] == 3 * counts[("0", "l1")] == 3 * (32 * 2 + 2 * 32 + 2)


def test_plot_sweep(swept):
    fig = plot_sweep(swept[0])
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["all", "0", "2"]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["l1", "f1+l1"]
    assert len(ax.texts) == 6 and ax.get_title() == "improvement by intervention site"
    assert len(fig.axes) == 2  # the heat map and its colour bar


def test_errors():
    model, tok = tiny_llama(), tiny_tokenizer()
    with pytest.raises(ValueError, match="layers contains 7; use layer indices 0..2"):
        sweep(model, tok, INPUTS, OUTPUTS, INPUTS, OUTPUTS, layers=[7])
    with pytest.raises(reftkit.PositionError):
        sweep(model, tok, INPUTS, OUTPUTS, INPUTS, OUTPUTS, positions=["middle"])
