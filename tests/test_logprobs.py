"""reftkit.training.logprobs against a hand computation: one unpadded forward per (prompt, continuation)
pair, ``model(...).logits``, ``log_softmax`` and a Python loop over the continuation's tokens; left- and
right-padded batches, the hidden-states + LM-head path and the full-logits path, an empty continuation."""
from __future__ import annotations

import types

import pytest
import torch
from conftest import pad_batch, tiny_llama

from reftkit.training.logprobs import continuation_logprobs, label_positions, predicting_states

PROMPTS = [[1, 5, 9, 14], [1, 7], [1, 20, 21, 22, 23], [1, 8, 3]]
CONTINUATIONS = [[30, 31, 2], [40], [50, 51], []]  # the last one is empty
PATHS = ["head", "logits"]


def hand(model, prompt, continuation):
    """``[log p(y_t | x, y_<t) for t]`` and their log-softmax rows, read at column len(prompt) - 1 + t."""
    with torch.no_grad():
        logp = model(input_ids=torch.tensor([prompt + continuation])).logits[0].float().log_softmax(-1)
    values, rows = [], []
    for t, token in enumerate(continuation):
        rows.append(logp[len(prompt) - 1 + t])
        values.append(float(rows[-1][token]))
    return values, rows


def batch(side):
    """The pairs padded on ``side``; labels mark the continuations' columns; hand-counted positions."""
    ids, mask = pad_batch([p + c for p, c in zip(PROMPTS, CONTINUATIONS)], side)
    labels = torch.full_like(ids, -100)
    positions = torch.zeros(len(PROMPTS), max(len(c) for c in CONTINUATIONS), dtype=torch.long)
    for n, (p, c) in enumerate(zip(PROMPTS, CONTINUATIONS)):
        start = ids.shape[1] - len(p) - len(c) if side == "left" else 0
        for t, token in enumerate(c):
            labels[n, start + len(p) + t] = token
            positions[n, t] = start + len(p) + t - 1
    return ids, mask, labels, positions


def states_of(model, path, ids, mask):
    position_ids = (mask.cumsum(1) - 1).clamp_min(0)  # a left-padded row starts at position 0, as unpadded
    if path == "head":
        states, head = predicting_states(types.SimpleNamespace(model=model), ids, mask, position_ids=position_ids)
        assert head is model.lm_head and states.shape[-1] == model.config.hidden_size
        return states, head
    return model(input_ids=ids, attention_mask=mask, position_ids=position_ids).logits, None


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("path", PATHS)
def test_continuation_logprobs_match_the_hand_computation(side, path):
    model = tiny_llama()
    ids, mask, labels, hand_positions = batch(side)
    positions, targets, valid = label_positions(labels)
    assert torch.equal(positions * valid, hand_positions)
    assert valid.sum(1).tolist() == [len(c) for c in CONTINUATIONS]
    with torch.no_grad():
        states, head = states_of(model, path, ids, mask)
        out = continuation_logprobs(states, positions, targets, valid, head)
    refs = [hand(model, p, c) for p, c in zip(PROMPTS, CONTINUATIONS)]
    expected = torch.zeros(valid.shape)
    for n, (values, _) in enumerate(refs):
        expected[n, :len(values)] = torch.tensor(values)
    torch.testing.assert_close(out.token_logprobs, expected, atol=1e-5, rtol=0)
    assert torch.equal(out.mask, valid) and not out.mask[3].any()  # the empty continuation: no tokens, zeros
    assert out.token_logprobs.dtype == torch.float32
    torch.testing.assert_close(out.rows, torch.stack([row for _, rows in refs for row in rows]), atol=1e-5, rtol=0)

    # a control: reading one column early or late gives other numbers, so the comparison above bites
    for shift in (-1, 1):
        moved = continuation_logprobs(states, (positions + shift).clamp(0, ids.shape[1] - 1), targets, valid, head)
        assert (moved.token_logprobs - expected).abs().max() > 1e-2


