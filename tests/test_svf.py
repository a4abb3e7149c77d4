"""SVF (Transformer²): identity at z = 1, recomposition against a hand-written U·diag(σ⊙z)·Vᵀ, the
released code's renormalisation and sigmoid policy, saving, and giving the base back."""
from __future__ import annotations

import pytest
import torch
from conftest import tiny_llama
from torch import nn

from reftkit.analysis.svf import (
    SVFLinear,
    apply_svf,
    load_svf,
    remove_svf,
    save_svf,
    svf_disabled,
    svf_modules,
    svf_parameter_count,
)


def _ids():
    torch.manual_seed(1)
    return torch.randint(3, 100, (2, 7))


def test_z_one_leaves_outputs_unchanged():
    model = tiny_llama()
    ids = _ids()
    with torch.no_grad():
        before = model(input_ids=ids).logits
        apply_svf(model)
        after = model(input_ids=ids).logits
    assert len(svf_modules(model)) == 3 * 3  # gate, up, down in each of 3 layers
    assert torch.allclose(after, before, atol=1e-5), (after - before).abs().max()


# A weight with a known SVD, written down rather than computed: W = U diag(4, 2, 1, 1/2) Vᵀ (4 × 5), U a 4 × 4
# Hadamard matrix / 2, V's columns a rotation of e1, e2 then e4, e3 (so the code's own SVD is not the reference).
U_HAND = torch.tensor([[1, 1, 1, 1], [1, -1, 1, -1], [1, 1, -1, -1], [1, -1, -1, 1]], dtype=torch.float64) / 2
V_HAND = torch.tensor([[3, -4, 0, 0], [4, 3, 0, 0], [0, 0, 0, 5], [0, 0, 5, 0], [0, 0, 0, 0]], dtype=torch.float64) / 5
SIGMA_HAND = [4.0, 2.0, 1.0, 0.5]  # Σσ = 15/2
BIAS_HAND = [0.5, -1.0, 0.25, 2.0]


def _hand_w(singular_values):
    return U_HAND @ torch.diag(torch.tensor(singular_values, dtype=torch.float64)) @ V_HAND.T


def _hand_linear():
    linear = nn.Linear(5, 4)
    with torch.no_grad():
        linear.weight.copy_(_hand_w(SIGMA_HAND))
        linear.bias.copy_(torch.tensor(BIAS_HAND))
    return linear


@pytest.mark.parametrize("z, sigma_new", [
    # σ ⊙ z = (8, 2, 1, 1/2), Σ = 23/2; renormalised by Σσ / Σ(σ ⊙ z) = 15/23
    ([2.0, 1.0, 1.0, 1.0], [120 / 23, 30 / 23, 15 / 23, 15 / 46]),
    # σ ⊙ z = (2, 3/2, 1/4, 1/4), Σ = 4; renormalised by (15/2) / 4 = 15/8
    ([0.5, 0.75, 0.25, 0.5], [15 / 4, 45 / 16, 15 / 32, 15 / 32]),
])
def test_recomposition_against_a_known_svd(z, sigma_new):
    """W' = U diag(σ ⊙ z) Vᵀ · Σσ / Σ(σ ⊙ z) (Transformer² §3.1 with the released code's renormalisation)."""
    svf = SVFLinear(_hand_linear())
    assert svf.S.tolist() == pytest.approx(SIGMA_HAND, abs=1e-6)
    with torch.no_grad():
        svf.z.copy_(torch.tensor(z))
    want = _hand_w(sigma_new)
    assert torch.allclose(svf.composed_weight().double(), want, atol=1e-6)
    # the layer's output: x W'ᵀ + b; for x = e_j that is column j of W' plus the bias
    x = torch.eye(5)
    assert torch.allclose(svf(x).double(), want.T + torch.tensor(BIAS_HAND, dtype=torch.float64), atol=1e-6)
    # the renormalisation keeps Σσ = 15/2
    assert sum(sigma_new) == pytest.approx(sum(SIGMA_HAND))


