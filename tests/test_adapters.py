"""Bottleneck adapters (Houlsby, Pfeiffer) and AdapterFusion: parity with ``adapters`` 1.3, formulas,
save/load, placement and argument errors.

The goldens were written by adapters itself (``bash tests/goldens/make_adapters_goldens.sh``, which
installs adapters 1.3.0 with transformers 4.57.6 in a throwaway venv): tiny random BERT and Llama
base weights, every case's adapter/fusion tensors under adapters' own state-dict names, right-padded
inputs and adapters' outputs. Here the same base weights are loaded into transformers 5.x, the
adapter tensors mapped into reftkit interventions, and the outputs compared on real tokens.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_gpt2
from safetensors.torch import load_file
from torch.nn import functional as F
from transformers import BertConfig, BertModel, LlamaConfig, LlamaModel

import reftkit
from reftkit.config import ConfigError
from reftkit.interventions import AdapterFusion, BottleneckAdapter, InterventionError, get_intervention_class
from reftkit.interventions.adapter_placement import (
    bottleneck_representations,
    fusion_regularization_loss,
    fusion_representations,
    houlsby_representations,
    pfeiffer_representations,
)

GOLDENS = Path(__file__).parent / "goldens" / "adapters"
MANIFEST = json.loads((GOLDENS / "manifest.json").read_text())
TOL = 1e-5
CASES = [(arch, case) for arch in ("bert", "llama") for case in sorted(MANIFEST["cases"][arch])]


# ----------------------------------------------------------------------------- helpers

def _base(arch: str):
    kwargs = MANIFEST["model_configs"][arch]
    if arch == "bert":
        cfg = BertConfig(**kwargs)
        cfg._attn_implementation = "eager"
        model = BertModel(cfg, add_pooling_layer=False)
    else:
        cfg = LlamaConfig(**kwargs)
        cfg._attn_implementation = "eager"
        model = LlamaModel(cfg)
    state = load_file(GOLDENS / arch / "base.safetensors")
    missing, unexpected = model.load_state_dict(state, strict=False)
    buffers = {name for name, _ in model.named_buffers()}
    assert not unexpected and set(missing) <= buffers, (missing, unexpected)
    return model.eval()


def _golden(arch: str):
    return load_file(GOLDENS / arch / "golden.safetensors")


def _run(model, golden):
    with torch.no_grad():
        return model(input_ids=golden["input_ids"], attention_mask=golden["attention_mask"]).last_hidden_state


def _location_prefix(arch: str, layer: int, component: str) -> str:
    """Where adapters 1.3 keeps the BottleneckLayer for this reftkit site."""
    attention = "attention" in component
    if arch == "bert":
        return f"encoder.layer.{layer}.attention.output." if attention else f"encoder.layer.{layer}.output."
    return f"layers.{layer}.attention_adapters." if attention else f"layers.{layer}.output_adapters."


def _adapter_state(tensors: dict, prefix: str) -> dict:
    """adapters' ``Adapter`` tensors under ``prefix`` renamed to BottleneckAdapter's."""
    sub = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    out = {}
    linear = [k for k, v in sub.items() if k.startswith("adapter_down.") and k.endswith(".weight") and v.dim() == 2]
    assert len(linear) == 1, sorted(sub)
    out["down.weight"] = sub[linear[0]]
    out["down.bias"] = sub[linear[0][:-len("weight")] + "bias"]
    out["up.weight"], out["up.bias"] = sub["adapter_up.weight"], sub["adapter_up.bias"]
    for theirs, ours in (("adapter_norm_before", "norm_before"), ("adapter_norm_after", "norm_after")):
        if f"{theirs}.weight" in sub:
            out[f"{ours}.weight"], out[f"{ours}.bias"] = sub[f"{theirs}.weight"], sub[f"{theirs}.bias"]
    if "scaling" in sub:
        out["scale"] = sub["scaling"]
    return out


def _load_adapter(iv: BottleneckAdapter, tensors: dict, prefix: str) -> None:
    state = _adapter_state(tensors, prefix)
    state.update({k: v for k, v in iv.state_dict().items() if k.startswith("original_ln_")})
    iv.load_state_dict(state, strict=True)


def _representations(model, config: dict) -> list:
    """reftkit entries for one adapters ``BnConfig`` (as its ``to_dict()``)."""
    assert config["residual_before_ln"] is True and config["original_ln_after"] is True
    assert not config["is_parallel"] and not config["use_gating"] and not config["phm_layer"]
    n = model.config.num_hidden_layers
    return bottleneck_representations(
        model, mh_adapter=config["mh_adapter"], output_adapter=config["output_adapter"],
        original_ln_before=config["original_ln_before"],
        layers=[i for i in range(n) if i not in config["leave_out"]],
        reduction_factor=config["reduction_factor"], non_linearity=config["non_linearity"],
        scaling=config["scaling"], ln_before=config["ln_before"], ln_after=config["ln_after"],
        adapter_residual_before_ln=config["adapter_residual_before_ln"])


def _fusion_kwargs(config: dict) -> dict:
    assert not config["temperature"]
    return {k: bool(config[k]) for k in ("query", "key", "value", "value_before_softmax", "value_initialized",
                                         "residual_before")}


def _build(arch: str, case: str, model=None):
    """A ReftModel equal to adapters' model for this golden case."""
    meta = MANIFEST["cases"][arch][case]
    tensors = load_file(GOLDENS / arch / f"{case}.safetensors")
    model = model if model is not None else _base(arch)
    refts = []
    for name in meta["order"]:
        reft = reftkit.get_reft_model(model, _representations(model, meta["adapters"][name]))
        for slot in reft._hooks.slots:
            prefix = _location_prefix(arch, slot.site.layer, slot.site.component) + f"adapters.{name}."
            _load_adapter(slot.intervention, tensors, prefix)
        refts.append(reft)
    if meta["fusion_name"] is None:
        return refts[0]
    for reft in refts:
        reft.detach()
    reft = reftkit.get_reft_model(model, fusion_representations(refts, **_fusion_kwargs(meta["fusion_config"])))
    for slot in reft._hooks.slots:
        prefix = _location_prefix(arch, slot.site.layer, slot.site.component)
        fusion = slot.intervention
        with torch.no_grad():
            for part in ("query", "key", "value"):
                for kind in ("weight", "bias"):
                    key = f"{prefix}adapter_fusion_layer.{meta['fusion_name']}.{part}.{kind}"
                    if key in tensors:
                        getattr(fusion, part).get_parameter(kind).copy_(tensors[key])
            for child, name in zip(fusion.adapters, meta["order"]):  # from_adapters copied these already
                for k, v in _adapter_state(tensors, f"{prefix}adapters.{name}.").items():
                    assert torch.equal(child.state_dict()[k], v), (slot.key, name, k)
    return reft


