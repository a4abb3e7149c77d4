"""Parity with pyreft 0.1.0: its save folders, imported with from_pyreft, reproduce its logits.

The goldens were written by pyreft itself (``bash tests/goldens/make_pyreft_goldens.sh``, which
installs pyreft 0.1.0 with transformers 4.45.1 in a throwaway venv); see tests/goldens/pyreft/README.md.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import reftkit
from reftkit.interventions import PYREFT_NAMES
from reftkit.pyreft_import import pyvene_component

GOLDENS = Path(__file__).parent / "goldens" / "pyreft"
CASES = [(arch, cls) for arch in ("llama", "gpt2") for cls in sorted(PYREFT_NAMES)]


def _base(arch):
    return AutoModelForCausalLM.from_pretrained(GOLDENS / arch / "base", dtype=torch.float32).eval()


@pytest.mark.parametrize("arch, cls_name", CASES)
@pytest.mark.parametrize("side", ["left", "right"])
def test_from_pyreft_reproduces_pyreft_logits(arch, cls_name, side):
    folder = GOLDENS / arch / cls_name
    golden = load_file(folder / "golden.safetensors")
    reft = reftkit.ReftModel.from_pyreft(_base(arch), folder).eval()
    assert all(type(iv) is PYREFT_NAMES[cls_name] for iv in reft.interventions.values())
    with torch.no_grad():
        logits = reft(input_ids=golden[f"{side}.input_ids"], attention_mask=golden[f"{side}.attention_mask"],
                      position_ids=golden[f"{side}.position_ids"],
                      intervention_locations=golden[f"{side}.unit_locations"]).logits
    real = golden[f"{side}.attention_mask"].bool()
    torch.testing.assert_close(logits[real], golden[f"{side}.logits"][real], atol=1e-5, rtol=1e-5)
    # and the interventions matter: the plain base model is far from pyreft's output
    base = load_file(GOLDENS / arch / "base_logits.safetensors")[f"{side}.logits"]
    assert (base[real] - golden[f"{side}.logits"][real]).abs().max() > 1e-3


@pytest.mark.parametrize("arch, cls_name", CASES)
def test_imported_weights_match_pyreft_materialised_weights(arch, cls_name):
    """Second oracle: the hand-written formula with the weights pyreft's forward used."""
    folder = GOLDENS / arch / cls_name
    weights = load_file(folder / "weights.safetensors")
    reft = reftkit.ReftModel.from_pyreft(_base(arch), folder).eval()
    torch.manual_seed(0)
    h = torch.randn(4, 32, dtype=torch.float64)
    for idx, iv in enumerate(reft.interventions.values()):
        w = {k.split(".", 1)[1]: v.double() for k, v in weights.items() if k.startswith(f"{idx}.")}
        if "R" in w:
            torch.testing.assert_close(iv.rotation().double(), w["R"], atol=1e-6, rtol=0)
        R = w.get("R")
        lin = (h @ w["W"].T + w["b"]) if "W" in w else None
        if cls_name == "LoreftIntervention":
            want = h + (lin - h @ R) @ R.T
        elif cls_name == "DireftIntervention":
            want = h + lin @ R.T
        elif cls_name == "NoreftIntervention":
            proj = h @ w["W2"].T + w.get("b2", 0)
            want = h + (lin - proj) @ w["W2"]
        elif cls_name == "NodireftIntervention":
            want = h + lin @ w["W2"]
        elif cls_name == "ConsreftIntervention":
            want = h + (w["b"] - h @ R) @ R.T
        else:
            want = h + (w["b"] @ R.T).expand_as(h)
        torch.testing.assert_close(iv(h.float()).double(), want, atol=1e-5, rtol=1e-5)


def test_positions_can_be_given_instead_of_locations():
    folder = GOLDENS / "llama" / "LoreftIntervention"
    golden = load_file(folder / "golden.safetensors")
    reft = reftkit.ReftModel.from_pyreft(_base("llama"), folder, positions="l2").eval()
    ids, mask = golden["right.input_ids"], golden["right.attention_mask"]
    with torch.no_grad():
        by_spec = reft(input_ids=ids, attention_mask=mask).logits
        lengths = mask.sum(1)
        locs = torch.stack([lengths - 2, lengths - 1], dim=1)
        by_locs = reft(input_ids=ids, attention_mask=mask, intervention_locations=locs).logits
    assert torch.equal(by_spec, by_locs)


