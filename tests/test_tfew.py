"""T-Few as trainer options: the multiple-choice data module, the choices' token log-probabilities, the
weighted L_LM + L_UL + L_LN, and ReftTrainer(loss_terms=...) — each against an independent reference."""
from __future__ import annotations

import math

import pytest
import torch
from conftest import tiny_llama, tiny_tokenizer
from ddp_worker import training_args

import reftkit
from reftkit.analysis.multiple_choice import accuracy, choice_logprobs, rank_classify
from reftkit.data import DataError
from reftkit.data.multiple_choice import MultipleChoiceDataCollator, make_multiple_choice_data_module
from reftkit.training import ReftForSequenceClassification, ReftTrainer
from reftkit.training.objectives import (
    check_loss_terms,
    choice_token_logprobs,
    length_normalized_loss,
    multiple_choice_loss,
    tfew_loss,
    unlikelihood_loss,
)

PROMPTS = ["what is the capital of france ?", "dog that barks", "how many legs spider ?", "sky"]
CHOICES = [["paris", "blue dog", "eight"], ["yes", "no"], ["eight legs", "a cat", "it", "good"], ["blue", "bad movie"]]
CORRECT = [0, 1, 0, 1]
# two interventions with different positions: the K axis of the locations is exercised
CONFIG = [{"layer": 0, "component": "block_output", "positions": "f1+l2", "low_rank_dimension": 4},
          {"layer": 1, "component": "block_output", "positions": "l1", "low_rank_dimension": 4}]


def _reft(seed: int = 3) -> reftkit.ReftModel:
    reft = reftkit.get_reft_model(tiny_llama(seed=5), CONFIG)
    torch.manual_seed(seed)
    with torch.no_grad():  # non-trivial LoReFT weights: the edit changes the scores
        for p in reft.interventions.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    return reft


def _batch(reft, side="right", idx=range(4)):
    tok = tiny_tokenizer(padding_side=side)
    data = make_multiple_choice_data_module(tok, reft, PROMPTS, CHOICES, CORRECT)
    return tok, data["data_collator"]([data["train_dataset"][i] for i in idx])


