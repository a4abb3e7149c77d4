"""shrink_layers(): the path is well formed and agrees with the sweep's training, the stopping rule (no
tolerance stops at the first rise, an infinite one shrinks to min_layers), a planted useless layer goes
first, the exact criterion matches a brute-force greedy search, the plot, and errors."""
from __future__ import annotations

import math
import tempfile

import pandas as pd
import pytest
import torch
from conftest import tiny_llama, tiny_tokenizer
from test_plot_helpers import assert_readable

import reftkit
from reftkit.analysis import plot_shrink, shrink_layers, sweep

INPUTS = ["what is the capital of france ?", "define dog", "how many legs spider ?", "colour sky ?"]
OUTPUTS = ["paris .", "animal that barks .", "eight .", "blue ."]
TRAINING = {"num_train_epochs": 10, "per_device_train_batch_size": 4}
KW = {"low_rank_dimension": 2, "learning_rate": 2e-2, "training": TRAINING, "progress": False}
PER_LAYER = 32 * 2 + 2 * 32 + 2  # LoReFT rank 2 on width 32: R, W and b


def shrink(model=None, **kwargs) -> pd.DataFrame:
    model = tiny_llama() if model is None else model
    return shrink_layers(model, tiny_tokenizer(), INPUTS * 2, OUTPUTS * 2, INPUTS, OUTPUTS, **{**KW, **kwargs})


@pytest.fixture(scope="module")
def shrunk():
    model = tiny_llama()
    reference = {k: v.clone() for k, v in model.state_dict().items()}
    return shrink(model, tolerance=math.inf), model, reference


def test_the_path_is_well_formed(shrunk):
    frame, model, reference = shrunk
    assert list(frame.columns) == ["step", "layers", "num_layers", "removed", "eval_loss", "relative_rise",
                                   "accepted", "base_eval_loss", "num_trainable_params", "train_time",
                                   "trainings", "scores"]
    assert frame["step"].tolist() == [0, 1, 2] and frame["num_layers"].tolist() == [3, 2, 1]
    assert frame["layers"].iloc[0] == (0, 1, 2) and pd.isna(frame["removed"].iloc[0])
    assert frame["scores"].iloc[0] is None and frame["accepted"].all()
    for before, (_, row) in zip(frame["layers"], frame.iloc[1:].iterrows()):
        assert row["removed"] in before and set(row["layers"]) == set(before) - {row["removed"]}
        assert set(row["scores"]) == set(before)
        assert row["removed"] == min(before, key=lambda layer: (row["scores"][layer], layer))
    assert frame["num_trainable_params"].tolist() == [3 * PER_LAYER, 2 * PER_LAYER, PER_LAYER]
    assert (frame["train_time"] > 0).all() and frame["trainings"].tolist() == [1, 1, 1]
    start = frame["eval_loss"].iloc[0]
    assert frame["relative_rise"].tolist() == pytest.approx([v / start - 1 for v in frame["eval_loss"]])
    assert (frame["eval_loss"] < frame["base_eval_loss"]).all()  # trained on these very pairs
    assert frame.attrs["kept"] == frame["layers"].iloc[-1] and frame.attrs["criterion"] == "ablation"
    # the model is left as it was: same weights, no hooks
    assert all(torch.equal(reference[k], v) for k, v in model.state_dict().items())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_the_starting_set_trains_as_the_sweep_does(shrunk):
    cell = sweep(tiny_llama(), tiny_tokenizer(), INPUTS * 2, OUTPUTS * 2, INPUTS, OUTPUTS, layers=["all"], **KW)
    assert shrunk[0]["eval_loss"].iloc[0] == pytest.approx(cell["eval_loss"].iloc[0], rel=1e-6)
    assert shrunk[0]["base_eval_loss"].iloc[0] == pytest.approx(cell["base_eval_loss"].iloc[0], rel=1e-6)


@pytest.mark.parametrize("criterion", ["ablation", "retrain"])
def test_no_tolerance_stops_at_the_first_rise(criterion):
    frame = shrink(tolerance=0.0, criterion=criterion)
    start = frame["eval_loss"].iloc[0]
    # here every removal costs something, so the first step is already rejected and kept in the path
    assert len(frame) == 2 and frame["accepted"].tolist() == [True, False]
    assert frame["eval_loss"].iloc[1] > start and frame.attrs["kept"] == (0, 1, 2)
    assert frame.attrs["limit"] == start


def test_an_infinite_tolerance_shrinks_to_min_layers(shrunk):
    assert shrunk[0]["num_layers"].iloc[-1] == 1 and shrunk[0]["accepted"].all()
    frame = shrink(layers=[0, 2], tolerance=math.inf, min_layers=1)
    assert frame["num_layers"].tolist() == [2, 1]
    frame = shrink(tolerance=math.inf, min_layers=2)
    assert frame["num_layers"].tolist() == [3, 2] and frame["accepted"].all()
    assert shrink(tolerance=math.inf, min_layers=3)["num_layers"].tolist() == [3]


@pytest.mark.parametrize("criterion", ["ablation", "retrain"])
def test_a_planted_useless_layer_goes_first(criterion):
    """At the first token (``f1``) the last layer's edit reaches only that token's own logits, which predict
    a prompt token no loss reads: it cannot help, so removing it changes the held-out loss by exactly
    nothing, while the earlier layers' edits reach the response through attention and do help."""
    frame = shrink(positions="f1", criterion=criterion, tolerance=math.inf)
    start = frame["eval_loss"].iloc[0]
    scores = frame["scores"].iloc[1]
    assert frame["removed"].iloc[1] == 2
    if criterion == "ablation":  # the rise in held-out loss when each layer is switched off
        assert scores[2] == 0.0 and scores[0] > 1e-3 and scores[1] > 1e-3
    else:  # the retrained loss without each layer
        assert scores[2] == pytest.approx(start, abs=1e-6) and min(scores[0], scores[1]) > start + 1e-3
    assert frame["eval_loss"].iloc[1] == pytest.approx(start, abs=1e-6)


