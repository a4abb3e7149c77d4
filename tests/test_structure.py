"""Tests for reftkit.structure on tiny random models of 12 architectures.

Every (arch, layer, component) site is hooked for real and the captured tensor
is compared with a reference recomputed by hand from the block input (taken
from ``output_hidden_states``), the model's weights and the attention
probabilities the model returns (``output_attentions``).  The reference also
rebuilds the whole block output, which is checked against the model, so the
references themselves are validated.
"""

from __future__ import annotations

import functools
import sys

import pytest
import torch
import torch.nn.functional as F
import transformers as T

from reftkit.structure import (
    COMPONENTS,
    FusedSlice,
    Site,
    StructureError,
    find_layers,
    hidden_size,
    num_layers,
    resolve_site,
)

_C = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
          intermediate_size=48, max_position_embeddings=64)

# name -> (auto class, config factory, reference family)
ARCHS = {
    "llama": (T.AutoModelForCausalLM, lambda: T.LlamaConfig(num_key_value_heads=2, **_C), "llama"),
    "mistral": (T.AutoModelForCausalLM, lambda: T.MistralConfig(num_key_value_heads=2, **_C), "llama"),
    "qwen2": (T.AutoModelForCausalLM, lambda: T.Qwen2Config(num_key_value_heads=2, **_C), "llama"),
    # head_dim * heads != hidden so attention_value_output/query widths differ from hidden.
    "qwen3": (T.AutoModelForCausalLM, lambda: T.Qwen3Config(num_key_value_heads=2, head_dim=16, **_C), "llama"),
    "gemma": (T.AutoModelForCausalLM, lambda: T.GemmaConfig(num_key_value_heads=1, head_dim=16, **_C), "llama"),
    "gemma2": (T.AutoModelForCausalLM, lambda: T.Gemma2Config(num_key_value_heads=2, head_dim=8, **_C), "gemma2"),
    "gpt2": (T.AutoModelForCausalLM,
             lambda: T.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                  n_inner=48, bos_token_id=0, eos_token_id=0), "gpt2"),
    "gpt_neox": (T.AutoModelForCausalLM, lambda: T.GPTNeoXConfig(**_C), "gpt_neox"),
    "phi3": (T.AutoModelForCausalLM,
             lambda: T.Phi3Config(num_key_value_heads=2, pad_token_id=0, bos_token_id=0, eos_token_id=0, **_C),
             "phi3"),
    "opt": (T.AutoModelForCausalLM,
            lambda: T.OPTConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                ffn_dim=48, max_position_embeddings=64, word_embed_proj_dim=32), "opt"),
    "bert": (T.AutoModel, lambda: T.BertConfig(**_C), "bert"),
    "roberta": (T.AutoModelForSequenceClassification,
                lambda: T.RobertaConfig(**{**_C, "max_position_embeddings": 66}), "bert"),
}
LAYERS = (0, 1)


def build(arch: str, meta: bool = False):
    auto, make_cfg, _ = ARCHS[arch]
    cfg = make_cfg()
    cfg._attn_implementation = "eager"  # output_attentions needs eager attention
    torch.manual_seed(0)
    if meta:
        with torch.device("meta"):
            return auto.from_config(cfg)
    return auto.from_config(cfg).double().eval()


def _first(x):
    return x[0] if isinstance(x, (tuple, list)) else x


def _hook(module, kind: str, store: list):
    if kind == "input":
        def pre(mod, args, kwargs):
            store.append((args[0] if args else kwargs["hidden_states"]).detach().clone())
        return module.register_forward_pre_hook(pre, with_kwargs=True)
    return module.register_forward_hook(lambda mod, args, out: store.append(_first(out).detach().clone()))


# ----------------------------------------------------------------------------- references

def _lin(m, x):
    if hasattr(m, "nf"):  # Conv1D stores weight as [in, out]
        return x @ m.weight + m.bias
    return F.linear(x, m.weight, m.bias)


def _heads(t, n):
    return t.unflatten(-1, (n, -1)).transpose(1, 2)  # [b, s, n*d] -> [b, n, s, d]


