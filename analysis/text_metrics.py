"""Text-generation metrics (BLEU-4, ROUGE, exact match) that are correct for CJK text, and batched
greedy generation for a Hugging Face model or a :class:`reftkit.ReftModel`.

Sources:

* BLEU: Papineni et al. 2002, computed by ``sacrebleu`` (Post 2018, "A Call for Clarity in
  Reporting BLEU Scores"): corpus BLEU-4, exponential smoothing, 0-100.
* ROUGE: Lin 2004, computed by Google's ``rouge-score`` package: F-measure per example, averaged.

CJK handling. ``rouge-score``'s default tokenizer lowercases, replaces every character outside
``[a-z0-9]`` with a space and keeps only ``[a-z0-9]+`` tokens, so Chinese/Japanese/Korean text is
dropped entirely (``"我爱北京"`` tokenizes to ``[]`` and every ROUGE score is 0).
:class:`CJKTokenizer` keeps each CJK character as one token and is identical to the default on
ASCII text. For BLEU, ``tokenize=None`` picks sacrebleu's ``"zh"`` tokenizer when any text
contains CJK characters (it splits Chinese ideographs into single characters and tokenizes the rest
like ``"13a"``); otherwise ``"13a"``, sacrebleu's default. Note that ``"zh"`` splits Han
characters (and full-width forms) only: Hangul words and runs of kana stay whole.

Conventions. Published Chinese results are often not comparable with the above: the P-Tuning v2
line of work (Liu et al. 2022, "P-Tuning v2: Prompt Tuning Can Be Comparable to Fine-tuning
Universally Across Scales and Tasks") and ChatGLM-6B's ``ptuning/main.py`` (``compute_metrics``)
score ROUGE on jieba *words* and BLEU-4 per *sentence* on characters with smoothing, then average
over examples. Every scoring function takes ``convention=``: ``"reftkit"`` (the default, as
described above) or ``"chatglm"``, which reproduces that script (see :func:`rouge` and
:func:`bleu4` for the formulas; exact match is the same in both). ``"chatglm"`` needs ``jieba``
(``pip install 'reftkit[zh]'``); the two give different numbers on the same outputs, so report
which one you used. A golden file made with ChatGLM's own code path
(``tests/goldens/make_chatglm_metric_goldens.sh``) checks the reproduction.
"""
from __future__ import annotations

import logging
import re
import warnings
from typing import Any, Sequence

import pandas as pd
import torch

from .common import model_device

# Han ideographs (+ extensions A-F, compatibility), kana, Hangul syllables/jamo, CJK punctuation
# and full-width forms. Deliberately wider than sacrebleu's "zh" ranges: detection only decides
# whether "zh" is needed, and ROUGE counts each of these letters as one token.
_CJK_CLASS = (r"\u1100-\u11ff\u2e80-\u2fdf\u3000-\u303f\u3040-\u30ff\u3100-\u31ff\u3200-\u33ff"
              r"\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff\ufe30-\ufe4f\uff00-\uffef"
              r"\U00020000-\U0003134f")
_CJK_RE = re.compile(f"[{_CJK_CLASS}]")
# One CJK letter/digit, or a run of other letters/digits. Punctuation (ASCII or CJK, e.g. "，。")
# and "_" are separators, never tokens, as in rouge-score.
_TOKEN_RE = re.compile(f"(?=[^\\W_])[{_CJK_CLASS}]|[^\\W_{_CJK_CLASS}]+")


#: the metric conventions every scoring function accepts as ``convention=`` (the first is the default)
CONVENTIONS = ("reftkit", "chatglm")
# rouge_chinese 1.0.3 ``Rouge.cut_sent``: where a sentence ends. Its ROUGE joins the sentences' words again, so the
# split only shows where a "sentence" is whitespace only (around a newline): it becomes one empty word.
_SENTENCE_BREAKS = ((re.compile("([。！？?])([^”’])"), r"\1\n\2"), (re.compile(r"(\.{6})([^”’])"), r"\1\n\2"),
                    (re.compile("(…{2})([^”’])"), r"\1\n\2"), (re.compile("([。！？?][”’])([^，。！？?])"), r"\1\n\2"))
_CHATGLM_TYPE_RE = re.compile(r"rouge([1-5]|L)")


