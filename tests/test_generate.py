"""generate(): the prompt is edited at prefill, decode steps pass through on the KV cache."""
from __future__ import annotations

import pytest
import torch
from conftest import pad_batch, tiny_gpt2, tiny_llama

import reftkit

PROMPTS = [[5, 9, 14, 3, 22], [7, 11, 19]]


def _reft(model, positions="f1+l2"):
    reft = reftkit.get_reft_model(model, {"layer": [0, 1], "component": "block_output", "positions": positions,
                                          "low_rank_dimension": 4})
    torch.manual_seed(4)
    with torch.no_grad():
        for p in reft.interventions.parameters():
            p.add_(torch.randn_like(p))
    return reft


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
def test_greedy_generate_equals_full_recompute_with_prompt_edits(make):
    """Reference: a greedy loop that re-runs the whole sequence each step, editing only the prompt
    positions (a causal model's prompt states do not depend on later tokens)."""
    reft = _reft(make())
    ids, mask = pad_batch(PROMPTS, "left")
    out = reft.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    # prompt positions as reftkit resolves them, then held fixed while the sequence grows
    state = reft._call_state(ids, None, mask, None)
    seq, full_mask = ids.clone(), mask.clone()
    for _ in range(6):
        locs = torch.nn.functional.pad(state.locations, (0, 0), value=-1)
        with torch.no_grad():
            logits = reft(input_ids=seq, attention_mask=full_mask, intervention_locations=locs,
                          position_ids=(full_mask.cumsum(1) - 1).clamp_min(0)).logits
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        seq, full_mask = torch.cat([seq, nxt], 1), torch.cat([full_mask, torch.ones_like(nxt)], 1)
    assert torch.equal(out, seq)
    bare = reft.detach().generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                                  pad_token_id=0)
    assert not torch.equal(bare, out), "the interventions should change the greedy continuation"


def test_decode_steps_do_not_run_interventions():
    reft = _reft(tiny_llama())
    calls = []
    for iv in reft.interventions.values():
        iv.register_forward_hook(lambda m, a, o: calls.append(a[0].shape))
    ids, mask = pad_batch(PROMPTS, "left")
    reft.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert len(calls) == len(reft.interventions)  # prefill only
    calls.clear()
    reft.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0,
                  num_beams=2, num_return_sequences=2)
    assert len(calls) == len(reft.interventions) and calls[0][0] == 4  # batch expanded for beams


def test_use_cache_false_is_refused():
    reft = _reft(tiny_llama())
    ids, mask = pad_batch(PROMPTS, "left")
    with pytest.raises(ValueError, match="use_cache=False"):
        reft.generate(input_ids=ids, attention_mask=mask, max_new_tokens=2, use_cache=False)
    reft.model.generation_config.use_cache = False
    with pytest.raises(ValueError, match="use_cache=False"):
        reft.generate(input_ids=ids, attention_mask=mask, max_new_tokens=2)


def test_no_state_outlives_a_call():
    reft = _reft(tiny_llama())
    ids, mask = pad_batch(PROMPTS, "left")
    reft(input_ids=ids, attention_mask=mask)
    assert reft._hooks.state is None
    reft.generate(input_ids=ids, attention_mask=mask, max_new_tokens=2, pad_token_id=0)
    assert reft._hooks.state is None
    # hooks are inert outside a call: the bare base model gives its own logits
    with torch.no_grad():
        direct = reft.model(input_ids=ids, attention_mask=mask).logits
        bare = tiny_llama()(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(direct, bare, atol=0, rtol=0)


def test_flattened_mlp_sites_with_beams():
    """OPT runs its MLP on [batch*seq, hidden]; the hook must unflatten with the expanded batch."""
    from transformers import OPTConfig, OPTForCausalLM
    torch.manual_seed(0)
    model = OPTForCausalLM(OPTConfig(hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                                     vocab_size=101, max_position_embeddings=64, word_embed_proj_dim=32,
                                     pad_token_id=0)).eval()
    reft = reftkit.get_reft_model(model, {"layer": 1, "component": "mlp_output", "positions": "l1",
                                          "low_rank_dimension": 2})
    with torch.no_grad():
        for p in reft.interventions.parameters():
            p.add_(torch.randn_like(p))
    ids, mask = pad_batch(PROMPTS, "left")
    seen = []
    reft.interventions["layer1_mlp_output"].register_forward_hook(lambda m, a, o: seen.append(a[0].shape))
    reft.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, num_beams=3, num_return_sequences=3,
                  do_sample=False, pad_token_id=0)
    assert seen == [torch.Size([6, 1, 32])]
    # forward on the flattened site agrees with a hand-written edit of fc2's output
    with torch.no_grad():
        got = reft(input_ids=ids, attention_mask=mask).logits
    reft.detach()
    iv = reft.interventions["layer1_mlp_output"]
    width = ids.shape[1]

    def edit(module, args, out):
        out = out.clone()
        for b in range(len(PROMPTS)):
            row = b * width + width - 1  # left padded: the last token is the last column
            out[row] = iv(out[row][None, None])[0, 0]
        return out

    handle = model.model.decoder.layers[1].fc2.register_forward_hook(edit)
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask).logits
    handle.remove()
    torch.testing.assert_close(got[mask.bool()], want[mask.bool()], atol=1e-5, rtol=1e-5)
