"""reftkit.training.suffix: the suffix path gives the full path's loss, logits and gradients (its reference here is
``causal_lm_loss`` without it, itself checked against hand-written hooks elsewhere), from the prefix KV cache and
from the per-example store; it falls back, saying why, where it cannot be exact; its check catches a wrong
function; it keeps to its byte budget; and ReftTrainer takes it by default with the same training curve."""
from __future__ import annotations

import warnings

import pytest
import torch
from conftest import tiny_gpt2, tiny_llama
from ddp_worker import Collator, LMData, training_args

import reftkit
from reftkit.training import ReftTrainer, causal_lm_loss
from reftkit.training import suffix as suffix_module
from reftkit.training.suffix import SuffixTraining, SuffixTrainingError


def _reft(build=tiny_llama, layers=(1, 3), positions="l1", n_layers: int = 4, **entry) -> reftkit.ReftModel:
    model = build(seed=0, layers=n_layers)
    torch.manual_seed(1)
    config = [{"layer": list(layers), "component": "block_output", "positions": positions,
               "intervention": "loreft", "low_rank_dimension": 3, **entry}]
    reft = reftkit.get_reft_model(model, config)
    with torch.no_grad():  # move the interventions off their identity-like init so they matter
        for p in reft.interventions.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return reft


def _batch(reft, n: int = 6, seed: int = 0) -> dict:
    """Right-padded prompts of 3-6 tokens + answers of 1-4; every third example is labelled on every token (its
    split is 0: position 0 predicts position 1), the others on the answer; intervened at the last prompt token."""
    data = LMData(n, seed=seed)
    return Collator(len(reft.interventions))([data[i] for i in range(n)])


def _run(reft, batch, **kw):
    reft.zero_grad()
    out = causal_lm_loss(reft, **batch, **kw)
    grads = torch.autograd.grad(out["loss"], list(reft.interventions.parameters()))
    return out, grads


def _assert_same(got, want, tol=1e-6):
    (g_out, g_grads), (w_out, w_grads) = got, want
    assert abs(g_out["loss"].item() - w_out["loss"].item()) <= tol * max(1.0, abs(w_out["loss"].item()))
    assert g_out["logits"].shape == w_out["logits"].shape
    assert (g_out["logits"] - w_out["logits"]).abs().max().item() <= 1e-4
    assert max((a - b).abs().max().item() for a, b in zip(g_grads, w_grads)) <= tol
    assert max(g.abs().max().item() for g in g_grads) > 1e-3  # the interventions do get a gradient


@pytest.mark.parametrize("build,layers", [(tiny_llama, (1, 3)), (tiny_llama, (0, 2)), (tiny_gpt2, (1, 2))],
                         ids=["llama-from-layer-1", "llama-from-layer-0", "gpt2"])
def test_suffix_and_stored_paths_equal_the_full_path(build, layers):
    reft = _reft(build, layers)
    suffix = SuffixTraining(reft)
    assert suffix.layer == (layers[0] if build is tiny_llama else 0)  # GPT-2 has no `layers` list: all layers
    opt = torch.optim.SGD(reft.interventions.parameters(), lr=0.5)
    batches = [_batch(reft, 6, seed) for seed in (0, 1)]
    for epoch in range(2):
        for batch in batches:
            want = _run(reft, batch)
            got = _run(reft, batch, suffix_training=suffix)
            _assert_same(got, want)
            for p, g in zip(reft.interventions.parameters(), got[1]):  # a real step: epoch 2 sees new weights
                p.grad = g
            opt.step()
    assert (suffix.suffix_steps, suffix.cached_steps, suffix.full_steps) == (2, 2, 0)
    assert suffix.hits == 12 and suffix.misses == 12 and len(suffix) == 12
    assert suffix.verified == {"suffix": True, "cached": True}
    assert 0 < suffix.prefix_tokens and 0 < suffix.suffix_tokens


def test_mixed_prefix_lengths_multiple_positions_and_explicit_padded_locations():
    reft = _reft(positions="l2", layers=(1, 2, 3))
    batch = _batch(reft, 5, seed=3)
    # per intervention, its own positions: -1 padded, different per row and intervention
    lengths = batch["attention_mask"].sum(1)
    loc = torch.full((5, 3, 2), -1)
    for b, n in enumerate(lengths.tolist()):
        loc[b, 0, :2] = torch.tensor([n - 3, n - 2])
        loc[b, 1, 0] = n - 1
        loc[b, 2, :2] = torch.tensor([max(n - 4, 1), n - 1])
    batch = {**batch, "intervention_locations": loc, "labels": torch.where(
        torch.arange(batch["labels"].shape[1])[None] >= (lengths - 1)[:, None], batch["labels"], -100)}
    suffix = SuffixTraining(reft)
    want = _run(reft, batch)
    _assert_same(_run(reft, batch, suffix_training=suffix), want)
    _assert_same(_run(reft, batch, suffix_training=suffix), want)
    assert suffix.cached_steps == 1
    # the split is each row's earliest intervened or supervised position
    assert suffix.prefix_tokens == 2 * sum(min(max(n - 4, 1), n - 3, n - 2) for n in lengths.tolist())


