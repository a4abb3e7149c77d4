"""Robustness of call inputs (issue 17, items 4 and 11-15): a training call with gradient checkpointing leaves
no edits on later bare calls, masks with holes or of the wrong shape, misspelt keywords, malformed locations and
sources, and ``[B, 1, P]`` locations on a model with several interventions."""
from __future__ import annotations

import pytest
import torch
from conftest import pad_batch, tiny_gpt2, tiny_llama

import reftkit
from reftkit import PositionError
from reftkit.positions import locate, parse_positions, real_tokens, sequence_extent

SEQS = [[5, 6, 7, 8, 9, 10], [11, 12, 13]]


def _reft(model=None, positions="l1", layers=(1,), **extra):
    model = model if model is not None else tiny_llama()
    reft = reftkit.get_reft_model(model, [{"layer": list(layers), "component": "block_output", "positions": positions,
                                           "intervention": "loreft", "low_rank_dimension": 2, **extra}])
    torch.manual_seed(1)
    with torch.no_grad():  # visible edits: LoReFT starts close to the identity otherwise
        for p in reft.interventions.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    return reft


def _copy_weights(dst, src):
    dst.interventions.load_state_dict(src.interventions.state_dict())


# -- item 4: gradient checkpointing's kept state serves the recomputation only ----------------------------
def _train_step(reft, ids, mask, between=None):
    out = reft(input_ids=ids, attention_mask=mask, labels=ids)
    seen = between() if between is not None else None
    out.loss.backward()
    grads = [p.grad.clone() for p in reft.interventions.parameters()]
    reft.interventions.zero_grad()
    return out.loss.detach(), grads, seen


def test_checkpointed_training_call_leaves_no_edit_on_bare_calls_and_other_batch_sizes():
    ids, mask = pad_batch(SEQS, "right")
    plain = _reft(layers=(0, 1, 2), positions="f1+l1")
    ckpt = _reft(layers=(0, 1, 2), positions="f1+l1")
    _copy_weights(ckpt, plain)
    ckpt.gradient_checkpointing_enable()
    assert ckpt.model.is_activation_checkpointing
    plain.train()
    ckpt.train()
    bare_reference = tiny_llama()  # the same weights, never hooked
    one = torch.tensor([[20, 21, 22, 23]])
    with torch.no_grad():
        want_bare = bare_reference(input_ids=one).logits

    def bare_call():  # between the forward and its backward: must be unedited and must not spoil the backward
        with torch.no_grad():
            return ckpt.model(input_ids=one).logits

    want_loss, want_grads, _ = _train_step(plain, ids, mask)
    got_loss, got_grads, got_bare = _train_step(ckpt, ids, mask, between=bare_call)
    torch.testing.assert_close(got_loss, want_loss)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    assert any(float(g.abs().max()) > 0 for g in got_grads)  # the recomputation did intervene
    torch.testing.assert_close(got_bare, want_bare, atol=0, rtol=0)
    # after the backward too: the bare model is not edited (with grad enabled, in training mode)
    torch.testing.assert_close(ckpt.model(input_ids=one).logits.detach(), want_bare, atol=0, rtol=0)
    # a batch-1 call (the kept state was located for batch 2) works and equals the non-checkpointed call
    got_one = ckpt(input_ids=one).logits
    want_one = plain(input_ids=one).logits
    torch.testing.assert_close(got_one, want_one)
    assert not torch.allclose(want_one, want_bare)  # the edit is visible, so the comparison above means something


