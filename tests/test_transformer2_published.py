"""Transformer²'s adaptation strategies as published (Sun et al. 2025, §3.1-3.2): the category *generated*
after the adaptation prompt, the classification expert as an SVF vector trained with REINFORCE, and ReFT
library experts trained with the REINFORCE objective — against hand-written generations and a gradient
written out from the formula."""
from __future__ import annotations

import pytest
import torch
from conftest import pad_batch, tiny_llama, tiny_tokenizer

import reftkit
from reftkit.analysis.svf import apply_svf, svf_modules
from reftkit.experts import (
    ExpertError,
    answer_reward,
    expert_dispatch,
    parse_category,
    prompt_dispatch,
    train_dispatch_expert,
    train_expert,
)
from reftkit.experts.policy_gradient import policy_gradient_step, reinforce_loss

NAMES = ["sentiment", "topic", "pos"]


@pytest.mark.parametrize("text, expected", [
    ("sentiment", "sentiment"),
    ("Topic.", "topic"),                                        # case-insensitive, punctuation around it
    ("The category is POS, not topic", "pos"),                 # the first mention wins
    ("  other: none of them", "other"),                         # "other" is a category: the base model
    ("Sentiment: Positive\nCategory: topic", "sentiment"),
    ("positive", None),                                         # "pos" inside a word is no mention
    ("topics about sentimentality", None),
    ("others", None),                                           # exact names only
    ("", None),
    ("I cannot tell.", None),
])
def test_parse_category_on_hand_written_generations(text, expected):
    assert parse_category(text, NAMES) == expected


def test_parse_category_prefers_the_longest_name_at_the_same_place_and_escapes_names():
    assert parse_category("news sports, surely", ["news", "news sports"]) == "news sports"
    assert parse_category("news, then news sports", ["news", "news sports"]) == "news"
    assert parse_category("say c++ here", ["c++", "c"], other="none") == "c++"
    assert parse_category("NONE", ["a"], other="none") == "none"


class ScriptedModel(torch.nn.Module):
    """Stands in for a causal LM whose greedy continuations are known: ``script`` maps a word of the
    request to the text it "generates" (whitespace-separated words of the tiny vocabulary)."""

    def __init__(self, tokenizer, script: dict[str, str]) -> None:
        super().__init__()
        self.tok, self.script, self.calls = tokenizer, script, []
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # gives model_device a parameter

    def generate(self, input_ids, attention_mask, max_new_tokens, do_sample, pad_token_id, **kw):
        assert do_sample is False  # greedy
        self.calls.append(max_new_tokens)
        rows = []
        for ids, mask in zip(input_ids, attention_mask):
            words = self.tok.decode(ids[mask.bool()], skip_special_tokens=True).split()
            text = next((self.script[w] for w in words if w in self.script), "it")
            new = self.tok(text, add_special_tokens=False)["input_ids"][:max_new_tokens]
            rows.append(ids.tolist() + new + [pad_token_id] * (max_new_tokens - len(new)))
        return torch.tensor(rows)


def test_generated_dispatch_on_a_scripted_model_is_exactly_computable():
    tok = tiny_tokenizer()
    names, other = ["dog", "cat", "movie"], "no"
    script = {"barks": "dog dog", "meows": "it is a cat", "great": "good movie", "spider": "no", "france": "yes",
              "sky": "colour blue"}
    model = ScriptedModel(tok, script)
    prompts = ["animal that barks", "animal that meows", "great", "how many legs spider", "capital of france",
               "sky", "animal that meows ."]
    gold = ["dog", "cat", "movie", None, None, None, "cat"]
    result = prompt_dispatch(model, tok, prompts, names, other=other, template="{prompt} ? {categories}",
                             max_new_tokens=5, batch_size=3)
    # by hand: dog, cat, movie, "no" → base, "yes" and "colour blue" name nothing → base (unparsed), cat
    assert list(result) == ["dog", "cat", "movie", None, None, None, "cat"] and result.method == "generate"
    assert result.unparsed == 2
    assert result.generations == ["dog dog", "it is a cat", "good movie", "no", "yes", "colour blue", "it is a cat"]
    assert sum(r == g for r, g in zip(result, gold)) / len(gold) == 1.0
    # one token is not enough to reach "cat" in "it is a cat": that row becomes unparsed, the rest hold
    short = prompt_dispatch(model, tok, prompts, names, other=other, template="{prompt} ? {categories}",
                            max_new_tokens=1)
    assert list(short) == ["dog", None, None, None, None, None, None] and short.unparsed == 5
    assert sum(r == g for r, g in zip(short, gold)) / len(gold) == pytest.approx(4 / 7)
    assert set(model.calls) == {5, 1}


