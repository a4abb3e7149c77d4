"""reftkit.data.datasets: WordNet parsing, the define-word set and the packaged labelled sets.

The data comes from packages that scripts/install_data.sh installs (scripts/env.sh runs it);
tests that read it skip, naming that script, only when it is absent.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from reftkit.data import datasets as ds


def _have_wordnet() -> bool:
    try:
        ds.wordnet_path()
        return True
    except FileNotFoundError:
        return False


def _have_labelled(name: str) -> bool:
    try:
        ds.LABELLED[name]()
        return True
    except FileNotFoundError:
        return False


needs_wordnet = pytest.mark.skipif(not _have_wordnet(), reason="WordNet 3.0 missing: run scripts/install_data.sh")


@pytest.fixture(scope="module")
def glosses() -> list[dict]:
    if not _have_wordnet():
        pytest.skip("WordNet 3.0 missing: run scripts/install_data.sh")
    return ds.wordnet_glosses()


@pytest.fixture(scope="module")
def by_key(glosses) -> dict[tuple[str, str], dict]:
    return {(r["word"], r["pos"]): r for r in glosses}


# --- gloss cleaning (no data needed) ----------------------------------------------------------

@pytest.mark.parametrize("raw, clean", [
    ('a member of the genus Canis; occurs in many breeds; "the dog barked all night"',
     "a member of the genus Canis; occurs in many breeds"),
    ('the act of putting one thing in the place of another: "he sent Smith in for Jones"',
     "the act of putting one thing in the place of another"),
    ('(law) a rule; "x"', "(law) a rule"),
    ('reward as in "carrot and stick"; "used the carrot of housing"', 'reward as in "carrot and stick"'),
    ("inaccessible and sparsely populated;  ", "inaccessible and sparsely populated"),
    ('a woolen fabric "he wore', "a woolen fabric"),
])
def test_clean_gloss(raw, clean):
    assert ds.clean_gloss(raw) == clean


# --- parsing a synthetic WordNet (CRLF, licence header, markers, sense order) ----------------

def _fake_wordnet(root: Path) -> Path:
    lic = "  1 This software and database is being provided to you, the LICENSEE\r\n  2 Princeton\r\n"
    data = {
        "noun": ["00000100 05 n 01 tree 0 000 | a tall perennial woody plant having a trunk; \"a big tree\"",
                 "00000200 05 n 01 tree 1 000 | a figure that branches from a single root in a diagram",
                 "00000300 15 n 01 Paris 0 000 | the capital and largest city of France",
                 "00000400 05 n 01 ox 0 000 | an adult castrated bull of the genus Bos"],
        "verb": ["00000500 30 v 02 abound 0 teem 0 000 | be abundant or plentiful; exist in large quantities"],
        "adj": ["00000600 00 s 02 abounding 0 galore(ip) 0 000 | existing in abundance; \"whiskey galore\""],
        "adv": ["00000700 02 r 01 quickly 0 000 | with rapid movements; \"he works quickly\""],
    }
    index = {  # tree: sense order in index.noun puts 00000200 (the diagram sense) first
        "noun": ["paris n 1 0 1 0 00000300", "tree n 2 1 @ 2 1 00000200 00000100", "ox n 1 0 1 0 00000400"],
        "verb": ["abound v 1 0 1 0 00000500", "teem v 1 0 1 0 00000500"],
        "adj": ["galore a 1 0 1 0 00000600", "abounding a 1 0 1 0 00000600"],
        "adv": ["quickly r 1 0 1 0 00000700"],
    }
    for part in data:
        (root / f"data.{part}").write_bytes((lic + "\r\n".join(data[part]) + "  \r\n").encode())
        (root / f"index.{part}").write_bytes((lic + "\r\n".join(index[part]) + "  \r\n").encode())
    (root / "cntlist.rev").write_text("tree%1:03:00:: 1 7\ntree%1:25:00:: 2 3\ngalore%5:00:00:abundant:00 1 2\n")
    return root


def test_parses_synthetic_wordnet(tmp_path, monkeypatch):
    monkeypatch.setenv("REFTKIT_WORDNET_DIR", str(_fake_wordnet(tmp_path)))
    assert ds.wordnet_path() == tmp_path
    rows = {(r["word"], r["pos"]): r for r in ds.wordnet_glosses()}
    assert ("paris", "n") not in rows  # proper noun: written capitalised in its synset
    assert rows[("ox", "n")]["count"] == 0  # word length is define_word_dataset's filter, not this one's
    assert rows[("tree", "n")]["gloss"] == "a figure that branches from a single root in a diagram"  # index order
    assert rows[("tree", "n")]["synset"] == "00000200-n" and rows[("tree", "n")]["count"] == 10
    assert rows[("galore", "a")]["gloss"] == "existing in abundance" and rows[("galore", "a")]["count"] == 2
    assert rows[("abound", "v")]["synset"] == rows[("teem", "v")]["synset"]
    assert rows[("quickly", "r")]["gloss"] == "with rapid movements"
    only_nouns = ds.wordnet_glosses(pos=("n",), min_len=1)
    assert {r["word"] for r in only_nouns} == {"tree", "ox"}
    with pytest.raises(ValueError, match="part of speech"):
        ds.wordnet_glosses(pos=("x",))


def test_missing_wordnet_names_install_command(tmp_path, monkeypatch):
    monkeypatch.setattr(ds, "_wordnet_candidates", lambda: [tmp_path])
    with pytest.raises(FileNotFoundError, match="install_data.sh"):
        ds.wordnet_path()


# --- the real WordNet 3.0 --------------------------------------------------------------------

def test_known_entries(by_key):
    dog = by_key[("dog", "n")]
    assert dog["gloss"].startswith("a member of the genus Canis")
    assert dog["synset"] == "02084071-n" and '"' not in dog["gloss"] and dog["gloss"].endswith("many breeds")
    assert by_key[("dog", "v")]["gloss"] == "go after with the intent to catch"
    # first sense by index order, not data-file order (the financial bank has the lower offset)
    assert by_key[("bank", "n")]["gloss"].startswith("sloping land")
    assert by_key[("run", "v")]["count"] > by_key[("run", "n")]["count"]


def test_filtering(glosses, by_key):
    assert len(glosses) > 50_000
    assert {r["pos"] for r in glosses} == {"n", "v", "a", "r"}
    for r in glosses:
        assert r["word"].isascii() and r["word"].isalpha() and r["word"].islower()
        assert 20 <= len(r["gloss"]) <= 200 and r["gloss"] == r["gloss"].strip()
        assert r["gloss"].count('"') % 2 == 0 and not r["gloss"].endswith((";", ":"))
    assert ("paris", "n") not in by_key and ("hot_dog", "n") not in by_key
    assert len(set(by_key)) == len(glosses)


@needs_wordnet
def test_define_word_dataset():
    d = ds.define_word_dataset(n_train=1000, n_eval=200, seed=0)
    train, evals = d["train"], d["eval"]
    assert len(train) == 1000 and len(evals) == 200
    words = lambda xs, k="word": {x[k] for x in xs}  # noqa: E731
    assert len(words(train)) == 1000 and len(words(evals)) == 200
    assert not words(train) & words(evals)
    assert not words(train, "synset") & words(evals, "synset")
    assert not words(train, "response") & words(evals, "response")
    for x in train + evals:
        assert x["prompt"] == f"Define the word {x['word']}." and len(x["word"]) >= 3
        assert x["response"][0].isupper() or not x["response"][0].isalpha()
        assert x["response"].endswith((".", "!", "?"))
    assert ds.define_word_dataset(seed=0) == d
    other = ds.define_word_dataset(seed=1)
    assert other["eval"] != evals
    assert ds.define_word_dataset(n_train=10, n_eval=200, seed=0)["eval"] == evals
    common = ds.define_word_dataset(n_train=100, n_eval=20, min_count=3, min_word_len=5)
    assert all(len(x["word"]) >= 5 for x in common["train"] + common["eval"])
    with pytest.raises(ValueError, match="qualify"):
        ds.define_word_dataset(n_train=10**6)


# --- labelled text classification -----------------------------------------------------------

@pytest.mark.parametrize("name, labels, low, high", [
    ("rotten_tomatoes", ["negative", "positive"], 4500, 5100),
    ("bbc_news", ["business", "entertainment", "politics", "sports", "tech"], 2000, 2300),
])
def test_labelled_texts(name, labels, low, high):
    if not _have_labelled(name):
        pytest.skip(f"{name} data missing: run scripts/install_data.sh")
    d = ds.labelled_texts(name, seed=0)
    assert d["labels"] == labels
    train, evals = d["train"], d["eval"]
    assert low <= len(train) + len(evals) <= high
    assert abs(len(evals) / (len(train) + len(evals)) - 0.2) < 0.01
    assert not {x["text"] for x in train} & {x["text"] for x in evals}
    for lab in range(len(labels)):  # stratified: every class in both, in proportion
        n_tr = sum(x["label"] == lab for x in train)
        n_ev = sum(x["label"] == lab for x in evals)
        assert n_ev > 0 and abs(n_ev / (n_tr + n_ev) - 0.2) < 0.01
    assert all(isinstance(x["label"], int) and len(x["text"].split()) >= 3 for x in train + evals)
    assert ds.labelled_texts(name, seed=0) == d and ds.labelled_texts(name, seed=1) != d
    if name == "rotten_tomatoes":
        counts = [sum(x["label"] == i for x in train) for i in range(2)]
        assert abs(counts[0] - counts[1]) < 0.05 * len(train)
        assert any("sleazy and fun" in x["text"] for x in train + evals)


def test_unknown_labelled_set():
    with pytest.raises(ValueError, match="rotten_tomatoes"):
        ds.labelled_texts("imdb")
