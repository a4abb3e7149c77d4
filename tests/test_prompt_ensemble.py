"""Prompt ensembling (Lester et al. 2021): N soft prompts in one replicated forward, against hand-written
``inputs_embeds`` forwards; a frozen base; save/load; majority vote; training with ReftTrainer."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_llama, tiny_tokenizer
from ddp_worker import training_args

from reftkit.analysis import EnsemblePrediction, PromptEnsembleModel, get_prompt_ensemble, majority_vote
from reftkit.analysis.prompt_ensemble import ensemble_rank_classify
from reftkit.data import make_last_position_supervised_data_module
from reftkit.data.multiple_choice import make_multiple_choice_data_module
from reftkit.training import ReftTrainer
from reftkit.training.objectives import multiple_choice_loss

N_VIRTUAL = 4


def _ensemble(num_prompts: int, seed: int = 0) -> PromptEnsembleModel:
    ensemble = get_prompt_ensemble(tiny_llama(seed=seed), num_prompts, N_VIRTUAL, seed=seed)
    with torch.no_grad():  # make the prompts clearly different from each other
        ensemble.prompts.add_(torch.randn(ensemble.prompts.shape, generator=torch.Generator().manual_seed(7)))
    return ensemble


def _inputs():
    ids = torch.tensor([[1, 5, 9, 14, 22, 7], [1, 30, 31, 8, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    labels = torch.tensor([[-100, -100, -100, 14, 22, 7], [-100, -100, 31, 8, -100, -100]])
    return ids, mask, labels


def _hand(base, prompt, ids, mask, labels):
    """[prompt; E(ids)] through inputs_embeds, the mask extended by ones; logits of the real tokens and the
    causal-LM loss computed by hand on the full sequence (virtual tokens unlabelled)."""
    n = prompt.shape[0]
    embeds = torch.cat([prompt.expand(len(ids), -1, -1), base.get_input_embeddings()(ids)], 1)
    full_mask = torch.cat([torch.ones(len(ids), n, dtype=mask.dtype), mask], 1)
    logits = base(inputs_embeds=embeds, attention_mask=full_mask).logits
    full_labels = torch.cat([torch.full((len(ids), n), -100), labels], 1)
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), full_labels[:, 1:].flatten(), ignore_index=-100)
    return logits[:, n:], loss


def test_initial_prompts_are_embeddings_of_sampled_tokens():
    base = tiny_llama()
    ensemble = get_prompt_ensemble(base, 3, N_VIRTUAL, seed=4, sample_from=50)
    ids = torch.randint(0, 50, (3, N_VIRTUAL), generator=torch.Generator().manual_seed(4))
    assert torch.equal(ensemble.prompts.detach(), base.get_input_embeddings().weight[ids])
    assert ensemble.prompts.requires_grad and ensemble.prompts.dtype == torch.float32
    assert ensemble.parameter_counts() == {"trainable": 3 * N_VIRTUAL * 32,
                                           "model": sum(p.numel() for p in base.parameters())}


def test_one_prompt_forward_equals_a_hand_written_forward():
    ensemble = _ensemble(1)
    ids, mask, labels = _inputs()
    with torch.no_grad():
        out = ensemble(input_ids=ids, attention_mask=mask, labels=labels)
        logits, loss = _hand(ensemble.base_model, ensemble.prompts[0], ids, mask, labels)
    assert out.logits.shape == (2, ids.shape[1], 101)  # the real tokens only, aligned with input_ids
    assert torch.allclose(out.logits, logits, atol=1e-6)
    assert abs(out.loss.item() - loss.item()) <= 1e-6


def test_three_prompts_in_one_forward_equal_three_separate_forwards():
    ensemble = _ensemble(3)
    ids, mask, labels = _inputs()
    with torch.no_grad():
        out = ensemble(input_ids=ids, attention_mask=mask, labels=labels)
        hand = [_hand(ensemble.base_model, ensemble.prompts[r], ids, mask, labels) for r in range(3)]
        assert out.logits.shape[0] == 6  # replica-major: rows r·B + b
        for r, (logits, _) in enumerate(hand):
            assert torch.allclose(out.logits[2 * r:2 * r + 2], logits, atol=1e-6)
            assert torch.allclose(ensemble(input_ids=ids, attention_mask=mask, prompt=r).logits, logits, atol=1e-6)
        # each replica labels as many tokens: the loss is the mean of the three prompts' losses
        assert abs(out.loss.item() - sum(h[1].item() for h in hand) / 3) <= 1e-6
        # Trainer's count is over the B rows; the ensemble scales it by N
        labelled = int((labels[:, 1:] != -100).sum())
        counted = ensemble(input_ids=ids, attention_mask=mask, labels=labels, num_items_in_batch=labelled).loss
        assert abs(counted.item() - out.loss.item()) <= 1e-6
        # disabled: the base model, B rows, no prompts
        with ensemble.disabled():
            bare = ensemble(input_ids=ids, attention_mask=mask).logits
        assert torch.allclose(bare, ensemble.base_model(input_ids=ids, attention_mask=mask).logits, atol=0)
    with pytest.raises(ValueError, match=r"prompt=3: give prompt indices in 0..2"):
        ensemble(input_ids=ids, prompt=3)
    with pytest.raises(ValueError, match="tasks= is an intervention input"):
        ensemble(input_ids=ids, tasks=["a", "b"])


def test_generate_under_each_prompt():
    ensemble = _ensemble(2)
    ids, mask, _ = _inputs()
    ids, mask = ids[:1], mask[:1]
    out = ensemble.generate(input_ids=ids, attention_mask=mask, max_new_tokens=1, do_sample=False)
    with torch.no_grad():
        last = ensemble(input_ids=ids, attention_mask=mask).logits[:, -1]
    assert torch.equal(out[:, :ids.shape[1]], ids.repeat(2, 1))
    assert out[:, -1].tolist() == last.argmax(-1).tolist()


def test_majority_vote_by_hand():
    # three prompts, four examples of two or three choices
    per_prompt = [[0, 1, 2, 0], [0, 2, 1, 1], [1, 2, 0, 0]]
    scores = [[[-1.0, -2.0], [-3.0, -1.0, -2.0], [-1.0, -1.5, -0.5], [-0.1, -0.2]],
              [[-1.0, -2.0], [-3.0, -2.0, -1.0], [-1.5, -0.5, -1.0], [-0.3, -0.1]],
              [[-2.0, -1.0], [-3.0, -2.0, -1.0], [-0.5, -1.0, -1.5], [-0.1, -0.9]]]
    # ex 0: votes 0,0,1 -> 0; ex 1: 1,2,2 -> 2; ex 2: one vote each -> mean scores (-1, -1, -1): tie -> index 0;
    # ex 3: 0,1,0 -> 0
    assert majority_vote(per_prompt, scores) == [0, 2, 0, 0]
    # a tie in votes broken by the mean score: choice 1 (mean -0.9) beats choice 0 (mean -1.0)
    assert majority_vote([[0], [1]], [[[-1.0, -0.8]], [[-1.0, -1.0]]]) == [1]
    assert majority_vote([[0], [1]], [[[-0.5, -0.8]], [[-1.0, -1.0]]]) == [0]
    with pytest.raises(ValueError, match="one row per prompt"):
        majority_vote([[0]], [])


PROMPTS = ["dog that barks", "what is the capital of france ?", "sky colour"]
CHOICES = [["dog", "cat", "spider"], ["paris", "blue dog"], ["blue", "eight legs"]]


def test_ensemble_rank_classify_scores_each_prompt_by_hand():
    ensemble, tok = _ensemble(3), tiny_tokenizer()
    got = ensemble_rank_classify(ensemble, tok, PROMPTS, CHOICES, batch_size=2)
    assert isinstance(got, EnsemblePrediction)
    base = ensemble.base_model
    for r in range(3):
        for e, (prompt, options) in enumerate(zip(PROMPTS, CHOICES)):
            p = tok(prompt)["input_ids"]
            for k, option in enumerate(options):
                c = tok(option, add_special_tokens=False)["input_ids"]
                ids = torch.tensor([p + c])
                with torch.no_grad():
                    logits, _ = _hand(base, ensemble.prompts[r], ids, torch.ones_like(ids), torch.full_like(ids, -100))
                logp = logits[0].double().log_softmax(-1)
                hand = sum(float(logp[len(p) - 1 + j, t]) for j, t in enumerate(c)) / len(c)
                assert got.scores[r][e][k] == pytest.approx(hand, abs=1e-5)
    assert got.per_prompt == [[max(range(len(s)), key=s.__getitem__) for s in row] for row in got.scores]
    assert got.predictions == majority_vote(got.per_prompt, got.scores)
    assert got.scores[0] != got.scores[1]  # the prompts do differ


def test_save_load_round_trip(tmp_path):
    ensemble = _ensemble(3)
    ids, mask, _ = _inputs()
    ensemble.save_pretrained(tmp_path / "saved")
    files = sorted(f.name for f in (tmp_path / "saved").iterdir())
    assert files == ["prompt_ensemble.safetensors", "prompt_ensemble_config.json"]  # no pickle
    loaded = PromptEnsembleModel.from_pretrained(tiny_llama(seed=0), tmp_path / "saved")
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids, attention_mask=mask).logits,
                           ensemble(input_ids=ids, attention_mask=mask).logits)
    with pytest.raises(ValueError, match=r"prompts has shape \(3, 4, 32\), this ensemble's is \(2, 4, 32\)"):
        get_prompt_ensemble(tiny_llama(), 2, N_VIRTUAL).load_trained(tmp_path / "saved")


def test_trainer_lowers_the_loss_and_leaves_the_base_frozen(tmp_path):
    tok = tiny_tokenizer()
    base = tiny_llama(seed=1)
    reference = {k: v.clone() for k, v in base.state_dict().items()}
    ensemble = get_prompt_ensemble(base, 3, N_VIRTUAL, seed=1)
    start_prompts = ensemble.prompts.detach().clone()
    inputs = ["what is the capital of france ?", "dog that barks", "how many legs spider ?", "sky colour"]
    outputs = ["paris", "dog", "eight", "blue"]
    data = make_last_position_supervised_data_module(tok, base, inputs, outputs, num_interventions=1)
    full = data["data_collator"](list(data["train_dataset"]))
    with torch.no_grad():
        start = ensemble(**full).loss.item()
    trainer = ReftTrainer(ensemble, training_args(str(tmp_path), 4, 25, learning_rate=5e-2),
                          train_dataset=data["train_dataset"], data_collator=data["data_collator"])
    assert trainer.compute_loss(ensemble, full).item() == pytest.approx(start, abs=1e-6)
    trainer.train()
    with torch.no_grad():
        end = ensemble(**full).loss.item()
    # a random tiny LM starts near uniform (log 101 = 4.62) and its small head limits how far a prompt
    # can move it: 0.05 nats is a clear fall here (untrained prompts leave the loss unchanged)
    assert end < start - 0.05
    assert all((ensemble.prompts[r] - start_prompts[r]).abs().max() > 1e-3 for r in range(3))  # all N trained
    assert not any(p.requires_grad for p in base.parameters())
    assert all(torch.equal(reference[k], v) for k, v in base.state_dict().items())
    # a checkpoint holds the prompts only, and loads back
    trainer.save_model(str(tmp_path / "ckpt"))
    assert not list((tmp_path / "ckpt").glob("model*.safetensors"))
    fresh = get_prompt_ensemble(tiny_llama(seed=1), 3, N_VIRTUAL, seed=9)
    fresh.load_trained(tmp_path / "ckpt")
    assert torch.equal(fresh.prompts, ensemble.prompts)
    assert ensemble.detach() is base
    assert all(p.requires_grad for p in base.parameters())  # flags as before the ensemble


def test_tfew_loss_of_an_ensemble_is_the_mean_over_its_prompts(tmp_path):
    ensemble, tok = _ensemble(2), tiny_tokenizer()
    data = make_multiple_choice_data_module(tok, ensemble, PROMPTS, CHOICES, [0, 0, 0], positions="l1",
                                            num_interventions=1)
    batch = data["data_collator"](list(data["train_dataset"]))
    with torch.no_grad():
        both = multiple_choice_loss(ensemble, **batch)
        singles = [multiple_choice_loss(PromptEnsembleModel(ensemble.base_model, ensemble.prompts[r:r + 1].clone()),
                                        **batch) for r in range(2)]
    for name in ("loss", "lm", "ul", "ln"):
        assert both[name].item() == pytest.approx(sum(s[name].item() for s in singles) / 2, abs=1e-5)
    trainer = ReftTrainer(ensemble, training_args(str(tmp_path), 3, 10, learning_rate=5e-2),
                          train_dataset=data["train_dataset"], data_collator=data["data_collator"])
    trainer.train()
    with torch.no_grad():
        after = multiple_choice_loss(ensemble, **batch)["loss"]
    assert math.isfinite(after.item()) and after < both["loss"]


def test_multiple_choice_data_needs_no_positions_for_an_ensemble():
    import reftkit

    assert reftkit.make_multiple_choice_data_module is make_multiple_choice_data_module
    ensemble = get_prompt_ensemble(tiny_llama(), num_prompts=2, num_virtual_tokens=2)
    module = make_multiple_choice_data_module(tiny_tokenizer(), ensemble, ["the cat"], [["yes", "no"]], [0])
    batch = module["data_collator"]([module["train_dataset"][0]])
    assert batch["input_ids"].shape[0] == 2 and batch["correct"].tolist() == [0]
