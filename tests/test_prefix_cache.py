"""reftkit.training.frozen_prefix: the frozen-prefix cache gives the uncached loss and gradients, refuses what it
cannot do exactly, respects its byte budget, and trains to the same weights inside ReftTrainer."""
from __future__ import annotations

import warnings

import pytest
import torch
from conftest import tiny_gpt2, tiny_llama
from ddp_worker import Collator, LMData, training_args

import reftkit
from reftkit.training import ReftForSequenceClassification, ReftTrainer, causal_lm_loss
from reftkit.training.frozen_prefix import FrozenPrefixCache, PrefixCacheError

# Earliest interventions in layer 1 (its block_input and block_output), another two layers higher.
CONFIG = [{"layer": [1, 3], "component": "block_output", "positions": "f1+l1", "intervention": "loreft",
           "low_rank_dimension": 4},
          {"layer": 1, "component": "block_input", "positions": "l2", "intervention": "loreft",
           "low_rank_dimension": 2}]


def _reft(config=CONFIG, layers: int = 4) -> reftkit.ReftModel:
    model = tiny_llama(seed=0, layers=layers)
    torch.manual_seed(1)
    reft = reftkit.get_reft_model(model, config)
    with torch.no_grad():  # move the interventions off their identity-like init so they matter
        for p in reft.interventions.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return reft


def _batches(reft, n: int, size: int, seed: int = 0) -> list[dict]:
    data, collate = LMData(n, seed=seed), Collator(len(reft.interventions))
    return [collate([data[i] for i in range(s, min(s + size, n))]) for s in range(0, n, size)]


def _loss_and_grads(reft, batch, **kw):
    out = causal_lm_loss(reft, **batch, **kw)
    grads = torch.autograd.grad(out["loss"], list(reft.interventions.parameters()))
    return out, grads


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointing"])
def test_two_epochs_same_loss_and_grads_second_all_hits(checkpointing):
    reft = _reft()
    if checkpointing:  # layers re-run in backward: the capture must keep the forward's value only
        reft.gradient_checkpointing_enable()
        reft.train()
    cache = FrozenPrefixCache(reft)
    assert cache.layer == 1
    batches = _batches(reft, 8, 4)
    opt = torch.optim.SGD(reft.interventions.parameters(), lr=0.1)
    for epoch in range(2):
        for batch in batches:
            want, want_g = _loss_and_grads(reft, batch)
            got, got_g = _loss_and_grads(reft, batch, prefix_cache=cache)
            assert torch.allclose(got["loss"], want["loss"], rtol=1e-6, atol=1e-7)
            assert max((a - b).abs().max().item() for a, b in zip(got_g, want_g)) <= 1e-6
            # a real step between batches, so epoch 2 sees different interventions than epoch 1
            for p, g in zip(reft.interventions.parameters(), want_g):
                p.grad = g
            opt.step()
        if epoch == 0:
            assert (cache.hits, cache.misses, cache.full_steps, cache.cached_steps) == (0, 8, 2, 0)
    assert (cache.hits, cache.misses, cache.full_steps, cache.cached_steps) == (8, 8, 2, 2)
    assert len(cache) == 8 and cache.tokens == sum(int(b["attention_mask"].sum()) for b in batches)
    assert cache.bytes_per_token == 32 * 4  # hidden 32, float32


def test_cached_path_skips_the_prefix_layers():
    reft = _reft()
    cache = FrozenPrefixCache(reft)
    batch = _batches(reft, 4, 4)[0]
    causal_lm_loss(reft, **batch, prefix_cache=cache)
    calls = []
    layer0 = reft.model.model.layers[0]
    handle = layer0.register_forward_hook(lambda *a: calls.append(1))
    causal_lm_loss(reft, **batch, prefix_cache=cache)
    handle.remove()
    assert calls == [] and cache.cached_steps == 1
    assert reft.model.model.layers is not None and len(reft.model.model.layers) == 4  # restored


