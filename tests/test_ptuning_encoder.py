"""P-tuning's LSTM prompt encoder against the paper's definition written out by hand, for both encoders reftkit
offers: peft's (``get_weight_space_model(model, "p_tuning", encoder_reparameterization_type="LSTM")``) and the
template P-tuning's own (:class:`reftkit.analysis.ptuning_template.PromptEncoder`, ``encoder="lstm"``).

Liu et al. 2021, "GPT Understands, Too", §3.2: the pseudo-token embeddings e_1..e_N go through a bidirectional
LSTM and a two-layer ReLU MLP, h_i = MLP([→h_i ; ←h_i]). The reference below is the LSTM recurrence itself, in
float64, on the encoder's own weights (PyTorch's layout: the rows of ``weight_ih`` / ``weight_hh`` are the
input, forget, cell and output gates), not ``torch.nn.LSTM``, so it does not share the code it checks.
"""
from __future__ import annotations

import pytest
import torch
from conftest import tiny_llama

from reftkit.analysis.baselines import get_weight_space_model
from reftkit.analysis.ptuning_template import PromptEncoder

H, N, HID = 32, 4, 8  # tiny_llama's width, virtual tokens, the encoder's hidden size
OPTIONS = {"num_virtual_tokens": N, "encoder_hidden_size": HID, "encoder_reparameterization_type": "LSTM"}


def _encoder(adapted):
    peft_model = adapted.peft_model
    return peft_model.prompt_encoder[peft_model.active_adapter]


def _sigmoid(x):
    return 1 / (1 + torch.exp(-x))


def _lstm_direction(xs, w_ih, w_hh, b_ih, b_hh, reverse, gates="ifgo"):
    """One direction of one LSTM layer over the sequence ``xs`` [T, in], h_0 = c_0 = 0:
    i, f, o = σ(W x_t + U h + b), g = tanh(...), c = f·c + i·g, h = o·tanh(c)."""
    hid = w_hh.shape[1]
    rows = {name: slice(k * hid, (k + 1) * hid) for k, name in enumerate(gates)}
    h, c = torch.zeros(hid, dtype=torch.float64), torch.zeros(hid, dtype=torch.float64)
    out = [None] * len(xs)
    for t in (reversed(range(len(xs))) if reverse else range(len(xs))):
        pre = w_ih @ xs[t] + b_ih + w_hh @ h + b_hh
        i, f, o = _sigmoid(pre[rows["i"]]), _sigmoid(pre[rows["f"]]), _sigmoid(pre[rows["o"]])
        g = torch.tanh(pre[rows["g"]])
        c = f * c + i * g
        h = o * torch.tanh(c)
        out[t] = h
    return torch.stack(out)


def _hand_prompt(encoder, lstm="lstm_head", mlp="mlp_head", gates="ifgo"):
    """h_i = W_2 ReLU(W_1 [→h_i ; ←h_i] + b_1) + b_2 over a stacked bidirectional LSTM, by hand; ``lstm`` and
    ``mlp`` name the encoder's submodules (peft: ``lstm_head`` / ``mlp_head``)."""
    def p(name):
        return encoder.get_parameter(name).detach().double()

    xs = encoder.embedding.weight.detach().double()  # e_1..e_N (the pseudo tokens in order)
    for layer in range(encoder.get_submodule(lstm).num_layers):
        directions = []
        for reverse in (False, True):
            tail = f"_l{layer}" + ("_reverse" if reverse else "")
            directions.append(_lstm_direction(xs, p(f"{lstm}.weight_ih{tail}"), p(f"{lstm}.weight_hh{tail}"),
                                              p(f"{lstm}.bias_ih{tail}"), p(f"{lstm}.bias_hh{tail}"), reverse, gates))
        xs = torch.cat(directions, -1)
    hidden = torch.relu(xs @ p(f"{mlp}.0.weight").T + p(f"{mlp}.0.bias"))
    return hidden @ p(f"{mlp}.2.weight").T + p(f"{mlp}.2.bias")


def _randomise_biases(encoder):
    with torch.no_grad():  # the default inits are random already; make the biases non-zero as well
        for name, param in encoder.named_parameters():
            if "bias" in name:
                param.normal_(0, 0.3)