def test_dispatch_errors_name_the_parameter_and_value():
    tok = tiny_tokenizer()
    model = ScriptedModel(tok, {})
    with pytest.raises(ValueError, match="method='beam'"):
        prompt_dispatch(model, tok, ["dog"], ["dog"], method="beam")
    with pytest.raises(ValueError, match="max_new_tokens=0"):
        prompt_dispatch(model, tok, ["dog"], ["dog"], max_new_tokens=0)
    with pytest.raises(ValueError, match="chat_template=True"):
        prompt_dispatch(model, tok, ["dog"], ["dog"], method="rank", chat_template=True)
    with pytest.raises(ExpertError, match="other='dog'"):
        prompt_dispatch(model, tok, ["dog"], ["dog"], other="dog")
    with pytest.raises(ValueError, match="kind='lora'"):
        train_dispatch_expert(tiny_llama(), tok, ["dog"], ["dog"], ["dog"], kind="lora")
    with pytest.raises(ExpertError, match="appears with two labels"):
        train_dispatch_expert(tiny_llama(), tok, ["dog", "dog"], ["dog", None], ["dog"])
    with pytest.raises(ExpertError, match="'rank'"):
        train_dispatch_expert(tiny_llama(), tok, ["dog"], ["dog"], ["dog"], {"rank": 4})
    with pytest.raises(ValueError, match="epochs=1.5"):
        train_dispatch_expert(tiny_llama(), tok, ["dog"], ["dog"], ["dog"], epochs=1.5)
    model = tiny_llama()
    apply_svf(model)
    with pytest.raises(ExpertError, match="already has SVF layers"):
        train_dispatch_expert(model, tok, ["dog"], ["dog"], ["dog"])
    config = {"layer": 1, "component": "block_output", "positions": "l1", "intervention": "loreft",
              "low_rank_dimension": 2}
    with pytest.raises(ValueError, match="objective='ppo'"):
        train_expert(tiny_llama(), tok, ["dog"], [" dog"], config, objective="ppo")
    with pytest.raises(ValueError, match="reward= applies"):
        train_expert(tiny_llama(), tok, ["dog"], [" dog"], config, reward=lambda p, c: [1.0])
    with pytest.raises(ValueError, match="epochs=0.5"):
        train_expert(tiny_llama(), tok, ["dog"], [" dog"], config, objective="reinforce", epochs=0.5)
    with pytest.raises(ExpertError, match="two answers"):
        answer_reward(["dog", "dog"], [" dog", " cat"])
    with pytest.raises(ExpertError, match="empty"):
        answer_reward(["dog"], ["  "])


def _fixed_loss(model, tok, prompts, gold, names, template):
    """The REINFORCE loss on fixed completions — every category name, rewarded +1 when right, −1 otherwise."""
    from reftkit.experts import dispatch_prompts

    questions = dispatch_prompts(prompts, names, other="no", template=template)
    rows = [(q, n, 1.0 if n == g else -1.0) for q, g in zip(questions, gold) for n in names]
    prompt_ids, prompt_mask = pad_batch([tok(q)["input_ids"] for q, _, _ in rows], "left")
    completion_ids = torch.tensor([tok(" " + n, add_special_tokens=False)["input_ids"] for _, n, _ in rows])
    with torch.no_grad():
        return float(reinforce_loss(model, prompt_ids, prompt_mask, completion_ids, None,
                                    torch.tensor([r for _, _, r in rows]))["loss"])


def test_svf_dispatch_expert_learns_a_separable_task_with_reinforce():
    tok = tiny_tokenizer()
    model = tiny_llama()
    model.resize_token_embeddings(len(tok))  # every sampled id decodes to a word
    names, template = ["dog", "cat"], "{prompt} . {categories} ?"
    train = ["tell me about dog", "dog that barks", "a dog", "the dog", "cat that meows", "tell me about cat",
             "the cat", "a cat"]
    labels = ["dog"] * 4 + ["cat"] * 4
    held_out, gold = ["dog animal", "that dog", "cat animal", "that cat"], ["dog", "dog", "cat", "cat"]
    before = expert_dispatch(model, tok, held_out, names, other="no", template=template, max_new_tokens=2)
    loss_before = _fixed_loss(model, tok, held_out, gold, names, template)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    expert = train_dispatch_expert(model, tok, train, labels, names, {"target_modules": "all-linear"}, other="no",
                                   template=template, steps=60, batch_size=8, samples_per_prompt=4, max_new_tokens=1,
                                   learning_rate=0.1, reward_norm=True, progress=False)
    # the model is left as it was: no SVF layers, its own flags; the expert is applied per call only
    assert not svf_modules(model) and flags == {n: p.requires_grad for n, p in model.named_parameters()}
    after = expert_dispatch(expert, tok, held_out, names, other="no", template=template, max_new_tokens=2)
    accuracy = [sum(r == g for r, g in zip(routes, gold)) / len(gold) for routes in (before, after)]
    assert accuracy[1] == 1.0 and accuracy[0] < 0.5, (accuracy, before.generations, after.generations)
    with expert.applied() as adapted:
        assert len(svf_modules(adapted)) == len(expert.modules)
        loss_after = _fixed_loss(adapted, tok, held_out, gold, names, template)
    assert loss_after < loss_before - 0.1, (loss_before, loss_after)
    history = expert.history
    assert history.reward_mean.iloc[-10:].mean() > history.reward_mean.iloc[:10].mean()
    assert not svf_modules(model)


