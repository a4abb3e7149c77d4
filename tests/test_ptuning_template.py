"""Template P-tuning (Liu et al. 2021, "GPT Understands, Too"): pseudo tokens and anchors land where the
template says for batches of any padding; the forward equals one built by hand (a hand-written
bidirectional LSTM + Linear/ReLU/Linear, embeddings put together by hand), logits and encoder gradients;
only the encoder trains; generation equals a hand-rolled greedy loop; malformed templates raise."""
from __future__ import annotations

import pytest
import torch
from conftest import tiny_llama, tiny_tokenizer
from torch import nn

from reftkit.analysis import compare, get_ptuning_model
from reftkit.analysis.ptuning import PTuningModel
from reftkit.analysis.ptuning_template import parse_template

TEMPLATE = "[P][P][P] {input} [P][P] ? [P] {output}"
INPUTS = ["what is the capital of france", "dog", "how many legs spider"]
OUTPUTS = ["paris .", "animal that barks meows .", "eight"]


def _batch(tok, side: str, with_outputs: bool):
    """Rows ``<s> input [output </s>]`` padded on ``side``; labels on the output tokens only."""
    rows, labelled = [], []
    for text, answer in zip(INPUTS, OUTPUTS):
        prompt = tok(text)["input_ids"]
        answer_ids = tok(answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] if with_outputs else []
        rows.append(prompt + answer_ids)
        labelled.append([-100] * len(prompt) + answer_ids)
    width = max(map(len, rows))
    ids, mask, labels = [], [], []
    for row, lab in zip(rows, labelled):
        fill = width - len(row)
        ids.append([0] * fill + row if side == "left" else row + [0] * fill)
        mask.append([0] * fill + [1] * len(row) if side == "left" else [1] * len(row) + [0] * fill)
        labels.append([-100] * fill + lab if side == "left" else lab + [-100] * fill)
    return torch.tensor(ids), torch.tensor(mask), torch.tensor(labels)


def _expected_row(tok, text: str, answer: str | None):
    """The template written out for one example: (token ids, pseudo index, labels); -1 marks a pseudo slot."""
    question = tok("?", add_special_tokens=False)["input_ids"]
    x = tok(text, add_special_tokens=False)["input_ids"]
    y = tok(answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] if answer is not None else []
    slots = [tok.bos_token_id] + ["P0", "P1", "P2"] + x + ["P3", "P4"] + question + ["P5"] + y
    ids = [0 if isinstance(s, str) else s for s in slots]
    pseudo = [int(s[1:]) if isinstance(s, str) else -1 for s in slots]
    labels = [-100] * (len(slots) - len(y)) + y
    return ids, pseudo, labels


# ---------------------------------------------------------------------------------------------- placement
@pytest.mark.parametrize("input_side", ["left", "right"])
@pytest.mark.parametrize("out_side", ["left", "right"])
@pytest.mark.parametrize("with_outputs", [True, False])
def test_pseudo_tokens_and_anchors_sit_where_the_template_says(input_side, out_side, with_outputs):
    tok = tiny_tokenizer()
    adapted = get_ptuning_model(tiny_llama(), tok, TEMPLATE)
    assert adapted.layout.num_pseudo_tokens == 6
    ids, mask, labels = _batch(tok, input_side, with_outputs)
    built = adapted.layout.build(ids, mask, labels if with_outputs else None, side=out_side)
    width = built["input_ids"].shape[1]
    for b, (text, answer) in enumerate(zip(INPUTS, OUTPUTS)):
        want_ids, want_pseudo, want_labels = _expected_row(tok, text, answer if with_outputs else None)
        fill = width - len(want_ids)
        real = slice(fill, width) if out_side == "left" else slice(0, len(want_ids))
        pad = slice(0, fill) if out_side == "left" else slice(len(want_ids), width)
        assert built["attention_mask"][b, real].tolist() == [1] * len(want_ids)
        assert built["attention_mask"][b, pad].sum() == 0
        assert built["input_ids"][b, real].tolist() == want_ids
        assert built["pseudo_index"][b, real].tolist() == want_pseudo
        assert (built["pseudo_index"][b, pad] == -1).all()
        if with_outputs:
            assert built["labels"][b, real].tolist() == want_labels
            assert (built["labels"][b, pad] == -100).all()
    assert width == max(len(_expected_row(tok, t, a if with_outputs else None)[0]) for t, a in zip(INPUTS, OUTPUTS))