def test_unreadable_pyreft_folder_errors(tmp_path):
    with pytest.raises(reftkit.LoadError, match="config.json is missing"):
        reftkit.ReftModel.from_pyreft(_base("llama"), tmp_path)
    src = GOLDENS / "llama" / "LoreftIntervention"
    (tmp_path / "config.json").write_text((src / "config.json").read_text())
    with pytest.raises(reftkit.LoadError, match=r"intkey_layer_0_comp_block_output_unit_pos_nunit_1#0\.bin is missing"):
        reftkit.ReftModel.from_pyreft(_base("llama"), tmp_path)
    import collections
    import pickle  # noqa: E401 - build a pickle that weights_only must refuse
    for f in src.glob("intkey_*.bin"):
        (tmp_path / f.name).write_bytes(pickle.dumps(collections.Counter(a=1)))
    with pytest.raises(reftkit.LoadError, match=r"could not be read safely \(weights_only=True\)"):
        reftkit.ReftModel.from_pyreft(_base("llama"), tmp_path)


# -- saves in the forms of pyreft's examples (tests/goldens/pyreft/styles, see its README section) ----------

STYLES = GOLDENS / "styles"
SUBLOREFT = {"SubloreftIntervention": "LoreftIntervention"}
#: case -> (from_pyreft keyword arguments, the ranks pyreft ran with)
STYLE_CASES = {
    "memorisation_consreft_r1": ({}, [1]),
    "composition_two_loreft": ({}, [2, 3]),
    "composition_subloreft": ({"classes": SUBLOREFT}, [8]),
    "bracket_paths": ({}, [4, 2]),
}


def _style(case):
    folder = STYLES / case
    kwargs, _ = STYLE_CASES[case]
    reft = reftkit.ReftModel.from_pyreft(_base("llama"), folder, **kwargs).eval()
    return reft, load_file(folder / "golden.safetensors")


def _run(reft, golden, **extra):
    call = {"subspaces": golden["subspaces"]} if "subspaces" in golden else {}
    with torch.no_grad():
        return reft(input_ids=golden["input_ids"], attention_mask=golden["attention_mask"],
                    intervention_locations=golden["unit_locations"], **(call | extra)).logits


@pytest.mark.parametrize("case", sorted(STYLE_CASES))
def test_from_pyreft_reproduces_pyreft_logits_for_example_style_saves(case):
    reft, golden = _style(case)
    logits = _run(reft, golden)
    real = golden["attention_mask"].bool()
    torch.testing.assert_close(logits[real], golden["logits"][real], atol=1e-5, rtol=1e-5)
    base = load_file(GOLDENS / "llama" / "base_logits.safetensors")
    assert torch.equal(base["right.input_ids"], golden["input_ids"])
    assert (base["right.logits"][real] - golden["logits"][real]).abs().max() > 1e-3


@pytest.mark.parametrize("case", sorted(STYLE_CASES))
def test_rank_is_read_off_the_tensors(case):
    import json
    saved = json.loads((STYLES / case / "config.json").read_text())["representations"]
    _, ranks = STYLE_CASES[case]
    assert None in [rep[4] for rep in saved]  # the case this covers: no flat low_rank_dimension
    reft, _ = _style(case)
    assert [iv.rank for iv in reft.interventions.values()] == ranks


def test_memorisation_save_is_one_rank_one_consreft():
    reft, _ = _style("memorisation_consreft_r1")
    (iv,) = reft.interventions.values()
    assert type(iv) is PYREFT_NAMES["ConsreftIntervention"] and iv.rotation().shape == (32, 1)


def test_composed_loreft_order_matters():
    """Two LoReFTs on one module at overlapping positions compose in list order, as pyvene runs them:
    the same two in the reversed order (each reading the other's output) are far from pyreft's logits."""
    reft, golden = _style("composition_two_loreft")
    last = golden["attention_mask"].sum(1) - 1  # both act on the last token of every row
    assert all(int(last[b]) in golden["unit_locations"][b, k].tolist() for b in range(3) for k in range(2))
    first, second = (reft.reft_config.representations[i].to_dict() for i in (0, 1))
    swapped = reftkit.get_reft_model(_base("llama"), [second, first]).eval()
    for key, iv in zip(swapped.interventions, reversed(list(reft.interventions.values()))):
        swapped.interventions[key].load_state_dict(iv.state_dict())
    real = golden["attention_mask"].bool()
    logits = _run(swapped, golden | {"unit_locations": golden["unit_locations"].flip(1)})
    assert (logits[real] - golden["logits"][real]).abs().max() > 1e-3


