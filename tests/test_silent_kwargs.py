"""No silent differences between pyreft/pyvene and reftkit's own API (issue 15, item 2).

pyvene's call form given to a ``ReftModel`` (``unit_locations=``, a dict first, ...) used to flow into the
Hugging Face model's ``**kwargs`` and be ignored; a pyvene field in a config entry was reported as an
unknown intervention argument; a model without positions must refuse a call without locations.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import pad_batch, tiny_llama

import reftkit
from reftkit.call_inputs import PYVENE_CALL_ARGUMENTS
from reftkit.config import PYVENE_FIELDS

GOLDENS = Path(__file__).parent / "goldens" / "pyreft"

#: pyvene 0.1.8's IntervenableModel.forward and .generate parameters (read off intervenable_base.py)
PYVENE_FORWARD = ("base", "sources", "unit_locations", "source_representations", "subspaces", "labels",
                  "output_original_output", "return_dict", "use_cache", "intervention_additional_kwargs")
PYVENE_GENERATE = ("base", "sources", "unit_locations", "source_representations", "intervene_on_prompt",
                   "subspaces", "output_original_output", "intervention_additional_kwargs")
#: the ones reftkit takes with pyvene's meaning: its own per-call inputs, or the HF model's own arguments
SHARED = {"sources", "subspaces", "labels", "return_dict", "use_cache"}
#: a word of each replacement the message must carry
REPLACEMENT = {"base": "**inputs", "unit_locations": "intervention_locations=", "intervene_on_prompt": "prefill",
               "source_representations": "sources=", "activations_sources": "sources=",
               "output_original_output": "reft_model.model(**inputs)", "intervention_additional_kwargs": "tasks"}


def _reft(positions: str | None = "l1"):
    return reftkit.get_reft_model(tiny_llama(), [{"layer": 1, "component": "block_output", "positions": positions,
                                                  "intervention": "loreft", "low_rank_dimension": 2}])


def _batch():
    return pad_batch([[5, 6, 7, 8], [9, 10]], "right")


def test_the_table_covers_every_pyvene_only_argument():
    pyvene_only = (set(PYVENE_FORWARD) | set(PYVENE_GENERATE)) - SHARED
    assert pyvene_only <= set(PYVENE_CALL_ARGUMENTS)
    assert set(REPLACEMENT) == set(PYVENE_CALL_ARGUMENTS)


def test_the_listed_pyvene_signatures_are_pyvenes():
    """Where the golden-making venv exists, read pyvene 0.1.8's IntervenableModel signatures off its source."""
    import ast
    import glob
    found = glob.glob("/tmp/pyreft_golden_venv/lib/python3*/site-packages/pyvene/models/intervenable_base.py")
    if not found:
        pytest.skip("no pyvene source (bash tests/goldens/make_pyreft_goldens.sh makes the venv)")
    tree = ast.parse(Path(found[0]).read_text())
    (cls,) = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "IntervenableModel"]
    params = {f.name: tuple(a.arg for a in f.args.args[1:]) for f in cls.body if isinstance(f, ast.FunctionDef)}
    assert params["forward"] == PYVENE_FORWARD
    assert params["generate"] == PYVENE_GENERATE


@pytest.mark.parametrize("name", sorted(PYVENE_CALL_ARGUMENTS))
@pytest.mark.parametrize("call", ["forward", "generate", "collect", "intervening"])
def test_pyvene_only_keyword_raises_naming_the_replacement(name, call):
    reft = _reft()
    ids, mask = _batch()
    value = {"sources->base": (None, [[[1], [1]]])} if name == "unit_locations" else True
    kwargs = {"input_ids": ids, "attention_mask": mask, name: value}
    with pytest.raises(TypeError) as err:
        if call == "intervening":
            with reft.intervening(**kwargs):
                pass
        elif call == "generate":
            reft.generate(**kwargs, max_new_tokens=1)
        else:
            getattr(reft, call)(**kwargs)
    message = str(err.value)
    assert f"'{name}'" in message and REPLACEMENT[name] in message, message
    assert f"{call}()" in message


@pytest.mark.parametrize("call", ["forward", "generate", "collect"])
def test_a_dict_first_is_pyvenes_base_and_raises(call):
    reft = _reft()
    ids, mask = _batch()
    with pytest.raises(TypeError, match=rf"{call}\(\) got a dict as input_ids .*\*\*inputs"):
        getattr(reft, call)({"input_ids": ids, "attention_mask": mask},
                            unit_locations={"sources->base": (None, [[[1], [1]]])})


def test_the_replacement_does_what_unit_locations_meant():
    """pyvene's locations [K][B][P], converted as the message says, act where pyreft would: at the first
    token here, so the output differs from the config's default 'l1' and equals a hand-made mask."""
    reft = _reft()
    ids, mask = _batch()
    locs = [[[0], [0]]]  # K=1, B=2, P=1: the first token of each row
    with torch.no_grad():
        by_default = reft(input_ids=ids, attention_mask=mask).logits
        converted = reft(input_ids=ids, attention_mask=mask,
                         intervention_locations=torch.tensor(locs).permute(1, 0, 2)).logits
        bare = reft.model(input_ids=ids, attention_mask=mask).logits  # the hooks pass through outside a call
        iv = reft.interventions["layer1_block_output"]
        # reference: the edit at token 0 only, by a forward hook of its own (reft's hooks pass through here)
        handle = reft.model.model.layers[1].register_forward_hook(
            lambda m, a, out: _edit_first(out, iv))
        try:
            want = reft.model(input_ids=ids, attention_mask=mask).logits
        finally:
            handle.remove()
    assert not torch.allclose(converted, by_default, atol=1e-4)
    assert not torch.allclose(converted, bare, atol=1e-4)
    torch.testing.assert_close(converted, want, atol=1e-5, rtol=1e-5)


