"""Issue 17, items 5-10: configs refused at config or attach time with a ConfigError that names the field and
the value, the base model left exactly as it was when attach refuses; and the valid neighbours still work."""
from __future__ import annotations

import math
import typing

import pytest
import torch
from conftest import pad_batch, tiny_gpt2, tiny_llama
from torch import nn

import reftkit
from reftkit.interventions import InterventionError, NoReFT
from reftkit.interventions.registry import INTERVENTIONS
from reftkit.positions import MAX_POSITION_COUNT, PositionError, PositionSpec, parse_positions

BASE = {"layer": 1, "component": "block_output", "positions": "l1", "intervention": "loreft",
        "low_rank_dimension": 4}
SEQS = [[5, 9, 14, 3, 22, 8, 40], [7, 11, 19]]


# ----------------------------------------------------------------------------- the base model's state

def snapshot(model: nn.Module) -> dict:
    return {"params": {k: v.detach().clone() for k, v in model.state_dict().items()},
            "grad": {k: p.requires_grad for k, p in model.named_parameters()},
            "training": {k: m.training for k, m in model.named_modules()}}


def assert_unchanged(model: nn.Module, before: dict) -> None:
    after = model.state_dict()
    assert after.keys() == before["params"].keys()
    for k, v in before["params"].items():
        assert torch.equal(after[k], v), k
    assert {k: p.requires_grad for k, p in model.named_parameters()} == before["grad"]
    assert {k: m.training for k, m in model.named_modules()} == before["training"]
    hooked = [k for k, m in model.named_modules() if m._forward_hooks or m._forward_pre_hooks]
    assert hooked == []


def _prepared(model: nn.Module) -> nn.Module:
    """A base whose flags are not the defaults, so a refused attach that resets them shows."""
    model.train()
    model.get_submodule(next(n for n, m in model.named_modules() if isinstance(m, nn.Embedding))).eval()
    next(model.parameters()).requires_grad_(False)
    return model


def refused_at_attach(model: nn.Module, entry: dict, *needles: str) -> str:
    """Attach must raise ConfigError whose message holds every needle, leaving ``model`` untouched."""
    model = _prepared(model)
    before = snapshot(model)
    reftkit.ReftConfig(entry)  # the config alone is fine: only the model shows what is wrong
    with pytest.raises(reftkit.ConfigError) as info:
        reftkit.get_reft_model(model, entry)
    message = str(info.value)
    for needle in needles:
        assert needle in message, (needle, message)
    assert_unchanged(model, before)
    return message


def refused_at_config(entry: dict, *needles: str) -> str:
    with pytest.raises(reftkit.ConfigError) as info:
        reftkit.ReftConfig(entry)
    message = str(info.value)
    for needle in needles:
        assert needle in message, (needle, message)
    return message


# ----------------------------------------------------------------------------- 5. modules that never run

def _with_module_dict() -> nn.Module:
    model = tiny_llama()
    model.model.extras = nn.ModuleDict({"a": nn.Linear(32, 32)})
    return model


def _with_bare_container() -> nn.Module:
    model = tiny_llama()
    holder = nn.Module()
    holder.lin = nn.Linear(32, 32)
    model.model.holder = holder
    return model


@pytest.mark.parametrize("make, component, kind", [
    (tiny_llama, "model.layers", "ModuleList"),
    (tiny_llama, "model.layers:input", "ModuleList"),
    (tiny_gpt2, "transformer.h", "ModuleList"),
    (_with_module_dict, "model.extras", "ModuleDict"),
    (_with_bare_container, "model.holder:output", "Module"),
])
def test_container_module_path_is_refused_at_attach(make, component, kind):
    message = refused_at_attach(make(), {**BASE, "component": component},
                                "representations[0]", f"component={component!r}", f"is a {kind}")
    assert "never" in message


def test_container_found_by_a_named_component_is_refused():
    """A named component that resolves to a container (an MLP kept in a ModuleDict) is refused the same way."""
    model = tiny_llama()
    model.model.layers[1].mlp = nn.ModuleDict({"up": nn.Linear(32, 64), "down": nn.Linear(64, 32)})
    refused_at_attach(model, {**BASE, "component": "mlp_output"}, "representations[0]", "component='mlp_output'",
                      "model.layers.1.mlp", "ModuleDict")


