"""Issue 17, items 16-18: save folders are checked (hash, NaN/inf), pyreft keys never name a path, and a pyreft
save whose torch ``orthogonal`` map collapsed columns of R is reproduced exactly, zero columns included.

References: the weights written (hashes recomputed by hand), torch's own ``orthogonal`` parametrisation for R,
and pyreft's formulas written out for the edited states.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import tiny_llama
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn.utils.parametrizations import orthogonal

import reftkit
import reftkit.pyreft as rp
from reftkit.interventions import ConsReFT, InterventionError, LoReFT
from reftkit.pyreft_import import CollapsedColumnsWarning
from reftkit.serialization import CONFIG_NAME, WEIGHTS_NAME, file_sha256

PYREFT_GOLDENS = Path(__file__).parent / "goldens" / "pyreft"
CONFIG = [{"layer": 1, "component": "block_output", "positions": "l2", "intervention": "loreft",
           "low_rank_dimension": 2}]
IDS = torch.tensor([[5, 9, 14, 22, 7], [6, 10, 15, 23, 8]])


@pytest.fixture
def saved(tmp_path):
    reft = reftkit.get_reft_model(tiny_llama(), CONFIG).eval()
    with torch.no_grad():
        for p in reft.interventions.parameters():
            p.add_(0.2 * torch.randn_like(p))
        want = reft(input_ids=IDS).logits
    return reft.save_pretrained(tmp_path / "run"), want


def _config(path):
    return json.loads((path / CONFIG_NAME).read_text())


def _write_config(path, config):
    (path / CONFIG_NAME).write_text(json.dumps(config))


# -- item 16: integrity -----------------------------------------------------------------------------------

def test_save_records_the_weights_hash(saved):
    path, _ = saved
    assert _config(path)["weights_sha256"] == file_sha256(path / WEIGHTS_NAME)


def test_folder_without_hash_is_refused_unless_the_caller_opts_out(saved):
    path, want = saved
    config = _config(path)
    del config["weights_sha256"]
    _write_config(path, config)
    with pytest.raises(reftkit.LoadError, match=r"config\.json has no weights_sha256.*verify_weights=False"):
        reftkit.ReftModel.from_pretrained(tiny_llama(), path)
    loaded = reftkit.ReftModel.from_pretrained(tiny_llama(), path, verify_weights=False).eval()
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=IDS).logits, want)


def test_hash_mismatch_is_refused_unless_the_caller_opts_out(saved):
    path, _ = saved
    tensors = load_file(str(path / WEIGHTS_NAME))
    tensors["layer1_block_output.source.bias"] = tensors["layer1_block_output.source.bias"] + 1.0
    save_file(tensors, str(path / WEIGHTS_NAME))  # a valid file, edited after saving
    with pytest.raises(reftkit.LoadError, match=r"interventions\.safetensors: SHA-256 does not match.*"
                                                r"verify_weights=False"):
        reftkit.ReftModel.from_pretrained(tiny_llama(), path)
    loaded = reftkit.ReftModel.from_pretrained(tiny_llama(), path, verify_weights=False)
    assert torch.equal(loaded.interventions["layer1_block_output"].source.bias.detach(),
                       tensors["layer1_block_output.source.bias"])


def test_hash_of_the_wrong_type_is_refused(saved):
    path, _ = saved
    config = _config(path)
    config["weights_sha256"] = 12345
    _write_config(path, config)
    with pytest.raises(reftkit.LoadError, match="weights_sha256=12345 must be a hex string"):
        reftkit.ReftModel.from_pretrained(tiny_llama(), path)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("verify", [True, False])
def test_non_finite_weights_are_refused_by_name(saved, bad, verify):
    path, _ = saved
    tensors = load_file(str(path / WEIGHTS_NAME))
    tensors["layer1_block_output.rotation.raw"][3, 1] = bad
    save_file(tensors, str(path / WEIGHTS_NAME))
    config = _config(path)
    config["weights_sha256"] = file_sha256(path / WEIGHTS_NAME)  # a faithful hash: only the values are wrong
    _write_config(path, config)
    model = tiny_llama()
    with pytest.raises(reftkit.LoadError, match=r"interventions\.safetensors: tensor "
                                                r"'layer1_block_output\.rotation\.raw' holds (NaN|inf)"):
        reftkit.ReftModel.from_pretrained(model, path, verify_weights=verify)
    assert not any(m._forward_hooks for m in model.modules())


def _pyreft_copy(tmp_path, cls_name="ConsreftIntervention"):
    folder = tmp_path / cls_name
    shutil.copytree(PYREFT_GOLDENS / "llama" / cls_name, folder)
    return folder


def _pyreft_base():
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(PYREFT_GOLDENS / "llama" / "base", dtype=torch.float32).eval()


@pytest.mark.parametrize("tensor", ["learned_source", "rotate_layer.parametrizations.weight.0.base"])
def test_non_finite_pyreft_weights_are_refused_by_name(tmp_path, tensor):
    folder = _pyreft_copy(tmp_path)
    path = sorted(folder.glob("intkey_*.bin"))[1]
    state = torch.load(path, weights_only=True)
    state[tensor] = state[tensor].contiguous()
    state[tensor].view(-1)[0] = float("nan")
    torch.save(state, path)
    with pytest.raises(reftkit.LoadError, match=rf"{path.name}: tensor '{tensor}' holds NaN"):
        reftkit.ReftModel.from_pyreft(_pyreft_base(), folder)


def test_expert_library_and_classifier_folders_still_load(tmp_path):
    # other readers of save_pretrained folders: the classifier's, which reads the same files
    from reftkit.training.classifier import ReftForSequenceClassification
    clf = ReftForSequenceClassification(reftkit.get_reft_model(tiny_llama(), CONFIG), num_labels=3)
    clf.save_pretrained(tmp_path / "clf")
    again = ReftForSequenceClassification.from_pretrained(tiny_llama(), tmp_path / "clf")
    for (name, a), b in zip(clf.state_dict().items(), again.state_dict().values()):
        if not name.startswith("reft.model."):
            assert torch.equal(a, b), name


# -- item 17: pyreft keys are file names, never paths ---------------------------------------------------------

@pytest.mark.parametrize("key", ["sub/../../x", "/abs/x", "..\\..\\x", "a/b", "x\0y"])
def test_pyreft_key_with_a_path_is_refused_before_any_file_is_opened(tmp_path, monkeypatch, key):
    folder = _pyreft_copy(tmp_path)
    config = json.loads((folder / "config.json").read_text())
    real = sorted(folder.glob("intkey_*.bin"))[0]
    # a readable state where the path would lead, and the folders it passes through, so opening would succeed
    (folder / "intkey_sub").mkdir()
    shutil.copy(real, tmp_path / "x.bin")
    config["sorted_keys"][0] = key
    (folder / "config.json").write_text(json.dumps(config))
    opened = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda f, *a, **k: opened.append(str(f)) or real_load(f, *a, **k))
    model = _pyreft_base()
    with pytest.raises(reftkit.LoadError, match=r"sorted_keys\[0\]=.* contains a path separator"):
        reftkit.ReftModel.from_pyreft(model, folder)
    with pytest.raises(reftkit.LoadError, match=r"sorted_keys\[0\]=.* contains a path separator"):
        rp.ReftModel.load(folder, model)
    assert opened == []
    assert not any(m._forward_hooks for m in model.modules())


# -- item 18: collapsed columns of torch's orthogonal map --------------------------------------------------

D, R_RANK, KEY = 32, 5, "layer_1_comp_block_output_unit_pos_nunit_1#0"
#: original's diagonal after weight decay: int() reads -1, 0, 0, 1, 0 -> columns 1, 2 and 4 collapse
DIAGONAL = [-1.0, 0.97, -0.5, 1.25, -0.999]
COLLAPSED = [1, 2, 4]


class _LowRankRotateLayer(nn.Module):
    """pyreft 0.1.0's LowRankRotateLayer: a d x r weight, applied as ``x @ weight``."""

    def __init__(self, n: int, m: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n, m))
        nn.init.orthogonal_(self.weight)


