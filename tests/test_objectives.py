"""T-Few's unlikelihood and length-normalised losses against values computed by hand."""
from __future__ import annotations

import math

import pytest
import torch

from reftkit.training.objectives import length_normalized_loss, unlikelihood_loss

# one example, three choices; choice 0 is correct. Probabilities of each choice's tokens:
PROBS = [[0.5, 0.25, 1.0], [0.1, 0.2, 0.4], [0.8, 1.0, 1.0]]
LENGTHS = [2, 3, 1]


def _inputs():
    probs = torch.tensor([PROBS], dtype=torch.float64)
    mask = torch.tensor([[[t < n for t in range(3)] for n in LENGTHS]])
    return probs.log(), mask, torch.tensor([0])


def test_unlikelihood_by_hand():
    logp, mask, correct = _inputs()
    # incorrect tokens: 0.1, 0.2, 0.4 (choice 1) and 0.8 (choice 2) — 4 tokens
    hand = -(math.log(0.9) + math.log(0.8) + math.log(0.6) + math.log(0.2)) / 4
    assert float(unlikelihood_loss(logp, mask, correct)) == pytest.approx(hand, rel=1e-12)


def test_length_normalized_by_hand():
    logp, mask, correct = _inputs()
    beta = [(math.log(0.5) + math.log(0.25)) / 2, (math.log(0.1) + math.log(0.2) + math.log(0.4)) / 3,
            math.log(0.8)]
    hand = -(beta[0] - math.log(sum(math.exp(b) for b in beta)))
    assert float(length_normalized_loss(logp, mask, correct)) == pytest.approx(hand, rel=1e-12)


def test_gradients_push_wrong_choices_down_and_the_right_one_up():
    logp, mask, correct = _inputs()
    logp = logp.clone().requires_grad_(True)
    (unlikelihood_loss(logp, mask, correct) + length_normalized_loss(logp, mask, correct)).backward()
    grad = logp.grad[0]
    assert (grad[0, :2] < 0).all()          # raising the correct choice's log-probs lowers the loss
    assert (grad[1, :3] > 0).all() and grad[2, 0] > 0
    assert (grad[~mask[0]] == 0).all()      # padding gets no gradient


def test_errors_name_the_shape():
    logp, mask, correct = _inputs()
    with pytest.raises(ValueError, match="outside 0..2"):
        unlikelihood_loss(logp, mask, torch.tensor([3]))
    with pytest.raises(ValueError, match="\\[batch, choices, tokens\\]"):
        length_normalized_loss(logp[0], mask[0], correct)
    empty = mask.clone()
    empty[0, 2] = False
    with pytest.raises(ValueError, match="at least one real token"):
        length_normalized_loss(logp, empty, correct)