def _attend(probs, v, n_kv):
    v = _heads(v, n_kv).repeat_interleave(probs.shape[1] // n_kv, dim=1)
    return (probs @ v).transpose(1, 2).flatten(-2)


def _probs(model, family, sa, q, k, n_heads, n_kv, seq):
    """Attention probabilities recomputed from the hand-made q and k."""
    qh, kh = _heads(q, n_heads), _heads(k, n_kv)
    if hasattr(sa, "q_norm"):  # qwen3 normalises per head before rotary
        qh, kh = sa.q_norm(qh), sa.k_norm(kh)
    rot = getattr(model.base_model, "rotary_emb", None)
    if rot is not None:
        pos = torch.arange(seq).unsqueeze(0)
        cos, sin = rot(qh, pos)
        qh, kh = sys.modules[type(sa).__module__].apply_rotary_pos_emb(qh, kh, cos, sin)
    kh = kh.repeat_interleave(n_heads // n_kv, dim=1)
    scale = 1.0 if family == "opt" else getattr(sa, "scaling", None) or qh.shape[-1] ** -0.5
    if family == "opt":
        qh = qh * qh.shape[-1] ** -0.5
    scores = qh @ kh.transpose(-1, -2) * scale
    if family == "gemma2":
        cap = model.config.attn_logit_softcapping
        scores = torch.tanh(scores / cap) * cap
    if family != "bert":
        scores = scores.masked_fill(torch.ones(seq, seq, dtype=torch.bool).triu(1), float("-inf"))
    return scores.softmax(-1)


def reference(model, family: str, blk, x, probs) -> dict:
    """All components of one block, by hand; x is the block input, probs the model's attention."""
    cfg = model.config
    H, nh = cfg.hidden_size, cfg.num_attention_heads
    n_kv = getattr(cfg, "num_key_value_heads", None) or nh
    r = {"block_input": x}
    if family == "gpt2":
        sa, mlp = blk.attn, blk.mlp
        ai = blk.ln_1(x)
        r["query_output"], r["key_output"], r["value_output"] = _lin(sa.c_attn, ai).split(H, dim=-1)
    elif family == "gpt_neox":
        sa, mlp = blk.attention, blk.mlp
        ai = blk.input_layernorm(x)
        # Re-derived from GPTNeoXAttention.forward: view(..., heads, 3*head_dim).chunk(3).
        qkv = _lin(sa.query_key_value, ai).unflatten(-1, (nh, -1))
        r["query_output"], r["key_output"], r["value_output"] = (t.flatten(-2) for t in qkv.chunk(3, dim=-1))
    elif family == "bert":
        sa = blk.attention
        ai = x
        r.update(query_output=_lin(sa.self.query, ai), key_output=_lin(sa.self.key, ai),
                 value_output=_lin(sa.self.value, ai))
    else:
        sa = blk.self_attn
        ai = (blk.self_attn_layer_norm if family == "opt" else blk.input_layernorm)(x)
        if family == "phi3":  # Phi3Attention.forward slices [q | k | v] contiguously
            q_w, kv_w = sa.o_proj.in_features, n_kv * sa.head_dim
            r["query_output"], r["key_output"], r["value_output"] = _lin(sa.qkv_proj, ai).split(
                [q_w, kv_w, kv_w], dim=-1)
        else:
            r.update(query_output=_lin(sa.q_proj, ai), key_output=_lin(sa.k_proj, ai),
                     value_output=_lin(sa.v_proj, ai))
    r["attention_input"] = ai
    r["probs_by_hand"] = _probs(model, family, sa, r["query_output"], r["key_output"], nh, n_kv, x.shape[1])
    r["attention_value_output"] = ctx = _attend(probs, r["value_output"], n_kv)
    o = {"gpt2": lambda: sa.c_proj, "gpt_neox": lambda: sa.dense, "bert": lambda: sa.output.dense,
         "opt": lambda: sa.out_proj}.get(family, lambda: sa.o_proj)()
    r["attention_output"] = ao = _lin(o, ctx)

    if family == "bert":
        h = sa.output.LayerNorm(ao + x)
        r["mlp_input"] = h
        r["mlp_activation"] = act = F.gelu(_lin(blk.intermediate.dense, h))
        r["mlp_output"] = mo = _lin(blk.output.dense, act)
        r["block_output"] = blk.output.LayerNorm(mo + h)
        return r
    if family == "gemma2":
        h = x + blk.post_attention_layernorm(ao)
        mi = blk.pre_feedforward_layernorm(h)
    elif family == "gpt2":
        h, mi = x + ao, blk.ln_2(x + ao)
    elif family == "opt":
        h, mi = x + ao, blk.final_layer_norm(x + ao)
    elif family == "gpt_neox":  # parallel residual: the MLP reads the block input
        h, mi = x + ao, blk.post_attention_layernorm(x)
    else:
        h, mi = x + ao, blk.post_attention_layernorm(x + ao)
    r["mlp_input"] = mi
    if family == "gpt2":
        r["mlp_activation"] = act = F.gelu(_lin(mlp.c_fc, mi), approximate="tanh")
        r["mlp_output"] = mo = _lin(mlp.c_proj, act)
    elif family == "gpt_neox":
        r["mlp_activation"] = act = F.gelu(_lin(mlp.dense_h_to_4h, mi))
        r["mlp_output"] = mo = _lin(mlp.dense_4h_to_h, act)
    elif family == "opt":
        r["mlp_activation"] = act = F.relu(_lin(blk.fc1, mi))
        r["mlp_output"] = mo = _lin(blk.fc2, act)
    else:
        mlp = blk.mlp
        if family == "phi3":
            gate, up = _lin(mlp.gate_up_proj, mi).chunk(2, dim=-1)
        else:
            gate, up = _lin(mlp.gate_proj, mi), _lin(mlp.up_proj, mi)
        gelu = family in ("gemma2",) or cfg.model_type == "gemma"
        r["mlp_activation"] = act = F.gelu(gate, approximate="tanh") if gelu else F.silu(gate)
        r["down_proj_input"] = act * up
        r["mlp_output"] = mo = _lin(mlp.down_proj, act * up)
    if family == "gemma2":
        mo = blk.post_feedforward_layernorm(mo)
    r["block_output"] = h + mo
    return r


@functools.cache
def run(arch: str):
    """Hook every (layer, component) site, run one forward, return captures and references."""
    model = build(arch)
    family = ARCHS[arch][2]
    sites = {(L, c): resolve_site(model, L, c) for L in LAYERS for c in COMPONENTS}
    captured = {key: [] for key in sites}
    handles = [_hook(model.get_submodule(s.module_path), s.hook, captured[key]) for key, s in sites.items()]
    ids = torch.randint(3, 64, (2, 6), generator=torch.Generator().manual_seed(1))
    try:
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=torch.ones_like(ids),
                        output_hidden_states=True, output_attentions=True)
            _, layers = find_layers(model)
            refs = {L: reference(model, family, layers[L], out.hidden_states[L], out.attentions[L])
                    for L in LAYERS}
    finally:
        for h in handles:
            h.remove()
    return model, sites, captured, refs, out


def _close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


# ----------------------------------------------------------------------------- per-site tests

@pytest.mark.parametrize("component", COMPONENTS)
@pytest.mark.parametrize("layer", LAYERS)
@pytest.mark.parametrize("arch", list(ARCHS))
def test_site_matches_hand_reference(arch, layer, component):
    model, sites, captured, refs, _ = run(arch)
    site = sites[(layer, component)]
    assert isinstance(site, Site) and site.layer == layer and site.component == component
    assert len(captured[(layer, component)]) == 1, "module must run exactly once per forward"
    got = captured[(layer, component)][0]
    if site.fused is not None:
        assert site.fused.width == site.width
        got = site.fused.extract(got)
    assert got.shape[-1] == site.width
    ref = refs[layer][component]
    if arch == "opt" and component.startswith("mlp"):
        # OPTDecoderLayer flattens tokens to [batch*seq, hidden] around its MLP.
        assert got.dim() == 2
        got = got.view(ref.shape)
    _close(got, ref)


@pytest.mark.parametrize("layer", LAYERS)
@pytest.mark.parametrize("arch", list(ARCHS))
def test_references_agree_with_model(arch, layer):
    """The hand references rebuild the model: block output, hidden states and attention probabilities."""
    model, _, _, refs, out = run(arch)
    ref = refs[layer]
    # Eager attention runs its softmax in float32 even for a float64 model.
    torch.testing.assert_close(ref["probs_by_hand"], out.attentions[layer], rtol=1e-5, atol=1e-6)
    if layer + 1 < num_layers(model):  # the last hidden state may be post final-norm
        _close(ref["block_output"], out.hidden_states[layer + 1])
    # widths of GQA models: k/v narrower than q
    cfg = model.config
    if getattr(cfg, "num_key_value_heads", None) not in (None, cfg.num_attention_heads):
        assert run(arch)[1][(layer, "key_output")].width < run(arch)[1][(layer, "query_output")].width


@pytest.mark.parametrize("arch", list(ARCHS))
def test_meta_device_same_sites(arch):
    real, sites = run(arch)[0], run(arch)[1]
    meta = build(arch, meta=True)
    assert next(meta.parameters()).is_meta
    assert find_layers(meta)[0] == find_layers(real)[0]
    assert num_layers(meta) == 2 and hidden_size(meta) == 32
    for (layer, component), site in sites.items():
        assert resolve_site(meta, layer, component) == site


# ----------------------------------------------------------------------------- layers, errors

def test_negative_layer_is_normalised():
    model = run("llama")[0]
    site = resolve_site(model, -1, "block_output")
    assert site.layer == 1 and site == resolve_site(model, 1, "block_output")
    assert resolve_site(model, -2, "mlp_input").module_path == "model.layers.0.mlp"


@pytest.mark.parametrize("layer", [7, 2, -3])
def test_out_of_range_layer(layer):
    model = run("gpt2")[0]
    with pytest.raises(StructureError, match=rf"layer={layer} is out of range: this GPT2LMHeadModel "
                                             r"has 2 layers \(0\.\.1\)"):
        resolve_site(model, layer, "block_output")


def test_bad_layer_values():
    model = run("gpt2")[0]
    with pytest.raises(StructureError, match=r"layer='1' must be an int"):
        resolve_site(model, "1", "block_output")
    with pytest.raises(StructureError, match=r"layer=None is only allowed with a raw module path"):
        resolve_site(model, None, "block_output")


def test_unknown_component():
    with pytest.raises(StructureError, match=r"component='foo' is not known; choose one of block_input, "):
        resolve_site(run("llama")[0], 0, "foo")


def test_raw_path_with_layer_and_input_suffix():
    model, _, _, refs, _ = run("llama")
    site = resolve_site(model, -1, "model.layers.{layer}.mlp.down_proj:input")
    assert site == Site(1, "model.layers.{layer}.mlp.down_proj:input", "model.layers.1.mlp.down_proj", "input", 48)
    store: list = []
    handle = _hook(model.get_submodule(site.module_path), site.hook, store)
    try:
        with torch.no_grad():
            model(input_ids=torch.randint(3, 64, (2, 6), generator=torch.Generator().manual_seed(1)))
    finally:
        handle.remove()
    _close(store[0], refs[1]["down_proj_input"])


def test_raw_path_defaults_and_widths():
    model = run("gpt2")[0]
    s = resolve_site(model, 0, "transformer.h.{layer}.mlp.c_fc")  # Conv1D, default output
    assert (s.module_path, s.hook, s.width) == ("transformer.h.0.mlp.c_fc", "output", 48)
    assert resolve_site(model, 1, "transformer.h.{layer}.mlp.c_proj:input").width == 48
    s = resolve_site(model, None, "transformer.ln_f")
    assert (s.layer, s.module_path, s.hook, s.width) == (None, "transformer.ln_f", "output", 32)
    assert resolve_site(model, None, "transformer.wte").width == 32
    assert resolve_site(model, 0, "transformer.h.{layer}.attn:input").width == 32  # no features: hidden


def test_bad_raw_paths():
    model = run("llama")[0]
    with pytest.raises(StructureError, match=r"'model.layers.0.mlp.nope' does not exist; nearest existing "
                                             r"prefix is 'model.layers.0.mlp' \(LlamaMLP\).*gate_proj"):
        resolve_site(model, 0, "model.layers.{layer}.mlp.nope")
    with pytest.raises(StructureError, match=r"nearest existing prefix is '<root>'"):
        resolve_site(model, None, "decoder.layers")
    with pytest.raises(StructureError, match=r"contains '\{layer\}' but layer=None"):
        resolve_site(model, None, "model.layers.{layer}.mlp")
    with pytest.raises(StructureError, match=r"suffix ':inputs' must be ':input' or ':output'"):
        resolve_site(model, 0, "model.layers.{layer}.mlp:inputs")
    with pytest.raises(StructureError, match=r"layer=5 is out of range"):
        resolve_site(model, 5, "model.layers.{layer}.mlp")
    with pytest.raises(StructureError, match=r"token ids"):
        resolve_site(model, None, "model.embed_tokens:input")


def test_unavailable_fused_layout_is_a_clear_error():
    cfg = T.FalconConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4)
    with torch.device("meta"):
        model = T.AutoModelForCausalLM.from_config(cfg)
    with pytest.raises(StructureError, match=r"query_output is not available for FalconForCausalLM: "
                                             r".*query_key_value"):
        resolve_site(model, 0, "query_output")
    assert resolve_site(model, 0, "block_output").module_path == "transformer.h.0"


