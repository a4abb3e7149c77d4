"""Generation of the prompt baselines (prefix tuning, P-Tuning v2, P-tuning, prompt tuning) applies what they
trained. Reference: greedy decoding by repeated full forwards through peft's own forward (the path training
uses, no KV cache), one unpadded prompt at a time. With peft 0.21 and transformers 5.24 peft's ``generate``
dropped the key/value prefix (both prefix methods generated what the bare model generates, so tutorial 05
scored them identically) and re-fed the virtual tokens at every step."""
from __future__ import annotations

import pytest
import torch
from conftest import MODELS, pad_batch, tiny_llama

from reftkit.analysis.baselines import PROMPT_METHODS, get_weight_space_model

NEW = 6
PROMPTS = [[5, 17, 23, 9, 41, 7], [12, 30, 8, 50]]  # different lengths: the batch is left-padded


def _randomise(adapted, seed: int, scale: float = 3.0) -> None:
    """A large random prompt/prefix: its effect on the next token cannot be lost in the noise."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in adapted.trained_parameters():
            p.copy_(torch.randn_like(p) * scale)
    adapted.eval()


@torch.no_grad()
def _reference(forward, prompt: list[int], new: int) -> list[int]:
    ids = torch.tensor([prompt])
    for _ in range(new):
        logits = forward(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[:, -1]
        ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
    return ids[0, len(prompt):].tolist()


@torch.no_grad()
def _generate(model, new: int = NEW) -> list[list[int]]:
    ids, mask = pad_batch(PROMPTS, "left")
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, do_sample=False, pad_token_id=0,
                         eos_token_id=None)
    assert torch.equal(out[:, :ids.shape[1]], ids), "generate must return the prompt followed by the new tokens"
    return out[:, ids.shape[1]:].tolist()


@pytest.mark.parametrize("arch", sorted(MODELS))
@pytest.mark.parametrize("method", PROMPT_METHODS)
def test_generate_equals_greedy_decoding_through_peft_forward(method, arch):
    options = {"num_virtual_tokens": 4, **({"encoder_hidden_size": 16} if method == "p_tuning" else {})}
    adapted = get_weight_space_model(MODELS[arch](), method, **options)
    _randomise(adapted, seed=1)
    expected = [_reference(adapted, p, NEW) for p in PROMPTS]
    assert _generate(adapted) == expected


@pytest.mark.parametrize("method", ["prefix_tuning", "p_tuning_v2"])
def test_a_large_random_prefix_changes_the_generations(method):
    bare = _generate(tiny_llama())
    adapted = get_weight_space_model(tiny_llama(), method, num_virtual_tokens=4)
    _randomise(adapted, seed=1)
    generated = _generate(adapted)
    # every prompt's first new token already differs: the prefix reaches the prefill's attention
    assert all(g[0] != b[0] for g, b in zip(generated, bare)), (generated, bare)


def test_two_prefix_methods_do_not_generate_identically():
    outputs = {}
    for method, seed in (("prefix_tuning", 1), ("p_tuning_v2", 2)):
        adapted = get_weight_space_model(tiny_llama(), method, num_virtual_tokens=4)
        _randomise(adapted, seed=seed)
        outputs[method] = _generate(adapted)
    assert outputs["prefix_tuning"] != outputs["p_tuning_v2"]


def test_generate_that_drops_the_prefix_raises(monkeypatch):
    adapted = get_weight_space_model(tiny_llama(), "p_tuning_v2", num_virtual_tokens=4)
    base = adapted.peft_model.get_base_model()
    original = type(base).generate

    def without_cache(self, *args, cache=None, past_key_values=None, **kwargs):
        # what a transformers that renames or ignores the cache argument would do
        kwargs["attention_mask"] = kwargs["attention_mask"][:, 4:]
        return original(self, *args, **kwargs)

    monkeypatch.setattr(type(base), "generate", without_cache)
    with pytest.raises(RuntimeError, match=r"p_tuning_v2: generate did not use the key/value prefix .*transformers"):
        _generate(adapted)


def test_prompt_method_generate_refuses_inputs_it_would_override():
    adapted = get_weight_space_model(tiny_llama(), "prefix_tuning", num_virtual_tokens=4)
    ids = torch.tensor([PROMPTS[0]])
    with pytest.raises(ValueError, match="position_ids= cannot be passed to a prefix_tuning model"):
        adapted.generate(input_ids=ids, position_ids=torch.arange(ids.shape[1])[None], max_new_tokens=2)
    with pytest.raises(ValueError, match="prefix_tuning generates from input_ids="):
        adapted.generate(inputs_embeds=torch.zeros(1, 3, 32), max_new_tokens=2)