def test_sigmoid_policy_of_the_released_code():
    """m(z) = max_mult · sigmoid(z) (SakanaAI/self-adaptive-llms' policy); z = 0, ±ln 3 give 1/2, 3/4, 1/4."""
    ln3 = float(torch.tensor(3.0).log())
    for max_mult in (1.0, 2.0):
        svf = SVFLinear(_hand_linear(), parametrization="sigmoid", max_mult=max_mult)
        with torch.no_grad():
            svf.z.copy_(torch.tensor([0.0, ln3, -ln3, 0.0]))
        assert svf.mask().tolist() == pytest.approx([max_mult / 2, 3 * max_mult / 4, max_mult / 4, max_mult / 2],
                                                    abs=1e-6)
        # σ ⊙ m ∝ (2, 3/2, 1/4, 1/4): the W' of the identity parametrisation at z = (1/2, 3/4, 1/4, 1/2), whatever
        # max_mult (the renormalisation divides a uniform factor out, as in the released code)
        assert torch.allclose(svf.composed_weight().double(), _hand_w([15 / 4, 45 / 16, 15 / 32, 15 / 32]), atol=1e-6)
    svf = SVFLinear(_hand_linear(), parametrization="sigmoid")
    with torch.no_grad():
        svf.z.fill_(0.7)  # a uniform mask: the renormalisation gives W back exactly
    assert torch.allclose(svf.composed_weight().double(), _hand_w(SIGMA_HAND), atol=1e-6)
    # init: z = 0.1 + 0.01·N(0, 1) (init_val 0.1), drawn from the given generator
    wide = SVFLinear(nn.Linear(200, 200), parametrization="sigmoid", generator=torch.Generator().manual_seed(3))
    z = wide.z.detach()
    assert float(z.mean()) == pytest.approx(0.1, abs=3e-3)  # 200 draws: the mean's sd is 7e-4
    assert float(z.std()) == pytest.approx(0.01, rel=0.2)  # the sd's relative sd is 5%
    with pytest.raises(ValueError, match="parametrization='tanh'"):
        SVFLinear(_hand_linear(), parametrization="tanh")


def test_gradients_reach_z_only_and_training_changes_the_output():
    model = tiny_llama()
    modules = apply_svf(model, target_modules=["q_proj", "down_proj"])
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith(".z") for n in trainable)
    assert sum(p.numel() for n, p in model.named_parameters() if p.requires_grad) == \
        svf_parameter_count(tiny_llama(), ["q_proj", "down_proj"]) == 3 * (32 + 32)
    ids = _ids()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert all(m.z.grad is not None and m.z.grad.abs().sum() > 0 for m in modules.values())


def test_save_load_disable_and_remove(tmp_path):
    model = tiny_llama()
    reference = {k: v.clone() for k, v in model.state_dict().items()}
    ids = _ids()
    with torch.no_grad():
        base_logits = model(input_ids=ids).logits
        apply_svf(model)
        for m in svf_modules(model).values():
            m.z.uniform_(0.5, 1.5)
        adapted = model(input_ids=ids).logits
        with svf_disabled(model):
            assert torch.equal(model(input_ids=ids).logits, base_logits)
    assert not torch.allclose(adapted, base_logits, atol=1e-4)
    save_svf(model, tmp_path)
    fresh = tiny_llama()
    load_svf(fresh, tmp_path)
    with torch.no_grad():
        assert torch.allclose(fresh(input_ids=ids).logits, adapted, atol=1e-6)
    remove_svf(model)
    assert not svf_modules(model)
    assert all(torch.equal(reference[k], v) for k, v in model.state_dict().items())
    other = tiny_llama(layers=2)
    with pytest.raises(ValueError, match="no SVF layer"):
        load_svf(other, tmp_path)


def test_target_errors_name_the_value():
    with pytest.raises(ValueError, match="target_modules=\\['nope'\\].*gate_proj"):
        apply_svf(tiny_llama(), target_modules=["nope"])