def test_a_right_padded_prompt_is_read_at_its_last_real_token():
    # prompt padding in the middle: [prompt, pad, pad | continuation]; label_positions would read the pad
    model = tiny_llama()
    prompt_ids, prompt_mask = pad_batch(PROMPTS[:3], "right")
    cont_ids, cont_mask = pad_batch(CONTINUATIONS[:3], "right")
    ids, mask = torch.cat([prompt_ids, cont_ids], 1), torch.cat([prompt_mask, cont_mask], 1)
    positions = torch.zeros(cont_ids.shape, dtype=torch.long)
    for n, p in enumerate(PROMPTS[:3]):
        positions[n] = torch.arange(cont_ids.shape[1]) + prompt_ids.shape[1] - 1
        positions[n, 0] = len(p) - 1
    with torch.no_grad():
        states, head = states_of(model, "head", ids, mask)
        out = continuation_logprobs(states, positions, cont_ids, cont_mask, head)
    for n, (p, c) in enumerate(zip(PROMPTS, CONTINUATIONS[:3])):
        assert out.token_logprobs[n, :len(c)].tolist() == pytest.approx(hand(model, p, c)[0], abs=1e-5)
        assert not out.token_logprobs[n, len(c):].any()


def test_gradients_reach_the_head_and_the_backbone():
    model = tiny_llama()
    ids, mask, labels, _ = batch("right")
    states, head = states_of(model, "head", ids, mask)
    continuation_logprobs(states, *label_positions(labels), head).token_logprobs.sum().backward()
    assert model.lm_head.weight.grad.abs().sum() > 0
    assert model.model.layers[0].mlp.down_proj.weight.grad.abs().sum() > 0


def test_predicting_states_falls_back_to_the_full_logits_read_from_the_right():
    model = tiny_llama()
    ids, mask, _, _ = batch("right")
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=mask).logits
        states, head = predicting_states(types.SimpleNamespace(model=model, label_only_loss=False), ids, mask)
    assert head is None and torch.equal(states, full)

    def with_virtual_tokens(input_ids, attention_mask):  # as prompt tuning: two columns in front
        return types.SimpleNamespace(logits=torch.cat([torch.full_like(full[:, :2], -1.0), full], 1))

    states, head = predicting_states(types.SimpleNamespace(model=with_virtual_tokens, label_only_loss=False), ids,
                                     mask)
    assert head is None and torch.equal(states, full)


def test_label_positions_by_hand():
    labels = torch.tensor([[-100, 5, -100, 7], [9, -100, -100, -100], [-100, -100, 6, -100]])
    positions, targets, mask = label_positions(labels)
    # row 0: columns 1 and 3, read at 0 and 2; row 1: a label in column 0 has nothing before it
    assert mask.tolist() == [[True, True], [False, False], [True, False]]
    assert (positions * mask).tolist() == [[0, 2], [0, 0], [1, 0]]
    assert (targets * mask).tolist() == [[5, 7], [0, 0], [6, 0]]
    empty = label_positions(torch.full((2, 3), -100))
    assert [tuple(t.shape) for t in empty] == [(2, 0)] * 3


def test_bad_positions_and_shapes_are_refused():
    states = torch.randn(2, 4, 11)
    targets, mask = torch.zeros(2, 2, dtype=torch.long), torch.tensor([[True, True], [True, False]])
    with pytest.raises(ValueError, match="columns 0..3"):
        continuation_logprobs(states, torch.tensor([[0, 4], [1, 0]]), targets, mask)
    with pytest.raises(ValueError, match="columns 0..3"):
        continuation_logprobs(states, torch.tensor([[0, 1], [-1, 0]]), targets, mask)
    # out of range where mask is False is never read
    out = continuation_logprobs(states, torch.tensor([[0, 1], [2, 99]]), targets, mask)
    expected = states.log_softmax(-1)[[0, 0, 1], [0, 1, 2], 0]
    torch.testing.assert_close(out.token_logprobs[mask], expected)
    with pytest.raises(ValueError, match=r"must all be \[N, T\]"):
        continuation_logprobs(states, torch.zeros(2, 3, dtype=torch.long), targets, mask)