def _check_convention(convention: str) -> str:
    if convention not in CONVENTIONS:
        raise ValueError(f"convention={convention!r} is not a metric convention; choose one of "
                         f"{', '.join(repr(c) for c in CONVENTIONS)}")
    return convention


def _jieba() -> Any:
    """jieba, imported on first use with its dictionary loaded quietly (jieba caches it under
    ``tempfile.gettempdir()``, never in the home folder); its own log level is restored afterwards."""
    try:
        with warnings.catch_warnings():  # jieba imports pkg_resources where it exists, which warns
            warnings.filterwarnings("ignore", message="pkg_resources is deprecated")
            import jieba
    except ImportError:
        raise ImportError("convention='chatglm' segments Chinese with jieba, which is not installed: "
                          "pip install 'reftkit[zh]' (or pip install jieba)") from None
    if not jieba.dt.initialized:
        log = logging.getLogger("jieba")
        level = log.level
        log.setLevel(logging.WARNING)  # "Building prefix dict ..." on stderr otherwise
        try:
            jieba.initialize()
        finally:
            log.setLevel(level)
    return jieba


def _chatglm_words(text: str, jieba: Any) -> list[str]:
    """The words rouge_chinese scores for ChatGLM's ``' '.join(jieba.cut(text))`` (punctuation included)."""
    para = " ".join(jieba.cut(text))
    for pattern, repl in _SENTENCE_BREAKS:
        para = pattern.sub(repl, para)
    sentences = [" ".join(s.split()) for s in para.rstrip().split("\n") if s]
    return [w for s in sentences for w in s.split(" ")]


def _f(p: float, r: float) -> float:
    return 2.0 * ((p * r) / (p + r + 1e-8))  # rouge_chinese's F, epsilon included


def _chatglm_rouge_f(hyp: list[str], ref: list[str], kind: str) -> float:
    """rouge_chinese 1.0.3's F of one pair of word lists (``kind``: "1".."5" or "L"); 0 if either is empty."""
    if not hyp or not ref:
        return 0.0  # ChatGLM2-6B's guard (rouge_chinese raises on a text without words)
    if kind == "L":
        row = [0] * (len(ref) + 1)
        for h in hyp:
            prev, row = row, [0]
            for j, w in enumerate(ref):
                row.append(prev[j] + 1 if h == w else max(prev[j + 1], row[j]))
        return _f(row[-1] / len(hyp), row[-1] / len(ref))
    n = int(kind)
    grams_h = {tuple(hyp[i:i + n]) for i in range(len(hyp) - n + 1)}
    grams_r = {tuple(ref[i:i + n]) for i in range(len(ref) - n + 1)}
    overlap = len(grams_h & grams_r)
    return _f(overlap / len(grams_h) if grams_h else 0.0, overlap / len(grams_r) if grams_r else 0.0)


def has_cjk(text: str) -> bool:
    """Whether ``text`` contains a Chinese, Japanese or Korean character."""
    return _CJK_RE.search(text) is not None


def _as_multi(references: Sequence[str] | Sequence[Sequence[str]]) -> list[list[str]]:
    """Per-example reference lists, whichever of the two forms was passed."""
    return [[r] if isinstance(r, str) else list(r) for r in references]


def _check(predictions: Sequence[str], refs: list[list[str]]) -> None:
    if len(predictions) != len(refs):
        raise ValueError(f"{len(predictions)} predictions but {len(refs)} references")
    if any(not r for r in refs):
        raise ValueError("every example needs at least one reference")