# ----------------------------------------------------------------------------- golden parity

@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_base_model_matches_the_golden_base(arch):
    golden = _golden(arch)
    real = golden["attention_mask"].bool()
    diff = (_run(_base(arch), golden) - golden["base"])[real].abs().max()
    assert diff <= TOL


@pytest.mark.parametrize("arch, case", CASES)
def test_parity_with_adapters_goldens(arch, case):
    golden = _golden(arch)
    reft = _build(arch, case).eval()
    out = _run(reft, golden)
    real = golden["attention_mask"].bool()
    diff = float((out - golden[case])[real].abs().max())
    assert diff <= TOL, f"{arch}/{case}: max |reftkit - adapters| = {diff:.3g}"
    # the adapters matter: the base output is far from adapters' output
    assert (golden["base"] - golden[case])[real].abs().max() > 0.05
    meta = MANIFEST["cases"][arch][case]
    kinds = {type(iv) for iv in reft.interventions.values()}
    assert kinds == ({AdapterFusion} if meta["fusion_name"] else {BottleneckAdapter})


def test_goldens_cover_both_placements_and_fusion():
    for arch in ("bert", "llama"):
        cases = MANIFEST["cases"][arch]
        assert {"houlsby", "pfeiffer", "fusion_pfeiffer", "fusion_houlsby"} <= set(cases)
    assert MANIFEST["versions"]["adapters"].startswith("1.3")


