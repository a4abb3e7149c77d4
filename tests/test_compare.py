"""compare(): one row per method with exact counts, the same scores as an independent evaluation, the
base model given back unchanged, files written, and clear errors."""
from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_llama, tiny_tokenizer

import reftkit
from reftkit.analysis import Method, compare, plot_comparison
from reftkit.analysis.text_metrics import generate_predictions, text_scores

INPUTS = ["what is the capital of france ?", "define dog", "how many legs spider ?", "colour sky ?"] * 2
OUTPUTS = ["paris .", "animal that barks .", "eight .", "blue ."] * 2
BUDGET = {"num_train_epochs": 2, "per_device_train_batch_size": 4, "disable_tqdm": True}


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    out = tmp_path_factory.mktemp("compare")
    model, tok = tiny_llama(), tiny_tokenizer()
    reference = {k: v.clone() for k, v in model.state_dict().items()}
    methods = ["base", Method("loreft", {"layer": [1], "low_rank_dimension": 2}), ("lora", {"r": 2}), "svf",
               ("prompt_tuning", {"num_virtual_tokens": 3}), "fpft"]
    frame = compare(model, tok, INPUTS, OUTPUTS, INPUTS[:4], OUTPUTS[:4], methods, training=BUDGET,
                    max_new_tokens=4, progress=False, output_dir=out)
    return frame, model, reference, out


def test_one_row_per_method_with_exact_counts(result):
    frame, model, _, _ = result
    assert list(frame["method"]) == ["base", "loreft", "lora", "svf", "prompt_tuning", "fpft"]
    base = sum(p.numel() for p in tiny_llama().parameters())
    assert (frame["num_total_params"] == base).all()
    counts = dict(zip(frame["method"], frame["num_trainable_params"]))
    # LoReFT rank 2 at one layer: R (32x2) + W (2x32) + b (2)
    assert counts == {"base": 0, "loreft": 32 * 2 + 2 * 32 + 2, "lora": 3 * 2 * (64 + 48 + 48 + 64 + 96 + 96 + 96),
                      "svf": 3 * 3 * 32, "prompt_tuning": 3 * 32, "fpft": base}
    assert frame.loc[frame["method"] == "fpft", "trainable_percent"].item() == 100.0
    trained = frame[frame["method"] != "base"]
    assert (trained["train_time"] > 0).all() and (trained["file_size"] > 0).all()
    assert (trained["peak_rss_mb"] > 0).all() and trained["train_loss"].notna().all()
    assert (frame["tokens_per_s"] > 0).all() and (frame["inference_latency_s"] > 0).all()


def test_base_row_matches_an_independent_evaluation_and_base_is_untouched(result):
    frame, model, reference, _ = result
    assert all(torch.equal(reference[k], v) for k, v in model.state_dict().items())
    assert set(model.state_dict()) == set(reference)
    predictions = generate_predictions(tiny_llama(), tiny_tokenizer(), INPUTS[:4], max_new_tokens=4, progress=False)
    expected = text_scores(predictions, OUTPUTS[:4])
    row = frame[frame["method"] == "base"].iloc[0]
    for key, value in expected.items():
        assert row[key] == pytest.approx(value)


def test_trained_reft_row_scores_its_saved_interventions(result):
    """The saved LoReFT, reloaded on a fresh base, generates what compare scored."""
    frame, _, _, out = result
    reft = reftkit.ReftModel.from_pretrained(tiny_llama(), out / "loreft")
    predictions = generate_predictions(reft, tiny_tokenizer(), INPUTS[:4], max_new_tokens=4, progress=False)
    row = frame[frame["method"] == "loreft"].iloc[0]
    assert row["rougeL"] == pytest.approx(text_scores(predictions, OUTPUTS[:4])["rougeL"])


def test_files_written(result):
    frame, _, _, out = result
    assert (out / "compare.csv").read_text().splitlines()[0].startswith("method,name,kind,num_trainable_params")
    saved = json.loads((out / "compare.json").read_text())
    assert saved["budget"]["num_train_epochs"] == 2 and len(saved["rows"]) == len(frame)
    assert (out / "lora" / "adapter_model.safetensors").is_file()
    assert (out / "svf" / "svf.safetensors").is_file()


def test_plot_comparison_axes(result):
    frame = result[0]
    fig = plot_comparison(frame, metric="rougeL")
    quality, cost = fig.axes
    assert quality.get_xscale() == "log" and quality.get_ylabel() == "rougeL"
    assert len(quality.collections) == len(frame) - 1  # one point per trained method
    assert len(quality.lines) == 1  # the untrained base as a reference line
    assert [t.get_text() for t in cost.get_yticklabels()] == list(frame["method"][1:])
    with pytest.raises(ValueError, match="no column 'accuracy'"):
        plot_comparison(frame, metric="accuracy")


def test_bad_input_errors():
    model, tok = tiny_llama(), tiny_tokenizer()
    with pytest.raises(ValueError, match="unknown method 'qlora'"):
        compare(model, tok, INPUTS, OUTPUTS, INPUTS, OUTPUTS, ["qlora"])
    small = tiny_llama()
    small.resize_token_embeddings(20)
    expected = "tokenizer has .* tokens but the model's input embedding has 20 rows \\(LlamaForCausalLM\\)"
    with pytest.raises(ValueError, match=expected):
        compare(small, tok, INPUTS, OUTPUTS, INPUTS, OUTPUTS, ["base"])
    with pytest.raises(ValueError, match="labels must be unique"):
        compare(model, tok, INPUTS, OUTPUTS, INPUTS, OUTPUTS, ["lora", "lora"])
    reft = reftkit.get_reft_model(model, [{"layer": 1, "component": "block_output", "intervention": "loreft"}])
    with pytest.raises(ValueError, match="already adapted"):
        compare(reft, tok, INPUTS, OUTPUTS, INPUTS, OUTPUTS, ["base"])


def test_method_specs_and_their_defaults():
    assert Method("loreft").representations() == [{"layer": "all", "component": "block_output", "positions": "l1",
                                                   "low_rank_dimension": 4, "intervention": "loreft"}]
    adapter = Method("bottleneck_adapter", {"reduction_factor": 8})
    reft = reftkit.get_reft_model(tiny_llama(), adapter.representations())
    # one Houlsby-style bottleneck per layer on every token: down 32->4 and up 4->32 with biases
    assert reft.parameter_counts()["trainable"] == 3 * (32 * 4 + 4 + 4 * 32 + 32)
    assert Method("lora").options["r"] == 8 and Method("lora", {"r": 2}).options["r"] == 2
    assert Method("fpft").learning_rate == 2e-5 and Method("direft").learning_rate == 2e-3
    with pytest.raises(ValueError, match="method 'base' takes no options"):
        Method("base", {"r": 1})
