"""BLEU/ROUGE/exact match against sacrebleu's documented example, hand counts and rouge-score's own
default tokenizer; generate_predictions against a manual greedy loop on a tiny random Llama."""
from __future__ import annotations

import pytest
import torch
from conftest import tiny_llama
from rouge_score import rouge_scorer, tokenizers
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

import reftkit
from reftkit.analysis.text_metrics import (
    CJKTokenizer,
    bleu4,
    evaluate_generation,
    exact_match,
    generate_predictions,
    generation_scores,
    has_cjk,
    rouge,
    text_scores,
)

WORDS = ("the cat sat on a mat dog bit man it was not big red blue green user assistant : . ? "
         "what is where who yes no").split()


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """WordLevel tokenizer over 101 ids (the tiny models' vocab): <pad>=0, <s>=1, </s>=2, <unk>=3."""
    vocab = ["<pad>", "<s>", "</s>", "<unk>"] + WORDS
    vocab += [f"w{i}" for i in range(101 - len(vocab))]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")
    fast.chat_template = ("{% for m in messages %}<s> {{ m['role'] }} : {{ m['content'] }} </s> {% endfor %}"
                          "{% if add_generation_prompt %}assistant :{% endif %}")
    return fast


# -- BLEU ------------------------------------------------------------------------------------------

def test_bleu_matches_sacrebleu_readme_example():
    """sacrebleu's README: BLEU = 48.53 for this system against two reference streams."""
    stream1 = ["The dog bit the man.", "It was not unexpected.", "The man bit him first."]
    stream2 = ["The dog had bit the man.", "No one was surprised.", "The man had bitten the dog."]
    hyps = ["The dog bit the man.", "It wasn't surprising.", "The man had just bitten him."]
    per_example = [list(r) for r in zip(stream1, stream2)]
    assert bleu4(hyps, per_example) == pytest.approx(48.53, abs=0.005)


def test_bleu_by_hand():
    # precisions 5/6, 3/5, 2/4, 1/3 (the doubled "the" is clipped), equal lengths so BP = 1
    assert bleu4(["the cat sat on the mat"], ["the cat sat on a mat"]) == pytest.approx(100 * (1 / 12) ** 0.25)
    # several references per example: n-grams are clipped against the best reference
    cat = "the cat sat on the mat"
    assert bleu4([cat], [["a dog bit the man", cat]]) == pytest.approx(100.0)
    # a missing second reference for example 1 is allowed (None in sacrebleu's stream)
    assert bleu4([cat, "a dog bit the man"], [["x", cat], ["a dog bit the man"]]) == pytest.approx(100.0)


def test_bleu_cjk_uses_zh_tokenizer():
    # per character: 6/7, 5/6, 4/5, 3/4 -> (3/7)^(1/4); as one 13a "word" each the sentences share nothing
    hyp, ref = ["我爱北京天安门"], ["他爱北京天安门"]
    assert bleu4(hyp, ref) == pytest.approx(100 * (3 / 7) ** 0.25)
    assert bleu4(hyp, ref, tokenize="zh") == pytest.approx(100 * (3 / 7) ** 0.25)
    assert bleu4(hyp, ref, tokenize="13a") == pytest.approx(0.0)
    assert has_cjk("abc 北") and has_cjk("こんにちは") and has_cjk("안녕") and not has_cjk("café, naïve")


# -- ROUGE -----------------------------------------------------------------------------------------

def test_rouge_score_default_tokenizer_drops_cjk():
    """Why the custom tokenizer exists: rouge-score keeps only [a-z0-9] tokens."""
    assert tokenizers.DefaultTokenizer().tokenize("我爱北京") == []
    assert tokenizers.DefaultTokenizer().tokenize("I love 北京") == ["i", "love"]
    default = rouge_scorer.RougeScorer(["rouge1"]).score("我爱上海", "我爱北京")["rouge1"]
    assert default.fmeasure == 0.0


def test_rouge_cjk_by_hand():
    scores = rouge("我爱北京", "我爱上海")
    assert scores["rouge1"] == pytest.approx(50.0)       # 我, 爱 of 4 characters each
    assert scores["rouge2"] == pytest.approx(100 / 3)    # 我爱 of 3 bigrams each
    assert scores["rougeL"] == pytest.approx(50.0)       # LCS 我爱
    mixed = rouge(["I love 北京"], ["i LOVE 上海"], types=("rouge1",))
    assert mixed["rouge1"] == pytest.approx(50.0)        # i, love of [i, love, 北, 京]
    assert CJKTokenizer().tokenize("Déjà vu，我爱NLP。") == ["déjà", "vu", "我", "爱", "nlp"]


ASCII_PREDS = ["The cats are sitting on the mat!", "It wasn't surprising, really.", "runs ran running 42x",
               "completely unrelated"]
ASCII_REFS = ["the cat sat on the mat", "It was not unexpected.", "running runs 42x ran", "the dog's bone"]


