"""IA3 as a reftkit intervention, checked against peft's IA3 and the formula ``h -> l ⊙ h``.

The references are independent of reftkit's code: peft 0.21 wraps its own copy of the same tiny
model with ``IA3Config`` (target/feed-forward modules taken from peft's own default tables), its
vectors are set to random values, and the same values are copied into reftkit's interventions by
module path. Logits, gradients and a save/load round trip must then agree.
"""
from __future__ import annotations

import json

import peft  # a normal dependency: this test runs in CI, it is not skipped
import pytest
import torch
import transformers as tf
from conftest import pad_batch, tiny_gpt2, tiny_llama
from peft.tuners.ia3 import IA3Layer
from peft.utils.constants import TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING as PEFT_FF
from peft.utils.constants import TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING as PEFT_TARGETS

import reftkit
from reftkit.config import ConfigError
from reftkit.interventions import IA3, InterventionError, get_intervention_class
from reftkit.interventions.scaling import PEFT_IA3_DEFAULTS, ia3_representations
from reftkit.structure import num_layers, resolve_site

SEQS = [[1, 5, 6, 7, 8, 9, 10, 11], [1, 12, 13], [1, 14, 15, 16, 17, 18]]


def _other(kind: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    if kind == "qwen2":
        cfg = tf.Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, vocab_size=101, pad_token_id=0)
        return tf.Qwen2ForCausalLM(cfg).eval()
    if kind == "gpt_neox":  # fused, per-head interleaved query_key_value
        cfg = tf.GPTNeoXConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                               vocab_size=101, pad_token_id=0)
        return tf.GPTNeoXForCausalLM(cfg).eval()
    if kind == "opt":  # the MLP sees tokens flattened to [batch * seq, width]
        cfg = tf.OPTConfig(hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=101,
                           pad_token_id=0, word_embed_proj_dim=32)
        return tf.OPTForCausalLM(cfg).eval()
    if kind == "bert":  # encoder; peft's "output.dense" also matches attention.output.dense
        cfg = tf.BertConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                            vocab_size=101, pad_token_id=0)
        return tf.BertForMaskedLM(cfg).eval()
    raise KeyError(kind)


BUILD = {"llama": tiny_llama, "gpt2": tiny_gpt2, **{k: (lambda seed=0, k=k: _other(k, seed))
                                                    for k in ("qwen2", "gpt_neox", "opt", "bert")}}


def _sites(model, reps):
    """The resolved site of each intervention, in the order of ``reft.interventions``."""
    out = []
    for rep in reps:
        layers = range(num_layers(model)) if rep["layer"] == "all" else rep["layer"]
        out.extend(resolve_site(model, layer, rep["component"]) for layer in layers)
    return out


def _pair(kind: str, seed: int = 0, dtype: torch.dtype = torch.float32):
    """Two copies of one tiny model: one wrapped by peft's IA3 with random vectors, one by reftkit's IA3
    with the same vectors copied in by module path."""
    a, b = BUILD[kind](seed).to(dtype), BUILD[kind](seed).to(dtype)
    model_type = a.config.model_type
    pm = peft.get_peft_model(a, peft.IA3Config(target_modules=list(PEFT_TARGETS[model_type]),
                                               feedforward_modules=list(PEFT_FF[model_type])))
    reps = ia3_representations(b)
    reft = reftkit.get_reft_model(b, reps)
    layers = {name: mod for name, mod in pm.base_model.model.named_modules() if isinstance(mod, IA3Layer)}
    sites = _sites(b, reps)
    assert sorted(s.module_path for s in sites) == sorted(layers), "placement differs from peft's"
    gen = torch.Generator().manual_seed(seed + 1)
    pairs = []
    for site, (key, iv) in zip(sites, reft.interventions.items()):
        layer = layers[site.module_path]
        assert (site.hook == "input") == layer.is_feedforward, site
        vec = layer.ia3_l["default"]
        with torch.no_grad():
            vec.copy_(1 + 0.5 * torch.randn(vec.shape, generator=gen))
            iv.scale.copy_(vec.flatten())
        pairs.append((key, iv.scale, vec))
    return pm, reft, pairs


def _max_real_diff(x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor) -> float:
    m = mask.bool()
    return (x.float()[m] - y.float()[m]).abs().max().item()


# ----------------------------------------------------------------------------- the formula

def test_formula_init_and_float32():
    iv = IA3(embed_dim=6)
    assert iv.scale.dtype == torch.float32 and torch.equal(iv.scale, torch.ones(6))
    h = torch.randn(2, 3, 6)
    assert torch.equal(iv(h), h)  # ones: the identity
    with torch.no_grad():
        iv.scale.copy_(torch.tensor([0.5, 2.0, -1.0, 0.0, 3.0, 1.25]))
    want = torch.stack([h[..., j] * s for j, s in enumerate([0.5, 2.0, -1.0, 0.0, 3.0, 1.25])], -1)
    torch.testing.assert_close(iv(h), want, rtol=0, atol=0)
    # init_ia3_weights=False draws N(0, 1) as peft does
    assert not torch.equal(IA3(embed_dim=64, init_ia3_weights=False).scale, torch.ones(64))
    assert IA3(embed_dim=6).config() == {"embed_dim": 6, "init_ia3_weights": True}


