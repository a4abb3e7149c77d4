"""Encoder-decoder models (T5, BART): ``stack`` in a representation, positions over the encoder's or the
decoder's input, every catalogue intervention on both stacks against a hand-written hook, training with
``labels``, generation against a hand-rolled greedy loop, save/load, and IA3 against peft's on T5."""
from __future__ import annotations

import pytest
import torch
from conftest import tiny_llama
from torch import nn
from transformers import BartConfig, BartForConditionalGeneration, T5Config, T5ForConditionalGeneration

import reftkit
from reftkit.config import ConfigError
from reftkit.interventions.registry import INTERVENTIONS
from reftkit.structure import resolve_site


def tiny_t5(seed: int = 0) -> T5ForConditionalGeneration:
    torch.manual_seed(seed)
    return T5ForConditionalGeneration(T5Config(
        vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
        decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)).eval()


def tiny_bart(seed: int = 0) -> BartForConditionalGeneration:
    torch.manual_seed(seed)
    return BartForConditionalGeneration(BartConfig(
        vocab_size=64, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
        pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2, forced_eos_token_id=None)).eval()


MODELS = {"t5": tiny_t5, "bart": tiny_bart}
#: encoder input: two examples, right padded (the second has 4 real tokens of 6)
ENC = torch.tensor([[5, 9, 14, 22, 7, 30], [6, 10, 15, 23, 3, 3]])
ENC_MASK = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
DEC = torch.tensor([[0, 11, 12, 13, 4], [0, 17, 18, 4, 4]])
DEC_MASK = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
LAST_ENC, LAST_DEC = [5, 3], [4, 2]

#: arguments for catalogue classes that need some
KWARGS = {
    "adapter_fusion": {"adapters": [{"reduction_factor": 4}, {"reduction_factor": 8}]},
    "mixture": {"members": [{"intervention": "loreft", "low_rank_dimension": 2},
                            {"intervention": "addition", "scale": 0.5}], "weights": [0.5, 0.5]},
    "noise": {"scale": 0.0},  # random by design: at scale 0 the reference is exact
}
RANKED = {"loreft", "noreft", "direft", "nodireft", "consreft", "lobireft", "lowrank_rotated_space"}


def kwargs_for(name: str) -> dict:
    return KWARGS.get(name, {"low_rank_dimension": 2} if name in RANKED else {})


def model_inputs(model: nn.Module) -> dict:
    dec = DEC.clone()
    dec[:, 0] = model.config.decoder_start_token_id
    return {"input_ids": ENC, "attention_mask": ENC_MASK, "decoder_input_ids": dec, "decoder_attention_mask": DEC_MASK}


# ----------------------------------------------------------------------------- the stack field

def test_stack_is_validated_and_round_trips():
    with pytest.raises(ConfigError, match=r"representations\[0\]\.stack='middle' is not a stack"):
        reftkit.ReftConfig([{"layer": 0, "stack": "middle"}])
    cfg = reftkit.ReftConfig([{"layer": 0, "stack": "encoder"}, {"layer": 1, "positions": "f1", "stack": "decoder"}])
    assert [r["stack"] for r in cfg.to_dict()["representations"]] == ["encoder", "decoder"]
    assert reftkit.ReftConfig.from_json(cfg.to_json()) == cfg
    assert "stack" not in reftkit.ReftConfig([{"layer": 0}]).to_dict()["representations"][0]


def test_missing_or_foreign_stack_is_refused_at_attach():
    with pytest.raises(ConfigError, match=r"representations\[0\]\.stack is missing.*'encoder' or stack='decoder'"):
        reftkit.get_reft_model(tiny_t5(), [{"layer": 0}])
    with pytest.raises(ConfigError, match=r"representations\[0\]\.stack='decoder'.*not an encoder-decoder"):
        reftkit.get_reft_model(tiny_llama(), [{"layer": 0, "stack": "decoder"}])
    with pytest.raises(ConfigError, match="cross_key_output.*stack='decoder'"):
        reftkit.get_reft_model(tiny_t5(), [{"layer": 0, "component": "cross_key_output", "stack": "encoder"}])
    with pytest.raises(ConfigError, match="layer=5 is out of range.*2 layers"):
        reftkit.get_reft_model(tiny_bart(), [{"layer": 5, "stack": "decoder"}])