def _cut_second_layer_backward(encoder, lstm):
    with torch.no_grad():
        encoder.get_submodule(lstm).weight_ih_l1_reverse.zero_()


def test_peft_lstm_encoder_is_a_bidirectional_lstm_then_a_relu_mlp():
    torch.manual_seed(0)
    encoder = _encoder(get_weight_space_model(tiny_llama(), "p_tuning", **OPTIONS))
    _randomise_biases(encoder)
    with torch.no_grad():
        got = encoder(torch.arange(N)[None])[0].double()
    hand = _hand_prompt(encoder)
    assert got.shape == (N, H)
    torch.testing.assert_close(got, hand, atol=1e-5, rtol=1e-5)
    # the reference tells the claim apart: the gates read in another order differ, and so does the encoder once
    # its second layer's backward direction is cut from its input
    assert (got - _hand_prompt(encoder, gates="figo")).abs().max() > 1e-3
    _cut_second_layer_backward(encoder, "lstm_head")
    with torch.no_grad():
        assert (encoder(torch.arange(N)[None])[0].double() - hand).abs().max() > 1e-3


@pytest.mark.parametrize("hidden_size, num_layers", [(8, 2), (None, 1)])
def test_template_ptuning_lstm_encoder_is_a_bidirectional_lstm_then_a_relu_mlp(hidden_size, num_layers):
    torch.manual_seed(1)
    encoder = PromptEncoder(5, H, "lstm", hidden_size=hidden_size, num_layers=num_layers)
    assert encoder.lstm.hidden_size == (hidden_size or H // 2)  # default d // 2, as the authors' code
    _randomise_biases(encoder)
    with torch.no_grad():
        got = encoder().double()
    hand = _hand_prompt(encoder, lstm="lstm", mlp="mlp")
    assert got.shape == (5, H)
    torch.testing.assert_close(got, hand, atol=1e-5, rtol=1e-5)
    assert (got - _hand_prompt(encoder, lstm="lstm", mlp="mlp", gates="figo")).abs().max() > 1e-3
    if num_layers == 2:
        _cut_second_layer_backward(encoder, "lstm")
        with torch.no_grad():
            assert (encoder().double() - hand).abs().max() > 1e-3


def test_lstm_encoder_parameter_count_by_hand():
    """Embeddings N·H; per LSTM layer and direction 4·HID·(in + HID) + 2·4·HID (PyTorch keeps two bias vectors),
    in = H for the first layer and 2·HID for the second (peft's encoder_num_layers defaults to 2); the MLP
    2·HID → 2·HID → H."""
    adapted = get_weight_space_model(tiny_llama(), "p_tuning", **OPTIONS)
    lstm = 2 * (4 * HID * (H + HID) + 8 * HID) + 2 * (4 * HID * (2 * HID + HID) + 8 * HID)
    mlp = (2 * HID * 2 * HID + 2 * HID) + (2 * HID * H + H)
    assert adapted.parameter_counts()["trainable"] == N * H + lstm + mlp == 5296


def test_the_model_reads_the_encoded_prompt_before_the_input():
    """The adapted forward is the base model on [h_1..h_N ; embed(input_ids)], and training reaches the LSTM."""
    torch.manual_seed(1)
    model = tiny_llama()
    adapted = get_weight_space_model(model, "p_tuning", **OPTIONS)
    encoder = _encoder(adapted)
    ids = torch.tensor([[5, 9, 14, 22, 7], [6, 10, 15, 23, 8]])
    with torch.no_grad():
        logits = adapted(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        prompt = _hand_prompt(encoder).float().expand(len(ids), -1, -1)
        embeds = torch.cat([prompt, model.get_input_embeddings()(ids)], 1)
        want = model(inputs_embeds=embeds, attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long)).logits
        bare = model(input_ids=ids).logits
    assert logits.shape == (2, N + ids.shape[1], model.config.vocab_size)
    torch.testing.assert_close(logits[:, N:], want[:, N:], atol=1e-4, rtol=1e-4)
    assert (logits[:, N:] - bare).abs().max() > 1e-2  # the prompt matters
    out = adapted(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids)
    out.loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in encoder.lstm_head.parameters())
    assert all(p.grad is None for p in model.parameters())