def test_bf16_input_keeps_float32_math():
    torch.manual_seed(0)
    iv = IA3(embed_dim=256)
    with torch.no_grad():
        iv.scale.copy_(1 + 0.3 * torch.randn(256))
    h = torch.randn(4, 5, 256).to(torch.bfloat16)
    out = iv(h)
    assert out.dtype == torch.bfloat16 and iv.scale.dtype == torch.float32
    assert torch.equal(out, (h.float() * iv.scale).to(torch.bfloat16))
    # bf16 math (scale rounded to bf16 first) gives other values: the float32 path is really taken
    assert not torch.equal(out, h * iv.scale.to(torch.bfloat16))


def test_registry_and_aliases():
    assert get_intervention_class("ia3") is IA3
    assert get_intervention_class("IA3") is IA3
    assert get_intervention_class("IA3Intervention") is IA3
    from reftkit.interventions import IA3 as imported
    assert imported is IA3


# ----------------------------------------------------------------------------- errors

def test_bad_arguments_name_the_field():
    with pytest.raises(InterventionError, match="embed_dim=0"):
        IA3(embed_dim=0)
    with pytest.raises(InterventionError, match="init_ia3_weights='yes'"):
        IA3(init_ia3_weights="yes")
    with pytest.raises(InterventionError, match="embed_dim=8.*width 16"):
        IA3(embed_dim=8).materialize(16)
    with pytest.raises(TypeError):
        IA3(embed_dim=4, low_rank_dimension=2)
    # through a config: the entry's field is named
    with pytest.raises(ConfigError, match=r"representations\[0\]\.low_rank_dimension=4"):
        reftkit.ReftConfig([{"layer": 0, "component": "key_output", "positions": "all", "intervention": "ia3",
                             "low_rank_dimension": 4}])
    with pytest.raises(ConfigError, match="init_ia3_weights=1"):
        reftkit.ReftConfig([{"layer": 0, "component": "key_output", "positions": "all", "intervention": "ia3",
                             "init_ia3_weights": 1}])
    # an instance of the wrong width for the site it is attached to (Llama's key_output is 16 wide)
    with pytest.raises(ConfigError, match="embed_dim=7.*width 16"):
        reftkit.get_reft_model(tiny_llama(), [{"layer": 0, "component": "key_output", "positions": "all",
                                               "intervention": IA3(embed_dim=7)}])


def test_placement_helper_errors():
    model = tiny_llama()
    with pytest.raises(InterventionError, match="target_modules='k_proj'"):
        ia3_representations(model, target_modules="k_proj")
    with pytest.raises(InterventionError, match="feedforward_modules=.*'up_proj' is not in it"):
        ia3_representations(model, target_modules=["k_proj"], feedforward_modules=["up_proj"])
    with pytest.raises(InterventionError, match=r"layers=\[7\]"):
        ia3_representations(model, layers=[7])
    with pytest.raises(InterventionError, match="matches no module"):
        ia3_representations(model, target_modules=["nope"])
    with pytest.raises(InterventionError, match="'lm_head'.*outside the layer stack"):
        ia3_representations(model, target_modules=["k_proj", "lm_head"])
    model.config.model_type = "unheard_of"
    with pytest.raises(InterventionError, match="model_type='unheard_of'"):
        ia3_representations(model)


# ----------------------------------------------------------------------------- placement

def test_defaults_mirror_peft_tables():
    for model_type, (targets, feedforward) in PEFT_IA3_DEFAULTS.items():
        assert set(targets) == set(PEFT_TARGETS[model_type]), model_type
        assert set(feedforward) == set(PEFT_FF[model_type]), model_type


def test_placement_llama_and_gpt2():
    llama = ia3_representations(tiny_llama())
    assert [(r["layer"], r["component"], r["positions"], r["intervention"]) for r in llama] == [
        ("all", "key_output", "all", "ia3"), ("all", "value_output", "all", "ia3"),
        ("all", "model.layers.{layer}.mlp.down_proj:input", "all", "ia3")]
    gpt2 = ia3_representations(tiny_gpt2())
    assert [r["component"] for r in gpt2] == ["transformer.h.{layer}.attn.c_attn:output",
                                              "transformer.h.{layer}.mlp.c_proj:input"]
    assert [r["layer"] for r in ia3_representations(tiny_gpt2(), layers=[2, 0])] == [[0, 2], [0, 2]]
    # keys and values only (the paper's attention placement) with separate projections
    tfew = ia3_representations(tiny_llama(), target_modules=["k_proj", "v_proj"])
    assert [r["component"] for r in tfew] == ["key_output", "value_output"]
    # entries are plain config data: JSON round trip
    cfg = reftkit.ReftConfig(llama)
    assert reftkit.ReftConfig.from_json(cfg.to_json()) == cfg


# ----------------------------------------------------------------------------- parity with peft