@pytest.mark.parametrize("arch", sorted(MODELS))
def test_stacks_resolve_to_their_own_layers(arch):
    model = MODELS[arch]()
    enc, dec = (resolve_site(model, 1, "block_output", stack=s) for s in ("encoder", "decoder"))
    assert "encoder" in enc.module_path and "decoder" in dec.module_path
    assert (enc.sequence, dec.sequence) == ("encoder", "decoder")
    assert resolve_site(model, 0, "cross_key_output", stack="decoder").sequence == "encoder"
    assert resolve_site(model, 0, "cross_query_output", stack="decoder").sequence == "decoder"


# ----------------------------------------------------------------------------- every intervention, both stacks

def _first(output):
    return output[0] if isinstance(output, tuple) else output


def _hand_edit(model, site, iv, rows_at, source=None):
    """A forward hook that applies ``iv`` at ``rows_at[b]`` of each example, by hand (a Python loop)."""
    def hook(module, args, output):
        h = _first(output).clone()
        for b, p in enumerate(rows_at):
            kw = {} if source is None else {"source": source[b:b + 1, None]}
            h[b, p] = iv(h[b:b + 1, p][:, None], **kw)[0, 0].to(h.dtype)
        return (h, *output[1:]) if isinstance(output, tuple) else h
    return model.get_submodule(site.module_path).register_forward_hook(hook)


def _record(model, site, inputs):
    seen = {}

    def keep(module, args, output):
        seen.setdefault("h", _first(output).detach())
    handle = model.get_submodule(site.module_path).register_forward_hook(keep)
    with torch.no_grad():
        model(**inputs)
    handle.remove()
    return seen["h"]


@pytest.mark.parametrize("stack", ["encoder", "decoder"])
@pytest.mark.parametrize("arch", sorted(MODELS))
@pytest.mark.parametrize("name", sorted(INTERVENTIONS))
def test_every_intervention_on_both_stacks_matches_a_hand_hook(name, arch, stack):
    model = MODELS[arch]()
    inputs = model_inputs(model)
    entry = {"layer": 1, "component": "block_output", "positions": "l1", "stack": stack, "intervention": name,
             **kwargs_for(name)}
    reft = reftkit.get_reft_model(model, [entry])
    key = next(iter(reft.interventions))
    iv = reft.interventions[key]
    torch.manual_seed(1)
    with torch.no_grad():  # move the trainable state off its identity start so the edit shows
        for p in iv.parameters():
            p.add_(0.1 * torch.randn_like(p))
    site = reft._hooks.slots[0].site
    call = dict(inputs)
    source = None
    if iv.uses_source:
        src_inputs = {**inputs, "input_ids": ENC.flip(0), "attention_mask": ENC_MASK.flip(0)} if stack == "encoder" \
            else {**inputs, "decoder_input_ids": inputs["decoder_input_ids"].flip(0),
                  "decoder_attention_mask": DEC_MASK.flip(0)}
        call["sources"] = src_inputs
        full = _record(model, site, src_inputs)
        src_last = (LAST_ENC if stack == "encoder" else LAST_DEC)[::-1]
        source = torch.stack([full[b, p] for b, p in enumerate(src_last)])
    with torch.no_grad():
        got = reft(**call).logits
        bare = model(**inputs).logits
        handle = _hand_edit(model, site, iv, LAST_ENC if stack == "encoder" else LAST_DEC, source)
        want = model(**inputs).logits
        handle.remove()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    if name not in ("collect", "noise") and stack == "decoder":  # a decoder edit at l1 changes that row only
        changed = (got - bare).abs().amax(-1) > 1e-6
        assert changed[0, LAST_DEC[0]] and changed[1, LAST_DEC[1]]
        changed[0, LAST_DEC[0]] = changed[1, LAST_DEC[1]] = False
        assert not changed.any()
    reft.detach()


@pytest.mark.parametrize("arch", sorted(MODELS))
def test_labels_give_the_hf_loss_and_decoder_positions_follow_the_shifted_labels(arch):
    model = MODELS[arch]()
    labels = torch.tensor([[11, 12, 13, 4, -100], [17, 18, -100, -100, -100]])
    reft = reftkit.get_reft_model(model, [{"layer": 0, "positions": "l1", "stack": "decoder",
                                           "intervention": "loreft", "low_rank_dimension": 2}])
    # the decoder reads [start, 11, 12, 13, 4] and [start, 17, 18, pad, pad]: l1 is 4 and 2
    state = reft._call_state(ENC, None, ENC_MASK, None, inputs={"labels": labels})
    assert state.locations[:, 0, 0].tolist() == [4, 2]
    out = reft(input_ids=ENC, attention_mask=ENC_MASK, labels=labels)
    logits = out.logits
    want = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out.loss, want)
    with pytest.raises(ValueError, match="decoder_input_ids .* or labels"):
        reft(input_ids=ENC, attention_mask=ENC_MASK)