def test_tokens_after_the_last_supervised_prediction_are_not_run():
    """Rows whose last tokens carry no label (and an intervention placed there too): those tokens reach no loss
    term, so the suffix ends at the last supervised prediction, and loss and gradients stay the full path's."""
    reft = _reft(positions="l2", layers=(1, 3))
    batch = _batch(reft, 6, seed=4)
    lengths = batch["attention_mask"].sum(1)
    columns = torch.arange(batch["labels"].shape[1])[None]
    labels = torch.where(columns < (lengths - 2)[:, None], batch["labels"], -100)  # the last two tokens: no label
    loc = torch.as_tensor(batch["intervention_locations"])
    last = (lengths - 1)[:, None, None].expand(-1, loc.shape[1], 1)
    loc = torch.cat([loc, last], 2)  # and an intervention on the very last token too
    batch = {**batch, "labels": labels, "intervention_locations": loc}
    suffix = SuffixTraining(reft)
    want = _run(reft, batch)
    _assert_same(_run(reft, batch, suffix_training=suffix), want)
    _assert_same(_run(reft, batch, suffix_training=suffix), want)
    assert suffix.cached_steps == 1
    # by hand: s = the earliest intervened position or supervised prediction; the suffix stops at the last label
    expected = 0
    for b, n in enumerate(lengths.tolist()):
        labelled = [t for t in range(1, n) if labels[b, t] != -100]  # a label at t is predicted at t - 1
        located = [int(x) for x in loc[b].flatten() if x >= 0]
        split = min(min(located), labelled[0] - 1 if labelled else n) if located else labelled[0] - 1
        end = max(labelled[-1], split + 1) if labelled else split + 1
        expected += end - split
    assert suffix.suffix_tokens == 2 * expected
    assert expected < 2 * sum(n - 2 for n in lengths.tolist())  # fewer than the tokens from each split to the end


def test_routed_tasks_and_subspaces_pass_through():
    model = tiny_llama(seed=0, layers=3)
    torch.manual_seed(2)
    reft = reftkit.get_reft_model(model, [
        {"layer": 1, "component": "block_output", "positions": "l1", "intervention": "loreft",
         "low_rank_dimension": 3, "task": "a"},
        {"layer": 2, "component": "block_output", "positions": "l1", "intervention": "loreft",
         "low_rank_dimension": 3, "task": "b"}])
    with torch.no_grad():
        for p in reft.interventions.parameters():
            p.add_(0.3 * torch.randn_like(p))
    batch = _batch(reft, 4)
    batch["tasks"] = ["a", "b", "b", "a"]
    suffix = SuffixTraining(reft)
    want = _run(reft, batch)
    _assert_same(_run(reft, batch, suffix_training=suffix), want)
    _assert_same(_run(reft, batch, suffix_training=suffix), want)


@pytest.mark.parametrize("case", ["left-padded", "f-positions", "checkpointing", "dropout", "extra-input"])
def test_falls_back_to_the_full_path_and_says_why(case):
    reft = _reft(positions="f1+l1" if case == "f-positions" else "l1")
    batch = _batch(reft, 4)
    reason = {"left-padded": "not right-padded", "f-positions": "no example has a token before",
              "checkpointing": "gradient checkpointing", "dropout": "dropout config.attention_dropout=0.1",
              "extra-input": "backbone inputs \\['position_ids'\\]"}[case]
    if case == "left-padded":
        mask, width = batch["attention_mask"], batch["attention_mask"].shape[1]
        shift = width - mask.sum(1)
        order = (torch.arange(width)[None] - shift[:, None]) % width
        batch = {k: (v.gather(1, order) if k != "intervention_locations" else v + shift[:, None, None])
                 for k, v in batch.items()}
        batch["labels"] = torch.where(batch["attention_mask"].bool(), batch["labels"], -100)
    if case == "f-positions":
        batch.pop("intervention_locations")
        batch["labels"] = torch.where(batch["attention_mask"].bool(), batch["input_ids"], -100)
    if case == "checkpointing":
        reft.gradient_checkpointing_enable()
        reft.train()
    if case == "dropout":
        reft.model.config.attention_dropout = 0.1
        reft.train()
    if case == "extra-input":
        batch["position_ids"] = torch.arange(batch["input_ids"].shape[1])[None].expand_as(batch["input_ids"])
    suffix = SuffixTraining(reft)
    torch.manual_seed(0)
    want = _run(reft, batch)
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match=f"suffix training: running the full path because .*{reason}"):
        got = _run(reft, batch, suffix_training=suffix)
    _assert_same(got, want, tol=0 if case != "checkpointing" else 1e-6)
    assert suffix.full_steps == 1 and suffix.suffix_steps == 0 and len(suffix.fallbacks) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one warning per reason, not per batch
        _run(reft, batch, suffix_training=suffix)


