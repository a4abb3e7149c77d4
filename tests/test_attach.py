"""Attach-time behaviour: freezing, errors naming field and value, counts, detach, dtypes, checkpointing."""
from __future__ import annotations

import pytest
import torch
from conftest import pad_batch, tiny_gpt2, tiny_llama
from transformers import LlamaConfig, LlamaForCausalLM

import reftkit
import reftkit.interventions

SEQS = [[5, 9, 14, 3, 22, 8, 40], [7, 11, 19]]
BASE = {"layer": 1, "component": "block_output", "positions": "l1", "intervention": "loreft",
        "low_rank_dimension": 4}


@pytest.mark.parametrize("change, message", [
    ({"layer": 7}, r"representations\[0\]: layer=7 is out of range"),
    ({"layer": [0, 9]}, r"layer=9 is out of range"),
    ({"component": "mlp_outptu"}, r"component='mlp_outptu'"),
    ({"positions": "f2+x1"}, r"representations\[0\]\.positions='f2\+x1'"),
    ({"positions": "f0"}, r"f0 selects no token"),
    ({"low_rank_dimension": 0}, r"low_rank_dimension=0 must be a positive int"),
    ({"low_rank_dimension": 33}, r"low_rank_dimension=33 exceeds the width 32"),
    ({"intervention": "lorft"}, r"intervention='lorft' is not known"),
    ({"dropout": 2.0}, r"dropout=2\.0"),
    ({"act_fn": "swishy"}, r"act_fn='swishy'"),
    ({"rank": 4}, r"representations\[0\]\.rank=4: LoReFT takes no argument 'rank'"),
    ({"layer": "some"}, r"representations\[0\]\.layer='some' must be"),
    ({"share_weights": "yes"}, r"share_weights='yes'"),
])
def test_bad_config_fails_at_attach_naming_field_and_value(change, message):
    model = tiny_llama()
    with pytest.raises(reftkit.ConfigError, match=message):
        reftkit.get_reft_model(model, {**BASE, **change})
    # nothing was left attached or frozen by the failed attempt
    assert all(p.requires_grad for p in model.parameters())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_locations_beyond_the_sequence_are_refused():
    reft = reftkit.get_reft_model(tiny_llama(), BASE)
    ids, mask = pad_batch(SEQS, "right")
    with pytest.raises(reftkit.PositionError, match=r"= 7 is outside the sequence \(valid: 0..6"):
        reft(input_ids=ids, attention_mask=mask, intervention_locations=torch.tensor([[7], [1]]))


def test_base_is_frozen_and_only_interventions_get_gradients():
    reft = reftkit.get_reft_model(tiny_gpt2(), {**BASE, "layer": "all"})
    assert not any(p.requires_grad for p in reft.model.parameters())
    ids, mask = pad_batch(SEQS, "right")
    reft(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
    assert all(p.grad is None for p in reft.model.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in reft.interventions.parameters())


def test_train_and_eval_reach_the_interventions():
    reft = reftkit.get_reft_model(tiny_llama(), {**BASE, "dropout": 0.3})
    reft.train()
    assert all(m.training for m in reft.interventions.modules())
    reft.eval()
    assert not any(m.training for m in reft.interventions.modules())


def test_detach_leaves_the_base_bit_identical():
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {k: p.requires_grad for k, p in model.named_parameters()}
    ids, mask = pad_batch(SEQS, "right")
    with torch.no_grad():
        ref_logits = model(input_ids=ids, attention_mask=mask).logits
    reft = reftkit.get_reft_model(model, [{**BASE, "layer": "all", "component": c}
                                          for c in ("block_output", "mlp_input", "query_output")])
    with torch.no_grad():
        for p in reft.interventions.parameters():
            p.add_(1.0)
        reft(input_ids=ids, attention_mask=mask)
    base = reft.detach()
    assert base is model
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    assert {k: p.requires_grad for k, p in model.named_parameters()} == flags
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, ref_logits)
    with pytest.raises(RuntimeError, match="detached"):
        reft(input_ids=ids)


def test_llama_7b_count_on_meta_device():
    cfg = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=32, vocab_size=32000)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    reft = reftkit.get_reft_model(model, {"layer": "all", "component": "block_output", "positions": "f7+l7",
                                          "intervention": "loreft", "low_rank_dimension": 8})
    counts = reft.parameter_counts()
    assert counts == {"trainable": 2_097_408, "model": counts["model"]}  # 32 x (4096*8 + 8*4096 + 8)
    assert counts["model"] == 6_738_415_616
    assert "2,097,408" in reft.print_trainable_parameters()
    untied = reftkit.get_reft_model(model, {"layer": "all", "component": "block_output", "positions": "f7+l7",
                                            "share_weights": False, "low_rank_dimension": 8})
    assert untied.parameter_counts()["trainable"] == 2 * 2_097_408


