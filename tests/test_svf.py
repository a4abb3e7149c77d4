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


def test_recomposition_matches_hand_written_svd_with_renormalisation():
    torch.manual_seed(0)
    linear = nn.Linear(12, 7)
    svf = SVFLinear(linear)
    with torch.no_grad():
        svf.z.copy_(torch.rand(7) * 2)
    w = linear.weight.detach().double()
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    z = svf.z.detach().double()
    hand = u @ torch.diag(s * z) @ vh * (s.sum() / (s * z).sum())
    assert torch.allclose(svf.composed_weight().double(), hand, atol=1e-5)
    x = torch.randn(3, 12)
    assert torch.allclose(svf(x), x @ hand.float().T + linear.bias, atol=1e-5)
    # the renormalisation keeps Σσ: the new singular values sum to the old ones
    assert torch.allclose(torch.linalg.svdvals(svf.composed_weight().double()).sum(), s.sum(), rtol=1e-5)


def test_sigmoid_policy_of_the_released_code():
    torch.manual_seed(0)
    linear = nn.Linear(8, 8)
    svf = SVFLinear(linear, parametrization="sigmoid", generator=torch.Generator().manual_seed(3))
    # init 0.1 + 0.01·N(0,1), mask = sigmoid(z)·max_mult
    assert torch.allclose(svf.z.detach().mean(), torch.tensor(0.1), atol=0.02)
    assert torch.allclose(svf.mask(), torch.sigmoid(svf.z)), "max_mult=1"
    with torch.no_grad():
        svf.z.fill_(0.7)  # a uniform mask: the renormalisation gives W back exactly
    assert torch.allclose(svf.composed_weight(), linear.weight, atol=1e-5)
    with pytest.raises(ValueError, match="parametrization='tanh'"):
        SVFLinear(linear, parametrization="tanh")


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