def test_explicit_locations_are_checked_per_sequence():
    model = tiny_t5()
    reft = reftkit.get_reft_model(model, [{"layer": 0, "stack": "encoder"}, {"layer": 0, "stack": "decoder"}])
    locs = torch.tensor([[[5], [4]], [[3], [2]]])
    reft(**model_inputs(model), intervention_locations=locs)
    with pytest.raises(ValueError, match=r"intervention_locations\[0, 1, 0\] = 5 is outside the decoder sequence"):
        reft(**model_inputs(model), intervention_locations=torch.tensor([[[5], [5]], [[3], [2]]]))


# ----------------------------------------------------------------------------- training

def test_trainer_reduces_the_seq2seq_loss_and_leaves_the_base_untouched(tmp_path):
    from transformers import TrainingArguments

    from reftkit.training import ReftTrainer

    model = tiny_t5()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    reft = reftkit.get_reft_model(model, [
        {"layer": 1, "positions": "l1", "stack": "encoder", "intervention": "loreft", "low_rank_dimension": 2},
        {"layer": 1, "positions": "all", "stack": "decoder", "intervention": "loreft", "low_rank_dimension": 2}])
    labels = torch.tensor([[11, 12, 13, 1], [17, 18, 1, -100]])
    rows = [{"input_ids": ENC[i], "attention_mask": ENC_MASK[i], "labels": labels[i]} for i in range(2)] * 4
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, num_train_epochs=3,
                             learning_rate=5e-2, report_to=[], logging_steps=1, save_strategy="no", use_cpu=True)
    trainer = ReftTrainer(reft, args, train_dataset=rows,
                          data_collator=lambda b: {k: torch.stack([r[k] for r in b]) for k in b[0]})
    assert trainer.suffix_training is None  # 'auto' switched off: not a causal decoder
    with torch.no_grad():
        start = reft(input_ids=ENC, attention_mask=ENC_MASK, labels=labels).loss
    trainer.train()
    with torch.no_grad():
        end = reft(input_ids=ENC, attention_mask=ENC_MASK, labels=labels).loss
    assert end < start * 0.8
    base = reft.detach()
    for k, v in base.state_dict().items():
        assert torch.equal(v, before[k]), k
    with pytest.raises(ValueError, match="suffix_training=True cannot run: .*not a causal decoder"):
        ReftTrainer(reftkit.get_reft_model(model, [{"layer": 0, "stack": "encoder"}]), args, train_dataset=rows,
                    suffix_training=True)


# ----------------------------------------------------------------------------- generation

@pytest.mark.parametrize("arch", sorted(MODELS))
def test_generate_equals_a_hand_rolled_greedy_loop(arch):
    model = MODELS[arch]()
    reft = reftkit.get_reft_model(model, [
        {"layer": 1, "positions": "l1", "stack": "encoder", "intervention": "loreft", "low_rank_dimension": 2},
        {"layer": 0, "positions": "f1", "stack": "decoder", "intervention": "loreft", "low_rank_dimension": 2},
        {"layer": 1, "component": "mlp_output", "positions": "all", "stack": "decoder", "intervention": "ia3",
         "init_ia3_weights": False}])
    run = dict(input_ids=ENC, attention_mask=ENC_MASK, max_new_tokens=6, do_sample=False, min_new_tokens=6,
               output_scores=True, return_dict_in_generate=True)
    out = reft.generate(**run)
    got, scores = out.sequences, torch.stack(out.scores, 1)
    steps = []
    slots = reft._hooks.slots
    sites = [s.site for s in slots]
    ivs = [s.intervention for s in slots]
    with torch.no_grad():
        handle = _hand_edit(model, sites[0], ivs[0], LAST_ENC)
        encoded = model.get_encoder()(input_ids=ENC, attention_mask=ENC_MASK)
        handle.remove()
        dec = torch.full((2, 1), model.config.decoder_start_token_id)
        for _ in range(6):
            hands = [_hand_edit(model, sites[1], ivs[1], [0, 0]),
                     model.get_submodule(sites[2].module_path).register_forward_hook(
                         lambda m, a, o: ivs[2](_first(o)))]
            logits = model(encoder_outputs=encoded, attention_mask=ENC_MASK, decoder_input_ids=dec,
                           use_cache=False).logits
            for h in hands:
                h.remove()
            logits[:, -1, model.config.eos_token_id] = -torch.inf  # min_new_tokens: no end before 6 tokens
            steps.append(logits[:, -1])
            dec = torch.cat([dec, logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(got, dec)
    torch.testing.assert_close(scores, torch.stack(steps, 1), rtol=1e-5, atol=1e-5)
    bare = torch.stack(model.generate(**run).scores, 1)
    assert (bare - scores)[torch.isfinite(bare)].abs().max() > 1e-3


# ----------------------------------------------------------------------------- save / load

def test_save_load_round_trip_and_foreign_model(tmp_path):
    from reftkit.serialization import LoadError

    model = tiny_bart()
    reft = reftkit.get_reft_model(model, [
        {"layer": 0, "positions": "f1+l1", "stack": "encoder", "intervention": "loreft", "low_rank_dimension": 2},
        {"layer": 1, "component": "cross_value_output", "positions": "all", "stack": "decoder",
         "intervention": "ia3", "init_ia3_weights": False}])
    inputs = model_inputs(model)
    with torch.no_grad():
        want = reft(**inputs).logits
    reft.save_pretrained(tmp_path)
    reft.detach()
    loaded = reftkit.ReftModel.from_pretrained(model, tmp_path)
    assert [r.stack for r in loaded.reft_config.representations] == ["encoder", "decoder"]
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).logits, want)
    loaded.detach()
    with pytest.raises(LoadError, match="stack='encoder'.*not an encoder-decoder"):
        reftkit.ReftModel.from_pretrained(tiny_llama(), tmp_path)


