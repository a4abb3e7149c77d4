"""Representation-change analysis, subspace angles and the logit lens against independent references:
Hugging Face's own ``output_hidden_states``, hand-computed LoReFT edits and LoRA updates, numpy's
eigendecomposition for PCA, and closed-form angles."""
from __future__ import annotations

import contextlib
import copy
import math

import matplotlib
import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

matplotlib.use("Agg")

from conftest import tiny_gpt2, tiny_llama, tiny_tokenizer

import reftkit
from reftkit.analysis.representations import (
    fit_pca,
    hidden_states,
    pca_before_after,
    plot_pca,
    plot_representation_changes,
    representation_changes,
)
from reftkit.analysis.subspaces import (
    logit_lens,
    lora_subspaces,
    plot_logit_lens,
    plot_subspace_similarity,
    principal_angles,
    reft_subspaces,
    subspace_similarity,
)

PROMPTS = ["what is the capital of france", "good movie", "the sky is blue yes", "tell me about it"]
LAYER = 1  # where the LoReFT acts, in a 3-layer tiny Llama


def n_hooks(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def loreft_model(seed=0, layer=LAYER, positions="l1", rank=2):
    model = tiny_llama(seed=0)
    torch.manual_seed(seed)
    return reftkit.get_reft_model(model, [{"layer": layer, "positions": positions, "intervention": "loreft",
                                           "low_rank_dimension": rank}])


def hand_loreft(iv, h):
    """LoReFT by hand from its weights: h + (h Wᵀ + b − h R) Rᵀ."""
    rot = iv.rotation().detach()
    w, b = iv.source.weight.detach(), iv.source.bias.detach()
    return h + (h @ w.T + b - h @ rot) @ rot.T


def hf_states(model, ids):
    """Hugging Face's own hidden states of one unpadded prompt, [L + 1, T, d]; the last entry is normed."""
    with torch.no_grad():
        return torch.stack(model(input_ids=ids, output_hidden_states=True).hidden_states)[:, 0]


class FakeBaseline:
    """The weight-space baseline interface (``.model``, ``__call__``, ``.disabled()``) over a peft model."""

    def __init__(self, peft_model):
        self.model = peft_model

    def __call__(self, input_ids=None, attention_mask=None):
        return self.model(input_ids=input_ids, attention_mask=attention_mask)

    @contextlib.contextmanager
    def disabled(self):
        with self.model.disable_adapter():
            yield


def lora_model(layers=(2,), targets=("q_proj", "v_proj"), r=2, seed=1):
    import peft

    model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=r, lora_alpha=4, target_modules=list(targets),
                                                              layers_to_transform=list(layers)))
    torch.manual_seed(seed)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.5)
    return model.eval()


# ----------------------------------------------------------------------------- capture


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
def test_hidden_states_match_hugging_face_and_hooks_are_removed(make):
    model = make()
    ids = torch.tensor([[1, 5, 6, 7, 8], [1, 9, 10, 11, 12]])
    before = n_hooks(model)
    ours = hidden_states(model, {"input_ids": ids})
    assert n_hooks(model) == before
    with torch.no_grad():  # (transformers installs its own recording hooks here, for good)
        ref = model(input_ids=ids, output_hidden_states=True).hidden_states
    assert ours.shape == (4, 2, 5, 32) and ours.dtype == torch.float32
    for i in range(3):  # embeddings, blocks 0 and 1: identical
        torch.testing.assert_close(ours[i], ref[i], atol=0, rtol=0)
    norm = model.model.norm if make is tiny_llama else model.transformer.ln_f
    with torch.no_grad():  # HF's last entry has the final norm applied; ours is the raw block output
        torch.testing.assert_close(norm(ours[3]), ref[3], atol=1e-6, rtol=1e-6)
    before = n_hooks(model)
    with pytest.raises(IndexError):
        hidden_states(model, {"input_ids": torch.tensor([[1, 500]])})  # id beyond the vocabulary
    assert n_hooks(model) == before  # removed although the forward failed