def test_container_message_suggests_the_layer_placeholder():
    message = refused_at_attach(tiny_llama(), {**BASE, "component": "model.layers"}, "model.layers.{layer}")
    # and the suggestion works
    reft = reftkit.get_reft_model(tiny_llama(), {**BASE, "component": "model.layers.{layer}"})
    assert [s.site.module_path for s in reft._hooks.slots] == ["model.layers.1"], message


# ----------------------------------------------------------------------------- 6. "all" without {layer}

@pytest.mark.parametrize("layer", ["all", [0, 1], [0, -1]])
@pytest.mark.parametrize("component", ["model.norm", "model.layers.0.mlp", "model.embed_tokens:output"])
def test_many_layers_with_a_fixed_module_path_is_refused_at_config(layer, component):
    refused_at_config({**BASE, "layer": layer, "component": component},
                      f"representations[0].layer={layer!r}", f"representations[0].component={component!r}",
                      "{layer}")


def test_one_layer_with_a_fixed_module_path_still_works():
    reft = reftkit.get_reft_model(tiny_llama(), {**BASE, "layer": 0, "component": "model.norm"})
    assert [s.site.module_path for s in reft._hooks.slots] == ["model.norm"]


# ----------------------------------------------------------------------------- 7. one layer twice

@pytest.mark.parametrize("layer, twice", [([3, -1], 3), ([-4, 0], 0), ([1, 2, -2], 2), ([-3, 1], 1)])
@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
def test_a_layer_named_twice_through_a_negative_alias_is_refused(make, layer, twice):
    refused_at_attach(make(layers=4), {**BASE, "layer": layer}, f"representations[0].layer={layer!r}",
                      f"layer {twice} twice")


@pytest.mark.parametrize("layer", [[3, 3], [-1, -1]])
def test_a_layer_written_twice_is_refused_at_config(layer):
    refused_at_config({**BASE, "layer": layer}, f"representations[0].layer={layer!r}", "twice")


@pytest.mark.parametrize("layer, bad", [(-5, -5), ([-5], -5), ([0, -5], -5), ([-1, 4], 4), ([-4, -9], -9)])
def test_out_of_range_negative_layers_are_refused(layer, bad):
    refused_at_attach(tiny_llama(layers=4), {**BASE, "layer": layer}, "representations[0]", f"layer={bad}",
                      "out of range", "4 layers")


def test_a_raw_path_with_a_negative_alias_twice_is_refused():
    entry = {**BASE, "layer": [3, -1], "component": "model.layers.{layer}.mlp:input"}
    refused_at_attach(tiny_llama(layers=4), entry, "representations[0].layer=[3, -1]", "layer 3 twice")


# ----------------------------------------------------------------------------- 8. position counts

@pytest.mark.parametrize("positions", ["f1000000", "l99999999999999999999", f"f{MAX_POSITION_COUNT + 1}",
                                       "f5+l70000", "l" + "9" * 5000, "f0000000000000065537"])
def test_position_counts_beyond_the_cap_are_refused_at_config(positions):
    message = refused_at_config({**BASE, "positions": positions}, f"representations[0].positions={positions!r}",
                                str(MAX_POSITION_COUNT), "'all'")
    assert len(message) < 12_000


def test_the_cap_itself_is_allowed_and_positionspec_is_checked_too():
    assert parse_positions(f"f{MAX_POSITION_COUNT}") == PositionSpec(first=MAX_POSITION_COUNT)
    assert parse_positions("f0000007") == PositionSpec(first=7)
    reftkit.ReftConfig({**BASE, "positions": f"l{MAX_POSITION_COUNT}"})
    for bad in (MAX_POSITION_COUNT + 1, -1, 2.0, True):
        with pytest.raises(PositionError, match=rf"PositionSpec.first={bad!r}"):
            PositionSpec(first=bad)