def test_reinforce_library_expert_gradient_equals_the_formula_in_float64():
    """∂L/∂logits of completion token t of example j, written out (π = softmax of the expert's logits):
    −(r_j / N) (onehot(y_t) − π) from −(1/N) Σ r_j log π(y_j), plus (λ / N) (π − π_ref) from λ KL(π_ref ‖ π);
    chained to the intervention's parameters through the model's own Jacobian."""
    torch.set_default_dtype(torch.float64)
    try:
        tok, model = tiny_tokenizer(), tiny_llama().double()
        model.resize_token_embeddings(len(tok))
        config = {"layer": 1, "component": "block_output", "positions": "l1", "intervention": "loreft",
                  "low_rank_dimension": 2}
        prompts, lam, steps = ["define word dog", "how many legs spider", "tell me about it"], 0.5, 2

        def fresh():
            torch.manual_seed(0)  # what train_expert does before attaching, so the same initial expert
            return reftkit.get_reft_model(model, config)

        reft = fresh()
        completions = []
        for p in prompts:
            ids = torch.tensor([tok(p)["input_ids"]])
            out = reft.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=steps,
                                do_sample=False, pad_token_id=0)
            completions.append(out[0, ids.shape[1]:].tolist())
        reft.detach()
        # prompt 0 is answered as the expert will answer it (+1), the others wrongly (−1)
        answers = [tok.decode(completions[0], skip_special_tokens=True), "yes no", "eight"]
        rewards = [1.0, -1.0, -1.0]

        reft = fresh()
        params = [p for p in reft.interventions.parameters() if p.requires_grad]
        hand = [torch.zeros_like(p) for p in params]
        for prompt, completion, r in zip(prompts, completions, rewards):
            p_ids = tok(prompt)["input_ids"]
            ids = torch.tensor([p_ids + completion])
            rows = slice(len(p_ids) - 1, len(p_ids) - 1 + len(completion))
            logits = reft(input_ids=ids, intervention_locations=torch.tensor([[len(p_ids) - 1]])).logits[0, rows]
            with torch.no_grad():
                ref = model(input_ids=ids).logits[0, rows].softmax(-1)
                pi = logits.softmax(-1)
                onehot = torch.nn.functional.one_hot(torch.tensor(completion), pi.shape[-1]).to(pi.dtype)
                cotangent = -(r / len(prompts)) * (onehot - pi) + (lam / len(prompts)) * (pi - ref)
            for h, g in zip(hand, torch.autograd.grad(logits, params, cotangent)):
                h += g
        loss, metrics = policy_gradient_step(reft, tok, prompts, answer_reward(prompts, answers), kl_coef=lam,
                                             max_new_tokens=steps, do_sample=False)
        assert metrics["reward_mean"] == pytest.approx(sum(rewards) / 3)
        got = torch.autograd.grad(loss, params)
        for g, h in zip(got, hand):
            # the model and the formula run in float64; reftkit keeps intervention weights (and so their edit) in
            # float32, and the batched, left-padded forward rounds a few edits differently from the unpadded one
            assert torch.allclose(g.double(), h.double(), rtol=1e-5, atol=1e-7), (g - h).abs().max()
        reft.detach()

        # train_expert(objective="reinforce") takes that very gradient: its first step's norm, before clipping
        expert, history = train_expert(model, tok, prompts, answers, config, objective="reinforce", batch_size=3,
                                       seed=0, progress=False, return_history=True,
                                       training={"steps": 1, "kl_coef": lam, "max_new_tokens": steps,
                                                 "do_sample": False})
        norm = torch.sqrt(sum((h ** 2).sum() for h in hand))
        assert history.grad_norm.iloc[0] == pytest.approx(float(norm), rel=1e-5)
        assert history.reward_mean.iloc[0] == pytest.approx(-1 / 3)
        expert.detach()
    finally:
        torch.set_default_dtype(torch.float32)


def test_reinforce_library_expert_runs_whole_epochs_and_leaves_the_base_model():
    tok, model = tiny_tokenizer(), tiny_llama()
    config = {"layer": 2, "component": "block_output", "positions": "l1", "intervention": "loreft",
              "low_rank_dimension": 4}
    prompts = ["define word dog", "how many legs spider", "tell me about it", "colour sky", "good movie", "a cat"]
    ids = torch.tensor([tok(prompts[0])["input_ids"]])
    before = model(input_ids=ids).logits
    expert, history = train_expert(model, tok, prompts, ["yes"] * 6, config, objective="reinforce", epochs=2,
                                   batch_size=4, progress=False, return_history=True,
                                   training={"max_new_tokens": 2, "kl_coef": 0.1})
    assert len(history) == 4 and (history.kl >= 0).all()   # 2 passes of ceil(6 / 4) batches
    assert all(p.requires_grad for p in expert.interventions.parameters())
    assert torch.equal(expert.detach()(input_ids=ids).logits, before)
