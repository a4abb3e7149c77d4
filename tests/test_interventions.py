"""Each LoReFT-family intervention against a hand-written forward of its formula."""
from __future__ import annotations

import pytest
import torch

from reftkit.interventions import (
    ConsReFT,
    DiReFT,
    InterventionError,
    LobiReFT,
    LoReFT,
    LoreftIntervention,
    NodiReFT,
    NoReFT,
    get_intervention_class,
)
from reftkit.interventions.reft import REFT_FAMILY

D, R = 16, 3


def _randomise(iv: torch.nn.Module) -> None:
    torch.manual_seed(1)
    with torch.no_grad():
        for p in iv.parameters():
            p.add_(torch.randn_like(p) * 0.5)


def _basis(iv) -> torch.Tensor:
    return iv.rotation().detach()


def reference(iv, h: torch.Tensor) -> torch.Tensor:
    """The paper's formulas in column-vector form, computed in float64 from the raw weights."""
    h = h.double()
    name = iv.name
    act = torch.relu if iv.hparams.get("act_fn") == "relu" else (lambda x: x)
    if name in ("loreft", "direft", "consreft", "lobireft"):
        Rm = _basis(iv).double().T  # r x d, orthonormal rows
    if name in ("loreft", "direft", "noreft", "nodireft"):
        W, b = iv.source.weight.double(), iv.source.bias.double()
        Wh = act(h @ W.T + b)
    if name == "loreft":
        return h + (Wh - h @ Rm.T) @ Rm
    if name == "direft":
        return h + Wh @ Rm
    if name in ("noreft", "nodireft"):
        P = iv.projection.weight.double()
        Ph = h @ P.T + (iv.projection.bias.double() if iv.projection.bias is not None else 0)
        return h + ((Wh - Ph) @ P if name == "noreft" else Wh @ P)
    if name == "consreft":
        return h + (iv.bias.double() - h @ Rm.T) @ Rm
    if name == "lobireft":
        return h + (iv.bias.double() @ Rm).expand_as(h)
    raise AssertionError(name)


# the LoReFT family; the other families have their own test files
FAMILY = {cls.name: cls for cls in REFT_FAMILY}
CASES = [(n, a) for n in sorted(FAMILY) for a in (None, "relu")
         if a is None or "act_fn" in FAMILY[n].arguments]


@pytest.mark.parametrize("name, act_fn", CASES)
def test_matches_hand_written_formula(name, act_fn):
    kwargs = {"low_rank_dimension": R} | ({"act_fn": act_fn} if act_fn else {})
    iv = get_intervention_class(name)(embed_dim=D, **kwargs).eval()
    _randomise(iv)
    h = torch.randn(2, 5, D)
    torch.testing.assert_close(iv(h).double(), reference(iv, h), atol=1e-5, rtol=1e-5)


def test_rotation_is_orthonormal_and_assignable():
    iv = LoReFT(embed_dim=D, low_rank_dimension=R)
    _randomise(iv)
    basis = iv.rotation()
    torch.testing.assert_close(basis.T @ basis, torch.eye(R), atol=1e-6, rtol=0)
    # QR keeps the column space of the raw matrix
    raw = iv.rotation.raw.detach()
    proj = basis @ basis.T
    torch.testing.assert_close(proj @ raw, raw, atol=1e-5, rtol=1e-5)
    q, _ = torch.linalg.qr(torch.randn(D, R))
    iv.rotation.assign(q)
    torch.testing.assert_close(iv.rotation(), q, atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", ["loreft", "noreft", "direft", "nodireft", "lobireft"])
def test_dropout_hits_the_edit_only_and_is_off_in_eval(name):
    iv = get_intervention_class(name)(embed_dim=D, low_rank_dimension=R, dropout=0.5)
    _randomise(iv)
    h = torch.randn(4, 6, D)
    iv.train()
    torch.manual_seed(0)
    out = iv(h)
    edit = reference(iv.eval(), h).float() - h
    # every coordinate is either h (edit dropped) or h + 2 * edit (kept, rescaled), never 0 from h
    dropped = torch.isclose(out, h, atol=1e-6)
    kept = torch.isclose(out, h + 2 * edit, atol=1e-5)
    assert bool((dropped | kept).all())
    assert 0.3 < dropped.float().mean() < 0.7
    iv.eval()
    torch.testing.assert_close(iv(h).double(), reference(iv, h), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", sorted(FAMILY))
def test_bf16_inputs_keep_float32_math(name):
    iv = get_intervention_class(name)(embed_dim=64, low_rank_dimension=8).eval()
    _randomise(iv)
    h = torch.randn(3, 7, 64)
    out = iv(h.bfloat16())
    assert out.dtype == torch.bfloat16
    expected = reference(iv, h.bfloat16().float())
    # one bf16 rounding of the result, nothing worse
    torch.testing.assert_close(out.double(), expected, atol=0.0, rtol=2 ** -7)
    basis = iv.rotation() if hasattr(iv, "rotation") else None
    if basis is not None:
        assert basis.dtype == torch.float32


def test_no_nan_gradients_and_all_parameters_train():
    for name in FAMILY:
        iv = get_intervention_class(name)(embed_dim=D, low_rank_dimension=R, **(
            {"act_fn": "relu"} if "act_fn" in get_intervention_class(name).arguments else {}))
        iv(torch.randn(2, 3, D)).square().sum().backward()
        for pname, p in iv.named_parameters():
            if name == "nodireft" and pname == "projection.bias":
                continue  # saved for pyreft parity, not part of the formula
            assert p.grad is not None and torch.isfinite(p.grad).all(), (name, pname)


@pytest.mark.parametrize("kwargs, field", [
    ({"low_rank_dimension": 0}, "low_rank_dimension=0"),
    ({"low_rank_dimension": -2}, "low_rank_dimension=-2"),
    ({"low_rank_dimension": 2.5}, "low_rank_dimension=2.5"),
    ({"dropout": 1.5}, "dropout=1.5"),
    ({"act_fn": "nope"}, "act_fn='nope'"),
])
def test_bad_arguments_name_the_field(kwargs, field):
    with pytest.raises(InterventionError, match=field.replace("(", r"\(").replace(".", r"\.")):
        LoReFT(**kwargs)


def test_rank_larger_than_width_is_refused():
    with pytest.raises(InterventionError, match="low_rank_dimension=20 exceeds the width 16"):
        LoReFT(embed_dim=16, low_rank_dimension=20)


def test_pyreft_aliases_and_lookup():
    assert LoreftIntervention is LoReFT
    assert get_intervention_class("LoreftIntervention") is LoReFT
    assert get_intervention_class("LoReFT") is LoReFT
    assert get_intervention_class("consreft") is ConsReFT
    for cls in (NoReFT, DiReFT, NodiReFT, LobiReFT):
        assert get_intervention_class(cls.__name__) is cls
    with pytest.raises(InterventionError, match="intervention='bogus' is not known"):
        get_intervention_class("bogus")


def test_config_lists_every_constructor_argument():
    iv = NoReFT(embed_dim=D, low_rank_dimension=2, dropout=0.1, act_fn="gelu", add_bias=False)
    assert iv.config() == {"embed_dim": D, "low_rank_dimension": 2, "dropout": 0.1, "act_fn": "gelu",
                           "add_bias": False}
    rebuilt = NoReFT(**iv.config())
    assert rebuilt.config() == iv.config()
    assert rebuilt.projection.bias is None