@pytest.mark.parametrize("make, positions, bound", [
    (tiny_llama, "f129", "max_position_embeddings=128"),
    (tiny_llama, "l1000", "max_position_embeddings=128"),
    (tiny_llama, "f3+l129", "max_position_embeddings=128"),
    (tiny_gpt2, "f200", "=128"),  # GPT2Config answers to max_position_embeddings for its n_positions
    (tiny_gpt2, "l65536", "=128"),
])
def test_position_counts_beyond_the_model_are_refused_at_attach(make, positions, bound):
    refused_at_attach(make(), {**BASE, "positions": positions}, f"representations[0].positions={positions!r}",
                      bound)


def test_position_counts_up_to_the_model_bound_work():
    reft = reftkit.get_reft_model(tiny_llama(), {**BASE, "positions": "f128+l128"})
    ids, mask = pad_batch(SEQS, "left")
    with torch.no_grad():
        assert reft(input_ids=ids, attention_mask=mask).logits.shape == (2, 7, 101)


# ----------------------------------------------------------------------------- 9. typed arguments

@pytest.mark.parametrize("intervention, field, value", [
    ("noreft", "add_bias", "false"), ("noreft", "add_bias", "no"), ("nodireft", "add_bias", 0),
    ("noreft", "add_bias", None), ("noreft", "add_bias", 1.0),
    ("loreft", "dropout", "0.1"), ("loreft", "dropout", None), ("loreft", "dropout", -0.1),
    ("loreft", "dropout", 1.0), ("loreft", "dropout", float("nan")), ("loreft", "dropout", True),
    ("direft", "dropout", float("inf")), ("bottleneck_adapter", "dropout", 1.5),
    ("loreft", "low_rank_dimension", "4"), ("loreft", "low_rank_dimension", 4.0),
    ("loreft", "low_rank_dimension", True), ("loreft", "low_rank_dimension", 0),
    ("consreft", "low_rank_dimension", -2), ("loreft", "low_rank_dimension", None),
    ("ia3", "init_ia3_weights", "true"), ("addition", "trainable", "yes"), ("addition", "scale", "2"),
    ("noise", "seed", 1.5), ("rotated_space", "interchange_dim", True), ("loreft", "act_fn", 3),
    ("loreft", "act_fn", "swishy"), ("bottleneck_adapter", "scaling", "0.5"), ("noise", "scale", -1.0),
])
def test_mistyped_intervention_arguments_are_refused_at_config(intervention, field, value):
    refused_at_config({"layer": 1, "intervention": intervention, field: value}, f"representations[0].{field}={value!r}")


@pytest.mark.parametrize("field, value", [("share_weights", "no"), ("share_weights", 1), ("share_weights", "False"),
                                          ("source", True), ("source", "0")])
def test_mistyped_entry_fields_are_refused_at_config(field, value):
    refused_at_config({**BASE, "positions": "f1+l1", field: value}, f"representations[0].{field}={value!r}")


def _scalar_arguments() -> list[tuple[str, str, tuple]]:
    """(registry name, argument, allowed types) for every registered class's argument annotated with scalars only."""
    scalars = {bool, int, float, str, type(None)}
    found = []
    for name, cls in sorted(INTERVENTIONS.items()):
        for arg, hint in typing.get_type_hints(cls.__init__).items():
            options = typing.get_args(hint) if typing.get_origin(hint) is not None else (hint,)
            if arg not in ("embed_dim", "return") and set(options) <= scalars:
                found.append((name, arg, options))
    return found


SCALAR_ARGUMENTS = _scalar_arguments()


def test_the_catalogue_has_typed_flags_to_check():
    assert ("noreft", "add_bias", (bool,)) in SCALAR_ARGUMENTS
    assert sum(bool in options for _, _, options in SCALAR_ARGUMENTS) >= 10


@pytest.mark.parametrize("intervention, field, options", SCALAR_ARGUMENTS,
                         ids=[f"{n}.{a}" for n, a, _ in SCALAR_ARGUMENTS])