# ----------------------------------------------------------------------------- placements

def test_placements_on_bert_and_llama():
    bert, llama = _base("bert"), _base("llama")
    h = houlsby_representations(bert)
    assert [e["component"] for e in h] == ["encoder.layer.{layer}.attention.output.dropout:output",
                                            "encoder.layer.{layer}.output.dropout:output"]
    assert all(e["positions"] == "all" and e["layer"] == [0, 1] for e in h)
    p = pfeiffer_representations(bert)
    assert [e["component"] for e in p] == ["encoder.layer.{layer}.output.LayerNorm:input"] * 2
    assert [e["layer"] for e in p] == [0, 1]
    for entry, layer in zip(p, (0, 1)):
        iv = entry["intervention"]
        norm = bert.encoder.layer[layer].output.LayerNorm
        assert iv.hparams["original_ln_before"] and iv.hparams["non_linearity"] == "relu"
        assert torch.equal(iv.original_ln_weight, norm.weight) and torch.equal(iv.original_ln_bias, norm.bias)
    assert [e["component"] for e in houlsby_representations(llama)] == ["attention_output", "mlp_output"]
    p = pfeiffer_representations(llama, layers=[1])
    assert [(e["component"], e["layer"]) for e in p] == [("block_output", [1])]
    assert "original_ln_before" not in p[0]  # a pre-LN model passes no LayerNorm to the adapter
    with pytest.raises(InterventionError, match="mid-block residual"):
        bottleneck_representations(llama, mh_adapter=True, output_adapter=False, original_ln_before=True)
    with pytest.raises(InterventionError, match="layers"):
        houlsby_representations(llama, layers=[5])


# ----------------------------------------------------------------------------- formulas

def _lin(layer, x):
    return x @ layer.weight.T.double() + (layer.bias.double() if layer.bias is not None else 0)


def test_bottleneck_formula():
    torch.manual_seed(0)
    iv = BottleneckAdapter(12, reduction_factor=4, non_linearity="relu", init_weights="houlsby")
    with torch.no_grad():
        for p in iv.parameters():
            p.normal_()
    h = torch.randn(2, 3, 12)
    want = h.double() + _lin(iv.up, torch.relu(_lin(iv.down, h.double())))
    torch.testing.assert_close(iv(h).double(), want, atol=1e-5, rtol=1e-5)
    assert iv.down.out_features == 3 and BottleneckAdapter(10, reduction_factor=16).down.out_features == 1
    assert BottleneckAdapter(12, bottleneck_dim=5).down.out_features == 5


def test_bottleneck_with_original_layer_norm_ln_after_and_scaling():
    torch.manual_seed(1)
    d = 8
    norm = torch.nn.LayerNorm(d, eps=1e-5)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    iv = BottleneckAdapter(d, reduction_factor=2, non_linearity="tanh", scaling="channel", ln_after=True,
                           original_ln_before=True, original_ln_eps=1e-5)
    with pytest.raises(InterventionError, match="set_original_layer_norm"):
        iv(torch.randn(1, 2, d))
    iv.set_original_layer_norm(norm)
    with torch.no_grad():
        for p in iv.parameters():
            p.normal_()
    z = torch.randn(3, 4, d)
    a = norm(z)
    up = iv.up(torch.tanh(iv.down(a))) * iv.scale
    want = z + F.layer_norm(up, (d,), iv.norm_after.weight, iv.norm_after.bias)
    torch.testing.assert_close(iv(z), want)
    # adapter_residual_before_ln: the new LayerNorm sees h + edit
    iv2 = BottleneckAdapter(d, reduction_factor=2, ln_after=True, adapter_residual_before_ln=True, scaling=0.5)
    edit = iv2.up(F.silu(iv2.down(z))) * 0.5
    torch.testing.assert_close(iv2(z), iv2.norm_after(z + edit))
    with pytest.raises(InterventionError, match="original_ln_eps"):
        BottleneckAdapter(d, original_ln_before=True, original_ln_eps=1e-12).set_original_layer_norm(norm)


