"""Weights shared across layers (``tie``): one intervention module reached from several sites, counted once,
trained as one (its gradient is the sum of the sites'), saved once, reloaded as one object; impossible ties are
refused at attach and at load, naming the field and value; generate, ReftTrainer and suffix training take it."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import pad_batch, tiny_gpt2, tiny_llama
from ddp_worker import Collator, LMData, training_args
from safetensors import safe_open

import reftkit
from reftkit.interventions import LoReFT
from reftkit.serialization import CONFIG_NAME, WEIGHTS_NAME, check_and_load
from reftkit.training import ReftTrainer, causal_lm_loss
from reftkit.training.classifier import load_interventions
from reftkit.training.suffix import SuffixTraining

SEQS = [[5, 9, 14, 3, 22, 8, 40], [7, 11, 19]]
LORA = {"intervention": "loreft", "low_rank_dimension": 3}
#: one intervention at layers 0 and 2 (tie=True), and the same one at layer 1's MLP output under a name
TIED = [{"layer": [0, 2], "positions": "l1", "tie": "steer", **LORA},
        {"layer": 1, "component": "mlp_output", "positions": "f2", "tie": "steer", **LORA}]


def _nudge(reft: reftkit.ReftModel, seed: int = 1) -> reftkit.ReftModel:
    """Move the interventions off their identity-like init so they change the outputs."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in reft.interventions.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return reft.eval()


def _tied(build=tiny_llama, config=TIED) -> reftkit.ReftModel:
    return _nudge(reftkit.get_reft_model(build(), config))


def _untied_copy(build, config, tied: reftkit.ReftModel) -> reftkit.ReftModel:
    """The same sites without ties, each holding its own copy of the tied weights."""
    untied = reftkit.get_reft_model(build(), [{k: v for k, v in e.items() if k != "tie"} for e in config])
    for key, iv in untied.interventions.items():
        iv.load_state_dict(tied.interventions[key].state_dict())
    assert not untied.tied_interventions
    return untied.eval()


def _batch():
    ids, mask = pad_batch(SEQS, "right")
    return {"input_ids": ids, "attention_mask": mask}


# -- attach: one module, every site, counted once ---------------------------------------------------------
def test_one_module_at_every_site_counted_once():
    reft = _tied()
    keys = ["layer0_block_output", "layer2_block_output", "layer1_mlp_output"]
    assert list(reft.interventions) == keys == reft.intervention_locations_order
    first = reft.interventions[keys[0]]
    assert all(reft.interventions[k] is first for k in keys)
    assert all(slot.intervention is first for slot in reft._hooks.slots)
    assert reft.tied_interventions == {keys[1]: keys[0], keys[2]: keys[0]}
    one = sum(p.numel() for p in first.parameters())
    assert reft.parameter_counts()["trainable"] == one
    assert f"trainable intervention params: {one:,} ||" in reft.print_trainable_parameters()
    trainable = [p for p in reft.parameters() if p.requires_grad]  # what an optimizer is given
    assert len(trainable) == len(list(first.parameters())) and {id(p) for p in trainable} == {
        id(p) for p in first.parameters()}
    # an entry without a tie still builds one intervention per layer (unchanged)
    plain = reftkit.get_reft_model(tiny_llama(), {"layer": [0, 2], **LORA})
    assert plain.interventions["layer0_block_output"] is not plain.interventions["layer2_block_output"]
    assert plain.parameter_counts()["trainable"] == 2 * one


def test_tie_true_ties_an_entry_s_layers_and_round_trips_as_json():
    cfg = reftkit.ReftConfig([{"layer": "all", "tie": True, **LORA}])
    reft = reftkit.get_reft_model(tiny_gpt2(), cfg)
    assert len({id(iv) for iv in reft.interventions.values()}) == 1 and len(reft.interventions) == 3
    assert cfg.to_dict()["representations"][0]["tie"] is True
    assert reftkit.ReftConfig.from_json(cfg.to_json()) == cfg
    assert "tie" not in reftkit.ReftConfig([{"layer": 1, **LORA}]).to_dict()["representations"][0]