def test_every_scalar_argument_of_the_catalogue_refuses_the_wrong_type(intervention, field, options):
    """Driven by the annotations: a bool flag refuses "false" and 0, an int refuses True and "3", a float
    refuses "0.5"; a str argument refuses 3."""
    bad = []
    if bool in options:
        bad += ["false", 0]
    if int in options and bool not in options:
        bad += [True, "3"]
    if float in options:
        bad += [False] + ([] if str in options else ["0.5"])
    if str in options and not {int, float} & set(options):
        bad += [3]
    assert bad
    for value in bad:
        refused_at_config({"layer": 1, "intervention": intervention, field: value},
                          f"representations[0].{field}={value!r}", "must be")


def test_direct_construction_refuses_a_string_flag():
    with pytest.raises(InterventionError, match=r"add_bias='false' must be a bool"):
        NoReFT(add_bias="false")
    with pytest.raises(InterventionError, match=r"dropout='0\.1' must be a number in \[0, 1\)"):
        reftkit.interventions.LoReFT(dropout="0.1")


@pytest.mark.parametrize("change", [{"dropout": 0.0}, {"dropout": 0}, {"dropout": 0.999},
                                    {"intervention": "noreft", "add_bias": True},
                                    {"intervention": "noreft", "add_bias": False},
                                    {"low_rank_dimension": 1}, {"act_fn": None}, {"act_fn": "relu"},
                                    {"intervention": "bottleneck_adapter", "reduction_factor": 2},
                                    {"intervention": "noise", "seed": None, "scale": 0}])
def test_well_typed_arguments_still_work_and_round_trip(change):
    entry = {**BASE, **change}
    if entry["intervention"] in ("bottleneck_adapter", "noise"):
        entry.pop("low_rank_dimension")
    cfg = reftkit.ReftConfig(entry)
    assert reftkit.ReftConfig.from_json(cfg.to_json()) == cfg
    reft = reftkit.get_reft_model(tiny_llama(), cfg)
    ids, mask = pad_batch(SEQS, "right")
    with torch.no_grad():
        assert torch.isfinite(reft(input_ids=ids, attention_mask=mask).logits).all()


# ----------------------------------------------------------------------------- 10. untied without a split

@pytest.mark.parametrize("positions", ["l1", "f3", "all", None, "l7"])
def test_untied_weights_without_a_first_last_split_are_refused_at_config(positions):
    refused_at_config({**BASE, "positions": positions, "share_weights": False},
                      "representations[0].share_weights=False", f"representations[0].positions={positions!r}",
                      "f5+l5")


@pytest.mark.parametrize("positions, first, last", [("f5+l5", 5, 5), ("l2+f1", 1, 2)])
def test_untied_weights_with_a_split_give_two_interventions(positions, first, last):
    reft = reftkit.get_reft_model(tiny_llama(), {**BASE, "positions": positions, "share_weights": False})
    assert list(reft.interventions) == ["layer1_block_output_first", "layer1_block_output_last"]
    assert reft._specs == [PositionSpec(first=first), PositionSpec(last=last)]


# ----------------------------------------------------------------------------- valid neighbours together

def test_valid_neighbours_attach_and_run():
    model = tiny_llama(layers=4)
    reft = reftkit.get_reft_model(model, [
        {**BASE, "layer": [3, -2]},
        {**BASE, "layer": "all", "component": "model.layers.{layer}.mlp:output"},
        {**BASE, "layer": 0, "positions": "f5+l5", "share_weights": False, "dropout": 0.0},
        {**BASE, "layer": 2, "intervention": "noreft", "add_bias": True},
    ])
    keys = list(reft.interventions)
    assert keys[:2] == ["layer3_block_output", "layer2_block_output"]
    assert [s.site.module_path for s in reft._hooks.slots[2:6]] == [f"model.layers.{i}.mlp" for i in range(4)]
    assert keys[6:] == ["layer0_block_output_first", "layer0_block_output_last", "layer2_block_output_2"]
    ids, mask = pad_batch(SEQS, "right")
    out = reft(input_ids=ids, attention_mask=mask, labels=ids)
    assert math.isfinite(out.loss.item())
    out.loss.backward()
    assert all(p.grad is not None for p in reft.interventions.parameters())
