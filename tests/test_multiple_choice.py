"""choice_logprobs / rank_classify against a full forward + log_softmax per (prompt, choice) pair,
for a plain model and for a ReftModel edited at the prompt's positions only."""
from __future__ import annotations

import pytest
import torch
from conftest import tiny_gpt2, tiny_llama
from test_text_metrics import tiny_tokenizer

import reftkit
from reftkit.analysis.multiple_choice import accuracy, choice_logprobs, rank_classify

PROMPTS = ["the cat sat on", "what is big ?", "who bit the man who was not a red dog", "it"]
CHOICES = [["a mat", "the dog bit the man", "no"], ["yes", "no"], ["the cat", "a blue man", "it", "green"],
           ["was", "is not big"]]


def reference(model, tok, prompt, choice, normalised, locations=None):
    """Hand computation: one unpadded forward of prompt + choice, log_softmax over the vocabulary,
    the choice tokens' log-probabilities from the positions just before them."""
    p = tok(prompt)["input_ids"]
    c = tok(choice, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([p + c])
    kwargs = {} if locations is None else {"intervention_locations": torch.tensor([locations(len(p))])}
    with torch.no_grad():
        logp = model(input_ids=ids, **kwargs).logits[0].log_softmax(-1)
    total = sum(float(logp[len(p) - 1 + j, t]) for j, t in enumerate(c))
    return total / len(c) if normalised else total


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
@pytest.mark.parametrize("normalised", [True, False])
def test_choice_logprobs_match_hand_computation(make, normalised):
    model, tok = make(), tiny_tokenizer()
    got = choice_logprobs(model, tok, PROMPTS, CHOICES, length_normalised=normalised, batch_size=3)
    expected = [[reference(model, tok, p, c, normalised) for c in cs] for p, cs in zip(PROMPTS, CHOICES)]
    assert [len(g) for g in got] == [len(c) for c in CHOICES]
    for g, e in zip(got, expected):
        assert g == pytest.approx(e, abs=1e-4)


def _reft(positions):
    reft = reftkit.get_reft_model(tiny_llama(seed=5), {"layer": [0, 1], "component": "block_output",
                                                       "positions": positions, "low_rank_dimension": 4})
    torch.manual_seed(6)
    with torch.no_grad():
        for p in reft.interventions.parameters():
            p.add_(torch.randn_like(p))
    return reft


def test_reft_model_is_edited_at_the_prompt_positions():
    reft, tok = _reft("f1+l2"), tiny_tokenizer()
    got = choice_logprobs(reft, tok, PROMPTS, CHOICES, batch_size=4)
    # f1+l2 on a prompt of n tokens: 0, n-2, n-1 (a 2-token prompt "<s> it": f1 takes 0, l2 shrinks to 1)
    def prompt_positions(n):
        return [0, n - 2, n - 1] if n >= 3 else [0, n - 1, -1]
    expected = [[reference(reft, tok, p, c, True, prompt_positions) for c in cs] for p, cs in zip(PROMPTS, CHOICES)]
    for g, e in zip(got, expected):
        assert g == pytest.approx(e, abs=1e-4)
    # positions resolved on prompt + choice (the naive call) would edit choice tokens: different scores
    naive = [[reference(reft, tok, p, c, True) for c in cs] for p, cs in zip(PROMPTS, CHOICES)]
    assert max(abs(a - b) for g, n in zip(got, naive) for a, b in zip(g, n)) > 1e-3
    bare = choice_logprobs(reft.model, tok, PROMPTS, CHOICES)  # hooks inactive outside a ReftModel call
    assert max(abs(a - b) for g, n in zip(got, bare) for a, b in zip(g, n)) > 1e-3


def test_reft_model_locations_fn():
    reft, tok = _reft("l1"), tiny_tokenizer()
    seen = []

    def first_token(prompt_lengths, attention_mask):
        seen.append((prompt_lengths.clone(), attention_mask.shape))
        return torch.zeros(len(prompt_lengths), 1, dtype=torch.long)

    got = choice_logprobs(reft, tok, PROMPTS, CHOICES, length_normalised=False, locations_fn=first_token)
    expected = [[reference(reft, tok, p, c, False, lambda n: [0]) for c in cs] for p, cs in zip(PROMPTS, CHOICES)]
    for g, e in zip(got, expected):
        assert g == pytest.approx(e, abs=1e-4)
    assert seen and all(m[0] == len(lengths) for lengths, m in seen)
    with pytest.raises(ValueError, match="ReftModel"):
        choice_logprobs(reft.model, tok, PROMPTS, CHOICES, locations_fn=first_token)


def test_rank_classify_and_accuracy():
    model, tok = tiny_llama(), tiny_tokenizer()
    scores = choice_logprobs(model, tok, PROMPTS, CHOICES)
    picked = rank_classify(model, tok, PROMPTS, CHOICES)
    assert picked == [max(range(len(s)), key=lambda k: s[k]) for s in scores]
    # the lowest length-normalised NLL, from the hand computation (not from choice_logprobs)
    nll = [[-reference(model, tok, p, c, True) for c in cs] for p, cs in zip(PROMPTS, CHOICES)]
    assert picked == [min(range(len(n)), key=lambda k: n[k]) for n in nll]
    summed = rank_classify(model, tok, PROMPTS, CHOICES, length_normalised=False)
    assert summed == [max(range(len(cs)), key=lambda k: reference(model, tok, p, cs[k], False))
                      for p, cs in zip(PROMPTS, CHOICES)]
    assert picked != summed  # length normalisation changes a pick here, so the test tells them apart
    assert accuracy(picked, picked) == 1.0
    assert accuracy([0, 1, 2, 0], [0, 1, 0, 1]) == 0.5
    with pytest.raises(ValueError):
        accuracy([0], [0, 1])
    with pytest.raises(ValueError, match="no tokens"):
        choice_logprobs(model, tok, ["the cat"], [["a", ""]])
