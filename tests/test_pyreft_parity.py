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