# ----------------------------------------------------------------------------- IA3 against peft on T5

def test_ia3_on_t5_matches_peft_logits_and_gradients():
    peft = pytest.importorskip("peft")
    from reftkit.interventions.scaling import ia3_representations

    inputs = {"input_ids": ENC[:, :4], "attention_mask": torch.ones(2, 4, dtype=torch.long),
              "labels": torch.tensor([[11, 12, 13, 1], [17, 18, 1, 5]])}
    theirs = peft.get_peft_model(tiny_t5(), peft.IA3Config(task_type="SEQ_2_SEQ_LM", init_ia3_weights=False))
    ours_model = tiny_t5()
    entries = ia3_representations(ours_model)
    components = {(e["stack"], e["component"]) for e in entries}
    assert ("decoder", "cross_key_output") in components and ("decoder", "cross_value_output") in components
    reft = reftkit.get_reft_model(ours_model, entries)
    # copy peft's random vectors onto reftkit's sites
    peft_vectors = {n[len("base_model.model."):].replace(".ia3_l.default", ""): p
                    for n, p in theirs.named_parameters() if "ia3_l" in n}
    assert len(peft_vectors) == len(reft.interventions) == 2 * 2 * 3 + 2 * 2
    with torch.no_grad():
        for slot in reft._hooks.slots:
            slot.intervention.scale.copy_(peft_vectors[slot.site.module_path].flatten())
    out_theirs, out_ours = theirs(**inputs), reft(**inputs)
    torch.testing.assert_close(out_ours.logits, out_theirs.logits, rtol=1e-5, atol=1e-5)
    out_theirs.loss.backward()
    out_ours.loss.backward()
    for slot in reft._hooks.slots:
        torch.testing.assert_close(slot.intervention.scale.grad, peft_vectors[slot.site.module_path].grad.flatten(),
                                   rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- T-Few on an encoder-decoder model

MC_PROMPTS = ["dog that barks", "cat that meows", "sky colour", "spider legs how many", "paris capital of",
              "good movie", "bad movie", "what animal barks"]
MC_CHOICES = [["dog", "cat"], ["dog", "cat", "spider"], ["blue", "eight"], ["eight", "blue", "a"],
              ["france", "sky"], ["great", "awful"], ["great", "awful"], ["dog cat", "spider"]]


def mc_t5(seed: int = 2) -> T5ForConditionalGeneration:
    torch.manual_seed(seed)
    return T5ForConditionalGeneration(T5Config(
        vocab_size=101, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
        decoder_start_token_id=0, pad_token_id=0, eos_token_id=2, dropout_rate=0.0)).eval()


def _hand_choice_logprobs(model, tok, prompt, choice):
    """The decoder's mean log-probability of ``choice`` given ``prompt`` in the encoder, from the full forward."""
    x = torch.tensor([tok(prompt)["input_ids"]])
    y = torch.tensor([tok(choice, add_special_tokens=False)["input_ids"]])
    logits = model(input_ids=x, labels=y).logits
    return logits.log_softmax(-1).gather(-1, y[..., None]).mean().item()


def test_rank_classification_and_choice_logprobs_score_choices_with_the_decoder():
    from conftest import tiny_tokenizer

    from reftkit.analysis.multiple_choice import choice_logprobs
    from reftkit.data.multiple_choice import make_multiple_choice_data_module
    from reftkit.training.objectives import choice_token_logprobs, multiple_choice_loss, tfew_loss

    tok, model = tiny_tokenizer(), mc_t5()
    reft = reftkit.get_reft_model(model, [
        {"layer": 1, "stack": "encoder", "positions": "l1", "intervention": "loreft", "low_rank_dimension": 2},
        {"layer": 0, "stack": "decoder", "positions": "f1", "intervention": "loreft", "low_rank_dimension": 2}])
    with torch.no_grad():
        scores = choice_logprobs(reft, tok, MC_PROMPTS, MC_CHOICES)
        bare = choice_logprobs(model, tok, MC_PROMPTS, MC_CHOICES)
        want = [[_hand_choice_logprobs(model, tok, p, c) for c in cs] for p, cs in zip(MC_PROMPTS, MC_CHOICES)]
    torch.testing.assert_close(torch.tensor(sum(bare, [])), torch.tensor(sum(want, [])), rtol=1e-5, atol=1e-5)
    assert max(abs(a - b) for a, b in zip(sum(scores, []), sum(bare, []))) > 1e-4  # the edits act
    data = make_multiple_choice_data_module(tok, reft, MC_PROMPTS, MC_CHOICES, [0] * len(MC_PROMPTS))
    batch = data["data_collator"](list(data["train_dataset"]))
    assert "intervention_locations" not in batch and batch["input_ids"].shape[0] == 8 * 3
    with torch.no_grad():
        lp, mask = choice_token_logprobs(reft, batch["input_ids"], batch["attention_mask"], batch["choice_labels"],
                                         batch["choice_mask"])
        beta = (lp * mask).sum(-1) / mask.sum(-1).clamp_min(1)
        for b, cs in enumerate(MC_CHOICES):  # the same scores as rank classification, choice by choice
            torch.testing.assert_close(beta[b, :len(cs)], torch.tensor(scores[b]), rtol=1e-5, atol=1e-5)
        out = multiple_choice_loss(reft, **batch)
        ref = tfew_loss(lp, mask, batch["correct"], batch["choice_mask"])
    for term in ("loss", "lm", "ul", "ln"):
        torch.testing.assert_close(out[term], ref[term])
    with pytest.raises(Exception, match="positions='l1'.*encoder-decoder"):
        make_multiple_choice_data_module(tok, reft, MC_PROMPTS, MC_CHOICES, [0] * 8, positions="l1")


def test_the_tfew_recipe_trains_ia3_on_a_tiny_t5(tmp_path):
    """T-Few: IA3 where peft puts it (both stacks, cross-attention included), L_LM + L_UL + L_LN, rank
    classification."""
    from conftest import tiny_tokenizer
    from ddp_worker import training_args

    from reftkit.analysis.multiple_choice import accuracy, choice_logprobs, rank_classify
    from reftkit.data.multiple_choice import make_multiple_choice_data_module
    from reftkit.interventions.scaling import ia3_representations
    from reftkit.training import ReftTrainer
    from reftkit.training.objectives import multiple_choice_loss

    tok, model = tiny_tokenizer(), mc_t5()
    reft = reftkit.get_reft_model(model, ia3_representations(model))
    before = choice_logprobs(reft, tok, MC_PROMPTS, MC_CHOICES)
    correct = [min(range(len(s)), key=s.__getitem__) for s in before]  # the choice ranked lowest
    assert accuracy(rank_classify(reft, tok, MC_PROMPTS, MC_CHOICES), correct) == 0.0
    data = make_multiple_choice_data_module(tok, reft, MC_PROMPTS, MC_CHOICES, correct)
    full = data["data_collator"](list(data["train_dataset"]))
    with torch.no_grad():
        start = multiple_choice_loss(reft, **full)
    trainer = ReftTrainer(reft, training_args(str(tmp_path), 4, 40, learning_rate=5e-2), loss_terms=("lm", "ul", "ln"),
                          train_dataset=data["train_dataset"], data_collator=data["data_collator"])
    trainer.train()
    with torch.no_grad():
        end = multiple_choice_loss(reft, **full)
    assert end["loss"] < start["loss"] and end["ln"] < start["ln"]
    assert accuracy(rank_classify(reft, tok, MC_PROMPTS, MC_CHOICES), correct) >= 0.75