@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
def test_outputs_equal_untied_copies_and_the_gradient_is_their_sum(build):
    config = [{"layer": [0, 2], "positions": "l1", "tie": True, **LORA},
              {"layer": 1, "component": "attention_output", "positions": "f2", "tie": False, **LORA}]
    tied = _tied(build, config)
    untied = _untied_copy(build, config, tied)
    out_t = tied(**_batch(), labels=_batch()["input_ids"])
    out_u = untied(**_batch(), labels=_batch()["input_ids"])
    assert torch.allclose(out_t.logits, out_u.logits, atol=1e-6)
    out_t.loss.backward()
    out_u.loss.backward()
    shared = tied.interventions["layer0_block_output"]
    for name, p in shared.named_parameters():
        parts = [dict(untied.interventions[k].named_parameters())[name].grad for k in
                 ("layer0_block_output", "layer2_block_output")]
        assert all(g.abs().sum() > 0 for g in parts), name  # every site contributes
        assert torch.allclose(p.grad, parts[0] + parts[1], atol=1e-6, rtol=1e-5), name
    alone = tied.interventions["layer1_attention_output"]  # tie=False: the untied entry is its own
    for (name, p), q in zip(alone.named_parameters(), untied.interventions["layer1_attention_output"].parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-6), name


def test_generate_equals_untied_copies():
    tied = _tied()
    untied = _untied_copy(tiny_llama, TIED, tied)
    ids, mask = pad_batch(SEQS, "left")
    kw = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    got = tied.generate(input_ids=ids, attention_mask=mask, **kw)
    assert torch.equal(got, untied.generate(input_ids=ids, attention_mask=mask, **kw))
    assert not torch.equal(got, tied.model.generate(input_ids=ids, attention_mask=mask, **kw))  # it acts


# -- the Python side: one instance in several entries -----------------------------------------------------
def test_one_instance_in_two_untied_entries_is_refused_and_tied_entries_share_it():
    iv = LoReFT(low_rank_dimension=2)
    same = r"representations\[1\]\.intervention is the same LoReFT instance as representations\[0\]\.intervention"
    with pytest.raises(reftkit.ConfigError, match=same + ", but the entries are not tied"):
        reftkit.ReftConfig([{"layer": 0, "intervention": iv}, {"layer": 1, "intervention": iv}])
    reft = reftkit.get_reft_model(tiny_llama(), [{"layer": 0, "intervention": iv, "tie": "a"},
                                                 {"layer": 1, "intervention": iv, "tie": "a"}])
    assert reft.interventions["layer0_block_output"] is reft.interventions["layer1_block_output"]
    assert reft.interventions["layer0_block_output"] is not iv  # an instance is a template, as for one entry
    # separate copies stay possible, and a list of layers still copies its instance per layer
    apart = reftkit.get_reft_model(tiny_llama(), [{"layer": 0, "intervention": iv},
                                                  {"layer": 1, "intervention": copy.deepcopy(iv)}])
    assert not apart.tied_interventions
    assert not reftkit.get_reft_model(tiny_llama(), {"layer": [0, 1], "intervention": iv}).tied_interventions


@pytest.mark.parametrize("entries, message", [
    ([{"layer": 0, "tie": "x", **LORA}, {"layer": 1, "tie": "x", "intervention": "noreft", "low_rank_dimension": 3}],
     r"representations\[1\]\.intervention='noreft' but representations\[0\]\.intervention='loreft': tie='x'"),
    ([{"layer": 0, "tie": "x", **LORA}, {"layer": 1, "tie": "x", **LORA, "low_rank_dimension": 5}],
     r"representations\[1\]\.low_rank_dimension=5 but representations\[0\]\.low_rank_dimension=3: tie='x'"),
    ([{"layer": 0, "tie": "x", **LORA}, {"layer": 1, "tie": "x", **LORA, "dropout": 0.1}],
     r"representations\[1\]\.dropout=0\.1 but representations\[0\]\.dropout=0\.0"),
    ([{"layer": 0, "tie": "x", "intervention": LoReFT(low_rank_dimension=3)},
      {"layer": 1, "tie": "x", "intervention": LoReFT(low_rank_dimension=3)}],
     r"representations\[1\]\.intervention=<LoReFT instance> and representations\[0\]\.intervention=<LoReFT "
     r"instance>: tie='x' shares one intervention between them, so pass that one instance"),
    ([{"layer": 0, "tie": "x", **LORA}, {"layer": 1, "component": "mlp_activation", "tie": "x", **LORA}],
     r"representations\[1\]\.tie='x': component='mlp_activation' at layer 1 has width 64, but the intervention it "
     r"shares was built for width 32 \(representations\[0\], component='block_output' at layer 0\)"),
    ([{"layer": [0, 1], "tie": True, **LORA}, {"layer": 2, "tie": "y", **LORA}],
     r"representations\[1\]\.tie='y': no other entry carries this name"),
    ([{"layer": 1, "tie": True, **LORA}], r"representations\[0\]\.tie=True with representations\[0\]\.layer=1: one "
                                          r"site, nothing to tie"),
    ([{"layer": [0, 1], "tie": "", **LORA}], r"representations\[0\]\.tie='' must be True"),
    ([{"layer": [0, 1], "tie": 2, **LORA}], r"representations\[0\]\.tie=2 must be True"),
    ([{"layer": [0, 1], "tie": True, "positions": "f1+l1", "share_weights": False, **LORA}],
     r"representations\[0\]\.tie=True with representations\[0\]\.share_weights=False"),
])
def test_impossible_ties_fail_at_attach_naming_field_and_value(entries, message):
    model = tiny_llama()
    with pytest.raises(reftkit.ConfigError, match=message):
        reftkit.get_reft_model(model, entries)
    assert all(p.requires_grad for p in model.parameters())  # the failed attach left nothing behind
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_a_tie_that_reaches_one_site_on_this_model_is_refused():
    with pytest.raises(reftkit.ConfigError, match=r"representations\[0\]\.tie=True ties one site only \(layer='all' "
                                                  r"on this LlamaForCausalLM\)"):
        reftkit.get_reft_model(tiny_llama(layers=1), {"layer": "all", "tie": True, **LORA})