def test_the_structured_form_and_multi_token_anchors():
    tok = tiny_tokenizer()
    model = tiny_llama()
    string = get_ptuning_model(model, tok, TEMPLATE).layout
    structured = get_ptuning_model(model, tok, [3, "{input}", 2, "?", 1, "{output}"]).layout
    assert string == structured
    layout = get_ptuning_model(model, tok, "tell me [P*2] {input} yes or no ? [P]").layout
    words = tok("tell me", add_special_tokens=False)["input_ids"]
    tail = tok("yes or no ?", add_special_tokens=False)["input_ids"]
    assert layout.fixed == tuple(words + [-1, -1] + tail + [-1]) and layout.before == len(words) + 2
    assert parse_template("[P*2] {input}")[-1] == ("output", None)   # {output} defaults to the end


# ---------------------------------------------------------------------------------------------- exact forward
def _hand_encoder(adapted: PTuningModel):
    """The encoder written out: a table, nn.LSTM(bidirectional) and Linear/ReLU/Linear, weights copied."""
    encoder = adapted.encoder
    table = nn.Parameter(encoder.embedding.weight.detach().clone())
    lstm = mlp = None
    if encoder.kind == "lstm":
        lstm = nn.LSTM(encoder.lstm.input_size, encoder.lstm.hidden_size, num_layers=encoder.lstm.num_layers,
                       bidirectional=True, batch_first=True)
        lstm.load_state_dict(encoder.lstm.state_dict())
    if encoder.kind in ("lstm", "mlp"):
        first, last = encoder.mlp[0], encoder.mlp[2]
        mlp = nn.Sequential(nn.Linear(first.in_features, first.out_features), nn.ReLU(),
                            nn.Linear(last.in_features, last.out_features))
        mlp.load_state_dict(encoder.mlp.state_dict())

    def run() -> torch.Tensor:
        hidden = table[None]
        if lstm is not None:
            hidden = lstm(hidden)[0]
        if mlp is not None:
            hidden = mlp(hidden)
        return hidden[0]

    names = {"embedding.weight": table}
    names.update({f"lstm.{k}": v for k, v in (lstm.named_parameters() if lstm is not None else [])})
    names.update({f"mlp.{k}": v for k, v in (mlp.named_parameters() if mlp is not None else [])})
    return run, names


@pytest.mark.parametrize("encoder", ["lstm", "mlp", "none"])
def test_forward_equals_a_hand_built_forward_logits_and_encoder_gradients(encoder):
    tok = tiny_tokenizer()
    adapted = get_ptuning_model(tiny_llama(), tok, TEMPLATE, encoder=encoder)
    with torch.no_grad():
        for p in adapted.trained_parameters():
            p.add_(torch.randn_like(p) * 0.1)
    run, hand_params = _hand_encoder(adapted)
    ids, mask, labels = _batch(tok, "left", True)
    out = adapted(input_ids=ids, attention_mask=mask, labels=labels)
    out.loss.backward()

    base = adapted.base_model
    embed = base.get_input_embeddings()
    prompts = run()
    rows = [_expected_row(tok, t, a) for t, a in zip(INPUTS, OUTPUTS)]
    width = max(len(r[0]) for r in rows)
    embeds, hand_mask, hand_labels = [], [], []
    for row_ids, pseudo, lab in rows:   # by hand, right-padded: the real row, then padding
        vectors = [prompts[p] if p >= 0 else embed.weight[i] for i, p in zip(row_ids, pseudo)]
        vectors += [embed.weight[0]] * (width - len(row_ids))
        embeds.append(torch.stack(vectors))
        hand_mask.append([1] * len(row_ids) + [0] * (width - len(row_ids)))
        hand_labels.append(lab + [-100] * (width - len(row_ids)))
    hand = base(inputs_embeds=torch.stack(embeds), attention_mask=torch.tensor(hand_mask),
                labels=torch.tensor(hand_labels))
    hand.loss.backward()
    real = torch.tensor(hand_mask).bool()
    assert out.logits.shape == hand.logits.shape
    torch.testing.assert_close(out.logits[real], hand.logits[real], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.loss, hand.loss, atol=1e-5, rtol=1e-5)
    mine = dict(adapted.encoder.named_parameters())
    assert set(mine) == set(hand_params)
    for name, param in mine.items():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
        torch.testing.assert_close(param.grad, hand_params[name].grad, atol=1e-5, rtol=1e-5)