def bleu4(predictions: Sequence[str], references: Sequence[str] | Sequence[Sequence[str]], *,
          tokenize: str | None = None, convention: str = "reftkit") -> float:
    """BLEU-4 (0-100): corpus BLEU by ``sacrebleu.corpus_bleu``, or ChatGLM's mean sentence BLEU.

    ``references[i]`` is the reference of example ``i`` or a list of its references (their number
    may vary per example). ``tokenize=None`` means ``"zh"`` if any prediction or reference contains
    CJK characters, else ``"13a"`` (sacrebleu's default, the WMT ``mteval-v13a`` tokenizer);
    pass any sacrebleu tokenizer name to override.

    ``convention="chatglm"`` is ChatGLM-6B ``ptuning/main.py``'s ``sentence_bleu([list(label)],
    list(pred), smoothing_function=SmoothingFunction().method3)`` (nltk) on *characters* (spaces and
    punctuation included; ``tokenize`` must stay ``None``). Per example, with c and r the lengths of
    the prediction and of the reference closest to it in length:

    * ``p_n`` = clipped matching character n-grams / the prediction's n-grams (at least 1), n = 1..4;
    * a ``p_n`` without matches becomes ``1 / (2**k * denominator)``, k = 1, 2, ... over the empty
      orders in turn (NIST geometric smoothing; Chen & Cherry 2014, method 3);
    * ``BP = 1`` if c > r, ``0`` if c = 0, else ``exp(1 - r / c)``;
    * ``BLEU = BP * exp((log p_1 + log p_2 + log p_3 + log p_4) / 4)``, or 0 if no character matches.

    Each example's ``round(100 * BLEU, 4)`` is averaged over the examples, as the script does.
    """
    refs = _as_multi(references)
    _check(predictions, refs)
    if _check_convention(convention) == "chatglm":
        if tokenize is not None:
            raise ValueError(f"tokenize={tokenize!r} cannot apply with convention='chatglm', which scores "
                             "characters; leave tokenize=None")
        try:
            from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
        except ImportError:
            raise ImportError("convention='chatglm' computes BLEU with nltk, which is not installed: "
                              "pip install 'reftkit[zh]' (or pip install nltk)") from None
        smooth = SmoothingFunction().method3
        scores = [round(sentence_bleu([list(r) for r in rs], list(p), smoothing_function=smooth) * 100, 4)
                  for p, rs in zip(predictions, refs)]
        return float(sum(scores) / max(len(scores), 1))
    import sacrebleu

    if tokenize is None:
        texts = list(predictions) + [r for rs in refs for r in rs]
        tokenize = "zh" if any(has_cjk(t) for t in texts) else "13a"
    # sacrebleu takes reference *streams* (stream j = j-th reference of every example); a missing
    # j-th reference is None, which sacrebleu skips.
    width = max(len(r) for r in refs) if refs else 1
    streams = [[r[j] if j < len(r) else None for r in refs] for j in range(width)]
    return float(sacrebleu.corpus_bleu(list(predictions), streams, tokenize=tokenize).score)


class CJKTokenizer:
    """A ``rouge_score`` tokenizer: each CJK character is a token (CJK punctuation is dropped, like
    ASCII punctuation); other text is lowercased and split into runs of letters/digits, exactly
    as rouge-score's default tokenizer does for ASCII (non-ASCII letters such as ``é`` are kept
    instead of being dropped). Hangul and kana are split into characters too.

    With ``use_stemmer`` the Porter stemmer is applied, as rouge-score does, to non-CJK tokens
    longer than 3 characters; CJK characters are never stemmed.
    """

    def __init__(self, use_stemmer: bool = False) -> None:
        self._stemmer = None
        if use_stemmer:
            from nltk.stem import porter  # rouge-score's own dependency and stemmer
            self._stemmer = porter.PorterStemmer()

    def tokenize(self, text: str) -> list[str]:
        tokens = _TOKEN_RE.findall(text.lower())
        if self._stemmer is not None:
            tokens = [self._stemmer.stem(t) if len(t) > 3 and not has_cjk(t) else t for t in tokens]
        return [t for t in tokens if t]