# -- save / load ----------------------------------------------------------------------------------------
@pytest.fixture
def saved(tmp_path):
    reft = _tied()
    reft.save_pretrained(tmp_path / "run")
    return reft, tmp_path / "run"


def _logits(reft):
    with torch.no_grad():
        return reft(**_batch()).logits


def test_saved_once_recorded_and_reloaded_as_one_object(saved):
    reft, path = saved
    with safe_open(str(path / WEIGHTS_NAME), "pt") as handle:
        assert sorted(handle.keys()) == ["layer0_block_output.rotation.raw", "layer0_block_output.source.bias",
                                         "layer0_block_output.source.weight"]
    config = json.loads((path / CONFIG_NAME).read_text())
    assert [r.get("tie") for r in config["representations"]] == ["steer", "steer"]
    assert [r.get("tied_to") for r in config["interventions"]] == [None, "layer0_block_output", "layer0_block_output"]
    loaded = reftkit.ReftModel.from_pretrained(tiny_llama(), path).eval()
    assert loaded.tied_interventions == reft.tied_interventions
    ivs = list(loaded.interventions.values())
    assert ivs[0] is ivs[1] is ivs[2]
    assert all(slot.intervention is ivs[0] for slot in loaded._hooks.slots)
    assert torch.equal(_logits(loaded), _logits(reft))
    assert loaded.reft_config == reft.reft_config


def test_a_full_state_dict_loads_when_its_copies_agree():
    reft, other = _tied(), reftkit.get_reft_model(tiny_llama(), TIED)
    check_and_load(other.interventions, reft.interventions.state_dict(), "test")  # every key, equal copies
    assert torch.equal(_logits(other.eval()), _logits(reft))
    state = {k: v.clone() for k, v in reft.interventions.state_dict().items()}
    state["layer2_block_output.source.bias"] += 1.0
    with pytest.raises(reftkit.LoadError, match=r"tensor 'layer2_block_output\.source\.bias' differs from "
                                                r"'layer0_block_output\.source\.bias', but intervention "
                                                r"'layer2_block_output' is tied to 'layer0_block_output'"):
        check_and_load(other.interventions, state, "test")


def _edit(path, change):
    config = json.loads((path / CONFIG_NAME).read_text())
    change(config)
    (path / CONFIG_NAME).write_text(json.dumps(config))


@pytest.mark.parametrize("change, message", [
    (lambda c: c["representations"][1].update(component="mlp_activation"),
     r"representations\[1\]\.tie='steer': component='mlp_activation' at layer 1 has width 64"),
    (lambda c: c["representations"][1].update(low_rank_dimension=2),
     r"representations\[1\]\.low_rank_dimension=2 but representations\[0\]\.low_rank_dimension=3"),
    (lambda c: c["interventions"][1].update(tied_to="layer9_block_output"),
     r"interventions\[1\]\.tied_to='layer9_block_output' names no other saved intervention"),
    (lambda c: [r.pop("tie") for r in c["representations"]],
     r"interventions\[1\]\.tied_to='layer0_block_output' \('layer2_block_output'\), but the config's "
     r"representations \(their tie fields\) does not tie it"),
    (lambda c: c["interventions"][2].pop("tied_to"),
     r"interventions\[2\]\.tied_to=None \('layer1_mlp_output'\), but .* ties it to 'layer0_block_output'"),
])
def test_an_inconsistent_tied_folder_is_refused_at_load(saved, change, message):
    _, path = saved
    _edit(path, change)
    model = tiny_llama()
    with pytest.raises(reftkit.LoadError, match=message):
        reftkit.ReftModel.from_pretrained(model, path)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_a_weights_file_that_repeats_a_tied_tensor_differently_is_refused(saved):
    from safetensors.torch import save_file

    reft, path = saved
    state = {k: v.detach().clone() for k, v in reft.interventions.state_dict().items()}
    state["layer1_mlp_output.rotation.raw"] += 0.5
    save_file(state, str(path / WEIGHTS_NAME))
    with pytest.raises(reftkit.LoadError, match=r"tensor 'layer1_mlp_output\.rotation\.raw' differs"):
        reftkit.ReftModel.from_pretrained(tiny_llama(), path, verify_weights=False)