def test_parameter_counts_follow_the_template_and_encoder():
    tok, d = tiny_tokenizer(), 32
    counts = {e: get_ptuning_model(tiny_llama(), tok, TEMPLATE, encoder=e).parameter_counts()["trainable"]
              for e in ("lstm", "mlp", "none")}
    h = d // 2   # per direction; two layers, the second reading both directions
    lstm = 2 * (4 * h * (d + h) + 8 * h) + 2 * (4 * h * (2 * h + h) + 8 * h)
    assert counts == {"none": 6 * d, "mlp": 6 * d + (d * d + d) * 2,
                      "lstm": 6 * d + lstm + (2 * h * 2 * h + 2 * h) + (2 * h * d + d)}


# ---------------------------------------------------------------------------------------------- training
def test_only_the_encoder_trains_and_the_loss_falls(tmp_path):
    from transformers import TrainingArguments

    import reftkit
    from reftkit.training import ReftTrainer

    tok = tiny_tokenizer()
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {k: p.requires_grad for k, p in model.named_parameters()}
    adapted = get_ptuning_model(model, tok, TEMPLATE)
    assert {id(p) for p in adapted.parameters() if p.requires_grad} == {id(p) for p in adapted.encoder.parameters()}
    encoder_before = {k: v.clone() for k, v in adapted.encoder.state_dict().items()}
    module = reftkit.make_last_position_supervised_data_module(tok, model, INPUTS, OUTPUTS)
    batch = module["data_collator"]([module["train_dataset"][i] for i in range(len(INPUTS))])

    def loss() -> float:
        with torch.no_grad():
            return float(adapted(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                 labels=batch["labels"]).loss)

    start = loss()
    args = TrainingArguments(output_dir=str(tmp_path), num_train_epochs=10, per_device_train_batch_size=3,
                             learning_rate=3e-2, report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True,
                             logging_steps=100)
    ReftTrainer(model=adapted, args=args, train_dataset=module["train_dataset"],
                data_collator=module["data_collator"]).train()
    assert loss() < start - 0.1   # a random tiny model: the prompt can only reach so far (about 4.64 -> 4.44)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert any(not torch.equal(encoder_before[k], v) for k, v in adapted.encoder.state_dict().items())
    # saved and loaded on a fresh base: the same model
    adapted.save_pretrained(tmp_path / "saved")
    reloaded = PTuningModel.from_pretrained(tiny_llama(), tmp_path / "saved")
    with torch.no_grad():
        a = adapted(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        b = reloaded(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert torch.equal(a, b)
    other = get_ptuning_model(tiny_llama(), tok, "[P*2] {input} [P] {output}")
    with pytest.raises(ValueError, match="fixed="):
        other.load_trained(tmp_path / "saved")
    assert adapted.detach() is model
    assert {k: p.requires_grad for k, p in model.named_parameters()} == flags


def test_compare_runs_the_template_method():
    tok = tiny_tokenizer()
    frame = compare(tiny_llama(), tok, INPUTS, OUTPUTS, INPUTS[:2], OUTPUTS[:2],
                    [("p_tuning_template", {"template": TEMPLATE, "encoder": "mlp"})],
                    training={"num_train_epochs": 1, "per_device_train_batch_size": 3, "disable_tqdm": True},
                    max_new_tokens=3, progress=False)
    row = frame.iloc[0]
    assert row["kind"] == "template" and row["num_trainable_params"] == 6 * 32 + 2 * (32 * 32 + 32)
    assert row["file_size"] > 0 and row["train_loss"] == row["train_loss"]


# ---------------------------------------------------------------------------------------------- generation
def test_generate_equals_a_hand_rolled_greedy_loop_and_returns_text():
    tok = tiny_tokenizer(padding_side="left")
    adapted = get_ptuning_model(tiny_llama(), tok, TEMPLATE)
    with torch.no_grad():
        for p in adapted.trained_parameters():
            p.mul_(3.0)
    enc = tok(INPUTS, return_tensors="pt", padding=True)
    new = 5
    out = adapted.generate(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], max_new_tokens=new,
                           do_sample=False, eos_token_id=None, pad_token_id=0)
    assert torch.equal(out[:, :enc["input_ids"].shape[1]], enc["input_ids"])
    generated = out[:, enc["input_ids"].shape[1]:]
    texts = tok.batch_decode(generated, skip_special_tokens=True)
    # (the random model also picks ids the word-level tokenizer has no word for, which decode to nothing)
    assert len(texts) == len(INPUTS) and all(isinstance(t, str) for t in texts) and any(t.strip() for t in texts)

    base, embed = adapted.base_model, adapted.base_model.get_input_embeddings()
    with torch.no_grad():
        call = adapted.model.template_inputs(enc["input_ids"], enc["attention_mask"], side="left")
        embeds, mask, picked = call["inputs_embeds"], call["attention_mask"], []
        for _ in range(new):   # full forwards, no cache, positions counted over the real tokens
            positions = (mask.cumsum(-1) - 1).clamp_min(0)
            logits = base(inputs_embeds=embeds, attention_mask=mask, position_ids=positions).logits[:, -1]
            token = logits.argmax(-1)
            picked.append(token)
            embeds = torch.cat([embeds, embed(token)[:, None]], 1)
            mask = torch.cat([mask, mask.new_ones(len(token), 1)], 1)
    assert generated.tolist() == torch.stack(picked, 1).tolist()
    # the template changes the generations (the pseudo tokens were scaled up)
    with adapted.disabled():
        bare = adapted.generate(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                                max_new_tokens=new, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert not torch.equal(bare, out)


# ---------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("template, message", [
    ("[P] {question} {output}", r"unknown placeholder '\{question\}'"),
    ("[P][P] ? {output}", r"no \{input\} placeholder"),
    ("{input} ? {output}", "zero pseudo tokens"),
    ("[P*0] {input}", r"malformed pseudo-token marker '\[P\*0\]'"),
    ("[P2] {input}", r"malformed pseudo-token marker '\[P2\]'"),
    ("[P] {input} {input}", r"\{input\} appears 2 times"),
    ("[P] {input} {output} [P]", r"follows \{output\}"),
    ("[P] {output} {input}", r"\{output\} comes before \{input\}"),
    ("[P] {input} } {output}", "stray brace"),
    ([0, "{input}"], "pseudo-token count 0"),
    ([True, "{input}"], "neither a pseudo-token count"),
    ([2, "{input}", "{answer}"], r"unknown placeholder '\{answer\}'"),
    ([2, "{input}", ""], "empty anchor"),
    (42, "give a template string"),
])
def test_malformed_templates_raise_naming_the_field_and_value(template, message):
    with pytest.raises(ValueError, match=message) as info:
        get_ptuning_model(tiny_llama(), tiny_tokenizer(), template)
    assert str(info.value).startswith(f"template={template!r}")


def test_a_bad_encoder_and_a_bad_call_raise():
    with pytest.raises(ValueError, match="encoder='gru'"):
        get_ptuning_model(tiny_llama(), tiny_tokenizer(), TEMPLATE, encoder="gru")
    with pytest.raises(ValueError, match="encoder_hidden_size=0"):
        get_ptuning_model(tiny_llama(), tiny_tokenizer(), TEMPLATE, encoder_hidden_size=0)
    adapted = get_ptuning_model(tiny_llama(), tiny_tokenizer(), TEMPLATE)
    with pytest.raises(ValueError, match="inputs_embeds= is not supported"):
        adapted(inputs_embeds=torch.zeros(1, 2, 32))
    with pytest.raises(ValueError, match="contiguous"):
        adapted(input_ids=torch.tensor([[1, 5, 6]]), attention_mask=torch.tensor([[1, 0, 1]]))
