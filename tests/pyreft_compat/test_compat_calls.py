"""reftkit.pyreft's model surface against hand-written references: pyvene's location and subspace forms, the
three generation modes, pyvene's keys and instances, the bookkeeping methods, and the save folder both ways."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
from conftest import tiny_llama

import reftkit
import reftkit.pyreft as pyreft

IDS = torch.tensor([[5, 9, 3, 7, 11, 2], [4, 8, 6, 1, 12, 10]])
MASK = torch.ones_like(IDS)


def build(intervention=pyreft.LoreftIntervention, layers=(1,), seed=0):
    model = tiny_llama(seed)
    torch.manual_seed(seed + 1)
    config = pyreft.ReftConfig(representations=[
        {"layer": layer, "component": "block_output", "low_rank_dimension": 2,
         "intervention": intervention(embed_dim=model.config.hidden_size, low_rank_dimension=2)}
        for layer in layers])
    reft = pyreft.get_reft_model(model, config)
    with torch.no_grad():
        for p in reft.interventions.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return reft


def hand_logits(reft, ids, edit_positions):
    """The bare model with a hook that applies each intervention to its rows, one row at a time."""
    model = reft.model
    handles = []
    for k, (key, iv) in enumerate(reft.interventions.items()):
        layer = reft.pyreft_config.representations[k].layer

        def hook(module, args, out, iv=iv, k=k):
            h = out[0] if isinstance(out, tuple) else out
            for b in range(h.shape[0]):
                for p in edit_positions(k, b, h.shape[1]):
                    h = h.index_put((torch.tensor([b]), torch.tensor([p])), iv(h[b, p][None, None])[0])
            return (h, *out[1:]) if isinstance(out, tuple) else h
        handles.append(model.model.layers[layer].register_forward_hook(hook))
    try:
        with torch.no_grad():
            return model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits
    finally:
        for handle in handles:
            handle.remove()


@pytest.mark.parametrize("unit_locations, positions", [
    ({"sources->base": (None, [[[2, 5], [0, 3]], [[1], [4]]])}, lambda k, b, n: [[[2, 5], [0, 3]], [[1], [4]]][k][b]),
    ({"base": 3}, lambda k, b, n: [3]),
    ({"sources->base": 4}, lambda k, b, n: [4]),
    ({"sources->base": (None, 2)}, lambda k, b, n: [2]),
    ({"base": [1, 5]}, lambda k, b, n: [1, 5]),
    (None, lambda k, b, n: list(range(n))),  # pyvene: no locations, every position
    # pyreft's padding repeats a position: edited once
    ({"sources->base": (None, [[[3, 3, 3], [1, 1, 2]], [[0], [5]]])},
     lambda k, b, n: [[[3], [1, 2]], [[0], [5]]][k][b]),
])
def test_pyvene_location_forms_equal_a_hand_written_hook(unit_locations, positions):
    reft = build(layers=(0, 2))
    with torch.no_grad():
        original, out = reft({"input_ids": IDS, "attention_mask": MASK}, unit_locations=unit_locations)
    assert original is None
    torch.testing.assert_close(out.logits, hand_logits(reft, IDS, positions), atol=1e-5, rtol=1e-5)


def test_original_output_and_return_dict():
    reft = build()
    with torch.no_grad():
        result = reft({"input_ids": IDS, "attention_mask": MASK}, unit_locations={"base": 3},
                      output_original_output=True, return_dict=True)
        bare = reft.model(input_ids=IDS, attention_mask=MASK).logits
    torch.testing.assert_close(result.original_outputs.logits, bare)
    assert (result.intervened_outputs.logits - bare).abs().max() > 1e-3


def _greedy_by_hand(reft, prompt, steps, edit):
    """Greedy decoding by recomputing the whole sequence, the hook editing ``edit(position, prompt_len)``."""
    ids = prompt.clone()
    n = prompt.shape[1]
    for _ in range(steps):
        logits = hand_logits(reft, ids, lambda k, b, length: [p for p in range(length) if edit(p, n)])
        ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids


@pytest.mark.parametrize("mode", ["prompt_at_locations", "prompt_and_new_tokens", "new_tokens_only"])
def test_generation_modes_equal_pyvene_semantics(mode):
    """pyvene: intervene_on_prompt=True edits the prompt at unit_locations (and, with no locations, every
    position and every new token); False edits each generated token only."""
    reft = build(seed=4)
    prompt = IDS[:1]
    kwargs = {"max_new_tokens": 6, "min_new_tokens": 6, "do_sample": False}
    if mode == "prompt_at_locations":
        _, got = reft.generate({"input_ids": prompt, "attention_mask": MASK[:1]},
                               unit_locations={"sources->base": (None, [[[4]]])}, intervene_on_prompt=True, **kwargs)
        want = _greedy_by_hand(reft, prompt, 6, lambda p, n: p == 4)
    elif mode == "prompt_and_new_tokens":
        _, got = reft.generate({"input_ids": prompt, "attention_mask": MASK[:1]}, intervene_on_prompt=True, **kwargs)
        want = _greedy_by_hand(reft, prompt, 6, lambda p, n: True)
    else:
        _, got = reft.generate({"input_ids": prompt, "attention_mask": MASK[:1]}, **kwargs)
        want = _greedy_by_hand(reft, prompt, 6, lambda p, n: p >= n)
    assert got.tolist() == want.tolist()
    bare = reft.model.generate(input_ids=prompt, attention_mask=MASK[:1], **kwargs)
    assert got.tolist() != bare.tolist(), "the interventions must change this generation for the test to mean much"


def test_generation_refuses_prompt_locations_without_intervene_on_prompt():
    reft = build()
    with pytest.raises(ValueError, match="intervene_on_prompt=True"):
        reft.generate({"input_ids": IDS[:1]}, unit_locations={"base": 3}, max_new_tokens=2)


def test_refusals_name_the_argument():
    reft = build()
    base = {"input_ids": IDS, "attention_mask": MASK}
    with pytest.raises(ValueError, match="sources"):
        reft(base, sources=[base], unit_locations={"base": 1})
    with pytest.raises(ValueError, match="sourceless"):
        reft(base, unit_locations={"sources->base": ([[[1]] * 2], [[[1]] * 2])})
    with pytest.raises(ValueError, match="interventions"):
        reft(base, unit_locations={"sources->base": (None, [[[1]] * 2] * 3)})
    with pytest.raises(TypeError, match="intervention_locations"):
        reft(input_ids=IDS, unit_locations={"base": 1})
    with pytest.raises(ValueError, match="save locally"):
        reft.save("/tmp/never", save_to_hf_hub=True)


def test_subspaces_forms_reach_a_subclass_as_index_lists():
    seen = []

    class Recording(pyreft.LoreftIntervention):
        def forward(self, base, source=None, subspaces=None):
            seen.append(subspaces)
            return super().forward(base, source, subspaces)

    reft = build(intervention=Recording, layers=(0, 2))
    base = {"input_ids": IDS, "attention_mask": MASK}
    with torch.no_grad():
        reft(base, unit_locations={"base": 2}, subspaces=[[[1], [0, 1]], None])
        reft(base, unit_locations={"base": 2}, subspaces=1)
    assert seen == [[[1], [0, 1]], [[0, 1], [0, 1]], [[1], [1]], [[1], [1]]]


def test_pyvene_keys_instances_and_sharing():
    model = tiny_llama()
    shared = pyreft.LoreftIntervention(embed_dim=32, low_rank_dimension=2)
    own = pyreft.NoreftIntervention(embed_dim=32, low_rank_dimension=2)
    reft = pyreft.get_reft_model(model, pyreft.ReftConfig(representations=[
        {"layer": 0, "component": "block_output", "intervention": shared},
        {"layer": 1, "component": "block_output", "intervention": shared},
        {"layer": 1, "component": "block_output", "intervention": own},
        {"layer": 1, "component": "model.layers[2].output", "intervention": pyreft.LoreftIntervention(
            low_rank_dimension=2)}]))
    assert list(reft.interventions) == reft.sorted_keys == [
        "layer_0_comp_block_output_unit_pos_nunit_1#0", "layer_1_comp_block_output_unit_pos_nunit_1#0",
        "layer_1_comp_block_output_unit_pos_nunit_1#1", "comp_model_layers[2]_output_unit_pos_nunit_1#0"]
    assert reft.interventions["layer_0_comp_block_output_unit_pos_nunit_1#0"] is shared
    assert reft.interventions["layer_1_comp_block_output_unit_pos_nunit_1#1"] is own
    assert reft.count_parameters() == sum(p.numel() for p in shared.parameters()) * 2 + sum(
        p.numel() for p in own.parameters())
    assert all(not p.requires_grad for p in reft.model.parameters()) and not reft.model.training
    assert len(reft.get_trainable_parameters()) == 3 + 4 + 3
    reft.enable_model_gradients()
    assert reft.count_parameters(include_model=True) == reft.count_parameters() + sum(
        p.numel() for p in model.parameters())
    reft.disable_model_gradients()
    reft.set_device("cpu")
    assert reft.get_device().type == "cpu"


def test_pyreft_constructor_keywords():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        iv = pyreft.LoreftIntervention(embed_dim=16, low_rank_dimension=2, dtype=torch.bfloat16, device="cpu",
                                       add_bias=False, act_fn="relu", dropout=0.1, layer=3, component="x")
    assert any("float32" in str(w.message) for w in caught)
    assert iv.learned_source.weight.dtype == torch.float32 and iv.rotate_layer.weight.shape == (16, 2)
    torch.testing.assert_close(iv.rotate_layer.weight.T @ iv.rotate_layer.weight, torch.eye(2), atol=1e-6, rtol=0)
    x = torch.randn(3, 16, dtype=torch.bfloat16)
    torch.testing.assert_close(iv.rotate_layer(x), x.float() @ iv.rotation())
    with pytest.raises(TypeError, match="unexpected keyword argument 'rank'"):
        pyreft.LoreftIntervention(embed_dim=16, rank=2)
    with pytest.raises(ValueError, match="low_rank_dimension"):
        pyreft.ConsreftIntervention(embed_dim=16)


@pytest.mark.parametrize("name", ["LoreftIntervention", "NoreftIntervention", "DireftIntervention",
                                  "NodireftIntervention", "ConsreftIntervention", "LobireftIntervention"])
def test_save_folder_reloads_here_and_natively(name, tmp_path):
    reft = build(intervention=getattr(pyreft, name), layers=(0, 2))
    loc = {"sources->base": (None, [[[1, 4]] * 2] * 2)}
    with torch.no_grad():
        want = reft({"input_ids": IDS, "attention_mask": MASK}, unit_locations=loc)[1].logits
    reft.save(save_directory=tmp_path / "save")
    again = pyreft.ReftModel.load(tmp_path / "save", copy.deepcopy(tiny_llama(0)))
    native = reftkit.ReftModel.from_pyreft(tiny_llama(0), tmp_path / "save", positions=None)
    with torch.no_grad():
        got = again({"input_ids": IDS, "attention_mask": MASK}, unit_locations=loc)[1].logits
        locations = torch.tensor([[1, 4]]).expand(2, 2, 2)
        native_logits = native(input_ids=IDS, attention_mask=MASK, intervention_locations=locations).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(native_logits, want, atol=1e-5, rtol=1e-5)
    assert type(list(again.interventions.values())[0]) is getattr(pyreft, name)
    fresh = build(intervention=getattr(pyreft, name), layers=(0, 2), seed=7)
    fresh.load_intervention(tmp_path / "save", include_model=False)  # in place, as pyvene's
    for key in reft.sorted_keys:
        saved, loaded = reft.interventions[key], fresh.interventions[key]
        torch.testing.assert_close(loaded.state_dict()["rotation.raw"] if hasattr(loaded, "rotation") else
                                   loaded.projection.weight, (saved.rotation() * loaded.rotation.scale)
                                   if hasattr(saved, "rotation") else saved.projection.weight, atol=1e-6, rtol=0)