def test_capture_sees_the_reft_edit_and_the_bare_base_is_unadapted():
    reft = loreft_model()
    tok = tiny_tokenizer("left")
    batch = dict(tok(PROMPTS[:3], return_tensors="pt", padding=True))
    mask = batch["attention_mask"].bool()
    base = hidden_states(reft.model, batch)  # outside reft(...): reftkit's hooks must do nothing
    fresh = hidden_states(tiny_llama(seed=0), batch)
    torch.testing.assert_close(base, fresh, atol=0, rtol=0)
    adapted = hidden_states(reft, batch)
    delta = (adapted - base).norm(dim=-1)  # [L + 1, B, T]
    assert bool((delta[:LAYER + 1] == 0).all())  # embeddings and blocks before the intervened one
    last = torch.zeros_like(mask)
    last[:, -1] = True  # left padding: every prompt's last token is the last column
    assert bool((delta[:, ~last] == 0).all())  # earlier positions never change (causal attention)
    iv = reft.interventions[f"layer{LAYER}_block_output"]
    with torch.no_grad():
        expected = hand_loreft(iv, base[LAYER + 1, :, -1])
    torch.testing.assert_close(adapted[LAYER + 1, :, -1], expected, atol=1e-6, rtol=1e-5)
    assert bool((delta[LAYER + 1:, :, -1] > 1e-4).all())


# ----------------------------------------------------------------------------- representation_changes


def test_representation_changes_against_hand_per_prompt_states():
    reft = loreft_model()
    tok = tiny_tokenizer("left")  # positions count from each prompt's first real token, not the padded column
    frame = representation_changes(reft, tok, PROMPTS[:3], batch_size=2, progress=False)  # 2 batches, 2 widths
    rows = {}
    for p in PROMPTS[:3]:  # one prompt at a time, no padding, HF's hidden states
        ids = tok(p, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            b = torch.stack(reft.model(input_ids=ids, output_hidden_states=True).hidden_states)[:, 0]
            a = torch.stack(reft(input_ids=ids, output_hidden_states=True).hidden_states)[:, 0]
        for i in range(3):  # layers -1, 0, 1 (HF's last entry is normed: compared in the capture test)
            for t in range(ids.shape[1]):
                d = float((a[i, t] - b[i, t]).norm())
                cos = 1.0 if d == 0 else float(torch.nn.functional.cosine_similarity(a[i, t], b[i, t], dim=0))
                rows.setdefault((i - 1, t), []).append((d, d / float(b[i, t].norm()), cos))
    got = frame.set_index(["layer", "position"])
    assert sorted(frame["layer"].unique()) == [-1, 0, 1, 2]
    for key, values in rows.items():
        mean = np.mean(values, axis=0)
        assert got.loc[key, "n_prompts"] == len(values)
        np.testing.assert_allclose(got.loc[key, ["delta_norm", "relative_delta", "cosine"]].to_numpy(float), mean,
                                   atol=1e-6, rtol=1e-5)
    unchanged = frame[frame["delta_norm"] == 0]
    assert len(unchanged) > 0 and (unchanged["cosine"] == 1.0).all()
    assert (frame.loc[frame["layer"] < LAYER, "delta_norm"] == 0).all()


def test_representation_changes_last_position_is_the_hand_edit_norm():
    reft = loreft_model()
    tok = tiny_tokenizer("left")
    frame = representation_changes(reft, tok, PROMPTS, positions="last", batch_size=3, progress=False)
    assert (frame["position"] == -1).all() and list(frame["layer"]) == [-1, 0, 1, 2]
    iv = reft.interventions[f"layer{LAYER}_block_output"]
    norms = []
    for p in PROMPTS:
        h = hf_states(reft.model, tok(p, return_tensors="pt")["input_ids"])[LAYER + 1, -1]
        with torch.no_grad():
            norms.append(float((hand_loreft(iv, h) - h).norm()))
    row = frame.set_index("layer")
    assert row.loc[-1, "delta_norm"] == 0 and row.loc[0, "delta_norm"] == 0 and row.loc[0, "cosine"] == 1
    assert row.loc[LAYER, "delta_norm"] == pytest.approx(np.mean(norms), rel=1e-5)
    assert (row["n_prompts"] == len(PROMPTS)).all()


def test_weight_space_baseline_by_duck_typing_and_plain_model_with_base():
    peft_model = lora_model(layers=(1,))
    tok = tiny_tokenizer("right")
    frame = representation_changes(FakeBaseline(peft_model), tok, PROMPTS, batch_size=2, positions="last",
                                   progress=False)
    hand = []
    for p in PROMPTS:  # peft's own switch, HF's own hidden states; layer 1 is HF entry 2 (not normed)
        ids = tok(p, return_tensors="pt")["input_ids"]
        adapted = hf_states(peft_model, ids)[2, -1]
        with peft_model.disable_adapter():
            base = hf_states(peft_model, ids)[2, -1]
        hand.append(float((adapted - base).norm()))
    got = frame.set_index("layer")["delta_norm"]
    assert got[-1] == 0 and got[0] == 0  # LoRA only in block 1
    assert got[1] == pytest.approx(np.mean(hand), rel=1e-5) and got[2] > 0
    # the same adaptation as a plain merged model against a separate base model
    merged = copy.deepcopy(peft_model).merge_and_unload()
    plain = representation_changes(merged, tok, PROMPTS, base=tiny_llama(), batch_size=2, positions="last",
                                   progress=False)
    np.testing.assert_allclose(plain["delta_norm"], frame["delta_norm"], rtol=1e-4, atol=1e-6)


def test_prompt_tuning_virtual_tokens_are_dropped():
    import peft

    model = peft.get_peft_model(tiny_llama(), peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2))
    frame = representation_changes(FakeBaseline(model.eval()), tiny_tokenizer("left"), PROMPTS, batch_size=2,
                                   progress=False)
    assert (frame.loc[frame["layer"] == -1, "delta_norm"] == 0).all()  # the prompt's own embeddings, aligned
    assert (frame.loc[frame["layer"] >= 0, "delta_norm"] > 1e-4).all()  # every token attends to the prefix
    assert frame["position"].max() == 6  # 7 tokens in the longest prompt, no virtual positions