def test_the_exactness_check_catches_a_wrong_function(monkeypatch):
    # a suffix that forgets its prefix (a cache of zeros) computes another function
    real = suffix_module.left_aligned_cache

    def forgetful(kv, suffix):
        return real(torch.zeros_like(kv), suffix)

    monkeypatch.setattr(suffix_module, "left_aligned_cache", forgetful)
    reft = _reft()
    batch = _batch(reft, 4)
    with pytest.raises(SuffixTrainingError, match="does not reproduce the full forward"):
        _run(reft, batch, suffix_training=SuffixTraining(reft))
    # not strict (the trainer's "auto"): it turns itself off and this very batch gets the full path's loss
    lenient = SuffixTraining(reft, strict=False)
    want = _run(reft, batch)
    with pytest.warns(UserWarning, match="does not reproduce the full forward"):
        got = _run(reft, batch, suffix_training=lenient)
    _assert_same(got, want, tol=0)
    assert lenient.disabled and lenient.full_steps == 1
    _assert_same(_run(reft, batch, suffix_training=lenient), want, tol=0)
    assert lenient.full_steps == 2 and lenient.suffix_steps == 0


def test_stored_path_check_catches_stale_states():
    reft = _reft()
    batch = _batch(reft, 4)
    suffix = SuffixTraining(reft)
    _run(reft, batch, suffix_training=suffix)
    for prefix, states in suffix._store.values():  # the stored layer-1 inputs go stale
        states.add_(1.0)
    with pytest.raises(SuffixTrainingError, match="from its stored prefix and layer-1 input"):
        _run(reft, batch, suffix_training=suffix)


def test_byte_budget_cpu_storage_and_counters():
    reft = _reft()
    batch = _batch(reft, 6)
    want = _run(reft, batch)
    nothing = SuffixTraining(reft, max_bytes=0)
    for _ in range(2):
        _assert_same(_run(reft, batch, suffix_training=nothing), want)
    assert len(nothing) == 0 and nothing.nbytes == 0 and nothing.suffix_steps == 2 and nothing.cached_steps == 0
    full = SuffixTraining(reft, device="cpu")
    _run(reft, batch, suffix_training=full)
    per_example = full.nbytes / len(full)
    some = SuffixTraining(reft, max_bytes=int(per_example * 2.5))
    with pytest.warns(UserWarning, match=r"max_bytes=\d+ reached with [12] examples"):
        _run(reft, batch, suffix_training=some)
    assert len(some) <= 3 and some.nbytes <= some.max_bytes
    _assert_same(_run(reft, batch, suffix_training=some), want)  # not all stored: the prefix is recomputed
    assert some.cached_steps == 0 and some.suffix_steps == 2
    assert all(t.device.type == "cpu" for pair in full._store.values() for t in pair if t is not None)
    _assert_same(_run(reft, batch, suffix_training=full), want)
    assert full.cached_steps == 1
    full.clear()
    assert len(full) == 0 and full.nbytes == 0
    with pytest.raises(SuffixTrainingError, match="max_bytes=-1"):
        SuffixTraining(reft, max_bytes=-1)


def test_refuses_what_it_cannot_do():
    with pytest.raises(SuffixTrainingError, match="needs a ReftModel"):
        SuffixTraining(tiny_llama())
    reft = _reft()
    reft.model.model.embed_tokens.weight.requires_grad_(True)
    with pytest.raises(SuffixTrainingError, match="requires_grad=True"):
        SuffixTraining(reft)
    reft = reftkit.get_reft_model(tiny_llama(seed=0, layers=3), [
        {"layer": 2, "component": "block_output", "positions": "l1", "intervention": "interchange"}])
    with pytest.raises(SuffixTrainingError, match="layer2_block_output.*reads a source run"):
        SuffixTraining(reft)
    other = _reft()
    with pytest.raises(ValueError, match="built for another ReftModel"):
        causal_lm_loss(_reft(), **_batch(other, 2), suffix_training=SuffixTraining(other))


# -- ReftTrainer --------------------------------------------------------------------------------
def _train(tmp_path, setting, epochs: int = 3):
    reft = _reft()
    # 8 examples, batch 4, three epochs in a fixed order; SGD so a scale error would show
    args = training_args(str(tmp_path / str(setting)), 4, 2 * epochs, optim="sgd", learning_rate=0.5,
                         max_grad_norm=0.0, logging_steps=1)
    trainer = ReftTrainer(reft, args, train_dataset=LMData(8), data_collator=Collator(len(reft.interventions)),
                          suffix_training=setting)
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return {k: v.detach().clone() for k, v in reft.interventions.state_dict().items()}, losses, trainer


