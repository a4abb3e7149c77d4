"""Transformer²'s REINFORCE objective (reftkit.experts.policy_gradient) against hand computations:
unpadded forwards + log_softmax + gather, KL(π_ref ‖ π) written out in float64 (and in closed form against a
uniform reference), generate's own logits, and training runs on tiny models whose reward prefers one word."""
from __future__ import annotations

import math

import pytest
import torch
from conftest import WORDS, pad_batch, tiny_llama, tiny_tokenizer

import reftkit
from reftkit.analysis.baselines import get_weight_space_model
from reftkit.analysis.svf import apply_svf
from reftkit.experts.policy_gradient import (
    check_rewards,
    completion_logprobs,
    policy_gradient_step,
    reinforce_loss,
    train_policy_gradient,
)

PROMPT_TOKENS = [[1, 5, 9, 14], [1, 7], [1, 20, 21, 22, 23]]
COMPLETION_TOKENS = [[30, 31, 2], [40], [50, 51]]
PROMPTS = ["what is the capital of france ?", "define word dog", "how many legs spider", "tell me about it",
           "colour sky"]


def loreft(model, positions="l1", layer=1, perturb=True, **extra):
    reft = reftkit.get_reft_model(model, {"representations": [
        {"layer": layer, "component": "block_output", "positions": positions, "intervention": "loreft",
         "low_rank_dimension": 4}, *extra.get("more", [])]})
    if perturb:  # a clearly non-trivial edit, so using the wrong positions would show
        gen = torch.Generator().manual_seed(7)
        with torch.no_grad():
            for p in reft.interventions.parameters():
                p.add_(torch.randn(p.shape, generator=gen) * 0.5)
    return reft


def hand(model, prompt, completion, locations=None):
    """One unpadded forward of prompt + completion: (token log-probs [T], log-softmax rows [T, V])."""
    ids = torch.tensor([prompt + completion])
    kwargs = {} if locations is None else {"intervention_locations": torch.tensor([locations])}
    logp = model(input_ids=ids, **kwargs).logits[0].float().log_softmax(-1)
    rows = logp[len(prompt) - 1:len(prompt) - 1 + len(completion)]
    return rows[torch.arange(len(completion)), torch.tensor(completion)], rows


def batched(side):
    prompt_ids, prompt_mask = pad_batch(PROMPT_TOKENS, side)
    completion_ids, completion_mask = pad_batch(COMPLETION_TOKENS, "right")
    return prompt_ids, completion_ids, prompt_mask, completion_mask


def padded_hand(per_example):
    out = torch.zeros(len(per_example), max(len(c) for c in COMPLETION_TOKENS))
    for i, lp in enumerate(per_example):
        out[i, :len(lp)] = lp
    return out


@pytest.mark.parametrize("side", ["left", "right"])
def test_completion_logprobs_plain_llama_by_hand(side):
    model = tiny_llama()
    with torch.no_grad():
        got = completion_logprobs(model, *batched(side), return_rows=True)
        refs = [hand(model, p, c) for p, c in zip(PROMPT_TOKENS, COMPLETION_TOKENS)]
    torch.testing.assert_close(got.token_logprobs, padded_hand([r[0] for r in refs]), atol=1e-5, rtol=0)
    torch.testing.assert_close(got.rows, torch.cat([r[1] for r in refs]), atol=1e-5, rtol=0)
    assert got.mask.sum() == sum(len(c) for c in COMPLETION_TOKENS)


@pytest.mark.parametrize("side", ["left", "right"])
def test_completion_logprobs_reft_edits_the_prompts_last_token(side):
    model = tiny_llama()
    reft = loreft(model, "l1")
    with torch.no_grad():
        got = completion_logprobs(reft, *batched(side)).token_logprobs
        refs = [hand(reft, p, c, [len(p) - 1])[0] for p, c in zip(PROMPT_TOKENS, COMPLETION_TOKENS)]
        base = completion_logprobs(model, *batched(side)).token_logprobs  # hooks inert: the base model
    torch.testing.assert_close(got, padded_hand(refs), atol=1e-5, rtol=0)
    assert (got - base).abs().max() > 1e-2  # the edit matters, so wrong positions would be caught


def test_completion_logprobs_match_generate_with_prompt_and_all_positions():
    """Generate edits the prompt's positions at prefill and "all" positions on every new token too."""
    tok = tiny_tokenizer()
    reft = loreft(tiny_llama(), "f1+l1", more=[{"layer": 2, "component": "mlp_output", "positions": "all",
                                                "intervention": "loreft", "low_rank_dimension": 2}])
    prompt_ids, prompt_mask = pad_batch([tok(p)["input_ids"] for p in PROMPTS[:3]], "left")
    with torch.no_grad():
        out = reft.generate(input_ids=prompt_ids, attention_mask=prompt_mask, max_new_tokens=4, do_sample=False,
                            output_logits=True, return_dict_in_generate=True, pad_token_id=0)
        completion = out.sequences[:, prompt_ids.shape[1]:]
        expected = torch.stack(out.logits, 1).float().log_softmax(-1).gather(-1, completion[..., None])[..., 0]
        got = completion_logprobs(reft, prompt_ids, completion, prompt_mask).token_logprobs
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