def test_fusion_formula_against_a_loop():
    torch.manual_seed(2)
    d = 8
    children = [{"reduction_factor": 2}, {"reduction_factor": 4, "non_linearity": "relu"},
                {"bottleneck_dim": 3, "scaling": "learned"}]
    for residual_before, value_before_softmax in ((False, True), (True, False)):
        fu = AdapterFusion(d, adapters=children, residual_before=residual_before,
                           value_before_softmax=value_before_softmax, temperature=2.0)
        with torch.no_grad():
            for p in fu.parameters():
                p.normal_(0, 0.5)
        h = torch.randn(2, 5, d, dtype=torch.float64)
        for b in range(2):
            for t in range(5):
                x = h[b, t]
                ups = [_lin(ad.up, {0: F.silu, 1: torch.relu, 2: F.silu}[i](_lin(ad.down, x)))
                       * (ad.scale.double() if i == 2 else 1.0) for i, ad in enumerate(fu.adapters)]
                if residual_before:
                    ups = [u + x for u in ups]
                q = _lin(fu.query, x)
                scores = torch.stack([q @ _lin(fu.key, u) for u in ups])
                p = torch.softmax(scores / 2.0, 0)
                if value_before_softmax:
                    c = sum(pi * (fu.value.weight.double() @ u) for pi, u in zip(p, ups))
                else:
                    c = fu.value.weight.double() @ sum(pi * u for pi, u in zip(p, ups))
                want = c if residual_before else x + c
                torch.testing.assert_close(fu(h)[b, t].double(), want, atol=1e-5, rtol=1e-5)
                torch.testing.assert_close(fu.attention(h)[b, t].double(), p, atol=1e-6, rtol=1e-6)


def test_fusion_init_freezing_and_regularisation():
    fu = AdapterFusion(6, adapters=[{"reduction_factor": 2}, {"reduction_factor": 3}])
    assert torch.allclose(fu.value.weight, torch.eye(6), atol=1e-6)  # value_initialized
    assert not any(p.requires_grad for p in fu.adapters.parameters())
    assert all(p.requires_grad for n, p in fu.named_parameters() if not n.startswith("adapters."))
    assert AdapterFusion(6, adapters=[{}], train_adapters=True).adapters[0].up.weight.requires_grad
    # value_initialized: W_V = I + 1e-6 off the diagonal, so 0.01 · 30 · 1e-12
    assert fu.regularization_loss().item() == pytest.approx(3e-13, rel=1e-3)
    static = AdapterFusion(6, adapters=[{}, {}], value=False, value_initialized=False)
    assert static.value is None and float(static.regularization_loss()) == 0.0
    # gradients reach the fusion, not the frozen adapters
    h = torch.randn(2, 3, 6)
    fu(h).sum().backward()
    assert fu.query.weight.grad is not None and fu.adapters[0].up.weight.grad is None


