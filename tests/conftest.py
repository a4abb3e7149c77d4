"""Tiny random models built from configs (no network), shared by the tests."""
from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM


def tiny_llama(seed: int = 0, layers: int = 3) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=101, max_position_embeddings=128, pad_token_id=0,
                      bos_token_id=1, eos_token_id=2)
    return LlamaForCausalLM(cfg).eval()


def tiny_gpt2(seed: int = 0, layers: int = 3) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    cfg = GPT2Config(n_embd=32, n_layer=layers, n_head=4, vocab_size=101, n_positions=128,
                     pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return GPT2LMHeadModel(cfg).eval()


MODELS = {"llama": tiny_llama, "gpt2": tiny_gpt2}


@pytest.fixture(params=sorted(MODELS))
def tiny_model(request):
    return MODELS[request.param]()


def pad_batch(seqs: list[list[int]], side: str, pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad token lists to one tensor on the given side; returns (input_ids, attention_mask)."""
    width = max(len(s) for s in seqs)
    ids, mask = [], []
    for s in seqs:
        fill = [pad] * (width - len(s))
        ones, zeros = [1] * len(s), [0] * (width - len(s))
        ids.append(fill + s if side == "left" else s + fill)
        mask.append(zeros + ones if side == "left" else ones + zeros)
    return torch.tensor(ids), torch.tensor(mask)


WORDS = ("what is the capital of france paris define word a an dog cat animal that barks meows "
         "colour sky blue how many legs spider eight tell me about it yes no good bad movie great awful").split()


def tiny_tokenizer(padding_side: str = "right", with_pad: bool = True):
    """A word-level tokenizer built offline: <pad>=0, <s>=1, </s>=2, <unk>=3, then WORDS."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{w: i + 4 for i, w in enumerate(WORDS)}}
    for extra in ("?", ".", "!", ","):
        vocab[extra] = len(vocab)
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    core.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                  pad_token="<pad>" if with_pad else None, padding_side=padding_side)
    return tok


def patching_case():
    """A tiny Llama with a clean and a corrupted batch (one token swapped) and a logit metric."""
    model = tiny_llama(layers=3)
    clean = {"input_ids": torch.tensor([[5, 9, 14, 22, 7], [6, 10, 15, 23, 8]])}
    corrupt = {"input_ids": torch.tensor([[5, 30, 14, 22, 7], [6, 31, 15, 23, 8]])}
    target = torch.tensor([40, 41])

    def metric(out):
        return out.logits[torch.arange(2), -1, target]

    return model, clean, corrupt, metric


# -- hypothesis profiles and the fuzz suite's outcome counts (tests/test_fuzz.py) -------------------------------
from collections import Counter  # noqa: E402 - this section was appended after the tiny-model helpers

#: "family/outcome" -> count, filled by tests/test_fuzz.py; printed at the end of the session and written as JSON
#: to the path in REFTKIT_FUZZ_REPORT when that is set (shrinking re-runs count too)
FUZZ_OUTCOMES: Counter[str] = Counter()

try:
    from hypothesis import HealthCheck, settings
except ImportError:  # the test extras bring it; without them only tests/test_fuzz.py cannot run
    pass
else:
    _SLOW_OK = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much]
    # ci (the default): few examples, no deadline (2 slow shared cores), derandomized so every CI run draws the same
    settings.register_profile("ci", max_examples=25, deadline=None, derandomize=True, database=None,
                              suppress_health_check=_SLOW_OK, print_blob=True)
    # a long local run: pytest tests/test_fuzz.py --hypothesis-profile=long (random seed each run)
    settings.register_profile("long", max_examples=2000, deadline=None, suppress_health_check=_SLOW_OK,
                              print_blob=True)
    settings.load_profile("ci")


def pytest_terminal_summary(terminalreporter) -> None:
    if not FUZZ_OUTCOMES:
        return
    import json
    import os

    def total(outcome: str) -> int:
        return sum(n for key, n in FUZZ_OUTCOMES.items() if key.endswith("/" + outcome))

    line = (f"reftkit fuzz: {sum(FUZZ_OUTCOMES.values())} fuzzed inputs, {total('works')} worked and matched the "
            f"reference, {total('clear error')} clear errors, {total('crash')} crashes, "
            f"{total('silent change')} silent changes")
    terminalreporter.write_sep("-", "reftkit fuzz outcomes")
    for key in sorted(FUZZ_OUTCOMES):
        terminalreporter.write_line(f"  {key}: {FUZZ_OUTCOMES[key]}")
    terminalreporter.write_line(line)
    path = os.environ.get("REFTKIT_FUZZ_REPORT")
    if path:
        with open(path, "w") as handle:
            json.dump({"summary": line, "outcomes": dict(sorted(FUZZ_OUTCOMES.items()))}, handle, indent=2)
