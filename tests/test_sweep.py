"""sweep(): a row per (layer, positions) cell, the base loss equal to the model's own loss on the held-out pairs,
training that generalises to prompts it never saw (and a control it must not), the model left untouched, the heat
map, and errors."""
from __future__ import annotations

import pytest
import torch
from conftest import tiny_llama, tiny_tokenizer

import reftkit
from reftkit.analysis import plot_sweep, sweep

# The task: the answer is a function of the prompt's last word. Training and held-out prompts share the keywords
# but no prompt: the held-out contexts never occur in training.
ANSWER = {"dog": "barks", "cat": "meows", "sky": "blue", "spider": "eight"}
TRAIN_CONTEXTS = ["tell me about {}", "what is a {}", "define word {}"]
HELD_OUT_CONTEXTS = ["how many legs {} ?", "is it a {}", "good {}"]
# negative control: the held-out prompts with the answers rotated (dog -> meows, cat -> blue, ...)
ROTATED = dict(zip(ANSWER, [*list(ANSWER.values())[1:], list(ANSWER.values())[0]]))


def _pairs(contexts, answers):
    return [c.format(k) for c in contexts for k in answers], [answers[k] for c in contexts for k in answers]


TRAIN_INPUTS, TRAIN_OUTPUTS = _pairs(TRAIN_CONTEXTS, ANSWER)
EVAL_INPUTS, EVAL_OUTPUTS = _pairs(HELD_OUT_CONTEXTS, ANSWER)
_, ROTATED_OUTPUTS = _pairs(HELD_OUT_CONTEXTS, ROTATED)
GRID = {"layers": ["all", 0, 2], "positions": ["l1", "f1+l1"], "low_rank_dimension": 2, "learning_rate": 5e-2,
        "training": {"num_train_epochs": 20, "per_device_train_batch_size": 12}, "progress": False}


def _model():
    model = tiny_llama()
    with torch.no_grad():  # a random tiny model is nearly uniform; a larger head lets one edit move its answers
        model.lm_head.weight.mul_(10)
    return model


@pytest.fixture(scope="module")
def swept():
    model, tok = _model(), tiny_tokenizer()
    assert not set(EVAL_INPUTS) & set(TRAIN_INPUTS)
    reference = {k: v.clone() for k, v in model.state_dict().items()}
    frame = sweep(model, tok, TRAIN_INPUTS, TRAIN_OUTPUTS, EVAL_INPUTS, EVAL_OUTPUTS, **GRID)
    # the control trains exactly as the sweep does (same seed, same pairs) on one positions spec per layer
    rotated = sweep(model, tok, TRAIN_INPUTS, TRAIN_OUTPUTS, EVAL_INPUTS, ROTATED_OUTPUTS,
                    **{**GRID, "positions": ["l1"]})
    return frame, rotated, model, reference


def test_rows_and_base_loss(swept):
    frame, _, model, reference = swept
    assert [(str(a), b) for a, b in zip(frame["layer"], frame["positions"])] == [
        ("all", "l1"), ("all", "f1+l1"), ("0", "l1"), ("0", "f1+l1"), ("2", "l1"), ("2", "f1+l1")]
    # the base loss is the model's own mean cross entropy over the held-out response tokens
    tok = tiny_tokenizer()
    module = reftkit.make_last_position_supervised_data_module(tok, model, EVAL_INPUTS, EVAL_OUTPUTS)
    batch = module["data_collator"]([module["train_dataset"][i] for i in range(len(EVAL_INPUTS))])
    with torch.no_grad():
        own = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
    assert frame["base_eval_loss"].iloc[0] == pytest.approx(float(own), rel=1e-5)
    assert (frame["eval_loss"] == frame["base_eval_loss"] - frame["improvement"]).all()
    assert all(torch.equal(reference[k], v) for k, v in model.state_dict().items())
    # all layers has 3x the parameters of one
    counts = dict(zip(zip(frame["layer"].astype(str), frame["positions"]), frame["num_trainable_params"]))
    assert counts[("all", "l1")] == 3 * counts[("0", "l1")] == 3 * (32 * 2 + 2 * 32 + 2)


def test_improvement_generalises_to_held_out_prompts(swept):
    """Scored on prompts it never trained on, every cell beats the base model by a wide margin (the base loss is
    ~5.3 nats/token, near log(101) for a uniform guess), and it has learned the prompt -> answer rule, not just the
    answer words: the same held-out prompts with the answers rotated among the keywords score worse in every cell.
    A sweep scoring its training pairs, or a constant one, would give the two frames the same numbers."""
    frame, rotated, _, _ = swept
    assert (frame["improvement"] > 1.0).all(), frame["improvement"].tolist()
    same_cells = frame[frame["positions"] == "l1"].reset_index(drop=True)
    assert same_cells["layer"].tolist() == rotated["layer"].tolist()
    gap = same_cells["improvement"] - rotated["improvement"]
    assert (gap > 0.3).all(), gap.tolist()
    assert (rotated["base_eval_loss"] != same_cells["base_eval_loss"]).all()  # scored on its own (rotated) pairs


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
        sweep(model, tok, TRAIN_INPUTS, TRAIN_OUTPUTS, EVAL_INPUTS, EVAL_OUTPUTS, layers=[7])
    with pytest.raises(reftkit.PositionError):
        sweep(model, tok, TRAIN_INPUTS, TRAIN_OUTPUTS, EVAL_INPUTS, EVAL_OUTPUTS, positions=["middle"])
