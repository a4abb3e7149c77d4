"""Mixed-task batches of IA3: the hooks apply every task's IA3 vectors in one product (``IA3.routed``); each
row equals its task run alone (outputs, gradients and generated tokens), and a subclass that does not define
``routed`` itself is run one task at a time."""
from __future__ import annotations

import pytest
import torch
from conftest import pad_batch, tiny_llama

import reftkit
from reftkit.interventions import IA3
from reftkit.interventions.scaling import ia3_representations

SEQS = [[5, 6, 7, 8, 9], [10, 11, 12], [13, 14, 15, 16], [17, 18, 19, 20, 21, 22]]
TASKS = ["t0", "t1", None, "t2"]


def _config(model, tasks=("t0", "t1", "t2"), cls=IA3):
    reps = []
    for t, task in enumerate(tasks):
        for r in ia3_representations(model):
            reps.append({**r, "intervention": cls(init_ia3_weights=False), "task": task})
    return reps


def _mixed(cls=IA3):
    torch.manual_seed(3)
    model = tiny_llama(seed=0, layers=2)
    return reftkit.get_reft_model(model, _config(model, cls=cls))


def _alone(mixed, task):
    """A model with only ``task``'s interventions, holding the same weights."""
    model = tiny_llama(seed=0, layers=2)
    reps = [r for r in _config(model) if r["task"] == task]
    alone = reftkit.get_reft_model(model, [{k: v for k, v in r.items() if k != "task"} for r in reps])
    mine = [key for key, slot in zip(mixed.interventions, mixed._hooks.slots) if slot.task == task]
    for key, mixed_key in zip(alone.interventions, mine):
        alone.interventions[key].load_state_dict(mixed.interventions[mixed_key].state_dict())
    return alone


def test_each_row_equals_its_task_alone_forward_and_gradients():
    mixed = _mixed()
    ids, mask = pad_batch(SEQS, "right")
    out = mixed(input_ids=ids, attention_mask=mask, tasks=TASKS).logits
    for b, task in enumerate(TASKS):
        real = mask[b].bool()
        if task is None:
            ref = mixed.model(input_ids=ids[b:b + 1], attention_mask=mask[b:b + 1]).logits
        else:
            ref = _alone(mixed, task)(input_ids=ids[b:b + 1], attention_mask=mask[b:b + 1]).logits
        torch.testing.assert_close(out[b, real], ref[0, real], atol=1e-5, rtol=1e-5)
    # gradients: task t's vectors get exactly the gradient of its rows alone
    loss = out[mask.bool()].logsumexp(-1).sum()
    grads = torch.autograd.grad(loss, list(mixed.interventions.parameters()))
    by_key = dict(zip(mixed.interventions.keys(), grads))
    for b, task in enumerate(TASKS):
        if task is None:
            continue
        alone = _alone(mixed, task)
        ref = alone(input_ids=ids[b:b + 1], attention_mask=mask[b:b + 1]).logits
        ref_grads = torch.autograd.grad(ref[0, mask[b].bool()].logsumexp(-1).sum(),
                                        list(alone.interventions.parameters()))
        mine = [key for key, slot in zip(mixed.interventions, mixed._hooks.slots) if slot.task == task]
        for key, g in zip(mine, ref_grads):
            torch.testing.assert_close(by_key[key], g, atol=1e-5, rtol=1e-4)


def test_generate_rows_equal_each_task_alone_and_the_stacked_path_is_taken(monkeypatch):
    mixed = _mixed()
    calls = []
    real = IA3.__dict__["routed"].__func__

    def spy(cls, members, h, which):
        calls.append(len(members))
        return real(cls, members, h, which)

    monkeypatch.setattr(IA3, "routed", classmethod(spy))
    ids, mask = pad_batch(SEQS, "left")
    kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    out = mixed.generate(input_ids=ids, attention_mask=mask, tasks=TASKS, **kw)
    assert calls and set(calls) == {3}  # one product per site for the three tasks, prefill and decode
    for b, task in enumerate(TASKS):
        one_ids, one_mask = pad_batch([SEQS[b]], "left")
        model = mixed.model if task is None else _alone(mixed, task)
        ref = model.generate(input_ids=one_ids, attention_mask=one_mask, **kw)
        assert out[b, -5:].tolist() == ref[0, -5:].tolist()


class HalfIA3(IA3):
    """A subclass with another formula: it must not inherit IA3's stacked product."""

    name = "half_ia3_test"

    def forward(self, h):
        return (h.float() * self.scale * 0.5).to(h.dtype)


def test_a_subclass_without_its_own_routed_runs_task_by_task():
    mixed = _mixed(HalfIA3)
    ids, mask = pad_batch(SEQS, "right")
    out = mixed(input_ids=ids, attention_mask=mask, tasks=TASKS).logits
    b = 1
    model = tiny_llama(seed=0, layers=2)
    reps = [{k: v for k, v in r.items() if k != "task"} for r in _config(model, cls=HalfIA3) if r["task"] == "t1"]
    alone = reftkit.get_reft_model(model, reps)
    mine = [key for key, slot in zip(mixed.interventions, mixed._hooks.slots) if slot.task == "t1"]
    for key, mixed_key in zip(alone.interventions, mine):
        alone.interventions[key].load_state_dict(mixed.interventions[mixed_key].state_dict())
    ref = alone(input_ids=ids[b:b + 1], attention_mask=mask[b:b + 1]).logits
    real = mask[b].bool()
    torch.testing.assert_close(out[b, real], ref[0, real], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("k", [1, 3])
def test_routed_matches_the_formula(k):
    members = [IA3(8, init_ia3_weights=False) for _ in range(k)]
    h = torch.randn(5, 4, 8)
    which = torch.tensor([0, k, k - 1, 0, k])
    got = IA3.routed(members, h, which)
    for b in range(5):
        want = h[b] if which[b] == k else members[which[b]](h[b])
        torch.testing.assert_close(got[b], want)