@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_logits_match_peft(kind, side):
    pm, reft, _ = _pair(kind)
    ids, mask = pad_batch(SEQS, side)
    with torch.no_grad():
        want = pm(input_ids=ids, attention_mask=mask).logits
        got = reft(input_ids=ids, attention_mask=mask).logits
        base = reft.model(input_ids=ids, attention_mask=mask).logits  # hooks idle outside a reft call
    assert _max_real_diff(got, want, mask) <= 1e-5
    assert _max_real_diff(base, want, mask) > 1e-2  # the random vectors do change the output


@pytest.mark.parametrize("kind", ["qwen2", "gpt_neox", "opt", "bert"])
def test_logits_match_peft_other_architectures(kind):
    pm, reft, _ = _pair(kind)
    ids, mask = pad_batch(SEQS, "right")
    with torch.no_grad():
        want = pm(input_ids=ids, attention_mask=mask).logits
        got = reft(input_ids=ids, attention_mask=mask).logits
        base = reft.model(input_ids=ids, attention_mask=mask).logits
    assert _max_real_diff(got, want, mask) <= 1e-5
    assert _max_real_diff(base, want, mask) > 1e-3


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_gradients_match_peft(kind, side):
    pm, reft, pairs = _pair(kind)
    ids, mask = pad_batch(SEQS, side)
    # Only real tokens may enter the loss. A causal LM's logits at t predict labels[t + 1], so the first
    # real token is unlabelled too: with left padding a pad would predict it, and peft scales pads
    # (it edits every row) while reftkit's positions "all" are the real tokens only.
    prev = torch.nn.functional.pad(mask[:, :-1], (1, 0))
    labels = ids.masked_fill((mask == 0) | (prev == 0), -100)
    pm(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    reft(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    assert not any(p.requires_grad for p in reft.model.parameters())
    for key, ours, theirs in pairs:
        assert theirs.grad is not None and theirs.grad.abs().max() > 1e-6, key
        torch.testing.assert_close(ours.grad, theirs.grad.flatten(), rtol=1e-5, atol=1e-6, msg=key)


def test_bf16_model_matches_peft():
    pm, reft, pairs = _pair("llama", dtype=torch.bfloat16)
    assert all(p.dtype == torch.float32 for _, p, _ in pairs)
    assert all(p.dtype == torch.float32 for _, _, p in pairs)  # peft autocasts adapters to float32 too
    ids, mask = pad_batch(SEQS, "right")
    with torch.no_grad():
        want = pm(input_ids=ids, attention_mask=mask).logits
        got = reft(input_ids=ids, attention_mask=mask).logits
    assert got.dtype == torch.bfloat16
    assert _max_real_diff(got, want, mask) <= 1e-5  # the same float32 products, the same bf16 roundings


def test_tfew_keys_values_on_fused_gpt2_match_hand_written_hook():
    """T-Few scales keys and values only; on GPT-2's fused c_attn that is two column slices, which
    reftkit's key_output / value_output select. Reference: a plain forward hook doing l ⊙ h by hand."""
    ref, ours = tiny_gpt2(), tiny_gpt2()
    reft = reftkit.get_reft_model(ours, [{"layer": "all", "component": c, "positions": "all", "intervention": "ia3"}
                                         for c in ("key_output", "value_output")])
    gen = torch.Generator().manual_seed(3)
    d = ours.config.n_embd
    for layer in range(ours.config.n_layer):
        lk, lv = 1 + 0.5 * torch.randn(d, generator=gen), 1 + 0.5 * torch.randn(d, generator=gen)
        with torch.no_grad():
            reft.interventions[f"layer{layer}_key_output"].scale.copy_(lk)
            reft.interventions[f"layer{layer}_value_output"].scale.copy_(lv)
        scale = torch.cat([torch.ones(d), lk, lv])  # c_attn columns are [q | k | v]
        ref.transformer.h[layer].attn.c_attn.register_forward_hook(lambda m, a, out, s=scale: out * s)
    for side in ("right", "left"):
        ids, mask = pad_batch(SEQS, side)
        with torch.no_grad():
            want = ref(input_ids=ids, attention_mask=mask).logits
            got = reft(input_ids=ids, attention_mask=mask).logits
            base = reft.model(input_ids=ids, attention_mask=mask).logits
        assert _max_real_diff(got, want, mask) <= 1e-5
        assert _max_real_diff(base, want, mask) > 1e-2


# ----------------------------------------------------------------------------- persistence

def test_save_load_round_trip(tmp_path):
    _, reft, _ = _pair("gpt2")
    ids, mask = pad_batch(SEQS, "right")
    with torch.no_grad():
        before = reft(input_ids=ids, attention_mask=mask).logits
    reft.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert {r["intervention"] for r in config["representations"]} == {"ia3"}
    loaded = reftkit.ReftModel.from_pretrained(tiny_gpt2(), tmp_path)
    assert list(loaded.interventions) == list(reft.interventions)
    for key, iv in loaded.interventions.items():
        assert isinstance(iv, IA3) and torch.equal(iv.scale, reft.interventions[key].scale)
    with torch.no_grad():
        after = loaded(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(before, after)