def test_other_compositions_and_padding_widths_match_uncached():
    reft = _reft()
    cache = FrozenPrefixCache(reft)
    data, collate = LMData(9, seed=5), Collator(len(reft.interventions))
    items = [data[i] for i in range(9)]
    for s in range(0, 9, 3):
        causal_lm_loss(reft, **collate(items[s:s + 3]), prefix_cache=cache)
    # Per-example reference: each example alone, unpadded, uncached.
    alone = [causal_lm_loss(reft, **collate([it]))["logits"] for it in items]
    for order in ([8, 0, 4, 2], [1, 7], [3, 5, 6, 0, 8]):
        batch = collate([items[i] for i in order])
        hits = cache.cached_steps
        got = causal_lm_loss(reft, **batch, prefix_cache=cache)
        assert cache.cached_steps == hits + 1
        want = causal_lm_loss(reft, **batch)
        assert torch.allclose(got["loss"], want["loss"], rtol=1e-6, atol=1e-7)
        assert torch.allclose(got["logits"], torch.cat([alone[i] for i in order]), atol=1e-5)
    # wider padding than any batch stored from: pad tokens appended at the end
    batch = collate([items[2], items[4]])
    wide = {k: torch.nn.functional.pad(v, (0, 7), value=-100 if k == "labels" else 0)
            for k, v in batch.items() if k != "intervention_locations"}
    wide["intervention_locations"] = batch["intervention_locations"]
    got = causal_lm_loss(reft, **wide, prefix_cache=cache)
    assert torch.allclose(got["loss"], causal_lm_loss(reft, **batch)["loss"], rtol=1e-6, atol=1e-7)


def test_pad_positions_are_never_read_by_real_tokens():
    """The reasoning behind zero pads: with right padding, what pad positions hold at layer L's input
    changes nothing at the real positions (the causal and padding masks hide them)."""
    reft = _reft()
    cache = FrozenPrefixCache(reft)
    batch = _batches(reft, 4, 4)[0]
    mask = batch["attention_mask"].bool()
    assert not bool(mask.all())  # the batch really has padding
    states = torch.randn(*batch["input_ids"].shape, 32)
    noisy = torch.where(mask[..., None], states, 1e3 * torch.randn_like(states))
    zeroed = torch.where(mask[..., None], states, 0.0)
    with torch.no_grad(), reft.intervening(batch["input_ids"], batch["attention_mask"],
                                           batch["intervention_locations"]):
        a = cache._from_layer(noisy, batch["attention_mask"], {})
        b = cache._from_layer(zeroed, batch["attention_mask"], {})
    assert torch.equal(a[mask], b[mask]) or torch.allclose(a[mask], b[mask], atol=1e-6)


# -- refusals -----------------------------------------------------------------------------------
def test_refuses_layer0_source_unfrozen_dropout_and_non_llama():
    with pytest.raises(PrefixCacheError, match="layer0_block_output.*layer 0"):
        FrozenPrefixCache(_reft([{"layer": [0, 2], "component": "block_output", "positions": "l1",
                                  "intervention": "loreft", "low_rank_dimension": 2}]))
    with pytest.raises(PrefixCacheError, match="layer2_block_output.*source run"):
        FrozenPrefixCache(_reft([{"layer": 2, "component": "block_output", "positions": "l1",
                                  "intervention": "interchange"}]))
    reft = _reft()
    reft.model.model.layers[0].mlp.up_proj.weight.requires_grad_(True)
    with pytest.raises(PrefixCacheError, match="model.layers.0.mlp.up_proj.weight.*requires_grad=True"):
        FrozenPrefixCache(reft)
    reft = _reft()
    reft.model.config.attention_dropout = 0.1
    reft.train()
    with pytest.raises(PrefixCacheError, match="config.attention_dropout=0.1"):
        FrozenPrefixCache(reft)
    reft.eval()
    cache = FrozenPrefixCache(reft)  # eval mode: dropout is off, so it is fine ...
    reft.train()
    with pytest.raises(PrefixCacheError, match="attention_dropout=0.1"):  # ... until training turns it on
        causal_lm_loss(reft, **_batches(reft, 2, 2)[0], prefix_cache=cache)
    gpt2 = reftkit.get_reft_model(tiny_gpt2(layers=3), [{"layer": 1, "component": "block_output",
                                                          "positions": "l1", "intervention": "loreft",
                                                          "low_rank_dimension": 2}])
    with pytest.raises(PrefixCacheError, match="GPT2LMHeadModel.*GPT2Model.*layers"):
        FrozenPrefixCache(gpt2)


def test_refuses_left_padding():
    reft = _reft()
    cache = FrozenPrefixCache(reft)
    batch = _batches(reft, 2, 2)[0]
    left = {"input_ids": batch["input_ids"].flip(1), "attention_mask": batch["attention_mask"].flip(1),
            "labels": batch["labels"].flip(1)}
    with pytest.raises(PrefixCacheError, match="right-padded.*padding_side='right'"):
        causal_lm_loss(reft, **left, prefix_cache=cache)