# ----------------------------------------------------------------------------- PCA


def test_fit_pca_on_a_hand_built_dataset():
    x = torch.tensor([[3.0, 0, 0], [-3.0, 0, 0], [0, 1.0, 0], [0, -1.0, 0]]) + torch.tensor([1.0, 2.0, 3.0])
    pca = fit_pca(x, 1)
    torch.testing.assert_close(pca.explained_variance, torch.tensor([6.0], dtype=torch.float64))  # 18 / 3
    torch.testing.assert_close(pca.explained_variance_ratio, torch.tensor([0.9], dtype=torch.float64))
    torch.testing.assert_close(pca.components, torch.tensor([[1.0, 0, 0]], dtype=torch.float64))
    residual = ((x.double() - pca.inverse_transform(pca.transform(x))) ** 2).sum() / 3
    assert float(residual) == pytest.approx(2 / 3)  # the variance of the dropped component
    full = fit_pca(x, 2)
    torch.testing.assert_close(full.inverse_transform(full.transform(x)), x.double())
    with pytest.raises(ValueError, match="n_components=4"):
        fit_pca(x, 4)


def test_pca_before_after_against_numpy_eigendecomposition():
    reft = loreft_model()
    tok = tiny_tokenizer("left")
    frame = pca_before_after(reft, tok, PROMPTS, layer=LAYER, batch_size=3, progress=False)
    base, adapted = [], []
    for p in PROMPTS:  # HF's hidden states, one unpadded prompt at a time, last token
        ids = tok(p, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            base.append(reft.model(input_ids=ids, output_hidden_states=True).hidden_states[LAYER + 1][0, -1])
            adapted.append(reft(input_ids=ids, output_hidden_states=True).hidden_states[LAYER + 1][0, -1])
    base, adapted = torch.stack(base).double().numpy(), torch.stack(adapted).double().numpy()
    evals, evecs = np.linalg.eigh(np.cov(base.T))  # the covariance's eigenvectors, not an SVD
    order = np.argsort(evals)[::-1][:2]
    comps = evecs[:, order].T
    np.testing.assert_allclose(frame.attrs["explained_variance"], evals[order], rtol=1e-5)
    np.testing.assert_allclose(frame.attrs["explained_variance_ratio"], evals[order] / evals.sum(), rtol=1e-5)
    for state, x in (("base", base), ("adapted", adapted)):
        got = frame[frame["state"] == state].sort_values("prompt")[["pc1", "pc2"]].to_numpy()
        want = (x - base.mean(0)) @ comps.T
        signs = np.sign((got * want).sum(0))  # an eigenvector's sign is arbitrary
        np.testing.assert_allclose(got, want * signs, atol=1e-6)
    assert list(frame["state"]).count("base") == len(PROMPTS) and frame.attrs["layer"] == LAYER
    assert list(frame["text"][:len(PROMPTS)]) == PROMPTS


# ----------------------------------------------------------------------------- principal angles


def test_principal_angles_closed_forms():
    e = torch.eye(4, dtype=torch.float64)
    a = e[:, :2]
    torch.testing.assert_close(principal_angles(a, a), torch.zeros(2, dtype=torch.float64), atol=1e-12, rtol=0)
    mixed = a @ torch.tensor([[2.0, 1.0], [0.5, -3.0]], dtype=torch.float64)  # another basis, same span
    torch.testing.assert_close(principal_angles(a, mixed), torch.zeros(2, dtype=torch.float64), atol=1e-12, rtol=0)
    torch.testing.assert_close(principal_angles(a, e[:, 2:]), torch.full((2,), math.pi / 2, dtype=torch.float64))
    for t in (1e-6, 0.3, 1.2):  # span(e1) vs span(cos t e1 + sin t e2) -> t, small angles included
        got = principal_angles(e[:, 0], math.cos(t) * e[:, 0] + math.sin(t) * e[:, 1])
        assert float(got[0]) == pytest.approx(t, rel=1e-9)
    s, u = 0.7, 0.2  # two angles at once, given out of order
    b = torch.stack([math.cos(s) * e[:, 0] + math.sin(s) * e[:, 2], math.cos(u) * e[:, 1] + math.sin(u) * e[:, 3]], 1)
    torch.testing.assert_close(principal_angles(a, b), torch.tensor([u, s], dtype=torch.float64))
    assert principal_angles(e[:, :3], e[:, :1]).shape == (1,)
    with pytest.raises(ValueError, match="linearly dependent"):
        principal_angles(torch.stack([e[:, 0], 2 * e[:, 0]], 1), a)
    with pytest.raises(ValueError, match="different spaces"):
        principal_angles(a, torch.eye(3)[:, :1])


def test_subspace_similarity_frame_and_plot():
    e = torch.eye(4)
    spaces = {"x": e[:, :2], "y": e[:, 1:3], "z": e[:, 3], "small": torch.eye(3)[:, :1]}
    frame = subspace_similarity(spaces)
    assert len(frame) == 16
    got = frame.set_index(["a", "b"])
    assert got.loc[("x", "x"), "mean_cos2"] == pytest.approx(1) and got.loc[("x", "x"), "min_angle_deg"] == 0
    assert got.loc[("x", "y"), "mean_cos2"] == pytest.approx(0.5)
    assert got.loc[("x", "y"), "max_angle_deg"] == pytest.approx(90)
    assert got.loc[("x", "z"), "mean_cos2"] == pytest.approx(0) and got.loc[("z", "x"), "dim_b"] == 2
    assert math.isnan(got.loc[("x", "small"), "mean_cos2"])  # different ambient widths
    fig = plot_subspace_similarity(frame)
    ax = fig.axes[0]
    assert len(fig.axes) == 2 and len(ax.texts) == 16 and "mean_cos2" in ax.get_title()
    assert [t.get_text() for t in ax.get_xticklabels()] == list(spaces)
    np.testing.assert_allclose(np.asarray(ax.images[0].get_array())[0, :3], [1.0, 0.5, 0.0], atol=1e-6)


def test_reft_subspaces_read_each_family():
    model = tiny_llama()
    reft = reftkit.get_reft_model(model, [
        {"layer": 0, "positions": "l1", "intervention": "loreft", "low_rank_dimension": 3},
        {"layer": 1, "positions": "l1", "intervention": "noreft", "low_rank_dimension": 2},
        {"layer": 2, "positions": "l1", "intervention": "addition"}])
    got = reft_subspaces(reft, prefix="s0/")
    assert list(got) == ["s0/layer0_block_output", "s0/layer1_block_output"]
    torch.testing.assert_close(got["s0/layer0_block_output"], reft.interventions["layer0_block_output"].rotation())
    torch.testing.assert_close(got["s0/layer0_block_output"].T @ got["s0/layer0_block_output"], torch.eye(3),
                               atol=1e-6, rtol=0)
    torch.testing.assert_close(got["s0/layer1_block_output"],
                               reft.interventions["layer1_block_output"].projection.weight.T)
    only_add = reftkit.get_reft_model(tiny_llama(), [{"layer": 0, "positions": "l1", "intervention": "addition"}])
    with pytest.raises(ValueError, match="no intervention of this ReftModel has a low-rank subspace"):
        reft_subspaces(only_add)
    with pytest.raises(TypeError, match="ReftModel"):
        reft_subspaces(model)


def test_lora_subspaces_equal_the_column_space_of_b_times_a():
    peft_model = lora_model(layers=(0, 1, 2))
    layer = peft_model.base_model.model.model.layers[1].self_attn.v_proj
    with torch.no_grad():  # make one update rank 1: B's columns parallel
        layer.lora_B["default"].weight[:, 1] = 3 * layer.lora_B["default"].weight[:, 0]
        other = peft_model.base_model.model.model.layers[0].self_attn.q_proj  # rank 1 through A: col(BA) != col(B)
        other.lora_A["default"].weight[1] = -2 * other.lora_A["default"].weight[0]
        peft_model.base_model.model.model.layers[2].self_attn.q_proj.lora_B["default"].weight.zero_()
    got = lora_subspaces(FakeBaseline(peft_model))
    assert "model.layers.2.self_attn.q_proj" not in got and len(got) == 5  # the zero update is skipped
    for name, basis in got.items():
        module = peft_model.base_model.model.get_submodule(name)
        delta = (module.lora_B["default"].weight @ module.lora_A["default"].weight * module.scaling["default"]).double()
        u, s, _ = torch.linalg.svd(delta)
        rank = int((s > 1e-6 * s[0]).sum())
        assert basis.shape == (delta.shape[0], rank)
        hand = u[:, :rank]
        torch.testing.assert_close((basis @ basis.T).double(), hand @ hand.T, atol=1e-5, rtol=0)
    assert got["model.layers.1.self_attn.v_proj"].shape == (16, 1)  # GQA: v_proj is 16 wide, rank 1
    assert got["model.layers.0.self_attn.q_proj"].shape == (32, 1)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.zero_()
    with pytest.raises(ValueError, match="is zero"):
        lora_subspaces(peft_model)
    with pytest.raises(ValueError, match="no peft LoRA layer"):
        lora_subspaces(tiny_llama())


# ----------------------------------------------------------------------------- logit lens


def test_logit_lens_puts_an_unembedding_row_first():
    model = tiny_llama()
    tok = tiny_tokenizer()
    w_u = model.get_output_embeddings().weight.detach()
    t, s = tok.convert_tokens_to_ids("dog"), tok.convert_tokens_to_ids("movie")
    frame = logit_lens({"dog": w_u[t], "not movie": -w_u[s]}, model, tok, top_k=3)
    top = frame[(frame["name"] == "dog") & (frame["kind"] == "promoted") & (frame["rank"] == 0)].iloc[0]
    assert top["token"] == "dog" and top["score"] == pytest.approx(float(w_u[t] @ w_u[t]), rel=1e-5)
    low = frame[(frame["name"] == "not movie") & (frame["kind"] == "suppressed") & (frame["rank"] == 0)].iloc[0]
    assert low["token"] == "movie" and low["score"] < 0
    assert len(frame) == 2 * 2 * 3
    with torch.no_grad():  # a non-identity norm weight g: v = w_u[t] / g becomes w_u[t] again
        model.model.norm.weight.copy_(torch.rand(32) + 0.5)
    g = model.model.norm.weight.detach()
    frame = logit_lens(w_u[t] / g, model, tok, top_k=1)
    assert frame.loc[frame["kind"] == "promoted", "token"].item() == "dog"
    assert frame.loc[frame["kind"] == "promoted", "score"].item() == pytest.approx(float(w_u[t] @ w_u[t]), rel=1e-5)


def test_logit_lens_layernorm_centres_and_scales_the_direction():
    model = tiny_gpt2()
    with torch.no_grad():
        model.transformer.ln_f.weight.copy_(torch.rand(32) + 0.5)
        model.transformer.ln_f.bias.copy_(torch.randn(32))
    flat = logit_lens(torch.ones(32), model, top_k=2)
    assert np.allclose(flat["score"], 0, atol=1e-6)  # a constant direction is removed by the centring
    v = torch.randn(32, 2)
    frame = logit_lens({"v": v}, model, top_k=4)
    w_u, g = model.get_output_embeddings().weight.detach(), model.transformer.ln_f.weight.detach()
    hand = ((v - v.mean(0)) * g[:, None]).T @ w_u.T  # [2, vocab]
    for j in range(2):
        vals, ids = hand[j].topk(4)
        part = frame[(frame["direction"] == j) & (frame["kind"] == "promoted")].sort_values("rank")
        assert list(part["token_id"]) == ids.tolist()
        np.testing.assert_allclose(part["score"], vals.numpy(), rtol=1e-5)


def test_logit_lens_of_a_reft_model_and_its_plot():
    reft = loreft_model(rank=3)
    tok = tiny_tokenizer()
    frame = logit_lens(reft, tokenizer=tok, top_k=4)
    assert set(frame["name"]) == {"layer1_block_output"} and sorted(frame["direction"].unique()) == [0, 1, 2]
    assert len(frame) == 3 * 2 * 4
    assert frame["token"].str.len().min() > 0  # ids beyond the tokenizer get "<id N>"
    fig = plot_logit_lens(frame)
    assert len(fig.axes) == 3
    for ax, j in zip(fig.axes, range(3)):
        assert len(ax.patches) == 8 and ax.get_title() == f"layer1_block_output · direction {j}"
    assert len(plot_logit_lens(frame, max_panels=2).axes) == 2
    with pytest.raises(ValueError, match=r"expected \[32, r\]"):
        logit_lens(torch.ones(5, 1), reft.model)
    with pytest.raises(ValueError, match="top_k=1000"):
        logit_lens(reft, top_k=1000)


# ----------------------------------------------------------------------------- plots


def test_plot_representation_changes_and_plot_pca():
    reft = loreft_model()
    tok = tiny_tokenizer("left")
    frame = representation_changes(reft, tok, PROMPTS, progress=False)
    fig = plot_representation_changes(frame)
    heat, lines = fig.axes[0], fig.axes[1]
    assert len(fig.axes) == 3  # heat map, cosine lines, colour bar
    grid = frame.pivot(index="layer", columns="position", values="delta_norm").sort_index()
    np.testing.assert_allclose(np.ma.filled(heat.images[0].get_array(), np.nan), grid.to_numpy(), equal_nan=True)
    assert [t.get_text() for t in heat.get_yticklabels()] == ["emb", "0", "1", "2"]
    assert len(lines.lines) == 4 and lines.get_ylabel() == "cosine(base, adapted)"  # one line per layer
    assert heat.get_title() == "delta_norm (adapted − base)"
    last = representation_changes(reft, tok, PROMPTS, positions="last", progress=False)
    fig = plot_representation_changes(last, value="relative_delta", title="last token")
    assert len(fig.axes[1].lines) == 1 and len(fig.axes[1].lines[0].get_xdata()) == 4  # one line across layers
    assert fig.axes[1].get_xlabel() == "layer" and fig._suptitle.get_text() == "last token"

    pca = pca_before_after(reft, tok, PROMPTS, layer=LAYER, progress=False)
    fig = plot_pca(pca)
    ax = fig.axes[0]
    assert len(fig.axes) == 1 and len(ax.collections) == 3  # base, adapted, arrows
    quiver = ax.collections[2]
    assert quiver.N == len(PROMPTS)
    base = pca[pca["state"] == "base"].sort_values("prompt")
    np.testing.assert_allclose(ax.collections[0].get_offsets(), base[["pc1", "pc2"]].to_numpy())
    np.testing.assert_allclose(quiver.U, pca[pca["state"] == "adapted"]["pc1"].to_numpy() - base["pc1"].to_numpy())
    assert ax.get_xlabel().startswith("PC1 (") and "layer 1" in ax.get_title()
    with pytest.raises(ValueError, match="two components"):
        plot_pca(pca_before_after(reft, tok, PROMPTS, layer=0, n_components=1, progress=False))


# ----------------------------------------------------------------------------- errors


def llama_with(**changes):
    torch.manual_seed(0)
    cfg = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
               num_key_value_heads=2, vocab_size=101, max_position_embeddings=128, pad_token_id=0)
    return LlamaForCausalLM(LlamaConfig(**(cfg | changes))).eval()