def _torch_rotation(diagonal, seed=0):
    """torch's orthogonal parametrisation as pyreft builds it, with reflectors set as training would leave them
    and the diagonal of ``original`` set to ``diagonal``; returns the module (its ``weight`` is pyreft's R)."""
    torch.manual_seed(seed)
    layer = orthogonal(_LowRankRotateLayer(D, R_RANK))
    with torch.no_grad():
        original = layer.parametrizations.weight.original
        original.add_(0.3 * torch.randn_like(original).tril(-1))
        original.diagonal().copy_(torch.tensor(diagonal))
    return layer


def _write_pyreft_folder(folder, cls_name, layer, extra):
    """A pyreft 0.1.0 save folder (pyvene's config.json and one intkey file), as pyreft writes it."""
    folder.mkdir(parents=True, exist_ok=True)
    state = {f"rotate_layer.{k}": v.detach().clone() for k, v in layer.state_dict().items()}
    state |= {"embed_dim": torch.tensor(D), "interchange_dim": torch.tensor(D), **extra}
    torch.save(state, folder / f"intkey_{KEY}.bin")
    config = {"intervention_types": [f"<class 'pyreft.interventions.{cls_name}'>"],
              "representations": [[1, "block_output", "pos", 1, R_RANK] + [None] * 9],
              "sorted_keys": [KEY], "mode": "parallel", "intervention_dimensions": [D],
              "intervention_constant_sources": [True]}
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def _pyreft_formula(cls_name, h, R, extra):
    """pyreft 0.1.0's forwards (eval mode), written out with its own R."""
    if cls_name == "ConsreftIntervention":
        return h + (extra["learned_source"].double() - h @ R) @ R.T
    if cls_name == "LobireftIntervention":
        return h + (extra["learned_source"].double() @ R.T).expand_as(h)
    lin = h @ extra["learned_source.weight"].double().T + extra["learned_source.bias"].double()
    return h + lin @ R.T  # DireftIntervention