def test_checkpointed_gpt2_bare_call_of_another_batch_size_after_training():
    reft = _reft(tiny_gpt2())
    reft.gradient_checkpointing_enable()
    reft.train()
    ids, mask = pad_batch(SEQS, "left")
    reft(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
    one = torch.tensor([[3, 4, 5]])
    reft.eval()  # GPT-2 has dropout; the hooks still run in eval mode, so a leaked state would apply
    got = reft.model(input_ids=one).logits.detach()  # batch 1 against a kept batch-2 state: no crash, no edit
    torch.testing.assert_close(got, tiny_gpt2()(input_ids=one).logits.detach(), atol=0, rtol=0)


# -- item 11: a mask with holes ----------------------------------------------------------------------------
def _reference_positions(mask_row: list[int], first: int, last: int) -> list[int]:
    """By hand: the real tokens' indices, the first `first` and last `last` of them (no overlap)."""
    real = [i for i, m in enumerate(mask_row) if m]
    n = len(real)
    n_first = min(first, n) if not last else first if n >= first + last else min(first, n // 2)
    n_last = min(n - n_first, last)
    picked = real[:n_first] + [-1] * (first - n_first)
    return picked + real[n - n_last:] + [-1] * (last - n_last) if last else picked


def test_mask_with_a_hole_positions_land_on_real_tokens():
    mask = torch.tensor([[1, 0, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1], [1, 0, 1, 0, 1, 0]])
    start, lengths = sequence_extent(mask, 4, 6, mask.device)
    got = locate(parse_positions("f2+l1"), start, lengths, 6, real_tokens(mask, mask.device)).tolist()
    assert got[0] == [0, 2, 5]  # the example
    assert got == [_reference_positions(row, 2, 1) for row in mask.tolist()]
    every = locate(parse_positions("all"), start, lengths, 6, real_tokens(mask, mask.device)).tolist()
    assert every == [[i for i, m in enumerate(row) if m] + [-1] * row.count(0) for row in mask.tolist()]


@pytest.mark.parametrize("side", ["left", "right"])
def test_left_and_right_padding_unchanged(side):
    ids, mask = pad_batch([[5, 6, 7, 8, 9, 10, 11], [12, 13, 14], [15]], side)
    start, lengths = sequence_extent(mask, *mask.shape, mask.device)
    for text, (first, last) in {"f2+l3": (2, 3), "l1": (0, 1), "f3": (3, 0)}.items():
        spec = parse_positions(text)
        with_table = locate(spec, start, lengths, mask.shape[1], real_tokens(mask, mask.device))
        contiguous = locate(spec, start, lengths, mask.shape[1])
        assert with_table.tolist() == contiguous.tolist()
        assert with_table.tolist() == [_reference_positions(r, first, last) for r in mask.tolist()]


def test_mask_with_a_hole_call_equals_hand_located_call():
    reft = _reft(positions="f2+l1")
    ids = torch.tensor([[5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 15, 16]])
    mask = torch.tensor([[1, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    with torch.no_grad():
        got = reft(input_ids=ids, attention_mask=mask).logits
        by_hand = torch.tensor([[0, 2, 5], [0, 1, 5]])
        want = reft(input_ids=ids, attention_mask=mask, intervention_locations=by_hand).logits
        on_the_hole = torch.tensor([[0, 1, 5], [0, 1, 5]])
        wrong = reft(input_ids=ids, attention_mask=mask, intervention_locations=on_the_hole).logits
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    assert not torch.allclose(got[0], wrong[0])  # where the positions land matters


# -- item 12: a mask of another shape ----------------------------------------------------------------------
@pytest.mark.parametrize("mask_shape", [(2, 5), (2, 7), (1, 6), (3, 6), (12,), (2, 6, 1), (2, 1, 5, 6)])
@pytest.mark.parametrize("explicit", [False, True])
def test_mask_shape_mismatch_raises_before_any_hook(mask_shape, explicit):
    reft = _reft()
    ids = torch.tensor([[5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 15, 16]])
    ran = []
    handle = reft.model.model.layers[0].register_forward_pre_hook(lambda *a: ran.append(1))
    locations = torch.tensor([[5], [5]]) if explicit else None
    with pytest.raises(PositionError) as err:
        reft(input_ids=ids, attention_mask=torch.ones(mask_shape, dtype=torch.long), intervention_locations=locations)
    handle.remove()
    message = str(err.value)
    names_ids_shape = any(s in message for s in ("(2, 6)", "[2, 6]", "[2 (or 1), heads, 6"))
    assert "attention_mask" in message and str(mask_shape) in message and names_ids_shape, message
    assert not ran


def test_four_dimensional_mask_of_the_right_shape_is_accepted_with_explicit_locations():
    """A ready-made [B, 1, T, T] causal mask (custom attention patterns) stays accepted when the positions are given."""
    reft = _reft()
    ids = torch.tensor([[5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 15, 16]])
    locations = torch.tensor([[5], [5]])
    causal = torch.ones(6, 6, dtype=torch.bool).tril()[None, None].expand(2, 1, 6, 6)
    with torch.no_grad():
        want = reft(input_ids=ids, intervention_locations=locations).logits
        got = reft(input_ids=ids, attention_mask=causal, intervention_locations=locations).logits
    torch.testing.assert_close(got, want)


# -- item 13: misspelt per-call arguments ------------------------------------------------------------------
MISSPELT = {"intervention_location": "intervention_locations", "source": "sources", "subspace": "subspaces",
            "task": "tasks"}


@pytest.mark.parametrize("call", ["forward", "collect", "generate"])
@pytest.mark.parametrize("wrong", sorted(MISSPELT))
def test_misspelt_argument_raises_type_error_with_the_right_name(call, wrong):
    reft = _reft()
    ids, mask = pad_batch(SEQS, "right")
    kwargs = {"input_ids": ids, "attention_mask": mask, wrong: torch.tensor([[0], [0]])}
    with pytest.raises(TypeError) as err:
        if call == "generate":
            reft.generate(**kwargs, max_new_tokens=1)
        else:
            getattr(reft, call)(**kwargs)
    message = str(err.value)
    assert f"'{wrong}'" in message and f"{MISSPELT[wrong]}=" in message and f"{call}()" in message, message


def test_unknown_forward_keyword_is_refused_and_intervening_suggests():
    reft = _reft()
    ids, mask = pad_batch(SEQS, "right")
    with pytest.raises(TypeError, match=r"'label' \(did you mean labels=\?\)"):
        reft(input_ids=ids, attention_mask=mask, label=ids)
    with pytest.raises(TypeError, match=r"'intervention_location' \(did you mean intervention_locations=\?\)"):
        with reft.intervening(ids, mask, intervention_location=torch.tensor([[0], [0]])):
            pass


@pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated:FutureWarning")
@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
def test_legitimate_model_keywords_still_pass(make):
    reft = _reft(make())
    ids, mask = pad_batch(SEQS, "right")
    with torch.no_grad():
        want = reft(input_ids=ids, attention_mask=mask).logits
        out = reft(input_ids=ids, attention_mask=mask, labels=ids, output_hidden_states=True, output_attentions=False,
                   use_cache=True, return_dict=True, position_ids=torch.arange(6).expand(2, 6), logits_to_keep=0)
        torch.testing.assert_close(out.logits, want)
        assert out.loss is not None and len(out.hidden_states) == 4
        as_tuple = reft(input_ids=ids, attention_mask=mask, return_dict=False)
        torch.testing.assert_close(as_tuple[0], want)
        first = reft(input_ids=ids[:, :4], attention_mask=mask[:, :4], use_cache=True)
        nxt = reft(input_ids=ids[:, 4:], attention_mask=mask, past_key_values=first.past_key_values,
                   intervention_locations=torch.full((2, 1), -1))
        assert nxt.logits.shape == (2, 2, 101)
        collected_ok = reft.generate(input_ids=ids, attention_mask=mask, max_new_tokens=2, do_sample=False,
                                     num_beams=1, output_scores=True, return_dict_in_generate=True)
        assert collected_ok.sequences.shape == (2, 8)


# -- item 14: malformed intervention_locations and sources -------------------------------------------------
BAD_LOCATIONS = {
    "ragged": ([[0, 1], [2]], PositionError, "ragged"),
    "string": ("l1", PositionError, "'l1' is a string"),
    "float": (torch.tensor([[1.0], [2.0]]), PositionError, "dtype torch.float32"),
    "4-D": (torch.zeros(2, 1, 1, 1, dtype=torch.long), PositionError, "shape (2, 1, 1, 1)"),
    "beyond": (torch.tensor([[0], [6]]), PositionError, "= 6 is outside the sequence"),
    "empty": (torch.zeros(0, dtype=torch.long), PositionError, "shape (0,)"),
    "empty batch": (torch.zeros(0, 1, dtype=torch.long), PositionError, "batch size 0"),
    "dict": ({"a": 1}, TypeError, "is a dict"),
}


@pytest.mark.parametrize("case", sorted(BAD_LOCATIONS))
def test_malformed_intervention_locations_name_the_argument(case):
    value, error, words = BAD_LOCATIONS[case]
    reft = _reft()
    ids, mask = pad_batch([[5, 6, 7, 8, 9, 10], [11, 12, 13]], "right")
    with pytest.raises(error) as err:
        reft(input_ids=ids, attention_mask=mask, intervention_locations=value)
    message = str(err.value)
    assert "intervention_locations" in message and words in message, message


@pytest.mark.parametrize("ids", [torch.zeros(2, 0, dtype=torch.long), torch.zeros(0, 4, dtype=torch.long),
                                 torch.tensor([5, 6, 7])], ids=["empty sequence", "empty batch", "1-D"])
def test_empty_or_flat_inputs_name_input_ids(ids):
    reft = _reft()
    with pytest.raises(PositionError, match=rf"input_ids has shape {tuple(ids.shape)}".replace("(", r"\(")
                       .replace(")", r"\)")):
        reft(input_ids=ids)


def _interchange_reft():
    return reftkit.get_reft_model(tiny_llama(), [{"layer": 1, "component": "block_output", "positions": "l1",
                                                  "intervention": "interchange"}])


@pytest.mark.parametrize("sources", [torch.tensor([[5, 6, 7], [8, 9, 10]]), "abc", [torch.tensor([[5, 6, 7]])]],
                         ids=["tensor", "string", "list of tensors"])
def test_sources_given_as_a_bare_tensor_raises_type_error_naming_it(sources):
    reft = _interchange_reft()
    ids, mask = pad_batch(SEQS, "right")
    with pytest.raises(TypeError) as err:
        reft(input_ids=ids, attention_mask=mask, sources=sources)
    message = str(err.value)
    assert "sources" in message and "input_ids" in message and "attention_mask" in message, message
    if isinstance(sources, torch.Tensor):
        assert "Tensor of shape (2, 3)" in message


def test_sources_as_a_dict_still_work_against_hand_located_call():
    reft = _interchange_reft()
    ids, mask = pad_batch(SEQS, "right")
    src = {"input_ids": torch.tensor([[20, 21, 22, 23, 24, 25], [26, 27, 28, 29, 30, 31]])}
    with torch.no_grad():
        got = reft(input_ids=ids, attention_mask=mask, sources=src).logits
        want = reft(input_ids=ids, attention_mask=mask, sources=src, intervention_locations=torch.tensor([[5], [2]]),
                    source_locations=torch.tensor([[5], [5]])).logits
    torch.testing.assert_close(got, want, atol=0, rtol=0)


# -- item 15: [B, 1, P] broadcasts like [B, P] -------------------------------------------------------------
def test_b1p_locations_broadcast_to_every_intervention():
    reft = _reft(layers=(0, 1, 2), positions="f1+l1", share_weights=False)
    assert len(reft.interventions) == 6
    ids, mask = pad_batch(SEQS, "right")
    flat = torch.tensor([[0, 5], [0, 2]])
    with torch.no_grad():
        want = reft(input_ids=ids, attention_mask=mask, intervention_locations=flat).logits
        got = reft(input_ids=ids, attention_mask=mask, intervention_locations=flat[:, None, :]).logits
        full = reft(input_ids=ids, attention_mask=mask,
                    intervention_locations=flat[:, None, :].expand(-1, 6, -1).contiguous()).logits
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    torch.testing.assert_close(got, full, atol=0, rtol=0)
    with pytest.raises(PositionError, match="2 intervention rows; this model has 6"):
        reft(input_ids=ids, attention_mask=mask, intervention_locations=flat[:, None, :].expand(-1, 2, -1))


def test_accepted_keywords_include_transformers_kwargs_and_the_forward_signature():
    import inspect

    from transformers.utils.generic import TransformersKwargs

    from reftkit.call_inputs import accepted_kwargs
    model = tiny_llama()
    names, open_ended = accepted_kwargs(model)
    assert not open_ended
    signature = {n for n, p in inspect.signature(type(model).forward).parameters.items()
                 if p.kind is p.POSITIONAL_OR_KEYWORD} - {"self"}
    assert set(TransformersKwargs.__optional_keys__) <= names and signature <= names
    assert "intervention_location" not in names and "label" not in names