def test_verification_catches_a_backbone_that_transforms_inputs_embeds():
    from transformers import GraniteConfig, GraniteForCausalLM
    torch.manual_seed(0)
    cfg = GraniteConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                        num_key_value_heads=2, vocab_size=101, pad_token_id=0, embedding_multiplier=4.0,
                        logits_scaling=1.0)
    reft = reftkit.get_reft_model(GraniteForCausalLM(cfg).eval(), [
        {"layer": 1, "component": "block_output", "positions": "l1", "intervention": "loreft",
         "low_rank_dimension": 2}])
    cache = FrozenPrefixCache(reft)  # nothing up front says it is inexact ...
    batch = _batches(reft, 2, 2)[0]
    with pytest.raises(PrefixCacheError, match=r"GraniteForCausalLM.*loss .* difference"):
        causal_lm_loss(reft, **batch, prefix_cache=cache)  # ... the first batch does
    assert len(cache) == 0


def test_max_bytes_is_respected():
    reft = _reft()
    batches = _batches(reft, 8, 2)
    per_token = 32 * 4
    first = int(batches[0]["attention_mask"].sum())
    cache = FrozenPrefixCache(reft, max_bytes=first * per_token + per_token)  # the first batch, and a token
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            for batch in batches:
                got = causal_lm_loss(reft, **batch, prefix_cache=cache)["loss"]
                want = causal_lm_loss(reft, **batch)["loss"]
                assert torch.allclose(got, want, rtol=1e-6, atol=1e-7)
    assert cache.nbytes <= cache.max_bytes and len(cache) == 2
    assert sum("max_bytes" in str(w.message) for w in caught) == 1  # said once
    assert cache.cached_steps == 1 and cache.full_steps == 7  # only the first batch runs cached
    assert FrozenPrefixCache(reft, max_bytes=0).max_bytes == 0
    with pytest.raises(PrefixCacheError, match="max_bytes=-1"):
        FrozenPrefixCache(reft, max_bytes=-1)


# -- ReftTrainer --------------------------------------------------------------------------------
def _train(tmp_path, cache: bool):
    reft = _reft()
    # 8 examples, batch 2, 8 steps: two epochs in a fixed order; SGD so a scale error would show
    args = training_args(str(tmp_path / str(cache)), 2, 8, optim="sgd", learning_rate=0.5, max_grad_norm=0.0)
    trainer = ReftTrainer(reft, args, train_dataset=LMData(8), data_collator=Collator(len(reft.interventions)),
                          cache_frozen_prefix=cache, suffix_training=False)  # else it takes every batch
    trainer.train()
    return {k: v.detach().clone() for k, v in reft.interventions.state_dict().items()}, trainer


def test_trainer_with_cache_reaches_the_same_weights(tmp_path):
    plain, _ = _train(tmp_path, False)
    cached, trainer = _train(tmp_path, True)
    assert trainer.prefix_cache.cached_steps == 4 and trainer.prefix_cache.full_steps == 4
    assert max((plain[k] - cached[k]).abs().max().item() for k in plain) <= 1e-6
    assert any((plain[k] - _reft().interventions.state_dict()[k]).abs().max() > 1e-3 for k in plain)  # it trained
    # evaluation neither fills nor uses the cache
    hits, misses = trainer.prefix_cache.hits, trainer.prefix_cache.misses
    trainer.evaluate(LMData(4, seed=9))
    assert (trainer.prefix_cache.hits, trainer.prefix_cache.misses) == (hits, misses)


def test_trainer_refuses_classifier_and_fsdp(tmp_path):
    reft = _reft()
    clf = ReftForSequenceClassification(reft, num_labels=2)
    with pytest.raises(ValueError, match="cache_frozen_prefix=True.*ReftForSequenceClassification"):
        ReftTrainer(clf, training_args(str(tmp_path), 2, 1), cache_frozen_prefix=True)
    # FSDP needs a process group to be set at all; the check reads the arguments, so set them afterwards
    trainer = ReftTrainer(_reft(), training_args(str(tmp_path), 2, 1))
    assert trainer.prefix_cache is None
    trainer.args.fsdp = True
    with pytest.raises(ValueError, match="cache_frozen_prefix=True with fsdp=True"):
        trainer._build_prefix_cache(trainer.model, True)
    with pytest.raises(ValueError, match="cache_frozen_prefix=-5"):
        ReftTrainer(_reft(), training_args(str(tmp_path), 2, 1), cache_frozen_prefix=-5)