# -- training: the trainer's optimizer, suffix training ---------------------------------------------------
def test_suffix_path_equals_the_full_path_for_a_tied_set():
    reft = reftkit.get_reft_model(tiny_llama(layers=4), [{"layer": [1, 3], "positions": "l1", "tie": True, **LORA}])
    _nudge(reft)
    data = LMData(6, seed=0)
    batch = Collator(len(reft.interventions))([data[i] for i in range(6)])
    params = list(reft.interventions.parameters())

    def run(**kw):
        out = causal_lm_loss(reft, **batch, **kw)
        return out["loss"], torch.autograd.grad(out["loss"], params)

    suffix = SuffixTraining(reft)  # strict: a mismatch on its first batch raises SuffixTrainingError
    (want, want_grads), (got, got_grads) = run(), run(suffix_training=suffix)
    assert suffix.verified["suffix"] and suffix.suffix_steps == 1 and suffix.full_steps == 0
    assert abs(got.item() - want.item()) <= 1e-6
    assert max((a - b).abs().max().item() for a, b in zip(got_grads, want_grads)) <= 1e-6
    assert max(g.abs().max().item() for g in got_grads) > 1e-3


def _train(tmp_path, setting):
    reft = reftkit.get_reft_model(tiny_llama(layers=4), [{"layer": [1, 3], "positions": "l1", "tie": True, **LORA}])
    _nudge(reft).train()
    args = training_args(str(tmp_path / str(setting)), 4, 4, optim="sgd", learning_rate=0.5, max_grad_norm=0.0,
                         logging_steps=1)
    trainer = ReftTrainer(reft, args, train_dataset=LMData(8), data_collator=Collator(len(reft.interventions)),
                          suffix_training=setting)
    trainer.create_optimizer()
    given = [p for group in trainer.optimizer.param_groups for p in group["params"]]
    one = list(reft.interventions["layer1_block_output"].parameters())
    assert len(given) == len({id(p) for p in given}) == len(one)  # each parameter once
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return reft, losses, trainer


def test_trainer_trains_the_tied_set_as_one_through_the_suffix_path(tmp_path):
    before = {k: v.clone() for k, v in _nudge(reftkit.get_reft_model(tiny_llama(layers=4), [
        {"layer": [1, 3], "positions": "l1", "tie": True, **LORA}])).interventions.state_dict().items()}
    full, full_losses, off = _train(tmp_path, False)
    reft, losses, trainer = _train(tmp_path, True)
    assert off.suffix_training is None and trainer.suffix_training.verified["suffix"]
    assert trainer.suffix_training.full_steps == 0
    assert reft.interventions["layer1_block_output"] is reft.interventions["layer3_block_output"]
    weights, reference = reft.interventions.state_dict(), full.interventions.state_dict()
    assert max(abs(a - b) for a, b in zip(losses, full_losses)) <= 1e-5
    assert max((weights[k] - reference[k]).abs().max().item() for k in reference) <= 1e-5
    assert any((weights[k] - before[k]).abs().max() > 1e-3 for k in before)  # it trained
    trainer.save_model(str(tmp_path / "out"))
    loaded = reftkit.ReftModel.from_pretrained(tiny_llama(layers=4), tmp_path / "out")
    assert loaded.tied_interventions == {"layer3_block_output": "layer1_block_output"}
    assert torch.equal(_logits(loaded.eval()), _logits(reft.eval()))
    resumed = reftkit.get_reft_model(tiny_llama(layers=4), reft.reft_config)  # what a resumed run loads into
    load_interventions(resumed, tmp_path / "out")
    assert torch.equal(_logits(resumed.eval()), _logits(reft))
