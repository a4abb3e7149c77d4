"""BLEU/ROUGE/exact match against sacrebleu's documented example, hand counts and rouge-score's own
default tokenizer; the ChatGLM convention against hand counts and a golden made with ChatGLM's own code path
(tests/goldens/make_chatglm_metric_goldens.sh); generate_predictions against a manual greedy loop on a tiny
random Llama."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import jieba
import pytest
import torch
from conftest import tiny_llama
from rouge_score import rouge_scorer, tokenizers
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

import reftkit
from reftkit.analysis.text_metrics import (
    CONVENTIONS,
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


# -- conventions -----------------------------------------------------------------------------------

ZH_PREDS = ["我爱北京，我爱上海。", "今天天气很好", "北京很好"]
ZH_REFS = ["我爱北京天安门。", "今天天气不错", "我爱北京天安门"]
GOLDEN = json.loads((Path(__file__).parent / "goldens" / "chatglm_metrics.json").read_text(encoding="utf-8"))


def test_chatglm_convention_by_hand():
    # jieba words (punctuation included); ChatGLM's ROUGE counts DISTINCT n-grams, F = 2PR/(P+R+1e-8),
    # and every example's score is round(100 F, 4)
    assert [list(jieba.cut(t)) for t in ZH_PREDS] == [["我", "爱", "北京", "，", "我", "爱", "上海", "。"],
                                                      ["今天天气", "很", "好"], ["北京", "很", "好"]]
    assert [list(jieba.cut(t)) for t in ZH_REFS] == [["我", "爱", "北京", "天安门", "。"], ["今天天气", "不错"],
                                                     ["我", "爱", "北京", "天安门"]]
    # 1: unigrams {我 爱 北京 ， 上海 。} (6, 我/爱 once each) vs {我 爱 北京 天安门 。} (5), 4 shared: P 4/6, R 4/5,
    #    F 8/11 (clipped counts would give P 4/8, F 8/13). Bigrams: 6 distinct (我爱 twice) vs 4, shared 我爱 爱北京:
    #    P 1/3, R 1/2, F 2/5. LCS 我 爱 北京 。 = 4 of 8 and 5 words: P 1/2, R 4/5, F 8/13.
    # 2: unigrams 今天天气 of 3 and 2: P 1/3, R 1/2, F 2/5; no shared bigram; LCS 1: F 2/5.
    # 3: unigrams 北京 of 3 and 4: P 1/3, R 1/4, F 2/7; no shared bigram; LCS 1: F 2/7.
    one, two, three = (rouge(p, r, convention="chatglm") for p, r in zip(ZH_PREDS, ZH_REFS))
    assert one == {"rouge1": 72.7273, "rouge2": 40.0, "rougeL": 61.5385}
    assert two == {"rouge1": 40.0, "rouge2": 0.0, "rougeL": 40.0}
    assert three == {"rouge1": 28.5714, "rouge2": 0.0, "rougeL": 28.5714}
    assert rouge(ZH_PREDS, ZH_REFS, convention="chatglm") == pytest.approx(
        {"rouge1": (72.7273 + 40 + 28.5714) / 3, "rouge2": 40 / 3, "rougeL": (61.5385 + 40 + 28.5714) / 3})
    # BLEU per example on CHARACTERS (punctuation included), p_n = clipped matches / prediction n-grams:
    # 1: 10 vs 8 characters (BP 1): p 5/10 (我 爱 北 京 。), 3/9 (我爱 爱北 北京), 2/8, 1/7 -> (1/168)^(1/4)
    # 2: 6 vs 6 (BP = e^0 = 1): p 4/6 (今 天 天 气), 3/5, 2/4, 1/3 -> (1/15)^(1/4)
    # 3: 4 vs 7 (BP e^(1-7/4)): p 2/4 (北 京), 1/3 (北京); no 3-gram of 2 matches -> 1/(2^1 * 2), no 4-gram of 1
    #    -> 1/(2^2 * 1) (method 3: k counts the empty orders) -> e^(-3/4) (1/96)^(1/4)
    bleus = [round(100 * x, 4) for x in ((1 / 168) ** 0.25, (1 / 15) ** 0.25, math.exp(-0.75) * (1 / 96) ** 0.25)]
    assert bleus == [27.7762, 50.8133, 15.0908]
    for p, r, expected in zip(ZH_PREDS, ZH_REFS, bleus):
        assert bleu4([p], [r], convention="chatglm") == expected
    assert bleu4(ZH_PREDS, ZH_REFS, convention="chatglm") == pytest.approx(sum(bleus) / 3)
    # a text without words scores 0 (ChatGLM2's guard); several references: the best for ROUGE, nltk's for BLEU
    assert rouge(" ", "我爱北京", convention="chatglm") == {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    assert bleu4([""], ["我爱北京"], convention="chatglm") == 0.0
    assert rouge(["我爱北京"], [["他在上海", "我爱北京"]], convention="chatglm")["rouge2"] == 100.0
    assert bleu4(["我爱北京天安门"], [["他", "我爱北京天安门"]], convention="chatglm") == 100.0


def test_conventions_differ_on_the_same_outputs_and_the_default_is_unchanged():
    default = text_scores(ZH_PREDS, ZH_REFS)
    assert default == text_scores(ZH_PREDS, ZH_REFS, convention="reftkit") and CONVENTIONS[0] == "reftkit"
    # reftkit: CHARACTER tokens without punctuation, clipped counts. 1: 8 vs 7 characters, 4 shared (我 爱 北 京):
    # F 2(1/2)(4/7)/(1/2+4/7) = 8/15; bigrams 3 of 7 and 6 (我爱 clipped to 1): F 6/13; LCS 我爱北京 = 4: 8/15.
    # 2: 4 of 6 each: F 2/3; bigrams 3 of 5 each: 3/5; LCS 4: 2/3. 3: 2 of 4 and 7: F 4/11; 1 of 3 and 6: 2/9.
    assert default["rouge1"] == pytest.approx(100 * (8 / 15 + 2 / 3 + 4 / 11) / 3)
    assert default["rouge2"] == pytest.approx(100 * (6 / 13 + 3 / 5 + 2 / 9) / 3)
    assert default["rougeL"] == pytest.approx(default["rouge1"])
    # corpus BLEU sums the counts: p 11/20, 7/17, 4/14, 2/11; 20 vs 21 characters: BP e^(1-21/20)
    assert default["bleu4"] == pytest.approx(100 * math.exp(-0.05) * (11 / 20 * 7 / 17 * 4 / 14 * 2 / 11) ** 0.25)
    chatglm = text_scores(ZH_PREDS, ZH_REFS, convention="chatglm")
    assert chatglm == pytest.approx({"bleu4": (27.7762 + 50.8133 + 15.0908) / 3, "rouge1": 47.09956666666667,
                                     "rouge2": 40 / 3, "rougeL": 43.36996666666667, "exact_match": 0.0})
    assert all(abs(chatglm[k] - default[k]) > 0.05 for k in ("bleu4", "rouge1", "rouge2", "rougeL"))


def test_chatglm_convention_matches_chatglms_own_code_path():
    """tests/goldens/chatglm_metrics.json: rouge_chinese + jieba + nltk run as ChatGLM's compute_metrics."""
    rows = GOLDEN["sample"]
    preds, refs = [r["prediction"] for r in rows], [r["reference"] for r in rows]
    for row in rows:  # the same segmentation first (a jieba dictionary change would show here)
        assert list(jieba.cut(row["prediction"])) == row["prediction_words"]
        assert list(jieba.cut(row["reference"])) == row["reference_words"]
    for row, pred, ref in zip(rows, preds, refs):
        got = {**rouge(pred, ref, convention="chatglm"), "bleu4": bleu4([pred], [ref], convention="chatglm")}
        assert got == {"rouge1": row["scores"]["rouge-1"], "rouge2": row["scores"]["rouge-2"],
                       "rougeL": row["scores"]["rouge-l"], "bleu4": row["scores"]["bleu-4"]}, row["prediction"]
    means = text_scores(preds, refs, convention="chatglm")
    assert means == pytest.approx({"rouge1": GOLDEN["means"]["rouge-1"], "rouge2": GOLDEN["means"]["rouge-2"],
                                   "rougeL": GOLDEN["means"]["rouge-l"], "bleu4": GOLDEN["means"]["bleu-4"],
                                   "exact_match": 0.0}, abs=1e-9)