def test_find_layers_errors_and_no_config():
    with pytest.raises(StructureError, match=r"could not find the layer stack of Sequential"):
        find_layers(torch.nn.Sequential(torch.nn.Linear(2, 2)))
    # Without a config the longest homogeneous list of attention blocks is taken.
    model = run("gpt2")[0].transformer
    path, layers = find_layers(model)
    assert path == "h" and len(layers) == 2


# ----------------------------------------------------------------------------- FusedSlice

def test_fused_slice_round_trip_and_gradients():
    fs = FusedSlice(groups=4, group_width=24, start=8, stop=16)
    full = torch.randn(2, 3, 96, requires_grad=True)
    part = fs.extract(full)
    assert part.shape == (2, 3, 32) and fs.width == 32
    _close(part, full.unflatten(-1, (4, 24))[..., 8:16].flatten(-2))
    same = fs.insert(full, part)
    _close(same, full)
    assert same.data_ptr() != full.data_ptr()

    new = torch.randn(2, 3, 32, requires_grad=True)
    before = full.detach().clone()
    out = fs.insert(full, new)
    _close(full.detach(), before)  # out of place
    _close(fs.extract(out), new)
    mask = torch.zeros(4, 24, dtype=torch.bool)
    mask[:, 8:16] = True
    mask = mask.flatten()
    _close(out[..., ~mask], full[..., ~mask])
    (out * torch.arange(96.0)).sum().backward()
    _close(full.grad[..., mask], torch.zeros(2, 3, 32))  # replaced columns: no gradient to full
    _close(full.grad[..., ~mask], torch.arange(96.0)[~mask].expand(2, 3, -1))
    _close(new.grad, torch.arange(96.0)[mask].expand(2, 3, -1))
    with pytest.raises(StructureError, match=r"part.shape\[-1\]=5 must equal width=32"):
        fs.insert(full, torch.zeros(2, 3, 5))


def test_raw_path_on_a_plain_module_without_layer_stack():
    class Toy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = torch.nn.ModuleList([torch.nn.Linear(4, 6), torch.nn.Linear(6, 4)])

    toy = Toy()
    site = resolve_site(toy, 1, "blocks.{layer}:input")
    assert (site.layer, site.module_path, site.hook, site.width) == (1, "blocks.1", "input", 6)
    with pytest.raises(StructureError, match=r"layer=-1 must be a non-negative int: could not find the layer stack"):
        resolve_site(toy, -1, "blocks.{layer}")
    with pytest.raises(StructureError, match=r"could not find the layer stack of Toy"):
        resolve_site(toy, 0, "block_output")