def _extra(cls_name):
    gen = torch.Generator().manual_seed(7)
    if cls_name == "DireftIntervention":
        return {"learned_source.weight": torch.randn(R_RANK, D, generator=gen),
                "learned_source.bias": torch.randn(R_RANK, generator=gen)}
    return {"learned_source": torch.randn(R_RANK, generator=gen)}


@pytest.mark.parametrize("cls_name", ["ConsreftIntervention", "DireftIntervention", "LobireftIntervention"])
def test_collapsed_columns_are_reproduced_and_reported(tmp_path, cls_name):
    layer, extra = _torch_rotation(DIAGONAL), _extra(cls_name)
    with torch.no_grad():
        R_torch = layer.weight.detach().double()
    # the premise: torch's map zeroes exactly these columns, the others stay orthonormal
    assert [j for j in range(R_RANK) if not R_torch[:, j].any()] == COLLAPSED
    folder = _write_pyreft_folder(tmp_path / cls_name, cls_name, layer, extra)
    with pytest.warns(CollapsedColumnsWarning, match=rf"intervention '{KEY}' has collapsed columns \[1, 2, 4\]"):
        reft = reftkit.ReftModel.from_pyreft(tiny_llama(), folder)
    reft.eval()
    iv = reft.interventions["layer1_block_output"]
    R = iv.rotation().detach().double()
    assert torch.equal(R[:, COLLAPSED], torch.zeros(D, len(COLLAPSED), dtype=torch.float64))
    torch.testing.assert_close(R, R_torch, atol=1e-6, rtol=0)
    h = torch.randn(6, D, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    want = _pyreft_formula(cls_name, h, R_torch, extra)
    with torch.no_grad():
        torch.testing.assert_close(iv(h.float()).double(), want, atol=1e-5, rtol=1e-5)
        # and the old import (a full orthonormal R) is measurably different: the test can fail
        full = torch.linalg.qr(iv.rotation.raw.double())[0]
        assert (_pyreft_formula(cls_name, h, full, extra) - want).abs().max() > 1e-2


def test_collapsed_columns_in_a_whole_model_call(tmp_path):
    cls_name = "ConsreftIntervention"
    layer, extra = _torch_rotation(DIAGONAL), _extra(cls_name)
    R_torch = layer.weight.detach()
    folder = _write_pyreft_folder(tmp_path / "f", cls_name, layer, extra)
    model = tiny_llama()
    with pytest.warns(CollapsedColumnsWarning):
        reft = reftkit.ReftModel.from_pyreft(model, folder, positions="l2").eval()
    with torch.no_grad():
        got = reft(input_ids=IDS).logits
    reft.detach()

    def pyreft_edit(module, args, output):  # pyreft's formula on the last two positions, by hand
        hidden = output[0] if isinstance(output, tuple) else output
        edited = hidden.clone()
        rows = hidden[:, -2:].double()
        edited[:, -2:] = _pyreft_formula(cls_name, rows, R_torch.double(), extra).to(hidden.dtype)
        return (edited, *output[1:]) if isinstance(output, tuple) else edited

    handle = model.model.layers[1].register_forward_hook(pyreft_edit)
    with torch.no_grad():
        want = model(input_ids=IDS).logits
    handle.remove()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_collapsed_columns_round_trip_through_reftkit_and_pyreft_saves(tmp_path):
    cls_name = "DireftIntervention"
    layer, extra = _torch_rotation(DIAGONAL), _extra(cls_name)
    folder = _write_pyreft_folder(tmp_path / "pyreft", cls_name, layer, extra)
    with pytest.warns(CollapsedColumnsWarning):
        reft = reftkit.ReftModel.from_pyreft(tiny_llama(), folder, positions="l1")
    iv = reft.interventions["layer1_block_output"]
    assert iv.config()["collapsed_columns"] == COLLAPSED
    reft.save_pretrained(tmp_path / "reftkit")
    assert _config(tmp_path / "reftkit")["interventions"][0]["arguments"]["collapsed_columns"] == COLLAPSED
    again = reftkit.ReftModel.from_pretrained(tiny_llama(), tmp_path / "reftkit")
    assert torch.equal(again.interventions["layer1_block_output"].rotation(), iv.rotation())
    # reftkit.pyreft reads the folder alike, and writes one whose torch map (in pyreft) has the same zeros
    with pytest.warns(CollapsedColumnsWarning):
        compat = rp.ReftModel.load(folder, tiny_llama())
    (compat_iv,) = compat.interventions.values()
    assert torch.equal(compat_iv.rotation(), iv.rotation())
    compat.save(tmp_path / "pyreft_again")
    state = torch.load(next((tmp_path / "pyreft_again").glob("intkey_*.bin")), weights_only=True)
    fresh = orthogonal(_LowRankRotateLayer(D, R_RANK))
    fresh.load_state_dict({k[len("rotate_layer."):]: v for k, v in state.items() if k.startswith("rotate_layer.")})
    with torch.no_grad():
        torch.testing.assert_close(fresh.weight, iv.rotation().detach(), atol=1e-6, rtol=0)
        assert torch.equal(fresh.weight[:, COLLAPSED], torch.zeros(D, len(COLLAPSED)))


def test_loreft_save_with_zero_columns_is_read_as_collapsed(tmp_path):
    # pyreft's LoReFT saves R itself; a column its map zeroed is stored as zeros
    folder = _pyreft_copy(tmp_path, "LoreftIntervention")
    path = sorted(folder.glob("intkey_*.bin"))[0]
    state = torch.load(path, weights_only=True)
    state["rotate_layer"][:, 2] = 0.0
    torch.save(state, path)
    with pytest.warns(CollapsedColumnsWarning, match=r"collapsed columns \[2\]"):
        reft = reftkit.ReftModel.from_pyreft(_pyreft_base(), folder)
    iv = next(iter(reft.interventions.values()))
    torch.testing.assert_close(iv.rotation(), state["rotate_layer"], atol=1e-6, rtol=0)
    assert torch.equal(iv.rotation()[:, 2], torch.zeros(D))


def test_no_collapse_no_warning_and_default_unchanged(tmp_path, recwarn):
    layer, extra = _torch_rotation([-1.0, -1.2, 1.0, -1.0, 1.9]), _extra("ConsreftIntervention")
    folder = _write_pyreft_folder(tmp_path / "f", "ConsreftIntervention", layer, extra)
    reft = reftkit.ReftModel.from_pyreft(tiny_llama(), folder)
    assert not [w for w in recwarn if issubclass(w.category, CollapsedColumnsWarning)]
    iv = reft.interventions["layer1_block_output"]
    assert "collapsed_columns" not in iv.config()
    torch.testing.assert_close(iv.rotation(), layer.weight.detach(), atol=1e-6, rtol=0)
    # the default map is the plain sign-fixed QR, bit for bit
    q, r = torch.linalg.qr(iv.rotation.raw.detach())
    assert torch.equal(iv.rotation().detach(), q * torch.where(r.diagonal() < 0, -1.0, 1.0))


def test_a_diagonal_that_scales_a_column_is_refused(tmp_path):
    layer = _torch_rotation([-1.0, 2.5, 1.0, -1.0, 1.0])
    folder = _write_pyreft_folder(tmp_path / "f", "LobireftIntervention", layer, _extra("LobireftIntervention"))
    with pytest.raises(reftkit.LoadError, match=r"original\[1, 1\]=2\.5 scales column 1 of R by 2"):
        reftkit.ReftModel.from_pyreft(tiny_llama(), folder)


@pytest.mark.parametrize("columns, why", [([4], r"contains 4"), ([1, 1], "repeats"), ("01", "list of column"),
                                          ([True], "contains True"), ([-1], "contains -1")])
def test_collapsed_columns_argument_is_checked(columns, why):
    with pytest.raises(InterventionError, match=why):
        LoReFT(embed_dim=D, low_rank_dimension=4, collapsed_columns=columns)
    with pytest.raises(reftkit.ConfigError):
        reftkit.ReftConfig([{"layer": 0, "component": "block_output", "intervention": "consreft",
                             "low_rank_dimension": 4, "collapsed_columns": columns}])


def test_collapsed_columns_argument_zeroes_those_columns():
    torch.manual_seed(0)
    iv = ConsReFT(embed_dim=D, low_rank_dimension=4, collapsed_columns=(3, 0))
    assert iv.config()["collapsed_columns"] == [0, 3]
    R = iv.rotation()
    q, r = torch.linalg.qr(iv.rotation.raw.detach())
    full = q * torch.where(r.diagonal() < 0, -1.0, 1.0)
    assert torch.equal(R[:, [0, 3]], torch.zeros(D, 2)) and torch.equal(R[:, [1, 2]], full[:, [1, 2]])