# -- the data module -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("side", ["right", "left"])
def test_collated_rows_are_prompt_plus_choice_and_locations_the_prompts(side):
    reft = _reft()
    tok, batch = _batch(reft, side)
    c_max = max(len(c) for c in CHOICES)
    prompt_ids = [tok(p)["input_ids"] for p in PROMPTS]
    hand_rows, hand_labels = [], []
    for p, options in zip(prompt_ids, CHOICES):
        for c in range(c_max):
            choice = tok(options[c], add_special_tokens=False)["input_ids"] if c < len(options) else []
            hand_rows.append(p + choice)
            hand_labels.append([-100] * len(p) + choice)
    width = max(len(r) for r in hand_rows)
    assert batch["input_ids"].shape == (len(PROMPTS) * c_max, width)
    prompt_loc = reft.prompt_locations(torch.tensor([len(p) for p in prompt_ids]))  # [B, K, P], from 0
    for r, (row, labels) in enumerate(zip(hand_rows, hand_labels)):
        pad = width - len(row)
        span = slice(pad, width) if side == "left" else slice(0, len(row))
        assert batch["input_ids"][r, span].tolist() == row
        assert batch["attention_mask"][r].tolist() == ([0] * pad + [1] * len(row) if side == "left"
                                                       else [1] * len(row) + [0] * pad)
        assert batch["choice_labels"][r, span].tolist() == labels
        assert (batch["choice_labels"][r] != -100).sum() == sum(t != -100 for t in labels)
        expected = prompt_loc[r // c_max]
        expected = torch.where(expected >= 0, expected + (pad if side == "left" else 0), -1)
        got = batch["intervention_locations"][r]
        assert torch.equal(got[:, :expected.shape[1]], expected) and (got[:, expected.shape[1]:] == -1).all()
    assert batch["choice_mask"].tolist() == [[c < len(o) for c in range(c_max)] for o in CHOICES]
    assert batch["correct"].tolist() == CORRECT
    # the left-padded locations still point at the same prompt tokens
    left = batch["intervention_locations"][:, 1, 0]
    assert all(batch["input_ids"][r, left[r]] == prompt_ids[r // c_max][-1] for r in range(len(hand_rows)))


def test_positions_string_and_eval_split():
    tok, model = tiny_tokenizer(), tiny_llama()
    data = make_multiple_choice_data_module(tok, model, PROMPTS, CHOICES, CORRECT, positions="f1",
                                            num_interventions=2, eval_fraction=0.25, seed=1)
    train, held = data["train_dataset"], data["eval_dataset"]
    assert len(train) == 3 and len(held) == 1
    assert sorted(tok.decode(x["input_ids"], skip_special_tokens=True) for x in list(train) + list(held)) == \
        sorted(PROMPTS)
    assert all(x["locations"] == [[0], [0]] for x in train)
    data = make_multiple_choice_data_module(tok, model, PROMPTS, CHOICES, CORRECT, positions="l1",
                                            eval_prompts=PROMPTS[:1], eval_choices=CHOICES[:1], eval_correct=[2])
    assert data["eval_dataset"][0]["correct"] == 2 and len(data["train_dataset"]) == 4


def test_data_errors_name_the_argument_and_index():
    tok, reft = tiny_tokenizer(), _reft()

    def build(prompts=PROMPTS, choices=CHOICES, correct=CORRECT, **kw):
        return make_multiple_choice_data_module(tok, reft, prompts, choices, correct, **kw)

    with pytest.raises(DataError, match="choices has 3 entries, prompts has 4"):
        build(choices=CHOICES[:3])
    with pytest.raises(DataError, match="correct has 2 entries, prompts has 4"):
        build(correct=[0, 1])
    with pytest.raises(DataError, match=r"choices\[1\] is empty"):
        build(choices=[CHOICES[0], [], *CHOICES[2:]])
    with pytest.raises(DataError, match=r"correct\[3\]=2 is out of range for 2 choices \(0..1\)"):
        build(correct=[0, 1, 0, 2])
    with pytest.raises(DataError, match=r"choices\[2\]\[1\]='' has no tokens"):
        build(choices=[CHOICES[0], CHOICES[1], ["it", ""], CHOICES[3]])
    with pytest.raises(DataError, match=r"choices\[0\] is the string"):
        build(choices=["paris", *CHOICES[1:]])
    with pytest.raises(DataError, match=r"eval_correct\[0\]=5"):
        build(eval_prompts=PROMPTS[:1], eval_choices=CHOICES[:1], eval_correct=[5])
    with pytest.raises(DataError, match="eval_fraction=1.5"):
        build(eval_fraction=1.5)
    with pytest.raises(DataError, match="positions=None needs model to be a ReftModel"):
        make_multiple_choice_data_module(tok, tiny_llama(), PROMPTS, CHOICES, CORRECT)


# -- the choices' token log-probabilities -----------------------------------------------------------------------
def _hand_token_logprobs(reft, tok):
    """Per (prompt, choice): one unpadded forward of prompt + choice with the interventions at the prompt's
    positions, log_softmax over the whole vocabulary, the choice tokens' entries."""
    out = []
    for prompt, options in zip(PROMPTS, CHOICES):
        p = tok(prompt)["input_ids"]
        locations = reft.prompt_locations(torch.tensor([len(p)]))
        row = []
        for option in options:
            c = tok(option, add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                logits = reft(input_ids=torch.tensor([p + c]), intervention_locations=locations).logits[0]
            logp = logits.double().log_softmax(-1)
            row.append([float(logp[len(p) - 1 + j, t]) for j, t in enumerate(c)])
        out.append(row)
    return out


@pytest.mark.parametrize("side", ["right", "left"])
def test_token_logprobs_equal_a_full_forward_and_rank_classification(side):
    reft = _reft()
    tok, batch = _batch(reft, side)
    head = reft.model.get_output_embeddings()
    seen = []
    handle = head.register_forward_hook(lambda m, a, out: seen.append(tuple(out.shape)))
    with torch.no_grad():
        logprobs, mask = choice_token_logprobs(reft, **{k: v for k, v in batch.items() if k != "correct"})
    handle.remove()
    n_choice_tokens = int((batch["choice_labels"] != -100).sum())
    assert seen == [(n_choice_tokens, head.out_features)]  # vocabulary logits for the choice tokens only
    hand = _hand_token_logprobs(reft, tok)
    assert logprobs.shape[:2] == (len(PROMPTS), max(len(c) for c in CHOICES))
    for b, row in enumerate(hand):
        assert not mask[b, len(row):].any()  # padded choices: no tokens
        for c, tokens in enumerate(row):
            assert mask[b, c].sum() == len(tokens)
            assert logprobs[b, c, :len(tokens)].tolist() == pytest.approx(tokens, abs=1e-5)
    # the same numbers as rank classification (positions resolved there on the prompt alone)
    for normalised in (False, True):
        ranked = choice_logprobs(reft, tok, PROMPTS, CHOICES, length_normalised=normalised)
        ours = (logprobs * mask).sum(-1) / (mask.sum(-1).clamp_min(1) if normalised else 1)
        for b, row in enumerate(ranked):
            assert ours[b, :len(row)].tolist() == pytest.approx(row, abs=1e-5)


def test_fallback_full_forward_and_no_locations_give_the_same(monkeypatch):
    reft = _reft()
    _, batch = _batch(reft)
    args = {k: v for k, v in batch.items() if k != "correct"}
    with torch.no_grad():
        ref, ref_mask = choice_token_logprobs(reft, **args)
        # without locations: the config's positions resolved on the prompt part of the mask
        alone, _ = choice_token_logprobs(reft, **{k: v for k, v in args.items() if k != "intervention_locations"})
        monkeypatch.setattr(reft.model, "get_output_embeddings", lambda: None)
        full, full_mask = choice_token_logprobs(reft, **args)
    assert torch.equal(ref_mask, full_mask)
    assert torch.allclose(ref, full, atol=1e-5) and torch.allclose(ref, alone, atol=1e-5)


def test_choice_mask_must_agree_with_the_labels():
    reft = _reft()
    _, batch = _batch(reft)
    batch["choice_mask"] = batch["choice_mask"].clone()
    batch["choice_mask"][1, 2] = True
    with pytest.raises(ValueError, match=r"choice_mask\[1, 2\]=True but choice_labels has no labelled tokens"):
        multiple_choice_loss(reft, **batch)


# -- the weighted loss -------------------------------------------------------------------------------------------
# two examples: the first has 3 choices (correct 0), the second 2 (correct 1) and a padded third
PROBS = [[[0.5, 0.25, 1.0], [0.1, 0.2, 0.4], [0.8, 1.0, 1.0]],
         [[0.3, 0.6, 1.0], [0.9, 0.7, 1.0], [1.0, 1.0, 1.0]]]
LENGTHS = [[2, 3, 1], [1, 2, 0]]


def _loss_inputs():
    logp = torch.tensor(PROBS, dtype=torch.float64).log()
    mask = torch.tensor([[[t < n for t in range(3)] for n in row] for row in LENGTHS])
    return logp, mask, torch.tensor([0, 1]), torch.tensor([[True, True, True], [True, True, False]])


def test_tfew_loss_parts_by_hand():
    logp, mask, correct, choice_mask = _loss_inputs()
    parts = tfew_loss(logp, mask, correct, choice_mask)
    # L_LM: token mean of the correct choices' NLL (0.5, 0.25 | 0.9, 0.7)
    lm = -(math.log(0.5) + math.log(0.25) + math.log(0.9) + math.log(0.7)) / 4
    # L_UL: the incorrect choices' tokens of the whole batch (0.1 0.2 0.4 0.8 | 0.3)
    ul = -sum(math.log(1 - p) for p in (0.1, 0.2, 0.4, 0.8, 0.3)) / 5
    beta0 = [(math.log(0.5) + math.log(0.25)) / 2, (math.log(0.1) + math.log(0.2) + math.log(0.4)) / 3, math.log(0.8)]
    beta1 = [math.log(0.3), (math.log(0.9) + math.log(0.7)) / 2]
    ln = (-(beta0[0] - math.log(sum(map(math.exp, beta0)))) - (beta1[1] - math.log(sum(map(math.exp, beta1))))) / 2
    assert float(parts["lm"]) == pytest.approx(lm, rel=1e-12)
    assert float(parts["ul"]) == pytest.approx(ul, rel=1e-12)
    assert float(parts["ln"]) == pytest.approx(ln, rel=1e-12)
    assert float(parts["loss"]) == pytest.approx(lm + ul + ln, rel=1e-12)
    assert parts["scores"][0].tolist() == pytest.approx(beta0)
    assert parts["scores"][1, :2].tolist() == pytest.approx(beta1)
    assert parts["scores"][1, 2] == float("-inf")
    weighted = tfew_loss(logp, mask, correct, choice_mask, weights={"lm": 2.0, "ln": 0.5})
    assert float(weighted["loss"]) == pytest.approx(2 * lm + 0.5 * ln, rel=1e-12)
    assert float(tfew_loss(logp, mask, correct, choice_mask, weights=["ul"])["loss"]) == pytest.approx(ul, rel=1e-12)


# every example with all three choices (no choice_mask): example 0 is right with choice 2, example 1 with choice 0;
# each choice's token probabilities, the padded slots holding p = 0.999 that a missing mask would count
EQUAL = [[[1 / 2, 1 / 4], [1 / 8, 0.999], [1 / 2, 1 / 2]],
         [[1 / 4, 0.999], [3 / 4, 1 / 2], [1 / 2, 0.999]]]
EQUAL_LENGTHS = [[2, 1, 2], [1, 2, 1]]
LN2 = math.log(2)
# L_UL: the six incorrect tokens 1/2 1/4 1/8 | 3/4 1/2 1/2, −Σ log(1 − p) / 6 = (5 ln 2 + ln 4/3 + ln 8/7) / 6
EQUAL_UL = (5 * LN2 + math.log(4 / 3) + math.log(8 / 7)) / 6                          # 0.6478248946
# L_LN: β = mean token log p; exp β per choice is 2^-1.5, 1/8, 1/2 (example 0) and 1/4, √(3/8), 1/2 (example 1);
# each example's loss is −log(exp β_correct / Σ exp β)
EQUAL_LN = (math.log((2 ** -1.5 + 1 / 8 + 1 / 2) / (1 / 2))                           # 0.6714672506
            + math.log((1 / 4 + math.sqrt(3 / 8) + 1 / 2) / (1 / 4))) / 2              # 1.6955219791
# L_LM: the correct choices' tokens 1/2 1/2 | 1/4: (ln 2 + ln 2 + 2 ln 2) / 3
EQUAL_LM = 4 * LN2 / 3                                                                  # 0.9241962407


def _equal_inputs():
    logp = torch.tensor(EQUAL, dtype=torch.float64).log()
    mask = torch.tensor([[[t < n for t in range(2)] for n in row] for row in EQUAL_LENGTHS])
    return logp, mask, torch.tensor([2, 0])


def test_unlikelihood_and_length_normalised_losses_by_hand():
    """Each function on its own against the paper's formulas worked by hand (Liu et al. 2022, §3.2)."""
    logp, mask, correct = _equal_inputs()
    assert float(unlikelihood_loss(logp, mask, correct)) == pytest.approx(EQUAL_UL, rel=1e-12)
    assert float(length_normalized_loss(logp, mask, correct)) == pytest.approx(EQUAL_LN, rel=1e-12)
    parts = tfew_loss(logp, mask, correct)  # no choice_mask: every example has all C choices
    assert float(parts["ul"]) == pytest.approx(EQUAL_UL, rel=1e-12)
    assert float(parts["ln"]) == pytest.approx(EQUAL_LN, rel=1e-12)
    assert float(parts["lm"]) == pytest.approx(EQUAL_LM, rel=1e-12)
    assert float(parts["loss"]) == pytest.approx(EQUAL_LM + EQUAL_UL + EQUAL_LN, rel=1e-12)
    # the choice of the correct answer matters: example 1 right with choice 1 instead changes every term
    other = torch.tensor([2, 1])
    ul = (LN2 + math.log(4 / 3) + math.log(8 / 7) + math.log(4 / 3) + LN2) / 5        # 1/2 1/4 1/8 | 1/4 1/2
    assert float(unlikelihood_loss(logp, mask, other)) == pytest.approx(ul, rel=1e-12)
    ln1 = math.log((1 / 4 + math.sqrt(3 / 8) + 1 / 2) / math.sqrt(3 / 8))
    assert float(length_normalized_loss(logp, mask, other)) == pytest.approx(
        (math.log((2 ** -1.5 + 1 / 8 + 1 / 2) / (1 / 2)) + ln1) / 2, rel=1e-12)


def test_unlikelihood_is_finite_and_exact_near_p_one():
    """−log(1 − p) for p = e^(−ε): 1 − p = ε − ε²/2 + …, so the loss is −log ε + ε/2 to O(ε²)."""
    for eps in (1e-3, 1e-6, 1e-9):
        logp = torch.tensor([[[-1.0], [-eps]]], dtype=torch.float64)  # the wrong choice has p = e^(−ε)
        got = float(unlikelihood_loss(logp, torch.ones_like(logp, dtype=torch.bool), torch.tensor([0])))
        assert got == pytest.approx(-math.log(eps) + eps / 2 - eps ** 2 / 24, rel=1e-12)


def test_loss_terms_errors_name_the_term():
    assert check_loss_terms(None) == {"lm": 1.0, "ul": 1.0, "ln": 1.0}
    assert check_loss_terms(("lm", "ln")) == {"lm": 1.0, "ul": 0.0, "ln": 1.0}
    with pytest.raises(ValueError, match="unknown term 'kl'"):
        check_loss_terms({"lm": 1.0, "kl": 1.0})
    with pytest.raises(ValueError, match=r"loss_terms\['ul'\]=-1"):
        check_loss_terms({"ul": -1})
    with pytest.raises(ValueError, match="every term 0"):
        check_loss_terms({"lm": 0})


def test_multiple_choice_loss_equals_tfew_loss_of_the_hand_logprobs():
    reft = _reft()
    tok, batch = _batch(reft)
    hand = _hand_token_logprobs(reft, tok)
    c_max, t_max = max(len(c) for c in CHOICES), max(len(t) for row in hand for t in row)
    logp = torch.zeros(len(hand), c_max, t_max, dtype=torch.float64)
    mask = torch.zeros(len(hand), c_max, t_max, dtype=torch.bool)
    for b, row in enumerate(hand):
        for c, tokens in enumerate(row):
            logp[b, c, :len(tokens)] = torch.tensor(tokens)
            mask[b, c, :len(tokens)] = True
    expected = tfew_loss(logp, mask, torch.tensor(CORRECT), batch["choice_mask"])
    with torch.no_grad():
        got = multiple_choice_loss(reft, **batch)
    for name in ("loss", "lm", "ul", "ln"):
        assert float(got[name]) == pytest.approx(float(expected[name]), abs=1e-5)


# -- ReftTrainer(loss_terms=...) ---------------------------------------------------------------------------------
TASK_PROMPTS = ["dog that barks", "cat that meows", "sky colour", "spider legs how many", "paris capital of",
                "good movie", "bad movie", "what animal barks"]
TASK_CHOICES = [["dog", "cat"], ["dog", "cat", "spider"], ["blue", "eight"], ["eight", "blue", "a"],
                ["france", "sky"], ["great", "awful"], ["great", "awful"], ["dog", "cat", "spider"]]


def test_trainer_with_loss_terms_lowers_the_loss_and_raises_accuracy(tmp_path):
    tok = tiny_tokenizer()
    reft = reftkit.get_reft_model(tiny_llama(seed=2), {"layer": [0, 1], "component": "block_output",
                                                       "positions": "l1", "low_rank_dimension": 4})
    # the gold answer is the choice the untrained model ranks lowest: accuracy starts at 0
    before = choice_logprobs(reft, tok, TASK_PROMPTS, TASK_CHOICES)
    correct = [min(range(len(s)), key=s.__getitem__) for s in before]
    assert accuracy(rank_classify(reft, tok, TASK_PROMPTS, TASK_CHOICES), correct) == 0.0
    data = make_multiple_choice_data_module(tok, reft, TASK_PROMPTS, TASK_CHOICES, correct,
                                            eval_prompts=TASK_PROMPTS, eval_choices=TASK_CHOICES, eval_correct=correct)
    full = data["data_collator"](list(data["train_dataset"]))
    with torch.no_grad():
        start = multiple_choice_loss(reft, **full)
    trainer = ReftTrainer(reft, training_args(str(tmp_path), 4, 30, learning_rate=2e-2), loss_terms={"lm": 1, "ul": 1,
                          "ln": 1}, train_dataset=data["train_dataset"], eval_dataset=data["eval_dataset"],
                          data_collator=data["data_collator"])
    assert trainer.compute_loss(reft, full).item() == pytest.approx(start["loss"].item(), abs=1e-6)
    trainer.train()
    with torch.no_grad():
        end = multiple_choice_loss(reft, **full)
    # L_LM is bounded by what one edited prompt token can do to multi-token choices; L_LN moves most
    assert end["loss"] < start["loss"] - 0.5 and end["ln"] < 0.7 * start["ln"] and end["lm"] < start["lm"]
    after = rank_classify(reft, tok, TASK_PROMPTS, TASK_CHOICES)
    assert accuracy(after, correct) >= 0.75
    # evaluation: the loss, and the length-normalised scores as predictions (argmax = rank classification)
    out = trainer.predict(data["eval_dataset"])
    assert out.metrics["test_loss"] == pytest.approx(end["loss"].item(), rel=1e-4)
    assert out.predictions.argmax(-1).tolist() == after and out.label_ids.tolist() == correct


def test_trainer_errors_name_the_problem(tmp_path):
    reft = _reft()
    _, batch = _batch(reft)
    with pytest.raises(ValueError, match="unknown term 'kl'"):
        ReftTrainer(reft, training_args(str(tmp_path), 2, 1), loss_terms={"kl": 1.0})
    classifier = ReftForSequenceClassification(_reft(), num_labels=2)
    with pytest.raises(ValueError, match="ReftForSequenceClassification trains on its head"):
        ReftTrainer(classifier, training_args(str(tmp_path), 2, 1), loss_terms=("lm",))
    trainer = ReftTrainer(classifier, training_args(str(tmp_path), 2, 1))
    with pytest.raises(ValueError, match="multiple-choice batch .* ReftForSequenceClassification"):
        trainer.compute_loss(classifier, batch)
    lm_trainer = ReftTrainer(reft, training_args(str(tmp_path), 2, 1))
    with pytest.raises(ValueError, match="not 'labels'"):
        lm_trainer.compute_loss(reft, {**batch, "labels": batch["choice_labels"]})


def test_collator_pads_to_multiple_and_refuses_bad_side():
    tok = tiny_tokenizer()
    data = make_multiple_choice_data_module(tok, tiny_llama(), PROMPTS, CHOICES, CORRECT, positions="l1")
    batch = MultipleChoiceDataCollator(tok, pad_to_multiple_of=8)(list(data["train_dataset"]))
    assert batch["input_ids"].shape[1] % 8 == 0
    with pytest.raises(DataError, match="padding_side='middle'"):
        MultipleChoiceDataCollator(tok, padding_side="middle")(list(data["train_dataset"]))