def rouge(predictions: Sequence[str], references: Sequence[str] | Sequence[Sequence[str]], *,
          types: Sequence[str] = ("rouge1", "rouge2", "rougeL"), use_stemmer: bool = False,
          convention: str = "reftkit") -> dict[str, float]:
    """Mean ROUGE F-measure (0-100) per type, by ``rouge_score.RougeScorer`` with :class:`CJKTokenizer`
    (``convention="reftkit"``) or as ChatGLM's evaluation script (``convention="chatglm"``).

    A single string for each of ``predictions`` and ``references`` is accepted as one example.
    With several references an example scores its best one (``RougeScorer.score_multi``; the best
    per type with ``"chatglm"``, whose script has one reference).

    ``"chatglm"`` is ChatGLM-6B ``ptuning/main.py``'s ``Rouge().get_scores(' '.join(jieba.cut(pred)),
    ' '.join(jieba.cut(label)))`` (rouge_chinese 1.0.3; types ``rouge1`` ... ``rouge5`` and ``rougeL``;
    no stemming). The words W of a text are its jieba segments (accurate mode), punctuation included
    and case kept; ``G_n(W)`` is the *set* of W's distinct n-grams, so a repeated n-gram counts once
    (rouge-score clips counts instead). With Ŵ the prediction's words:

    * ROUGE-N: ``P = |G_n(Ŵ) ∩ G_n(W)| / |G_n(Ŵ)|``, ``R = |G_n(Ŵ) ∩ G_n(W)| / |G_n(W)|`` (0 over an
      empty set);
    * ROUGE-L: ``P = L / |Ŵ|``, ``R = L / |W|`` with L the length of the longest common subsequence of
      the two word lists;
    * ``F = 2 P R / (P + R + 1e-8)``, and 0 when either text has no words (ChatGLM2-6B's guard;
      ChatGLM-6B's script raises there).

    Each example's ``round(100 * F, 4)`` is averaged over the examples, as the script does.
    """
    if isinstance(predictions, str):
        predictions = [predictions]
    if isinstance(references, str):
        references = [references]
    refs = _as_multi(references)
    _check(predictions, refs)
    if _check_convention(convention) == "chatglm":
        return _chatglm_rouge(predictions, refs, types, use_stemmer)
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(list(types), tokenizer=CJKTokenizer(use_stemmer))
    totals = {t: 0.0 for t in types}
    for pred, rs in zip(predictions, refs):
        scores = scorer.score(rs[0], pred) if len(rs) == 1 else scorer.score_multi(rs, pred)
        for t in types:
            totals[t] += scores[t].fmeasure
    n = max(len(refs), 1)
    return {t: 100.0 * v / n for t, v in totals.items()}


def _chatglm_rouge(predictions: Sequence[str], refs: list[list[str]], types: Sequence[str],
                   use_stemmer: bool) -> dict[str, float]:
    if use_stemmer:
        raise ValueError("use_stemmer=True cannot apply with convention='chatglm', which does not stem")
    kinds = {}
    for t in types:
        match = _CHATGLM_TYPE_RE.fullmatch(t)
        if match is None:
            raise ValueError(f"types has {t!r}, which convention='chatglm' does not compute; "
                             "use 'rouge1' ... 'rouge5' or 'rougeL'")
        kinds[t] = match.group(1)
    jieba = _jieba()
    totals = {t: 0.0 for t in types}
    for pred, rs in zip(predictions, refs):
        hyp = _chatglm_words(pred, jieba)
        words = [_chatglm_words(r, jieba) for r in rs]
        for t, kind in kinds.items():
            totals[t] += max(round(_chatglm_rouge_f(hyp, ref, kind) * 100, 4) for ref in words)
    n = max(len(refs), 1)
    return {t: v / n for t, v in totals.items()}


def _normalise(text: str) -> str:
    return " ".join(text.split())


def exact_match(predictions: Sequence[str], references: Sequence[str] | Sequence[Sequence[str]]) -> float:
    """Share (0-100) of predictions equal to one of their references, after stripping and
    collapsing whitespace (case and punctuation are kept: this is the strict metric)."""
    refs = _as_multi(references)
    _check(predictions, refs)
    hits = sum(_normalise(p) in {_normalise(r) for r in rs} for p, rs in zip(predictions, refs))
    return 100.0 * hits / max(len(refs), 1)


def text_scores(predictions: Sequence[str], references: Sequence[str] | Sequence[Sequence[str]], *,
                convention: str = "reftkit") -> dict[str, float]:
    """``bleu4``, ``rouge1``, ``rouge2``, ``rougeL`` and ``exact_match``, all on a 0-100 scale, by the
    metric ``convention`` (:data:`CONVENTIONS`; see :func:`bleu4` and :func:`rouge`)."""
    _check_convention(convention)
    return {"bleu4": bleu4(predictions, references, convention=convention),
            **rouge(predictions, references, convention=convention),
            "exact_match": exact_match(predictions, references)}


