"""Activation statistics, steering vectors and activation patching against hand computations."""
from __future__ import annotations

import matplotlib
import pytest
import torch

matplotlib.use("Agg")

from conftest import patching_case, tiny_llama, tiny_tokenizer

import reftkit
from reftkit.analysis.patching import activation_patching, mean_activation, plot_patching, steering_vector

POS = ["good movie", "great movie yes", "good good dog"]
NEG = ["bad movie", "awful movie no", "bad cat"]


def hand_mean(model, tok, prompts, layer, last_n=1):
    rows = []
    for p in prompts:
        ids = tok(p, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            hidden = model(input_ids=ids, output_hidden_states=True).hidden_states[layer + 1][0]
        rows.append(hidden[-last_n:].mean(0))
    return torch.stack(rows).mean(0)


@pytest.mark.parametrize("side", ["left", "right"])
def test_mean_activation_and_steering_vector_match_hand_computation(side):
    model = tiny_llama(layers=4)
    tok = tiny_tokenizer(side)
    hooks_before = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    got = mean_activation(model, tok, POS, layer=1, positions="l2", batch_size=2)
    vec = steering_vector(model, tok, POS, NEG, layer=2)
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()) == hooks_before
    torch.testing.assert_close(got, hand_mean(model, tok, POS, 1, last_n=2), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(vec, hand_mean(model, tok, POS, 2) - hand_mean(model, tok, NEG, 2), atol=1e-5, rtol=1e-5)


def test_steering_vector_through_an_addition_intervention():
    model = tiny_llama(layers=4)
    tok = tiny_tokenizer("left")
    vec = steering_vector(model, tok, POS, NEG, layer=1)
    reft = reftkit.get_reft_model(model, [{"layer": 1, "positions": "all", "intervention": "addition", "scale": 4.0}])
    next(iter(reft.interventions.values())).set_vector(vec)
    enc = tok(["what is the movie", "tell me"], return_tensors="pt", padding=True)
    out = reft(**enc).logits
    base = reft.detach()
    handle = base.model.layers[1].register_forward_hook(lambda m, a, o: (o[0] + 4.0 * vec,) + tuple(o[1:])
                                                        if isinstance(o, tuple) else o + 4.0 * vec)
    with torch.no_grad():
        ref = base(**enc).logits
    handle.remove()
    real = enc["attention_mask"].bool()
    torch.testing.assert_close(out[real], ref[real], atol=1e-5, rtol=1e-5)


def test_mean_activation_of_heads():
    model = tiny_llama(layers=2)
    tok = tiny_tokenizer("right")
    got = mean_activation(model, tok, POS, layer=0, component="head_value_output", heads=[1])
    assert got.shape == (1, 8)
    rows = []
    for p in POS:
        ids = tok(p, return_tensors="pt")["input_ids"]
        seen = {}
        h = model.model.layers[0].self_attn.v_proj.register_forward_hook(lambda m, a, o: seen.setdefault("v", o))
        with torch.no_grad():
            model(input_ids=ids)
        h.remove()
        rows.append(seen["v"][0, -1, 8:16])
    torch.testing.assert_close(got[0], torch.stack(rows).mean(0), atol=1e-6, rtol=1e-6)


def test_activation_patching_matches_manual_patching_and_its_invariants():
    model, clean, corrupt, metric = patching_case()

    frame = activation_patching(model, clean, corrupt, metric, progress=False)
    assert len(frame) == 3 * 5
    grid = frame.set_index(["layer", "position"])["score"]
    clean_score, corrupt_score = frame.clean_score[0], frame.corrupt_score[0]
    # the last layer at the last position decides the last logits: patching it restores the clean score
    assert grid[(2, 4)] == pytest.approx(clean_score, abs=1e-5)
    # a position where the inputs agree, at the first layer, changes nothing
    assert grid[(0, 0)] == pytest.approx(corrupt_score, abs=1e-5)
    # one entry by hand: layer 1, position 1
    with torch.no_grad():
        src = model(**clean, output_hidden_states=True).hidden_states[2]

    def patch(m, a, o):
        h = o[0] if isinstance(o, tuple) else o
        h = h.clone()
        h[:, 1] = src[:, 1]
        return (h,) + tuple(o[1:]) if isinstance(o, tuple) else h
    handle = model.model.layers[1].register_forward_hook(patch)
    with torch.no_grad():
        manual = float(metric(model(**corrupt)).mean())
    handle.remove()
    assert grid[(1, 1)] == pytest.approx(manual, abs=1e-5)
    fig = plot_patching(frame, tokens=["t0", "t1", "t2", "t3", "t4"])
    assert fig.axes[0].get_ylabel() == "layer"


def test_patching_refuses_mismatched_shapes():
    model = tiny_llama(layers=2)
    with pytest.raises(ValueError, match="must have the same shape"):
        activation_patching(model, {"input_ids": torch.ones(1, 4, dtype=torch.long)},
                            {"input_ids": torch.ones(1, 5, dtype=torch.long)}, lambda o: o.logits[:, -1, 0])
