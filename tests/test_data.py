"""Data modules: positions over the prompt, exact prompt/response boundary, dynamic padding, errors."""
from __future__ import annotations

import pytest
import torch
from conftest import tiny_llama, tiny_tokenizer

import reftkit
from reftkit.data import DataError, length_grouped_order

PROMPTS = ["what is the capital of france ?", "define dog .", "how many legs ?"]
ANSWERS = ["paris .", "an animal that barks .", "eight"]


def _reft(positions="l1", **extra):
    return reftkit.get_reft_model(tiny_llama(), {"layer": [0, 1], "component": "block_output",
                                                 "positions": positions, "low_rank_dimension": 2, **extra})


def test_last_position_module_matches_a_hand_tokenisation():
    tok = tiny_tokenizer()
    module = reftkit.make_last_position_supervised_data_module(tok, _reft(), PROMPTS, ANSWERS)
    for i, item in enumerate(module["train_dataset"]):
        prompt = tok(PROMPTS[i])["input_ids"]            # <s> + words
        response = tok(ANSWERS[i] + " </s>", add_special_tokens=False)["input_ids"]
        assert item["input_ids"] == prompt + response
        assert item["labels"] == [-100] * len(prompt) + response
        assert item["locations"] == [[len(prompt) - 1]] * 2  # the last prompt token, for both interventions
        assert tok.convert_ids_to_tokens(item["input_ids"][len(prompt) - 1]) in ("?", ".")


@pytest.mark.parametrize("side", ["left", "right"])
def test_collator_pads_dynamically_and_shifts_locations(side):
    tok = tiny_tokenizer(padding_side=side)
    module = reftkit.make_last_position_supervised_data_module(tok, _reft(), PROMPTS, ANSWERS)
    batch = module["data_collator"]([module["train_dataset"][i] for i in range(3)])
    lengths = [len(module["train_dataset"][i]["input_ids"]) for i in range(3)]
    assert batch["input_ids"].shape == (3, max(lengths))     # to the longest in the batch, no further
    for row in range(3):
        loc = int(batch["intervention_locations"][row, 0, 0])
        prompt_len = len(tok(PROMPTS[row])["input_ids"])
        offset = max(lengths) - lengths[row] if side == "left" else 0
        assert loc == offset + prompt_len - 1
        assert batch["attention_mask"][row].sum() == lengths[row]
        assert batch["labels"][row, loc + 1] != -100 and batch["labels"][row, loc] == -100


def test_left_and_right_batches_train_on_the_same_loss():
    reft = _reft()
    torch.manual_seed(0)
    with torch.no_grad():
        for p in reft.interventions.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    losses = []
    for side in ("left", "right"):
        tok = tiny_tokenizer(padding_side=side)
        module = reftkit.make_last_position_supervised_data_module(tok, reft, PROMPTS, ANSWERS)
        batch = module["data_collator"]([module["train_dataset"][i] for i in range(3)])
        position_ids = (batch["attention_mask"].cumsum(1) - 1).clamp_min(0)
        with torch.no_grad():
            losses.append(reft(**batch, position_ids=position_ids).loss)
    torch.testing.assert_close(losses[0], losses[1], atol=1e-5, rtol=1e-5)


def test_multiple_positions_follow_the_reft_config_including_untied():
    tok = tiny_tokenizer()
    reft = _reft("f2+l2", share_weights=False)
    module = reftkit.make_multiple_position_supervised_data_module(tok, reft, PROMPTS, ANSWERS, positions=None)
    item = module["train_dataset"][0]
    n = len(tok(PROMPTS[0])["input_ids"])
    assert list(reft.interventions)[:2] == ["layer0_block_output_first", "layer0_block_output_last"]
    assert item["locations"] == [[0, 1], [n - 2, n - 1], [0, 1], [n - 2, n - 1]]
    # pyreft's signature without a ReftModel: num_interventions and share_weights
    module = reftkit.make_multiple_position_supervised_data_module(
        tok, None, PROMPTS, ANSWERS, positions="f1+l1", num_interventions=2, share_weights=False)
    assert module["train_dataset"][0]["locations"] == [[0], [n - 1]]


def test_chat_template_boundary():
    tok = tiny_tokenizer()
    tok.chat_template = ("{% for m in messages %}{% if m['role'] == 'user' %}define {{ m['content'] }} ?"
                         "{% else %} {{ m['content'] }} </s>{% endif %}{% endfor %}")
    module = reftkit.make_last_position_supervised_data_module(tok, _reft(), ["dog"], ["an animal that barks"],
                                                               chat_template=True)
    item = module["train_dataset"][0]
    words = tok.convert_ids_to_tokens(item["input_ids"])
    assert words == ["define", "dog", "?", "an", "animal", "that", "barks", "</s>"]
    assert item["labels"][:3] == [-100] * 3 and item["locations"][0] == [2]


def test_classification_module_and_label_errors():
    tok = tiny_tokenizer()
    module = reftkit.make_classification_data_module(tok, None, ["good movie", "awful movie"], ["pos", "neg"],
                                                     label_names=["neg", "pos"])
    batch = module["data_collator"](list(module["train_dataset"]))
    assert batch["labels"].tolist() == [1, 0] and module["num_labels"] == 2
    assert batch["intervention_locations"][:, 0, 0].tolist() == [2, 2]  # <s> good movie -> last token
    with pytest.raises(DataError, match=r"labels\[1\]=5 is out of range; expected 0..1"):
        reftkit.make_classification_data_module(tok, None, ["a", "b"], [0, 5], label_names=["neg", "pos"])
    with pytest.raises(DataError, match=r"labels\[0\]=-1 is out of range"):
        reftkit.make_classification_data_module(tok, None, ["a"], [-1])


