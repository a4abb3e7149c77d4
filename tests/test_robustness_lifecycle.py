"""Issue 17, items 1-3: a failed load leaves the base model exactly as it was, several ReftModels on one base
restore its own flags whatever the detach order, and detach restores the base's own train/eval mode.

The reference is a snapshot of the base model taken before anything touches it: every parameter (bitwise),
every ``requires_grad`` flag, every module's forward and pre-forward hook dicts and ``training`` flag.
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from conftest import tiny_gpt2, tiny_llama
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import reftkit
import reftkit.pyreft as rp
from reftkit.serialization import CONFIG_NAME, WEIGHTS_NAME, file_sha256

PYREFT_GOLDENS = Path(__file__).parent / "goldens" / "pyreft"
CONFIG = [{"layer": 1, "component": "block_output", "positions": "l1", "intervention": "loreft",
           "low_rank_dimension": 2},
          {"layer": 2, "component": "mlp_output", "positions": "f1", "intervention": "consreft",
           "low_rank_dimension": 2}]


def _personalise(model):
    """Give the base its own non-default flags and modes, so restoring them is not the same as unfreezing
    everything or calling eval(): the embedding frozen, the rest trainable, training mode except one layer."""
    model.requires_grad_(True)
    model.get_input_embeddings().requires_grad_(False)
    model.train()
    model.model.layers[0].eval()
    return model


def snapshot(model):
    return {
        "params": {n: p.detach().clone() for n, p in model.named_parameters()},
        "flags": {n: p.requires_grad for n, p in model.named_parameters()},
        "training": {n: m.training for n, m in model.named_modules()},
        "hooks": {n: (dict(m._forward_hooks), dict(m._forward_pre_hooks)) for n, m in model.named_modules()},
    }


def assert_unchanged(model, before):
    after = snapshot(model)
    assert after["flags"] == before["flags"]
    assert after["training"] == before["training"]
    assert after["hooks"] == before["hooks"]
    assert set(after["params"]) == set(before["params"])
    for name, tensor in before["params"].items():
        assert torch.equal(after["params"][name], tensor), name


@pytest.fixture
def saved(tmp_path):
    reft = reftkit.get_reft_model(tiny_llama(), CONFIG)
    with torch.no_grad():
        for p in reft.interventions.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return reft.save_pretrained(tmp_path / "run")


def _edit_config(path, edit):
    config = json.loads((path / CONFIG_NAME).read_text())
    edit(config)
    (path / CONFIG_NAME).write_text(json.dumps(config))


def _rewrite_weights(path, edit):
    """Change the weights file and record its new hash, so only the change itself can be refused."""
    tensors = load_file(str(path / WEIGHTS_NAME))
    edit(tensors)
    save_file(tensors, str(path / WEIGHTS_NAME))
    _edit_config(path, lambda c: c.__setitem__("weights_sha256", file_sha256(path / WEIGHTS_NAME)))


# -- item 1: a failed from_pretrained leaves no trace ---------------------------------------------------------

def _set_rep(field, value):
    def edit(config):
        config["representations"][0][field] = value
    return edit


CONFIG_CORRUPTIONS = {
    "interventions [{}]": (lambda c: c.__setitem__("interventions", [{}]), r"interventions\[0\]\.key"),
    "interventions 5": (lambda c: c.__setitem__("interventions", 5), "interventions=5"),
    "interventions list of lists": (lambda c: c.__setitem__("interventions", [["layer1_block_output"]]),
                                    r"interventions\[0\]"),
    "interventions wrong key": (lambda c: c.__setitem__("interventions", [{"key": "bogus"}, {"key": "other"}]),
                                "bogus"),  # refused after the build: detach must undo the attach
    "representations 5": (lambda c: c.__setitem__("representations", 5), "representations"),
    "representation a list": (lambda c: c["representations"].__setitem__(0, [1, "block_output"]), ""),
    "layer the model lacks": (_set_rep("layer", 99), "99"),
    "unknown component": (_set_rep("component", "no_such_part"), "no_such_part"),
    "rank 0": (_set_rep("low_rank_dimension", 0), "low_rank_dimension"),
    "format_version missing": (lambda c: c.pop("format_version"), "format_version"),
}


@pytest.mark.parametrize("case", sorted(CONFIG_CORRUPTIONS))
def test_failed_from_pretrained_leaves_base_as_it_was(saved, case):
    edit, field = CONFIG_CORRUPTIONS[case]
    _edit_config(saved, edit)
    model = _personalise(tiny_llama())
    before = snapshot(model)
    with pytest.raises(reftkit.LoadError, match=r"config\.json") as err:
        reftkit.ReftModel.from_pretrained(model, saved)
    assert re.search(field, str(err.value))
    assert_unchanged(model, before)


def test_config_json_not_an_object_is_a_load_error(saved):
    (saved / CONFIG_NAME).write_text("[1, 2]")
    model = _personalise(tiny_llama())
    before = snapshot(model)
    with pytest.raises(reftkit.LoadError, match=r"config\.json: the top level must be a JSON object"):
        reftkit.ReftModel.from_pretrained(model, saved)
    assert_unchanged(model, before)


def test_tensor_refused_after_attach_leaves_base_as_it_was(saved):
    # a tensor of another shape is only found once the model is built and hooked: the load must detach
    _rewrite_weights(saved, lambda t: t.__setitem__("layer1_block_output.source.bias", torch.zeros(3)))
    model = _personalise(tiny_llama())
    before = snapshot(model)
    with pytest.raises(reftkit.LoadError, match=r"interventions\.safetensors: tensor 'layer1_block_output\.source"):
        reftkit.ReftModel.from_pretrained(model, saved)
    assert_unchanged(model, before)


def test_unexpected_exception_after_attach_becomes_a_load_error(saved, monkeypatch):
    import reftkit.serialization as serialization

    def boom(*args, **kwargs):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(serialization, "check_and_load", boom)
    model = _personalise(tiny_llama())
    before = snapshot(model)
    with pytest.raises(reftkit.LoadError, match=r"config\.json: RuntimeError: disk on fire"):
        reftkit.ReftModel.from_pretrained(model, saved)
    assert_unchanged(model, before)


def test_failed_attach_itself_leaves_base_as_it_was(monkeypatch):
    # an exception while hooks are being registered (after some are) is undone by the constructor
    from reftkit.hooks import HookManager
    real_attach = HookManager.attach

    def attach_then_fail(self):
        real_attach(self)
        raise RuntimeError("late failure")

    monkeypatch.setattr(HookManager, "attach", attach_then_fail)
    model = _personalise(tiny_llama())
    before = snapshot(model)
    with pytest.raises(RuntimeError, match="late failure"):
        reftkit.get_reft_model(model, CONFIG)
    assert_unchanged(model, before)


def _pyreft_copy(tmp_path, cls_name="ConsreftIntervention"):
    folder = tmp_path / cls_name
    shutil.copytree(PYREFT_GOLDENS / "llama" / cls_name, folder)
    return folder


def _pyreft_base():
    return _personalise(AutoModelForCausalLM.from_pretrained(PYREFT_GOLDENS / "llama" / "base", dtype=torch.float32))


def _edit_first_state(folder, edit):
    path = sorted(folder.glob("intkey_*.bin"))[0]
    state = torch.load(path, weights_only=True)
    torch.save(edit(state), path)
    return path


PYREFT_CORRUPTIONS = {
    "missing tensor": (lambda s: {k: v for k, v in s.items() if k != "learned_source"}, "'learned_source'"),
    "bare tensor": (lambda s: torch.zeros(4), "holds a Tensor"),
    "rank that does not fit": (lambda s: s | {"learned_source": torch.zeros(7)}, "learned_source"),
    "1-d basis": (lambda s: s | {"rotate_layer.parametrizations.weight.original": torch.zeros(32)}, "original"),
    "non-tensor entry": (lambda s: s | {"learned_source": [1.0, 2.0]}, "'learned_source'"),
}


@pytest.mark.parametrize("case", sorted(PYREFT_CORRUPTIONS))
def test_failed_from_pyreft_leaves_base_as_it_was(tmp_path, case):
    edit, field = PYREFT_CORRUPTIONS[case]
    folder = _pyreft_copy(tmp_path)
    path = _edit_first_state(folder, edit)
    model = _pyreft_base()
    before = snapshot(model)
    with pytest.raises(reftkit.LoadError) as err:
        reftkit.ReftModel.from_pyreft(model, folder)
    assert path.name in str(err.value) and field in str(err.value)
    assert_unchanged(model, before)


def test_pyreft_loreft_basis_of_another_shape_names_the_file_and_pyrefts_tensor(tmp_path):
    """R read from LoReFT's ``rotate_layer`` with an extra row: the error names the intkey file and pyreft's own
    tensor name, not reftkit's internal one (found by the fuzz suite)."""
    folder = _pyreft_copy(tmp_path, "LoreftIntervention")
    path = _edit_first_state(folder, lambda s: s | {"rotate_layer": torch.cat([s["rotate_layer"],
                                                                               s["rotate_layer"][:1]])})
    model = _pyreft_base()
    before = snapshot(model)
    with pytest.raises(reftkit.LoadError) as err:
        reftkit.ReftModel.from_pyreft(model, folder)
    message = str(err.value)
    assert path.name in message and "'rotate_layer'" in message and "rotation.raw" not in message, message
    assert_unchanged(model, before)


