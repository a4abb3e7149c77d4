"""Offline stand-ins for the hub checkpoints that pyreft's examples download.

``make_checkpoint`` writes a word-level tokenizer and a tiny random model (built from a config with a fixed
seed) into a folder, so that a pattern script can call ``AutoTokenizer.from_pretrained`` and
``AutoModelFor*.from_pretrained`` on it exactly as the examples do with "meta-llama/..." or "roberta-base".
Nothing here imports pyreft: the same file serves the real pyreft 0.1.0 venv (transformers 4.45) and
reftkit's venv (transformers 5.x).

The tokenizer has no pad token (like Llama-2's): scripts set ``tokenizer.pad_token = tokenizer.unk_token``
as pyreft's README does. Ids: <unk>=0, <s>=1, </s>=2, then punctuation and words. It prepends <s>.
"""
from __future__ import annotations

import json
import os
import re
import string
import sys

import torch
import transformers

# the words of pyreft's alpaca templates (ReftSupervisedDataset formats prompts with them)
TEMPLATE_WORDS = ("Below is an instruction that describes a task, paired with an input that provides further "
                  "context. Write a response that appropriately completes the request. ### Instruction: "
                  "Input: Response:")
SPECIALS = ["<unk>", "<s>", "</s>"]


def words_of(texts: list[str]) -> list[str]:
    """The word-level tokens of ``texts``: whitespace-separated chunks with each punctuation mark apart."""
    found: list[str] = []
    for text in texts:
        for chunk in text.split():
            found += [w for w in re.split(r"([%s])" % re.escape(string.punctuation), chunk) if w]
    return found


def make_tokenizer(texts: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for word in list(string.punctuation) + words_of([TEMPLATE_WORDS, *texts]):
        vocab.setdefault(word, len(vocab))
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    core.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", 1)])
    core.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return transformers.PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>",
                                                unk_token="<unk>", model_input_names=["input_ids", "attention_mask"])


def _config(arch: str, vocab_size: int, hidden: int, layers: int):
    ids = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if arch == "llama":
        return transformers.LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                                        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                        max_position_embeddings=256, tie_word_embeddings=False, **ids)
    if arch == "gpt2":
        return transformers.GPT2Config(vocab_size=vocab_size, n_embd=hidden, n_layer=layers, n_head=4,
                                       n_positions=256, resid_pdrop=0.0, embd_pdrop=0.0,
                                       attn_pdrop=0.0, **ids)
    if arch == "roberta":
        return transformers.RobertaConfig(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers,
                                          num_attention_heads=4, intermediate_size=2 * hidden,
                                          max_position_embeddings=258, type_vocab_size=1, hidden_dropout_prob=0.0,
                                          attention_probs_dropout_prob=0.0, **ids)
    raise ValueError(f"arch={arch!r}: use llama, gpt2 or roberta")


def make_checkpoint(folder: str, texts: list[str], arch: str = "llama", hidden: int = 128, layers: int = 4,
                    seed: int = 0, std: float = 0.1) -> str:
    """Write tokenizer + tiny random model to ``folder``; llama/gpt2 as *ForCausalLM (*LMHeadModel), roberta as
    RobertaForMaskedLM (what "roberta-base" is, so AutoModelForSequenceClassification adds a fresh head).

    ``PYREFT_COMPAT_SEED`` (an integer, default 0) is added to ``seed``: a robustness check reruns the patterns
    on other random models (``python tests/pyreft_compat/swap_import.py --seed 3``)."""
    os.makedirs(folder, exist_ok=True)
    tokenizer = make_tokenizer(texts)
    tokenizer.save_pretrained(folder)
    config = _config(arch, len(tokenizer), hidden, layers)
    torch.manual_seed(seed + int(os.environ.get("PYREFT_COMPAT_SEED", "0")))
    cls = {"llama": transformers.LlamaForCausalLM, "gpt2": transformers.GPT2LMHeadModel,
           "roberta": transformers.RobertaForMaskedLM}[arch]
    model = cls(config)
    # A larger init than HF's 0.02: with it a single-position intervention at layer 0 can steer a few
    # generated tokens (at 0.02 the tiny random model is near-constant and nothing is learnable).
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, std)
    model.save_pretrained(folder)
    return folder


def write_result(result: dict) -> None:
    """Write the script's small JSON result to argv[1] when given (the runners compare or keep it)."""
    if len(sys.argv) > 1:
        with open(sys.argv[1], "w") as f:
            json.dump(result, f, indent=1)


def falling(losses: list[float], factor: float = 0.5) -> bool:
    """True when the mean of the last quarter of ``losses`` is below ``factor`` x the first loss."""
    tail = losses[-max(1, len(losses) // 4):]
    return sum(tail) / len(tail) < factor * losses[0]