def test_trainer_takes_the_suffix_path_by_default_with_the_same_curve(tmp_path):
    full, full_losses, off = _train(tmp_path, False)
    assert off.suffix_training is None
    weights, losses, trainer = _train(tmp_path, "auto")
    suffix = trainer.suffix_training
    assert (suffix.suffix_steps, suffix.cached_steps, suffix.full_steps) == (2, 4, 0)
    assert len(losses) == len(full_losses) == 6
    assert max(abs(a - b) for a, b in zip(losses, full_losses)) <= 1e-5
    assert max((weights[k] - full[k]).abs().max().item() for k in full) <= 1e-5
    assert any((full[k] - _reft().interventions.state_dict()[k]).abs().max() > 1e-3 for k in full)  # it trained
    hits = suffix.hits
    trainer.evaluate(LMData(4, seed=9))  # evaluation neither fills nor uses the store
    assert suffix.hits == hits


def test_trainer_required_or_auto_when_it_cannot_run(tmp_path, caplog):
    args = training_args(str(tmp_path), 2, 1)
    reft = _reft()
    reft.model.model.norm.weight.requires_grad_(True)
    with pytest.raises(ValueError, match="suffix_training=True cannot run: .*requires_grad=True"):
        ReftTrainer(reft, args, suffix_training=True)
    assert ReftTrainer(reft, args).suffix_training is None  # auto: off, with the reason logged
    with pytest.raises(ValueError, match="suffix_training='yes'"):
        ReftTrainer(_reft(), args, suffix_training="yes")
    mine = SuffixTraining(reft := _reft(), max_bytes=0)
    assert ReftTrainer(reft, args, suffix_training=mine).suffix_training is mine
    with pytest.raises(ValueError, match="activation checkpointing re-runs layers"):
        ReftTrainer(_reft(), training_args(str(tmp_path), 2, 1, activation_checkpointing=True),
                    suffix_training=True)


def _with_common_start(batch: dict, start: list[int]) -> dict:
    """Every row prefixed with the same tokens (a system prompt); locations and labels move with them."""
    rows, width = batch["input_ids"].shape[0], len(start)
    head = torch.tensor(start).expand(rows, -1)
    return {"input_ids": torch.cat([head, batch["input_ids"]], 1),
            "attention_mask": torch.cat([torch.ones_like(head), batch["attention_mask"]], 1),
            "labels": torch.cat([torch.full_like(head, -100), batch["labels"]], 1),
            "intervention_locations": batch["intervention_locations"] + width}


@pytest.mark.parametrize("build,layers", [(tiny_llama, (1, 3)), (tiny_gpt2, (1, 2))], ids=["llama", "gpt2"])
def test_a_start_shared_by_every_row_runs_once_from_a_stored_block(build, layers):
    reft = _reft(build, layers)
    start = [5, 17, 9, 33, 8, 21, 40]
    suffix = SuffixTraining(reft)
    first, second = (_with_common_start(_batch(reft, 4, seed), start) for seed in (0, 5))
    for batch in (first, second, first):  # the second batch reads the block the first stored; the third is stored
        _assert_same(_run(reft, batch, suffix_training=suffix), _run(reft, batch))
    assert len(suffix._shared) == 1 and suffix.shared_hits == 1 and suffix.cached_steps == 1
    (length, _), block = next(iter(suffix._shared.items()))
    # the row labelled on every token is supervised from the start's last position on: its prefix ends before it
    assert length == len(start) - 1 and block.shape[-2] == len(start) - 1
    # rows that share fewer than MIN_SHARED_TOKENS tokens run their whole prefixes
    short = _with_common_start(_batch(reft, 4, 7), start[:suffix_module.MIN_SHARED_TOKENS - 1])
    before = (len(suffix._shared), suffix.shared_hits)
    _assert_same(_run(reft, short, suffix_training=suffix), _run(reft, short))
    assert (len(suffix._shared), suffix.shared_hits) == before


def test_a_wrong_shared_block_is_caught():
    reft = _reft()
    suffix = SuffixTraining(reft)
    batch = _with_common_start(_batch(reft, 4), [5, 17, 9, 33, 8, 21, 40])
    suffix.verified["suffix"] = True
    _run(reft, batch, suffix_training=suffix)  # stores the block (unchecked, as if checked on an earlier batch)
    for block in suffix._shared.values():
        block.mul_(0.5)
    suffix.verified["suffix"] = False
    suffix._store.clear()
    with pytest.raises(SuffixTrainingError, match="on a KV cache of its prefix"):
        _run(reft, batch, suffix_training=suffix)