@pytest.mark.parametrize("other, match", [
    (lambda: tiny_gpt2(), r"config.model_type: base has 'gpt2', adapted has 'llama'"),
    (lambda: tiny_llama(layers=2), "number of layers: base has 2, adapted has 3"),
    (lambda: llama_with(hidden_size=48, intermediate_size=96), "hidden size: base has 48, adapted has 32"),
    (lambda: llama_with(vocab_size=120), "input embedding rows: base has 120, adapted has 101"),
])
def test_incompatible_base_is_refused(other, match):
    with pytest.raises(ValueError, match=match):
        representation_changes(tiny_llama(), tiny_tokenizer(), PROMPTS, base=other())


def test_bad_inputs_raise_clear_errors():
    model, tok = tiny_llama(), tiny_tokenizer()
    reft = loreft_model()
    with pytest.raises(ValueError, match="plain LlamaForCausalLM.*pass base="):
        representation_changes(model, tok, PROMPTS)
    with pytest.raises(ValueError, match="prompts is empty"):
        representation_changes(reft, tok, [])
    with pytest.raises(TypeError, match="one string"):
        representation_changes(reft, tok, "good movie")
    with pytest.raises(ValueError, match="positions='first'"):
        representation_changes(reft, tok, PROMPTS, positions="first")
    for bad in (3, -2):
        with pytest.raises(ValueError, match=f"layer={bad} is out of range"):
            pca_before_after(reft, tok, PROMPTS, layer=bad)
    with pytest.raises(ValueError, match="position=5 is beyond prompt 1"):
        pca_before_after(reft, tok, PROMPTS, layer=0, position=5, progress=False)
    other = copy.deepcopy(tok)
    other.add_tokens(["zebra"])
    with pytest.raises(ValueError, match="different vocabularies.*zebra"):
        representation_changes(reft, tok, PROMPTS, adapted_tokenizer=other)
    representation_changes(reft, tok, PROMPTS[:1], adapted_tokenizer=copy.deepcopy(tok), progress=False)  # same: fine
    big = copy.deepcopy(tok)
    big.add_tokens([f"extra{i}" for i in range(60)])
    with pytest.raises(ValueError, match=f"tokenizer has {len(big)} tokens but the model's input embedding has 101"):
        representation_changes(reft, big, PROMPTS)
    with pytest.raises(ValueError, match="no pad token"):
        representation_changes(reft, tiny_tokenizer(with_pad=False), PROMPTS)
    with pytest.raises(ValueError, match=r"prompts\[1\]='' has no tokens"):
        representation_changes(reft, tiny_tokenizer_without_bos(), ["good", ""], progress=False)


def tiny_tokenizer_without_bos():
    tok = tiny_tokenizer()
    tok.backend_tokenizer.post_processor = None
    return tok