# -- generation ----------------------------------------------------------------------------------

@torch.no_grad()
def generate_predictions(model: Any, tokenizer: Any, prompts: Sequence[str], *, max_new_tokens: int = 64,
                         batch_size: int = 8, chat_template: bool = False, progress: bool = True,
                         tasks: Sequence[str | None] | None = None) -> list[str]:
    """Greedy continuations of ``prompts``, in input order, decoded without the prompt and stripped.

    ``model`` is anything with ``generate(input_ids=, attention_mask=, max_new_tokens=,
    do_sample=False, pad_token_id=)``: a Hugging Face causal LM, or a ``ReftModel``, whose
    ``generate`` edits the prompt at the positions of its config (resolved from the attention mask,
    so left padding is fine). Prompts are batched in order of token length to waste little compute
    on padding; the tokenizer is switched to left padding (decoder-only models continue from the
    last column) and restored afterwards, as is its pad token if one had to be borrowed from EOS.
    With ``chat_template`` each prompt is wrapped as one user turn with the generation prompt; the
    template already contains the special tokens, so none are added when tokenizing. ``tasks``
    (one per prompt) routes each prompt of a mixed-task ``ReftModel`` to its task.
    """
    from tqdm.auto import tqdm

    if tasks is not None and len(tasks) != len(prompts):
        raise ValueError(f"tasks has {len(tasks)} entries, prompts has {len(prompts)}; give one task per prompt")
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                           add_generation_prompt=True) for p in prompts] if chat_template \
        else list(prompts)
    special = not chat_template
    lengths = [len(tokenizer(t, add_special_tokens=special)["input_ids"]) for t in texts]
    order = sorted(range(len(texts)), key=lambda i: -lengths[i])
    device = model_device(model)
    side, pad = tokenizer.padding_side, tokenizer.pad_token
    results: list[str] = [""] * len(texts)
    try:
        tokenizer.padding_side = "left"
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        with tqdm(total=len(texts), disable=not progress, desc="generate") as bar:
            for start in range(0, len(order), batch_size):
                chunk = order[start:start + batch_size]
                enc = tokenizer([texts[i] for i in chunk], return_tensors="pt", padding=True,
                                add_special_tokens=special)
                ids, mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)
                routed = {} if tasks is None else {"tasks": [tasks[i] for i in chunk]}
                out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                     do_sample=False, pad_token_id=tokenizer.pad_token_id, **routed)
                new = out[:, ids.shape[1]:]  # with left padding every prompt ends at the same column
                for i, text in zip(chunk, tokenizer.batch_decode(new, skip_special_tokens=True)):
                    results[i] = text.strip()
                bar.update(len(chunk))
    finally:
        tokenizer.padding_side = side
        if pad is None:
            tokenizer.pad_token = None
    return results


def evaluate_generation(model: Any, tokenizer: Any, prompts: Sequence[str],
                        references: Sequence[str] | Sequence[Sequence[str]], *, convention: str = "reftkit",
                        **gen_kwargs: Any) -> pd.DataFrame:
    """Generate for ``prompts`` (``gen_kwargs`` go to :func:`generate_predictions`) and score.

    Returns one row per example (``prompt``, ``reference``, ``prediction``), with
    :func:`text_scores` of the whole set (by the metric ``convention``) in ``.attrs["scores"]``.
    """
    if len(prompts) != len(references):
        raise ValueError(f"{len(prompts)} prompts but {len(references)} references")
    if _check_convention(convention) == "chatglm":
        _jieba()  # fail before generating, not after
    predictions = generate_predictions(model, tokenizer, prompts, **gen_kwargs)
    frame = pd.DataFrame({"prompt": list(prompts), "reference": list(references), "prediction": predictions})
    frame.attrs["scores"] = text_scores(predictions, references, convention=convention)
    return frame


def generation_scores(model: Any, tokenizer: Any, prompts: Sequence[str],
                      references: Sequence[str] | Sequence[Sequence[str]], *, convention: str = "reftkit",
                      **gen_kwargs: Any) -> dict[str, float]:
    """Only the scores of :func:`evaluate_generation`."""
    return evaluate_generation(model, tokenizer, prompts, references, convention=convention,
                               **gen_kwargs).attrs["scores"]