def test_bad_input_errors():
    tok = tiny_tokenizer()
    reft = _reft()
    with pytest.raises(DataError, match="inputs is empty"):
        reftkit.make_last_position_supervised_data_module(tok, reft, [], [])
    with pytest.raises(DataError, match="inputs has 2 examples, outputs has 1"):
        reftkit.make_last_position_supervised_data_module(tok, reft, PROMPTS[:2], ANSWERS[:1])
    with pytest.raises(DataError, match=r"example 0: the prompt has 8 tokens, the model's context is 5"):
        reftkit.make_last_position_supervised_data_module(tok, reft, PROMPTS[:1], ANSWERS[:1], max_length=5)
    with pytest.raises(DataError, match=r"example 0: the response is empty \(after truncation to max_length=8\)"):
        reftkit.make_last_position_supervised_data_module(tok, reft, PROMPTS[:1], ANSWERS[:1], max_length=8)
    # an empty response string still teaches the model to stop: its one target is EOS
    module = reftkit.make_last_position_supervised_data_module(tok, reft, PROMPTS[:1], [""])
    assert [t for t in module["train_dataset"][0]["labels"] if t != -100] == [tok.eos_token_id]


def test_tokenizer_without_pad_token_pads_with_eos_or_refuses():
    tok = tiny_tokenizer(with_pad=False)
    module = reftkit.make_last_position_supervised_data_module(tok, _reft(), PROMPTS, ANSWERS)
    batch = module["data_collator"](list(module["train_dataset"]))
    assert (batch["input_ids"][batch["attention_mask"] == 0] == tok.eos_token_id).all()
    tok.eos_token = None
    with pytest.raises(DataError, match="neither pad_token nor eos_token"):
        module["data_collator"](list(module["train_dataset"]))


def test_length_grouped_order_is_a_seeded_permutation_of_similar_lengths():
    lengths = [5, 50, 6, 49, 7, 48, 8, 47]
    order = length_grouped_order(lengths, batch_size=2, seed=3)
    assert sorted(order) == list(range(8)) and order == length_grouped_order(lengths, batch_size=2, seed=3)
    for b in range(0, 8, 2):
        a, c = lengths[order[b]], lengths[order[b + 1]]
        assert abs(a - c) <= 3  # each batch pairs neighbours in length


def test_all_positions_cover_prompt_and_response():
    tok = tiny_tokenizer()
    reft = reftkit.get_reft_model(tiny_llama(), [
        {"layer": 0, "positions": "l1", "low_rank_dimension": 2},
        {"layer": 1, "component": "mlp_output", "positions": "all", "intervention": "ia3"}])
    module = reftkit.make_multiple_position_supervised_data_module(tok, reft, PROMPTS, ANSWERS, positions=None)
    for i, item in enumerate(module["train_dataset"]):
        prompt_len, total = len(tok(PROMPTS[i])["input_ids"]), len(item["input_ids"])
        last, every = item["locations"]
        assert [p for p in last if p >= 0] == [prompt_len - 1]
        assert [p for p in every if p >= 0] == list(range(total))  # IA3 acts on the response too


def test_tasks_reach_the_batch_and_route_training_rows():
    from reftkit.training import causal_lm_loss

    tok = tiny_tokenizer()
    mixed = reftkit.get_reft_model(tiny_llama(), [
        {"layer": 1, "positions": "l1", "low_rank_dimension": 2, "task": "a"},
        {"layer": 1, "positions": "l1", "low_rank_dimension": 2, "task": "b"}])
    tasks = ["a", "b", "a"]
    module = reftkit.make_last_position_supervised_data_module(tok, mixed, PROMPTS, ANSWERS, tasks=tasks)
    batch = module["data_collator"]([module["train_dataset"][i] for i in range(3)])
    assert batch["tasks"].tolist() == [0, 1, 0]
    with torch.no_grad():
        for iv in mixed.interventions.values():
            iv.source.bias.normal_()
    total = causal_lm_loss(mixed, **batch)["loss"]
    # reference: the sum of each task's rows run through a model that has only that task
    summed, count = 0.0, 0
    for k, (t, key) in enumerate((("a", "layer1_block_output"), ("b", "layer1_block_output_2"))):
        alone = reftkit.get_reft_model(tiny_llama(), {"layer": 1, "positions": "l1", "low_rank_dimension": 2})
        alone.interventions["layer1_block_output"].load_state_dict(mixed.interventions[key].state_dict())
        rows = [i for i, task in enumerate(tasks) if task == t]
        sub = {name: v[rows] for name, v in batch.items() if name != "tasks"}
        sub["intervention_locations"] = sub["intervention_locations"][:, [k]]
        n = int((sub["labels"][:, 1:] != -100).sum())
        summed, count = summed + causal_lm_loss(alone, **sub)["loss"] * n, count + n
    torch.testing.assert_close(total, summed / count, atol=1e-6, rtol=1e-6)


def test_task_errors_in_data_modules():
    tok = tiny_tokenizer()
    mixed = reftkit.get_reft_model(tiny_llama(), [{"layer": 1, "low_rank_dimension": 2, "task": "a"}])
    with pytest.raises(DataError, match=r"tasks\[1\]='z' is not a task of the model"):
        reftkit.make_last_position_supervised_data_module(tok, mixed, PROMPTS, ANSWERS, tasks=["a", "z", None])
    with pytest.raises(DataError, match="tasks has 2 entries, inputs has 3"):
        reftkit.make_last_position_supervised_data_module(tok, mixed, PROMPTS, ANSWERS, tasks=["a", "a"])
    with pytest.raises(DataError, match="not a ReftModel whose config assigns entries to tasks"):
        reftkit.make_last_position_supervised_data_module(tok, _reft(), PROMPTS, ANSWERS, tasks=["a"] * 3)
