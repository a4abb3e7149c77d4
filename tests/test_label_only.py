"""The label-only loss's one-pass cross entropy against torch's and against the formula in float64."""
import pytest
import torch
import torch.nn.functional as F

from reftkit.training.label_only import cross_entropy_sum, label_only_loss


@pytest.mark.parametrize("rows", [0, 1, 7])
def test_cross_entropy_sum_matches_torch_value_and_gradient(rows):
    torch.manual_seed(rows)
    z = (torch.randn(rows, 301) * 4).requires_grad_()
    y = torch.randint(0, 301, (rows,))
    ours = cross_entropy_sum(z, y)
    (ours * 0.37).backward()
    ref = z.detach().clone().requires_grad_()
    theirs = F.cross_entropy(ref, y, reduction="sum")
    (theirs * 0.37).backward()
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(z.grad, ref.grad, rtol=1e-5, atol=1e-7)


def test_cross_entropy_sum_is_the_formula():
    torch.manual_seed(0)
    z = torch.randn(5, 11, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 10, 3, 3, 7])
    cross_entropy_sum(z, y).backward()
    p = torch.exp(z.detach()) / torch.exp(z.detach()).sum(1, keepdim=True)
    expected = -torch.log(p[torch.arange(5), y]).sum()
    torch.testing.assert_close(cross_entropy_sum(z.detach(), y), expected)
    torch.testing.assert_close(z.grad, p - F.one_hot(y, 11).double())
    assert torch.autograd.gradcheck(lambda t: cross_entropy_sum(t, y), (z.detach().clone().requires_grad_(),))


def test_cross_entropy_sum_refuses_wrong_shapes():
    with pytest.raises(ValueError, match=r"logits \(2, 3, 4\) must be \[N, vocab\]"):
        cross_entropy_sum(torch.zeros(2, 3, 4), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"targets \(3,\)"):
        cross_entropy_sum(torch.zeros(2, 4), torch.zeros(3, dtype=torch.long))


def test_label_only_loss_equals_hf_shifted_loss():
    torch.manual_seed(1)
    head = torch.nn.Linear(6, 13, bias=False)
    hidden = torch.randn(2, 5, 6, requires_grad=True)
    labels = torch.tensor([[-100, -100, 4, 9, 1], [-100, 2, 2, -100, -100]])
    loss, logits = label_only_loss(hidden, head, labels, None)
    full = head(hidden)
    expected = F.cross_entropy(full[:, :-1].reshape(-1, 13), labels[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(loss, expected)
    assert logits.shape == (5, 13)
    (g,) = torch.autograd.grad(loss, hidden)
    (g_ref,) = torch.autograd.grad(expected, hidden)
    torch.testing.assert_close(g, g_ref)
    summed, _ = label_only_loss(hidden, head, labels, 10)
    torch.testing.assert_close(summed, expected * 5 / 10)