def test_fusion_regularisation_by_hand():
    """adapters' get_fusion_regularization_loss: 0.01 · ||I − W_V||_F², summed over the fusion layers."""
    fu = AdapterFusion(3, adapters=[{"bottleneck_dim": 1}, {"bottleneck_dim": 1}])
    with torch.no_grad():
        fu.value.weight.copy_(torch.tensor([[1.0, 0.5, 0.0], [0.0, 1.0, 0.0], [0.0, -2.0, 3.0]]))
    loss = fu.regularization_loss()
    # I − W_V has the entries −0.5, 2, −2 off the identity: 0.25 + 4 + 4 = 8.25
    assert loss.item() == pytest.approx(0.0825, rel=1e-6)
    loss.backward()
    # d/dW_V of 0.01 · ||I − W_V||² is 0.02 · (W_V − I)
    want = [[0.0, 0.01, 0.0], [0.0, 0.0, 0.0], [0.0, -0.04, 0.04]]
    assert fu.value.weight.grad.tolist() == [pytest.approx(row, abs=1e-7) for row in want]
    # a ReftModel's four fusion layers (two layers × attention and MLP), W_V = I + c·E_01 with c = 1, 2, 3, 4:
    # 0.01 · (1 + 4 + 9 + 16)
    model = _base("llama")
    a = reftkit.get_reft_model(model, houlsby_representations(model, reduction_factor=4))
    a.detach()
    reft = reftkit.get_reft_model(model, fusion_representations([a, a]))
    fusions = list(reft.interventions.values())
    assert len(fusions) == 4
    with torch.no_grad():
        for c, fusion in enumerate(fusions, start=1):
            fusion.value.weight.copy_(torch.eye(fusion.value.weight.shape[0]))
            fusion.value.weight[0, 1] = float(c)
    assert fusion_regularization_loss(reft).item() == pytest.approx(0.30, rel=1e-6)
    reft.detach()


# truncated N(0, 0.01²) at ±2σ has sd 0.01 · sqrt(1 − 4φ(2) / (2Φ(2) − 1)) and 28.48% of its draws beyond 1σ
_HOULSBY_SD = 0.01 * 0.8796256610
_HOULSBY_BEYOND_1SD = 0.2847672280


def test_houlsby_init_is_near_identity():
    """Houlsby et al. 2019, §2.1: "a near-identity initialization" — both projections drawn from a zero-mean
    Gaussian with standard deviation 1e-2 truncated to two standard deviations (adapters' "houlsby"),
    biases 0, so the adapter's output starts within a small fraction of its input."""
    d = 768
    torch.manual_seed(0)
    iv = BottleneckAdapter(d, reduction_factor=16, init_weights="houlsby")
    m = iv.down.out_features
    assert m == 48
    for lin in (iv.down, iv.up):
        w = lin.weight.detach().double()
        assert float(w.abs().max()) <= 0.02  # truncated at 2σ
        assert float(w.std()) == pytest.approx(_HOULSBY_SD, rel=0.03)  # 36,864 draws: the sd is within ~0.5%
        assert float(w.mean()) == pytest.approx(0.0, abs=3e-4)
        assert float((w.abs() > 0.01).double().mean()) == pytest.approx(_HOULSBY_BEYOND_1SD, abs=0.015)
        assert not lin.bias.detach().any()
    # output ≈ input. With swish(x) ≈ x/2 near 0, the edit is ≈ W_up W_down h / 2, whose expected squared norm is
    # d·m·sd⁴·||h||² / 4: the relative edit is sqrt(d·m)·sd² / 2 ≈ 0.0074 — near, but not exactly, the identity
    h = torch.randn(4, 6, d)
    with torch.no_grad():
        relative = float((iv(h) - h).norm() / h.norm())
    assert relative == pytest.approx((d * m) ** 0.5 * _HOULSBY_SD ** 2 / 2, rel=0.15)
    # negative control: the same adapter with nn.Linear's default (Kaiming-uniform) init is far from the identity
    with torch.no_grad():
        for lin in (iv.down, iv.up):
            lin.reset_parameters()
        assert float((iv(h) - h).norm() / h.norm()) > 0.1
    # in a model: Houlsby adapters at init leave a Llama's hidden states within 0.1% (relative)
    model = _base("llama")
    golden = _golden("llama")
    base = _run(model, golden)
    reft = reftkit.get_reft_model(model, houlsby_representations(model, reduction_factor=4, init_weights="houlsby"))
    adapted = _run(reft, golden)
    reft.detach()
    change = float((adapted - base).norm() / base.norm())
    assert 0 < change < 1e-3