def test_bf16_model_matches_fp32_reference():
    model32 = tiny_llama()
    reft32 = reftkit.get_reft_model(model32, {**BASE, "layer": [0, 2], "positions": "f1+l2"})
    with torch.no_grad():
        for p in reft32.interventions.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    state = {k: v.clone() for k, v in reft32.interventions.state_dict().items()}
    model16 = tiny_llama().to(torch.bfloat16)
    reft16 = reftkit.get_reft_model(model16, {**BASE, "layer": [0, 2], "positions": "f1+l2"})
    reft16.interventions.load_state_dict(state)
    assert all(p.dtype == torch.float32 for p in reft16.interventions.parameters())
    reft16.to(torch.bfloat16)  # casting the whole ReftModel keeps the interventions in float32
    assert all(p.dtype == torch.float32 for p in reft16.interventions.parameters())
    ids, mask = pad_batch(SEQS, "right")
    with torch.no_grad():
        a = reft32(input_ids=ids, attention_mask=mask).logits
        b = reft16(input_ids=ids, attention_mask=mask).logits.float()
    real = mask.bool()
    assert (a[real] - b[real]).abs().max() < 0.05 * a[real].abs().max()


def test_gradient_checkpointing_gives_the_same_gradients():
    grads = []
    for checkpointing in (False, True):
        model = tiny_llama()
        reft = reftkit.get_reft_model(model, {**BASE, "layer": [0, 1, 2], "positions": "f1+l1"})
        torch.manual_seed(0)
        with torch.no_grad():
            for p in reft.interventions.parameters():
                p.add_(torch.randn_like(p) * 0.3)
        if checkpointing:
            reft.gradient_checkpointing_enable()
            assert reft.model.is_activation_checkpointing
        reft.train()
        ids, mask = pad_batch(SEQS, "right")
        reft(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
        grads.append([p.grad.clone() for p in reft.interventions.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_query_output_on_fused_gpt2_attention_edits_only_query_columns():
    model = tiny_gpt2()
    reft = reftkit.get_reft_model(model, {**BASE, "layer": 0, "component": "query_output"})
    assert reft._hooks.slots[0].site.width == 32
    with torch.no_grad():
        for p in reft.interventions.parameters():
            p.add_(torch.randn_like(p))
    seen = {}

    def record(module, args, output):
        seen.setdefault("out", output.clone())  # returns None: observe only

    handle = model.transformer.h[0].attn.c_attn.register_forward_hook(record)
    ids, mask = pad_batch(SEQS, "right")
    with torch.no_grad():
        reft(input_ids=ids, attention_mask=mask)
    handle.remove()
    # the hook above ran after reftkit's, so it saw the edited output; recompute the clean one
    reft.detach()
    clean = model.transformer.h[0].attn.c_attn(model.transformer.h[0].ln_1(
        model.transformer.wte(ids) + model.transformer.wpe(torch.arange(ids.shape[1]))))
    edited = seen["out"]
    last = mask.sum(1) - 1
    iv = reft.interventions["layer0_query_output"]
    for b in range(len(SEQS)):
        for t in range(ids.shape[1]):
            want = clean[b, t].clone()
            if t == last[b]:
                want[:32] = iv(clean[b, t, :32][None])[0]
            torch.testing.assert_close(edited[b, t], want, atol=1e-5, rtol=1e-5)


def test_config_shape_errors():
    with pytest.raises(reftkit.ConfigError, match=r"representations\[1\]=5 must be a dict"):
        reftkit.ReftConfig([BASE, 5])
    with pytest.raises(reftkit.ConfigError, match=r"representations\[0\]\.layer is missing"):
        reftkit.ReftConfig([{"component": "block_output"}])
    with pytest.raises(reftkit.ConfigError, match=r"representations=\[\] is empty"):
        reftkit.ReftConfig([])
    with pytest.raises(reftkit.ConfigError, match=r"layer=\[1, 1\] lists a layer twice"):
        reftkit.ReftConfig({**BASE, "layer": [1, 1]})
    with pytest.raises(reftkit.ConfigError, match="is an instance, so its arguments are fixed"):
        reftkit.ReftConfig({**BASE, "intervention": reftkit.interventions.LoReFT(low_rank_dimension=2)})


def test_intervention_instances_and_classes_are_accepted():
    from reftkit.interventions import LoreftIntervention, NoReFT
    model = tiny_llama()
    # pyreft style: an instance built with the model's width, deep-copied per layer
    reft = reftkit.get_reft_model(model, {"layer": [0, 1], "component": "block_output", "positions": "l1",
                                          "intervention": LoreftIntervention(embed_dim=32, low_rank_dimension=2)})
    a, b = reft.interventions.values()
    assert a is not b and a.embed_dim == b.embed_dim == 32
    reft.detach()
    reft = reftkit.get_reft_model(model, {"layer": 0, "component": "mlp_activation", "positions": "l1",
                                          "intervention": NoReFT, "low_rank_dimension": 3})
    assert reft.interventions["layer0_mlp_activation"].embed_dim == 64  # the intermediate width
    reft.detach()
    with pytest.raises(reftkit.ConfigError, match="embed_dim=48 was given, but the representation"):
        reftkit.get_reft_model(model, {"layer": 0, "component": "block_output", "positions": "l1",
                                       "intervention": LoreftIntervention(embed_dim=48, low_rank_dimension=2)})
