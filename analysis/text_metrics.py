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
"""
from __future__ import annotations

import re
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
          tokenize: str | None = None) -> float:
    """Corpus BLEU-4 (0-100) by ``sacrebleu.corpus_bleu``.

    ``references[i]`` is the reference of example ``i`` or a list of its references (their number
    may vary per example). ``tokenize=None`` means ``"zh"`` if any prediction or reference contains
    CJK characters, else ``"13a"`` (sacrebleu's default, the WMT ``mteval-v13a`` tokenizer);
    pass any sacrebleu tokenizer name to override.
    """
    import sacrebleu

    refs = _as_multi(references)
    _check(predictions, refs)
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
          types: Sequence[str] = ("rouge1", "rouge2", "rougeL"), use_stemmer: bool = False) -> dict[str, float]:
    """Mean ROUGE F-measure (0-100) per type, by ``rouge_score.RougeScorer`` with :class:`CJKTokenizer`.

    A single string for each of ``predictions`` and ``references`` is accepted as one example.
    With several references an example scores its best one (``RougeScorer.score_multi``).
    """
    from rouge_score import rouge_scorer

    if isinstance(predictions, str):
        predictions = [predictions]
    if isinstance(references, str):
        references = [references]
    refs = _as_multi(references)
    _check(predictions, refs)
    scorer = rouge_scorer.RougeScorer(list(types), tokenizer=CJKTokenizer(use_stemmer))
    totals = {t: 0.0 for t in types}
    for pred, rs in zip(predictions, refs):
        scores = scorer.score(rs[0], pred) if len(rs) == 1 else scorer.score_multi(rs, pred)
        for t in types:
            totals[t] += scores[t].fmeasure
    n = max(len(refs), 1)
    return {t: 100.0 * v / n for t, v in totals.items()}


def _normalise(text: str) -> str:
    return " ".join(text.split())


def exact_match(predictions: Sequence[str], references: Sequence[str] | Sequence[Sequence[str]]) -> float:
    """Share (0-100) of predictions equal to one of their references, after stripping and
    collapsing whitespace (case and punctuation are kept: this is the strict metric)."""
    refs = _as_multi(references)
    _check(predictions, refs)
    hits = sum(_normalise(p) in {_normalise(r) for r in rs} for p, rs in zip(predictions, refs))
    return 100.0 * hits / max(len(refs), 1)


def text_scores(predictions: Sequence[str], references: Sequence[str] | Sequence[Sequence[str]]) -> dict[str, float]:
    """``bleu4``, ``rouge1``, ``rouge2``, ``rougeL`` and ``exact_match``, all on a 0-100 scale."""
    return {"bleu4": bleu4(predictions, references), **rouge(predictions, references),
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
                        references: Sequence[str] | Sequence[Sequence[str]], **gen_kwargs: Any) -> pd.DataFrame:
    """Generate for ``prompts`` (``gen_kwargs`` go to :func:`generate_predictions`) and score.

    Returns one row per example (``prompt``, ``reference``, ``prediction``), with
    :func:`text_scores` of the whole set in ``.attrs["scores"]``.
    """
    if len(prompts) != len(references):
        raise ValueError(f"{len(prompts)} prompts but {len(references)} references")
    predictions = generate_predictions(model, tokenizer, prompts, **gen_kwargs)
    frame = pd.DataFrame({"prompt": list(prompts), "reference": list(references), "prediction": predictions})
    frame.attrs["scores"] = text_scores(predictions, references)
    return frame


def generation_scores(model: Any, tokenizer: Any, prompts: Sequence[str],
                      references: Sequence[str] | Sequence[Sequence[str]], **gen_kwargs: Any) -> dict[str, float]:
    """Only the scores of :func:`evaluate_generation`."""
    return evaluate_generation(model, tokenizer, prompts, references, **gen_kwargs).attrs["scores"]