def test_dtype_round_trip_and_float32_weights():
    iv = BottleneckAdapter(16, reduction_factor=4)
    h = torch.randn(2, 3, 16).to(torch.bfloat16)
    out = iv(h)
    assert out.dtype == torch.bfloat16 and iv.up.weight.dtype == torch.float32
    fu = AdapterFusion(16, adapters=[{}, {}])
    assert fu(h).dtype == torch.bfloat16


# ----------------------------------------------------------------------------- ReftModel integration

def test_save_load_round_trip_keeps_layer_norm_copies_and_fusion(tmp_path):
    golden = _golden("bert")
    for case in ("pfeiffer", "fusion_pfeiffer"):
        reft = _build("bert", case).eval()
        want = _run(reft, golden)
        reft.save_pretrained(tmp_path / case)
        reft.detach()
        loaded = reftkit.ReftModel.from_pretrained(_base("bert"), tmp_path / case).eval()
        assert list(loaded.interventions) == list(reft.interventions)
        torch.testing.assert_close(_run(loaded, golden), want, atol=0, rtol=0)
        config = json.loads((tmp_path / case / "config.json").read_text())
        assert config["representations"][0]["intervention"] in ("bottleneck_adapter", "adapter_fusion")


def test_fusion_model_trains_only_the_fusion():
    model = _base("llama")
    a = reftkit.get_reft_model(model, houlsby_representations(model, reduction_factor=4))
    a.detach()
    b = reftkit.get_reft_model(model, houlsby_representations(model, reduction_factor=8, non_linearity="relu"))
    b.detach()
    reft = reftkit.get_reft_model(model, fusion_representations([a, b]))
    counts = reft.parameter_counts()
    d = model.config.hidden_size
    per_site = 2 * (d * d + d) + d * d
    assert counts["trainable"] == per_site * 4 and "trainable model params: 0" in reft.print_trainable_parameters()
    golden = _golden("llama")
    out = reft(input_ids=golden["input_ids"], attention_mask=golden["attention_mask"]).last_hidden_state
    (out.pow(2).mean() + fusion_regularization_loss(reft)).backward()
    fusion = next(iter(reft.interventions.values()))
    assert fusion.key.weight.grad is not None and fusion.adapters[0].down.weight.grad is None


def test_registry_and_config_names():
    assert get_intervention_class("bottleneck_adapter") is BottleneckAdapter
    assert get_intervention_class("Adapter") is BottleneckAdapter
    assert get_intervention_class("BertFusion") is AdapterFusion
    cfg = reftkit.ReftConfig([{"layer": 0, "component": "mlp_output", "positions": "all",
                               "intervention": "adapter_fusion", "adapters": [{"reduction_factor": 4}, {}]}])
    assert reftkit.ReftConfig.from_json(cfg.to_json()) == cfg


# ----------------------------------------------------------------------------- bad arguments

@pytest.mark.parametrize("kwargs, field", [
    ({"reduction_factor": 0}, "reduction_factor"),
    ({"reduction_factor": True}, "reduction_factor"),
    ({"bottleneck_dim": 0}, "bottleneck_dim"),
    ({"non_linearity": "nope"}, "non_linearity"),
    ({"scaling": "weird"}, "scaling"),
    ({"dropout": 1.5}, "dropout"),
    ({"ln_after": "yes"}, "ln_after"),
    ({"init_weights": "xavier"}, "init_weights"),
    ({"original_ln_eps": 0}, "original_ln_eps"),
    ({"original_ln_before": True, "ln_after": True, "adapter_residual_before_ln": True}, "adapter_residual_before_ln"),
])
def test_bottleneck_bad_arguments_name_the_field(kwargs, field):
    with pytest.raises(InterventionError, match=field):
        BottleneckAdapter(**kwargs)