def _trained_loss(layers: list[int]) -> float:
    """A by-hand reference: train LoReFT at ``layers`` with the public API, score it on the held-out pairs."""
    from transformers import TrainingArguments

    model, tok = tiny_llama(), tiny_tokenizer()
    torch.manual_seed(0)
    reft = reftkit.get_reft_model(model, {"layer": layers, "component": "block_output", "positions": "l1",
                                          "intervention": "loreft", "low_rank_dimension": 2})
    module = reftkit.make_multiple_position_supervised_data_module(
        tok, reft, INPUTS * 2, OUTPUTS * 2, positions=None, eval_inputs=INPUTS, eval_outputs=OUTPUTS)
    with tempfile.TemporaryDirectory() as scratch:
        args = TrainingArguments(output_dir=scratch, report_to=[], save_strategy="no", disable_tqdm=True,
                                 use_cpu=True, seed=0, learning_rate=2e-2, **TRAINING)
        reftkit.ReftTrainer(model=reft, args=args, train_dataset=module["train_dataset"],
                            data_collator=module["data_collator"]).train()
    reft.eval()
    batch = module["data_collator"]([module["eval_dataset"][i] for i in range(len(INPUTS))])
    with torch.no_grad():
        return float(reft(**batch).loss)


def test_retrain_is_the_brute_force_greedy_search():
    frame = shrink(criterion="retrain", tolerance=math.inf)
    current = [0, 1, 2]
    for _, row in frame.iloc[1:].iterrows():
        losses = {layer: _trained_loss([x for x in current if x != layer]) for layer in current}
        assert row["scores"] == pytest.approx(losses, rel=1e-5)
        best = min(losses, key=losses.get)
        assert sorted(losses.values())[1] - losses[best] > 1e-4  # a clear winner, not a tie
        assert row["removed"] == best and row["eval_loss"] == pytest.approx(losses[best], rel=1e-5)
        assert row["trainings"] == len(current)
        current.remove(best)


def test_plot_shrink(shrunk):
    (ax,) = assert_readable(plot_shrink(shrunk[0]))
    removed = shrunk[0]["removed"].tolist()
    assert [t.get_text() for t in ax.texts] == ["all 3", f"−{removed[1]}", f"−{removed[2]}"]
    assert ax.get_xlabel() == "layers with an intervention" and ax.get_ylabel() == "held-out loss [nats/token]"
    assert ax.get_xlim()[0] > ax.get_xlim()[1]  # read from all layers towards fewer
    stopped = pd.DataFrame({"num_layers": [3, 2], "removed": pd.array([None, 1], dtype="Int64"),
                            "accepted": [True, False], "eval_loss": [1.0, 1.2]})
    stopped.attrs.update(limit=1.1, tolerance=0.1, criterion="retrain")
    (ax,) = assert_readable(plot_shrink(stopped))
    labels = [line.get_label() for line in ax.get_lines()]
    assert labels == ["held-out loss", "rejected (over the tolerance)", "limit (+10.0% over all layers)"]
    with pytest.raises(ValueError, match="frame has no column 'accepted'"):
        plot_shrink(stopped.drop(columns="accepted"))


def test_errors():
    model, tok = tiny_llama(), tiny_tokenizer()

    def call(**kwargs):
        args = {"train_inputs": INPUTS, "train_outputs": OUTPUTS, "eval_inputs": INPUTS, "eval_outputs": OUTPUTS,
                **kwargs}
        shrink_layers(model, tok, args.pop("train_inputs"), args.pop("train_outputs"), args.pop("eval_inputs"),
                      args.pop("eval_outputs"), progress=False, **args)
    with pytest.raises(ValueError, match="eval_inputs is empty"):
        call(eval_inputs=[], eval_outputs=[])
    with pytest.raises(ValueError, match="train_inputs is empty"):
        call(train_inputs=[], train_outputs=[])
    with pytest.raises(ValueError, match="eval_inputs 4 and eval_outputs 3"):
        call(eval_outputs=OUTPUTS[:3])
    for bad in (-0.1, float("nan"), "0.1"):
        with pytest.raises(ValueError, match=r"tolerance=.*use a number >= 0"):
            call(tolerance=bad)
    with pytest.raises(ValueError, match=r"min_layers=0 is out of range: use 1..3"):
        call(min_layers=0)
    with pytest.raises(ValueError, match=r"min_layers=3 is out of range: use 1..2 \(the starting set \[0, 2\]"):
        call(layers=[0, 2], min_layers=3)
    with pytest.raises(ValueError, match=r"layers contains 7; use layer indices 0..2"):
        call(layers=[0, 7])
    with pytest.raises(ValueError, match="layers lists 1 twice"):
        call(layers=[1, 1])
    with pytest.raises(ValueError, match="layers is empty"):
        call(layers=[])
    with pytest.raises(ValueError, match="layers='some'"):
        call(layers="some")
    with pytest.raises(ValueError, match="criterion='norm'; use one of"):
        call(criterion="norm")
    with pytest.raises(reftkit.PositionError):
        call(positions="middle")
    assert not any(m._forward_hooks for m in model.modules())  # nothing attached by a refused call