def _edit_first(out, iv):
    h = out[0] if isinstance(out, tuple) else out
    h = h.clone()
    h[:, 0] = iv(h[:, 0])
    return (h, *out[1:]) if isinstance(out, tuple) else h


@pytest.mark.parametrize("call", ["forward", "generate"])
def test_positions_none_without_locations_raises_naming_both_fixes(call):
    reft = _reft(positions=None)
    ids, mask = _batch()
    with pytest.raises(ValueError) as err:
        if call == "generate":
            reft.generate(input_ids=ids, attention_mask=mask, max_new_tokens=1)
        else:
            reft(input_ids=ids, attention_mask=mask)
    message = str(err.value)
    assert "['layer1_block_output']" in message and "positions=None" in message
    assert "intervention_locations=" in message and "from_pyreft(model, path, positions=" in message


@pytest.mark.parametrize("call", ["forward", "generate"])
def test_from_pyreft_without_positions_needs_locations(call):
    from transformers import AutoModelForCausalLM
    golden = GOLDENS / "llama" / "LoreftIntervention"
    base = AutoModelForCausalLM.from_pretrained(GOLDENS / "llama" / "base", dtype=torch.float32).eval()
    reft = reftkit.ReftModel.from_pyreft(base, golden)
    ids, mask = _batch()
    with pytest.raises(ValueError, match=r"layer0_block_output.*from_pyreft load without positions="):
        if call == "generate":
            reft.generate(input_ids=ids, attention_mask=mask, max_new_tokens=1)
        else:
            reft(input_ids=ids, attention_mask=mask)
    # and with locations it runs (the parity tests check the numbers)
    locs = torch.tensor([[[3], [1], [3]], [[1], [0], [1]]])
    with torch.no_grad():
        assert reft(input_ids=ids, attention_mask=mask, intervention_locations=locs).logits.shape[:2] == ids.shape


# -- config entries --------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, value", [("unit", "pos"), ("max_number_of_units", 1), ("group_key", 0),
                                         ("intervention_link_key", 0), ("subspace_partition", [[0, 2], [2, 4]]),
                                         ("moe_key", 1), ("intervention_type", "LoreftIntervention"),
                                         ("source_representation", [0.0]), ("latent_dim", 4)])
def test_pyvene_field_in_a_config_entry_raises(name, value):
    entry = {"layer": 1, "component": "block_output", "intervention": "loreft", "low_rank_dimension": 2,
             name: value}
    with pytest.raises(reftkit.ConfigError) as err:
        reftkit.ReftConfig([entry])
    message = str(err.value)
    assert f"representations[0].{name}=" in message and "pyvene" in message and "reftkit.pyreft" in message
    assert PYVENE_FIELDS[name] in message


def test_pyvene_field_beside_an_instance_raises_the_pyvene_error():
    from reftkit.interventions import LoreftIntervention
    entry = {"layer": 1, "component": "block_output", "unit": "pos",
             "intervention": LoreftIntervention(low_rank_dimension=2)}
    with pytest.raises(reftkit.ConfigError, match=r"representations\[0\]\.unit='pos' is a field of pyvene"):
        reftkit.ReftConfig([entry])


@pytest.mark.parametrize("component, fix", [("model.layers[1].output", "model.layers.1:output"),
                                            ("model.layers.1.output", "'model.layers.1:output'"),
                                            ("model.layers.{layer}.mlp.input", "'model.layers.{layer}.mlp:input'")])
def test_pyvene_module_path_in_a_config_raises(component, fix):
    with pytest.raises(reftkit.ConfigError) as err:
        reftkit.ReftConfig([{"layer": 1, "component": component, "low_rank_dimension": 2}])
    assert f"representations[0].component={component!r}" in str(err.value) and fix in str(err.value)
    assert "pyvene_component" in str(err.value)


def test_reftkit_module_path_is_pyvenes_bracket_path():
    """Control: the path the error asks for hooks what the named component does."""
    named = reftkit.ReftConfig([{"layer": 1, "component": "block_output", "low_rank_dimension": 2}])
    raw = reftkit.ReftConfig([{"layer": 1, "component": "model.layers.1:output", "low_rank_dimension": 2}])
    a, b = (reftkit.get_reft_model(tiny_llama(), cfg) for cfg in (named, raw))
    b.interventions["layer1_model_layers_1_output"].load_state_dict(a.interventions["layer1_block_output"].state_dict())
    ids, mask = _batch()
    with torch.no_grad():
        torch.testing.assert_close(a(input_ids=ids, attention_mask=mask).logits,
                                   b(input_ids=ids, attention_mask=mask).logits, atol=0, rtol=0)


def test_pyreft_style_entry_without_positions_gets_the_documented_default():
    rep = reftkit.ReftConfig([{"layer": 1, "component": "block_output", "low_rank_dimension": 2}]).representations[0]
    assert rep.positions == "l1"
    assert "l1" in reftkit.ReftConfig.__doc__