@pytest.mark.parametrize("kwargs, field", [
    ({"adapters": []}, "adapters"),
    ({"adapters": {"reduction_factor": 4}}, "adapters"),
    ({"adapters": [{}, {"reduction_factor": -1}]}, r"adapters\[1\].*reduction_factor"),
    ({"adapters": [{"bogus": 1}]}, r"adapters\[0\]"),
    ({"adapters": [{"original_ln_before": True}]}, r"adapters\[0\].original_ln_before"),
    ({"adapters": [{}], "temperature": 0}, "temperature"),
    ({"adapters": [{}], "query": 1}, "query"),
    ({"adapters": [{}], "residual_before": True, "original_ln_before": True}, "residual_before"),
])
def test_fusion_bad_arguments_name_the_field(kwargs, field):
    with pytest.raises(InterventionError, match=field):
        AdapterFusion(**kwargs)


def test_bad_arguments_through_config_and_helpers():
    with pytest.raises(ConfigError, match="non_linearity"):
        reftkit.ReftConfig([{"layer": 0, "component": "mlp_output", "intervention": "bottleneck_adapter",
                             "non_linearity": "nope"}])
    model = _base("llama")
    with pytest.raises(InterventionError, match="bogus"):
        houlsby_representations(model, bogus=1)
    with pytest.raises(InterventionError, match="original_ln_before"):
        houlsby_representations(model, original_ln_before=True)
    with pytest.raises(InterventionError, match="reft_models"):
        fusion_representations([])
    a = reftkit.get_reft_model(model, houlsby_representations(model))
    a.detach()
    b = reftkit.get_reft_model(model, pfeiffer_representations(model))
    b.detach()
    with pytest.raises(InterventionError, match=r"reft_models\[1\]"):
        fusion_representations([a, b])
    with pytest.raises(InterventionError, match="materialised"):
        AdapterFusion.from_adapters([BottleneckAdapter()])


def test_other_architectures():
    from transformers import DistilBertConfig, DistilBertModel

    gpt2 = tiny_gpt2()
    assert [e["component"] for e in houlsby_representations(gpt2)] == ["attention_output", "mlp_output"]
    assert [e["component"] for e in pfeiffer_representations(gpt2)] == ["block_output"]
    reft = reftkit.get_reft_model(gpt2, houlsby_representations(gpt2, reduction_factor=4))
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        for iv in reft.interventions.values():
            iv.up.weight.normal_()
        edited = reft(input_ids=ids).logits
        base = reft.detach()(input_ids=ids).logits
    assert (edited - base).abs().max() > 1e-3
    distil = DistilBertModel(DistilBertConfig(vocab_size=50, dim=16, hidden_dim=32, n_layers=1, n_heads=2))
    with pytest.raises(InterventionError, match="distilbert"):
        pfeiffer_representations(distil)


def test_meta_device_bert_counts_parameters():
    cfg = BertConfig(**MANIFEST["model_configs"]["bert"])
    with torch.device("meta"):
        model = BertModel(cfg, add_pooling_layer=False)
    reft = reftkit.get_reft_model(model, pfeiffer_representations(model, reduction_factor=4))
    d = cfg.hidden_size
    assert reft.parameter_counts()["trainable"] == 2 * (d * 4 + 4 + 4 * d + d)


def test_fusion_dropout_follows_the_model_config():
    model = _base("bert")
    a = reftkit.get_reft_model(model, houlsby_representations(model))
    a.detach()
    fused = fusion_representations([a, a])
    assert fused[0]["intervention"].hparams["dropout"] == model.config.attention_probs_dropout_prob
    assert fusion_representations([a, a], dropout=0.0)[0]["intervention"].hparams["dropout"] == 0.0