def test_subloreft_needs_a_class_mapping_and_its_subspaces():
    folder = STYLES / "composition_subloreft"
    with pytest.raises(reftkit.LoadError, match=r"__main__\.SubloreftIntervention.*classes=\{'SubloreftIntervention'"):
        reftkit.ReftModel.from_pyreft(_base("llama"), folder)
    with pytest.raises(reftkit.LoadError, match=r"classes\['SubloreftIntervention'\]='Nothing'"):
        reftkit.ReftModel.from_pyreft(_base("llama"), folder, classes={"SubloreftIntervention": "Nothing"})
    # the dotted name works as a key too
    reft = reftkit.ReftModel.from_pyreft(_base("llama"), folder,
                                         classes={"__main__.SubloreftIntervention": "LoreftIntervention"}).eval()
    golden = load_file(folder / "golden.safetensors")
    real = golden["attention_mask"].bool()
    # without subspaces the full rank acts: not what pyreft computed
    full = _run(reft, {k: v for k, v in golden.items() if k != "subspaces"})
    assert (full[real] - golden["logits"][real]).abs().max() > 1e-3
    # pyvene's [K][B][s] layout is refused (K=1 rows for a batch of 3), naming the swap
    with pytest.raises(ValueError, match=r"pyvene's \[K\]\[B\]\[s\]"):
        _run(reft, golden, subspaces=golden["subspaces"].permute(1, 0, 2).tolist())


def test_bracket_paths_hook_the_modules_pyvenes_names_do():
    reft, _ = _style("bracket_paths")
    sites = [(s.site.module_path, s.site.hook) for s in reft._hooks.slots]
    named = [reftkit.resolve_site(reft.model, 1, "block_output"), reftkit.resolve_site(reft.model, 0, "mlp_output")]
    assert sites == [(s.module_path, s.hook) for s in named]
    assert sites == [("model.layers.1", "output"), ("model.layers.0.mlp", "output")]
    assert [r.component for r in reft.reft_config.representations] == ["model.layers.1:output",
                                                                       "model.layers.0.mlp:output"]


@pytest.mark.parametrize("component, want", [
    ("block_output", "block_output"),
    ("mlp_output", "mlp_output"),
    ("model.layers[3].mlp.output", "model.layers.3.mlp:output"),
    ("model.layers[1].output", "model.layers.1:output"),
    ("roberta.encoder.layer[1].output", "roberta.encoder.layer.1:output"),
    ("transformer.h[10].attn.c_proj.input", "transformer.h.10.attn.c_proj:input"),
    ("model.layers.2.self_attn.o_proj.input", "model.layers.2.self_attn.o_proj:input"),  # pyvene's getattr('2')
    ("model.layers[ 2 ].input", "model.layers.2:input"),
    ("model.layers.1:output", "model.layers.1:output"),  # already reftkit's form
])
def test_pyvene_component_translates(component, want):
    assert pyvene_component(component) == want


@pytest.mark.parametrize("component, why", [
    ("model.layers[1]", "neither 'input' nor 'output'"),
    ("model.layers[1].mlp", "neither 'input' nor 'output'"),
    ("model.layers[-1].output", "counts from the end"),
    ("model.layers[x].output", "neither a name nor name\\[index\\]"),
    ("model.layers[1][2].output", "neither a name nor name\\[index\\]"),
    ("model.layers[1.output", "neither a name nor name\\[index\\]"),
    ("model.layers1].output", "neither a name nor name\\[index\\]"),
    ("model..output", "neither a name nor name\\[index\\]"),
    ("model.layers[1]:output", "neither 'input' nor 'output'"),
    ("", "non-empty"),
])
def test_malformed_pyvene_component_raises_naming_it(component, why):
    with pytest.raises(ValueError, match=why) as err:
        pyvene_component(component)
    assert repr(component) in str(err.value)


def test_malformed_component_in_a_save_is_a_load_error(tmp_path):
    import json
    import shutil
    src = STYLES / "bracket_paths"
    for f in src.iterdir():
        shutil.copy(f, tmp_path / f.name)
    config = json.loads((src / "config.json").read_text())
    config["representations"][0][1] = "model.layers[one].output"
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(reftkit.LoadError, match=r"representations\[0\]: component='model.layers\[one\].output'"):
        reftkit.ReftModel.from_pyreft(_base("llama"), tmp_path)
    config["representations"][0][1] = "model.layers[1].output"
    config["representations"][0][2] = "h.pos"
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(reftkit.LoadError, match=r"representations\[0\]: unit='h.pos'"):
        reftkit.ReftModel.from_pyreft(_base("llama"), tmp_path)