def test_reinforce_loss_by_hand_and_gradients_reach_only_the_interventions():
    model = tiny_llama()
    reft = loreft(model, "l1")
    rewards = torch.tensor([1.0, -0.5, 2.0], requires_grad=True)
    policy = [hand(reft, p, c, [len(p) - 1]) for p, c in zip(PROMPT_TOKENS, COMPLETION_TOKENS)]
    with torch.no_grad():
        ref = [hand(model, p, c)[1] for p, c in zip(PROMPT_TOKENS, COMPLETION_TOKENS)]
        pg_hand = -sum(float(r) * float(lp.sum()) for r, (lp, _) in zip(rewards, policy)) / 3
        # KL(π_ref ‖ π) = Σ_t Σ_v π_ref(v) (log π_ref(v) − log π(v)) per completion, the docstring's direction
        # (the base model's distribution first), in float64, averaged over the 3 completions
        log_ref = torch.cat(ref).double()
        log_pi = torch.cat([rows for _, rows in policy]).double()
        kl_hand = float((log_ref.exp() * (log_ref - log_pi)).sum()) / 3
        kl_reverse = float((log_pi.exp() * (log_pi - log_ref)).sum()) / 3  # KL(π ‖ π_ref)
    assert abs(kl_reverse - kl_hand) > 1e-3 * kl_hand  # 10x the tolerance below: the directions are told apart
    prompt_ids, completion_ids, prompt_mask, completion_mask = batched("left")
    parts = reinforce_loss(reft, prompt_ids, prompt_mask, completion_ids, completion_mask, rewards,
                           ref_rows=torch.cat(ref), kl_coef=0.3)
    assert parts["pg"].item() == pytest.approx(pg_hand, rel=1e-5)
    assert parts["kl"].item() == pytest.approx(kl_hand, rel=1e-4) and kl_hand > 1e-3
    assert parts["loss"].item() == pytest.approx(pg_hand + 0.3 * kl_hand, rel=1e-5)
    parts["loss"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in reft.interventions.parameters())
    assert all(p.grad is None for p in model.parameters())
    assert rewards.grad is None


def test_kl_against_a_uniform_reference_in_closed_form():
    """With π_ref uniform over V tokens, KL(π_ref ‖ π) = Σ_t (−log V − (1/V) Σ_v log π(v | ·)): the mean
    negative log-probability over the vocabulary, not π's entropy (which KL(π ‖ π_ref) = log V − H(π) reads)."""
    model = tiny_llama()
    prompt_ids, completion_ids, prompt_mask, completion_mask = batched("right")
    with torch.no_grad():
        model.lm_head.weight.mul_(30)  # far from uniform: here KL(π_ref ‖ π) ≈ 9.1, KL(π ‖ π_ref) ≈ 5.3
        rows = completion_logprobs(model, prompt_ids, completion_ids, prompt_mask, completion_mask,
                                   return_rows=True).rows.double()
        vocab = rows.shape[-1]
        uniform = torch.full(rows.shape, -math.log(vocab))
        parts = reinforce_loss(model, prompt_ids, prompt_mask, completion_ids, completion_mask, torch.zeros(3),
                               ref_rows=uniform, kl_coef=1.0)
    forward = float((-math.log(vocab) - rows.mean(-1)).sum()) / 3
    reverse = float((math.log(vocab) + (rows.exp() * rows).sum(-1)).sum()) / 3
    assert parts["pg"].item() == 0.0
    assert parts["kl"].item() == pytest.approx(forward, rel=1e-4)
    assert abs(forward - reverse) > 0.2 * forward


@pytest.mark.parametrize("bad, shown", [
    (lambda p, c: [1.0] * (len(c) + 1), "length 3"),
    (lambda p, c: torch.ones(len(c), 1), "shape (2, 1)"),
    (lambda p, c: [1.0, math.nan], "nan at index 1"),
    (lambda p, c: "good", "str 'good'"),
    (lambda p, c: ["1", "0"], "list of length 2"),
])
def test_reward_fn_with_a_wrong_return_is_refused(bad, shown):
    reft = loreft(tiny_llama(), perturb=False)
    with pytest.raises(ValueError, match="reward_fn") as err:
        policy_gradient_step(reft, tiny_tokenizer(), PROMPTS[:2], bad, max_new_tokens=2, seed=0)
    assert "(2,)" in str(err.value) and shown in str(err.value)