@pytest.mark.parametrize("edit, field", [
    (lambda c: c["representations"][0].__setitem__(0, 99), "99"),  # a layer the model lacks
    (lambda c: c.__setitem__("representations", 5), "representations=5"),
    (lambda c: c["representations"].__setitem__(0, 5), r"representations[0]=5"),
    (lambda c: c.__setitem__("sorted_keys", {"a": 1}), "sorted_keys"),
])
def test_failed_from_pyreft_config_leaves_base_as_it_was(tmp_path, edit, field):
    folder = _pyreft_copy(tmp_path)
    config = json.loads((folder / "config.json").read_text())
    edit(config)
    (folder / "config.json").write_text(json.dumps(config))
    model = _pyreft_base()
    before = snapshot(model)
    with pytest.raises(reftkit.LoadError, match=r"config\.json") as err:
        reftkit.ReftModel.from_pyreft(model, folder)
    assert field in str(err.value)
    assert_unchanged(model, before)


def test_unexpected_exception_in_pyreft_install_becomes_a_load_error(tmp_path, monkeypatch):
    import reftkit.pyreft_import as pyreft_import

    def boom(*args, **kwargs):
        raise KeyError("surprise")

    monkeypatch.setattr(pyreft_import, "install_pyreft_weights", boom)
    model = _pyreft_base()
    before = snapshot(model)
    with pytest.raises(reftkit.LoadError, match=r"config\.json: KeyError: 'surprise'"):
        reftkit.ReftModel.from_pyreft(model, _pyreft_copy(tmp_path))
    assert_unchanged(model, before)