@pytest.mark.parametrize("stem", [False, True])
def test_rouge_equals_rouge_score_default_on_ascii(stem):
    types = ("rouge1", "rouge2", "rougeL", "rougeLsum")
    scorer = rouge_scorer.RougeScorer(list(types), use_stemmer=stem)
    expected = {t: 100 * sum(scorer.score(r, p)[t].fmeasure for p, r in zip(ASCII_PREDS, ASCII_REFS)) / 4
                for t in types}
    got = rouge(ASCII_PREDS, ASCII_REFS, types=types, use_stemmer=stem)
    assert got == pytest.approx(expected)
    for text in ASCII_PREDS + ASCII_REFS:
        assert CJKTokenizer(stem).tokenize(text) == tokenizers.DefaultTokenizer(stem).tokenize(text)


def test_rouge_multi_reference_takes_best():
    assert rouge(["the cat"], [["a dog", "the cat"]], types=("rouge1",))["rouge1"] == pytest.approx(100.0)


def test_exact_match_and_text_scores():
    assert exact_match([" the  cat ", "A dog"], ["the cat", "a dog"]) == pytest.approx(50.0)
    assert exact_match(["b"], [["a", "b"]]) == pytest.approx(100.0)
    scores = text_scores(["the cat sat on the mat"], ["the cat sat on a mat"])
    assert set(scores) == {"bleu4", "rouge1", "rouge2", "rougeL", "exact_match"}
    assert scores["rouge1"] == pytest.approx(100 * 5 / 6) and scores["exact_match"] == 0.0
    with pytest.raises(ValueError):
        text_scores(["a", "b"], ["a"])


# -- generation ------------------------------------------------------------------------------------

PROMPTS = ["the cat", "what is a big red dog ?", "it", "where was the blue man who bit a dog", "yes no yes"]


def manual_greedy(model, tokenizer, ids: list[int], steps: int) -> str:
    """Reference: one unpadded example, the whole sequence re-run each step, stop at EOS."""
    seq = list(ids)
    for _ in range(steps):
        with torch.no_grad():
            nxt = int(model(input_ids=torch.tensor([seq])).logits[0, -1].argmax())
        seq.append(nxt)
        if nxt == tokenizer.eos_token_id:
            break
    return tokenizer.decode(seq[len(ids):], skip_special_tokens=True).strip()


def test_generate_predictions_matches_manual_greedy_in_input_order():
    model, tok = tiny_llama(seed=1), tiny_tokenizer()
    tok.padding_side = "right"
    expected = [manual_greedy(model, tok, tok(p)["input_ids"], 6) for p in PROMPTS]
    got = generate_predictions(model, tok, PROMPTS, max_new_tokens=6, batch_size=2, progress=False)
    assert got == expected
    assert len(set(expected)) > 1, "the tiny model should give different continuations"
    assert tok.padding_side == "right"


def test_generate_predictions_chat_template_and_pad_restore():
    model, tok = tiny_llama(seed=2), tiny_tokenizer()
    tok.pad_token = None  # borrowed from EOS for the call, then restored
    texts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
             for p in PROMPTS[:3]]
    assert texts[0] == "<s> user : the cat </s> assistant :"
    expected = [manual_greedy(model, tok, tok(t, add_special_tokens=False)["input_ids"], 5) for t in texts]
    got = generate_predictions(model, tok, PROMPTS[:3], max_new_tokens=5, batch_size=3, chat_template=True,
                               progress=False)
    assert got == expected
    assert tok.pad_token is None and tok.padding_side == "right"


def test_generate_predictions_with_reft_model():
    reft = reftkit.get_reft_model(tiny_llama(seed=1), {"layer": [0, 1], "component": "block_output",
                                                       "positions": "f1+l1", "low_rank_dimension": 4})
    torch.manual_seed(4)
    with torch.no_grad():
        for p in reft.interventions.parameters():
            p.add_(torch.randn_like(p))
    tok = tiny_tokenizer()
    got = generate_predictions(reft, tok, PROMPTS, max_new_tokens=6, batch_size=3, progress=False)
    # reference: each prompt alone (no padding), edited at its own first and last token
    expected = []
    for p in PROMPTS:
        ids = torch.tensor([tok(p)["input_ids"]])
        out = reft.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                            pad_token_id=0)
        expected.append(tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip())
    assert got == expected
    assert got != generate_predictions(reft.model, tok, PROMPTS, max_new_tokens=6, progress=False)


def test_evaluate_generation_frame_and_scores():
    model, tok = tiny_llama(seed=1), tiny_tokenizer()
    refs = ["the cat sat", "a dog", "it", "the man", "yes"]
    frame = evaluate_generation(model, tok, PROMPTS, refs, max_new_tokens=4, progress=False)
    assert list(frame.columns) == ["prompt", "reference", "prediction"] and len(frame) == 5
    assert frame.attrs["scores"] == pytest.approx(text_scores(list(frame.prediction), refs))
    assert generation_scores(model, tok, PROMPTS, refs, max_new_tokens=4, progress=False) == \
        pytest.approx(frame.attrs["scores"])
