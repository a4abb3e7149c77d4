"""Shared by tests/pyreft_compat/test_compat_trainers.py: tiny models, pyreft-style ReFT models, and the reference
forward and loss written by hand (forward hooks on the decoder blocks, independent of reftkit's hooks)."""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers
from transformers import PreTrainedTokenizerFast

import reftkit.pyreft as pyreft
from reftkit.pyreft.trainer import once_each

PROMPTS = ["what is the capital of france ?", "define dog .", "how many legs ?"]
ANSWERS = [" paris .", " an animal that barks .", " eight"]
GOLDEN_DATA = Path(__file__).resolve().parents[1] / "goldens" / "pyreft_data"
GOLDEN_TOKENIZER = GOLDEN_DATA / "tokenizer.json"


def base_model(arch: str = "llama", seed: int = 0, classes: int | None = None) -> torch.nn.Module:
    """A tiny random model whose outputs react to its residual stream (initializer_range 0.3)."""
    torch.manual_seed(seed)
    common = dict(vocab_size=101, pad_token_id=0, bos_token_id=1, eos_token_id=2, initializer_range=0.3)
    if arch == "gpt2":
        config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=128, **common)
        return transformers.GPT2LMHeadModel(config).eval()
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, max_position_embeddings=128, **common)
    if classes is not None:
        config.num_labels = classes
        return transformers.LlamaForSequenceClassification(config).eval()
    return transformers.LlamaForCausalLM(config).eval()


def reft_on(model, layers=(0,), rank=4, cls=None, seed=1):
    cls = cls or pyreft.LoreftIntervention
    torch.manual_seed(seed)
    config = pyreft.ReftConfig(representations=[
        {"layer": layer, "component": "block_output", "low_rank_dimension": rank,
         "intervention": cls(embed_dim=32, low_rank_dimension=rank)} for layer in layers])
    return pyreft.get_reft_model(model, config)


def args(tmp_path, **extra):
    base = dict(output_dir=str(tmp_path / "run"), num_train_epochs=1, per_device_train_batch_size=3,
                learning_rate=4e-2, logging_steps=5, report_to=[], use_cpu=True, save_strategy="no",
                disable_tqdm=True)
    return transformers.TrainingArguments(**(base | extra))


def blocks(model):
    inner = getattr(model, "model", None) or model.transformer
    return inner.layers if hasattr(inner, "layers") else inner.h


@contextlib.contextmanager
def hand_intervened(reft, locations):
    """The reference forward: forward hooks on the decoder blocks that replace each listed row h (each
    position once) by ``intervention(h)``, in intervention order; independent of reftkit's hooks."""
    handles = []
    for k, (rep, iv) in enumerate(zip(reft.pyreft_config.representations, reft.interventions.values())):
        def edit(module, inputs, output, k=k, iv=iv):
            hidden = output[0] if isinstance(output, tuple) else output
            hidden = hidden.clone()
            for b in range(hidden.shape[0]):
                rows = sorted({int(p) for p in locations[b, k] if p >= 0})
                hidden[b, rows] = iv(hidden[b, rows]).to(hidden.dtype)
            return (hidden, *output[1:]) if isinstance(output, tuple) else hidden
        handles.append(blocks(reft.model)[rep.layer].register_forward_hook(edit))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def hand_lm_loss(reft, batch, grad=False):
    """pyreft's loss: the HF model's mean cross entropy over the shifted labels, computed here by hand."""
    with hand_intervened(reft, batch["intervention_locations"]), torch.set_grad_enabled(grad):
        logits = reft.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch["labels"][:, 1:].flatten(), ignore_index=-100)


def pyvene_call(reft, batch, **kwargs):
    """pyvene's call form (reftkit.pyreft.ReftModel's), each listed position once."""
    locations = once_each(batch["intervention_locations"]).permute(1, 0, 2).tolist()
    return reft({"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]},
                unit_locations={"sources->base": (None, locations)}, **kwargs)[1]


def golden_tokenizer():
    return PreTrainedTokenizerFast(tokenizer_file=str(GOLDEN_TOKENIZER), bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", pad_token="<pad>", padding_side="right", model_max_length=128)