def test_failed_pyreft_compat_load_keeps_the_base_mode(tmp_path):
    # reftkit.pyreft's ReftModel puts the base in eval mode as pyvene does; a failed load must undo that too
    folder = _pyreft_copy(tmp_path)
    _edit_first_state(folder, lambda s: s | {"learned_source": torch.zeros(7)})
    model = _pyreft_base()
    before = snapshot(model)
    with pytest.raises(reftkit.LoadError, match="learned_source"):
        rp.ReftModel.load(folder, model)
    assert_unchanged(model, before)


# -- item 2: several ReftModels on one base ---------------------------------------------------------------

@pytest.mark.parametrize("order", ["first_attached_first", "last_attached_first"])
def test_two_reft_models_on_one_base_restore_its_own_flags(order):
    model = _personalise(tiny_llama())
    before = snapshot(model)
    assert any(before["flags"].values()) and not all(before["flags"].values())
    a = reftkit.get_reft_model(model, CONFIG[:1])
    b = reftkit.get_reft_model(model, CONFIG[1:])
    assert not any(p.requires_grad for p in model.parameters())
    first, second = (a, b) if order == "first_attached_first" else (b, a)
    first.detach()
    # the other is still attached: the base stays frozen and keeps that one's hooks
    assert not any(p.requires_grad for p in model.parameters())
    assert sum(len(m._forward_hooks) for m in model.modules()) == 1
    second.detach()
    assert_unchanged(model, before)


def test_three_reft_models_and_a_failed_one_in_between():
    model = _personalise(tiny_llama())
    before = snapshot(model)
    a = reftkit.get_reft_model(model, CONFIG[:1])
    with pytest.raises(reftkit.ConfigError):
        reftkit.get_reft_model(model, [{"layer": 99, "component": "block_output", "intervention": "loreft"}])
    # the failed attach neither unfroze the base nor took over its record
    assert not any(p.requires_grad for p in model.parameters())
    b = reftkit.get_reft_model(model, CONFIG[1:])
    a.detach()
    assert not any(p.requires_grad for p in model.parameters())  # b is still attached
    c = reftkit.get_reft_model(model, CONFIG)
    b.detach()
    assert not any(p.requires_grad for p in model.parameters())
    c.detach()
    assert_unchanged(model, before)
    # and a fresh cycle records the flags as they are now
    model.lm_head.requires_grad_(False)
    again = snapshot(model)
    reftkit.get_reft_model(model, CONFIG).detach()
    assert_unchanged(model, again)


# -- item 3: detach restores the base's own train/eval mode ------------------------------------------------

@pytest.mark.parametrize("switch", ["train", "eval"])
def test_detach_restores_the_base_mode(switch):
    model = _personalise(tiny_llama())
    before = snapshot(model)
    reft = reftkit.get_reft_model(model, CONFIG)
    getattr(reft, switch)()
    assert all(m.training == (switch == "train") for m in model.modules())
    reft.detach()
    assert_unchanged(model, before)


def test_detached_eval_base_has_dropout_off_again():
    # GPT-2 has dropout (0.1): after reft.train() and detach, an eval-mode base must be deterministic again
    model = tiny_gpt2()
    ids = torch.tensor([[5, 9, 14, 22, 7, 3]])
    with torch.no_grad():
        want = model(input_ids=ids).logits
    reft = reftkit.get_reft_model(model, CONFIG[:1])
    reft.train()
    reft.detach()
    assert not model.training
    with torch.no_grad():
        torch.manual_seed(1)
        first = model(input_ids=ids).logits
        torch.manual_seed(2)
        second = model(input_ids=ids).logits
    assert torch.equal(first, want) and torch.equal(second, want)