def test_convention_errors():
    for call in (lambda: rouge(ZH_PREDS, ZH_REFS, convention="ChatGLM"),
                 lambda: bleu4(ZH_PREDS, ZH_REFS, convention="ChatGLM"),
                 lambda: text_scores(ZH_PREDS, ZH_REFS, convention="ChatGLM"),
                 lambda: evaluate_generation(None, None, ["a"], ["b"], convention="ChatGLM")):  # before generating
        with pytest.raises(ValueError, match=r"convention='ChatGLM'.*'reftkit', 'chatglm'"):
            call()
    with pytest.raises(ValueError, match="tokenize='zh'"):
        bleu4(ZH_PREDS, ZH_REFS, tokenize="zh", convention="chatglm")
    with pytest.raises(ValueError, match="use_stemmer=True"):
        rouge(ZH_PREDS, ZH_REFS, use_stemmer=True, convention="chatglm")
    with pytest.raises(ValueError, match="types has 'rougeLsum'"):
        rouge(ZH_PREDS, ZH_REFS, types=("rouge1", "rougeLsum"), convention="chatglm")


def test_chatglm_without_jieba_or_nltk_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "jieba", None)  # import jieba now raises ImportError
    with pytest.raises(ImportError, match=r"jieba.*pip install 'reftkit\[zh\]'"):
        rouge(ZH_PREDS, ZH_REFS, convention="chatglm")
    with pytest.raises(ImportError, match="jieba"):
        generation_scores(None, None, ["a"], ["b"], convention="chatglm")  # before generating
    monkeypatch.setitem(sys.modules, "nltk.translate.bleu_score", None)
    with pytest.raises(ImportError, match=r"nltk.*pip install 'reftkit\[zh\]'"):
        bleu4(ZH_PREDS, ZH_REFS, convention="chatglm")


def test_jieba_is_lazy_quiet_and_caches_in_the_temp_folder(tmp_path):
    home, tmp = tmp_path / "home", tmp_path / "tmp"
    home.mkdir()
    tmp.mkdir()
    code = ("import sys; import reftkit.analysis.text_metrics as tm; assert 'jieba' not in sys.modules; "
            "print(tm.rouge('我爱北京', '我爱上海', convention='chatglm')['rouge1'])")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HOME": str(home), "TMPDIR": str(tmp)})
    assert done.returncode == 0, done.stderr
    # words 我 爱 北京 vs 我 爱 上海: 2 of 3 shared (characters, the default, give 50); jieba's own log stays quiet
    assert done.stdout.strip() == "66.6667" and "prefix dict" not in done.stderr
    assert list(home.iterdir()) == [] and (tmp / "jieba.cache").is_file()


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
    chatglm = generation_scores(model, tok, PROMPTS, refs, max_new_tokens=4, progress=False, convention="chatglm")
    assert chatglm == pytest.approx(text_scores(list(frame.prediction), refs, convention="chatglm"))
