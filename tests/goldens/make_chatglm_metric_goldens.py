"""Generate tests/goldens/chatglm_metrics.json: ROUGE-1/2/L and BLEU-4 as ChatGLM's P-Tuning v2 script scores them.

Run ONLY inside the throwaway venv created by ``make_chatglm_metric_goldens.sh`` (rouge_chinese 1.0.3,
jieba 0.42.1, nltk, numpy). :func:`chatglm_scores` is ``compute_metrics`` of ChatGLM-6B ``ptuning/main.py``
after decoding, with ChatGLM2-6B's guard for a text without words (where ChatGLM-6B's ``Rouge().get_scores``
raises ``ValueError``): per pair, jieba words joined by spaces for rouge_chinese, characters for nltk's
``sentence_bleu`` with ``SmoothingFunction().method3``, each score ``round(100 * x, 4)``, then ``np.mean``.

The sample covers what makes the convention differ from reftkit's default: repeated words (rouge_chinese
counts *distinct* n-grams), punctuation as words, mixed Latin text kept in case, a newline (a whitespace-only
"sentence" becomes an empty word), several sentences, an empty prediction, and per-sentence rather than corpus
BLEU (the smoothing is reached by pairs without 3- or 4-gram matches).

Output: ``{"versions", "sample": [{"prediction", "reference", "prediction_words", "reference_words",
"scores"}], "means"}`` where the words are ``list(jieba.cut(text))`` and ``scores``/``means`` have ChatGLM's
keys ``rouge-1``, ``rouge-2``, ``rouge-l``, ``bleu-4``.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from importlib.metadata import version
from pathlib import Path

try:
    import jieba
    import numpy as np
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
    from rouge_chinese import Rouge
except ImportError as exc:  # pragma: no cover - guidance only
    sys.exit(f"import failed ({exc}); run via `bash tests/goldens/make_chatglm_metric_goldens.sh`, which builds "
             "the throwaway venv")

OUT = Path(__file__).resolve().parent / "chatglm_metrics.json"
#: (prediction, reference) pairs
SAMPLE = [
    ("我爱北京，我爱上海。", "我爱北京天安门。"),
    ("今天天气很好", "今天天气不错"),
    ("北京很好", "我爱北京天安门"),
    ("你好\n\n世界。", "你好，世界。"),
    ("ChatGLM是一个开源的对话模型！It supports English.", "ChatGLM-6B 是一个开源的、支持中英双语的对话语言模型。"),
    ("好的。好的。好的。", "好的。"),
    ("他说：“你好。”然后走了。", "他说：“你好！”"),
    ("", "没有输出。"),
]


def chatglm_scores(decoded_preds: list[str], decoded_labels: list[str]) -> tuple[list[dict], dict]:
    """ChatGLM's ``compute_metrics`` loop: per-pair scores and their means."""
    score_dict = {"rouge-1": [], "rouge-2": [], "rouge-l": [], "bleu-4": []}
    for pred, label in zip(decoded_preds, decoded_labels):
        hypothesis = list(jieba.cut(pred))
        reference = list(jieba.cut(label))
        if len(" ".join(hypothesis).split()) == 0 or len(" ".join(reference).split()) == 0:
            result = {"rouge-1": {"f": 0.0}, "rouge-2": {"f": 0.0}, "rouge-l": {"f": 0.0}}
        else:
            rouge = Rouge()
            scores = rouge.get_scores(" ".join(hypothesis), " ".join(reference))
            result = scores[0]
        for k, v in result.items():
            score_dict[k].append(round(v["f"] * 100, 4))
        bleu_score = sentence_bleu([list(label)], list(pred), smoothing_function=SmoothingFunction().method3)
        score_dict["bleu-4"].append(round(bleu_score * 100, 4))
    per_pair = [{k: v[i] for k, v in score_dict.items()} for i in range(len(decoded_preds))]
    return per_pair, {k: float(np.mean(v)) for k, v in score_dict.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    jieba.setLogLevel(logging.WARNING)
    preds, labels = [p for p, _ in SAMPLE], [r for _, r in SAMPLE]
    per_pair, means = chatglm_scores(preds, labels)
    golden = {
        "versions": {name: version(name) for name in ("rouge_chinese", "jieba", "nltk", "numpy")},
        "sample": [{"prediction": p, "reference": r, "prediction_words": list(jieba.cut(p)),
                    "reference_words": list(jieba.cut(r)), "scores": s}
                   for (p, r), s in zip(SAMPLE, per_pair)],
        "means": means,
    }
    # one line per pair, so a diff shows which pair changed
    rows = ",\n".join("  " + json.dumps(row, ensure_ascii=False) for row in golden["sample"])
    text = (f'{{\n "versions": {json.dumps(golden["versions"])},\n "sample": [\n{rows}\n ],\n'
            f' "means": {json.dumps(golden["means"])}\n}}\n')
    assert json.loads(text) == golden
    args.out.write_text(text, encoding="utf-8")
    print(f"wrote {args.out}: {means}")


if __name__ == "__main__":
    main()