def test_check_rewards_accepts_numbers_and_tensors():
    assert check_rewards([1, -1.5, True], 3).tolist() == [1.0, -1.5, 1.0]
    assert check_rewards(torch.tensor([0.5, 2.0], requires_grad=True), 2).requires_grad is False


def _target_word(model, tok):
    """The word the base model finds most likely after the prompts (a reachable target)."""
    ids = torch.tensor([tok.convert_tokens_to_ids(w) for w in dict.fromkeys(WORDS)])
    with torch.no_grad():
        probs = torch.stack([model(torch.tensor([tok(p)["input_ids"]])).logits[0, -1].softmax(-1)
                             for p in PROMPTS]).mean(0)
    return tok.convert_ids_to_tokens(int(ids[probs[ids].argmax()]))


def _word_probability(model, tok, word):
    prompt_ids, prompt_mask = pad_batch([tok(p)["input_ids"] for p in PROMPTS], "left")
    completion = torch.full((len(PROMPTS), 1), tok.convert_tokens_to_ids(word))
    with torch.no_grad():
        return float(completion_logprobs(model, prompt_ids, completion, prompt_mask).token_logprobs.exp().mean())


def _peaky_llama():
    model = tiny_llama()
    with torch.no_grad():  # a random tiny model is nearly uniform; a larger head gives it preferences
        model.lm_head.weight.mul_(10)
    return model


@pytest.mark.parametrize("method", ["loreft", "svf"])
def test_training_raises_the_reward_of_the_preferred_word(method):
    tok, model = tiny_tokenizer(), _peaky_llama()
    word = _target_word(model, tok)
    adapted = loreft(model, "l1", perturb=False) if method == "loreft" else get_weight_space_model(model, "svf")
    before = _word_probability(adapted, tok, word)

    def reward(prompts, completions):
        return [1.0 if c.split()[:1] == [word] else -1.0 for c in completions]

    frame = train_policy_gradient(adapted, tok, PROMPTS, reward, steps=30, batch_size=5, samples_per_prompt=4,
                                  max_new_tokens=1, learning_rate=0.1, max_grad_norm=1.0, seed=0, progress=False)
    after = _word_probability(adapted, tok, word)
    assert list(frame.columns[:3]) == ["step", "reward_mean", "pg"] and len(frame) == 30
    assert after > 2 * before, (before, after)
    assert frame.reward_mean.iloc[-10:].mean() > frame.reward_mean.iloc[:10].mean()


@pytest.mark.parametrize("wrapper", ["weight_space_model", "plain_svf"])
def test_kl_is_zero_at_the_identity_and_grows_with_training(wrapper):
    tok, model = tiny_tokenizer(), _peaky_llama()
    word = _target_word(model, tok)
    if wrapper == "weight_space_model":
        adapted = get_weight_space_model(model, "svf")  # z = 1: the base model up to float rounding
    else:
        apply_svf(model)
        adapted = model

    def reward(prompts, completions):
        return torch.tensor([1.0 if c.split()[:1] == [word] else -1.0 for c in completions])

    frame = train_policy_gradient(adapted, tok, PROMPTS, reward, steps=12, batch_size=5, samples_per_prompt=2,
                                  max_new_tokens=2, learning_rate=0.1, max_grad_norm=1.0, kl_coef=0.1, seed=1,
                                  progress=False)
    assert abs(frame.kl.iloc[0]) < 1e-5  # float32 recomposition of W, not exactly 0
    assert frame.kl.iloc[-1] > 1e-3 and frame.kl.iloc[-1] > 100 * abs(frame.kl.iloc[0])


def test_refusals_and_epochs():
    tok = tiny_tokenizer()
    frozen = tiny_llama().requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        train_policy_gradient(frozen, tok, PROMPTS, lambda p, c: [0.0] * len(c), steps=1, progress=False)
    reft = loreft(tiny_llama(), perturb=False)
    with pytest.raises(ValueError, match="prompts is empty"):
        train_policy_gradient(reft, tok, [], lambda p, c: [0.0] * len(c), steps=1, progress=False)
    with pytest.raises(ValueError, match="exactly one of steps and epochs"):
        train_policy_gradient(reft, tok, PROMPTS, lambda p, c: [0.0] * len(c), steps=1, epochs=1, progress=False)
    plain = tiny_llama()  # trainable, but with no way back to a base model for the KL
    with pytest.raises(ValueError, match="kl_coef > 0 needs the base model"):
        policy_gradient_step(plain, tok, PROMPTS[:1], lambda p, c: [0.0] * len(c), max_new_tokens=1, kl_coef=0.1)
    frame = train_policy_gradient(reft, tok, PROMPTS, lambda p, c: [1.0] * len(c), epochs=2, batch_size=2,
                                  max_new_tokens=1, progress=False)
    assert len(frame) == 6 and frame.reward_mean.tolist() == [1.0] * 6  # 5 prompts → 3 batches a pass
