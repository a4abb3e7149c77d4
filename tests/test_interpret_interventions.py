"""Interpretability interventions (interchange, steering, ablation, collection, DAS, noise) and the
subspace masks of the LoReFT family, each against a hand-written float64 forward of its formula."""
from __future__ import annotations

import json

import pytest
import torch

from reftkit.interventions import ALIASES, INTERVENTIONS, InterventionError, LoReFT, get_intervention_class
from reftkit.interventions.interpret import (
    FAMILY,
    Addition,
    Collect,
    Interchange,
    LowRankRotatedSpace,
    MeanAblation,
    Noise,
    RotatedSpace,
    Subtraction,
    ZeroAblation,
)
from reftkit.interventions.reft import REFT_FAMILY

D, R = 12, 4
BF16 = 2 ** -7  # one bf16 rounding of the result


def _pair(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, D, generator=g), torch.randn(*shape, D, generator=g)


def _randomise(iv: torch.nn.Module) -> None:
    torch.manual_seed(1)
    with torch.no_grad():
        for p in iv.parameters():
            p.add_(torch.randn_like(p) * 0.5)


def _mask(*shape, width=R, seed=3):
    return torch.rand(*shape, width, generator=torch.Generator().manual_seed(seed)) < 0.5


# -- interchange / ablation ------------------------------------------------------------------

@pytest.mark.parametrize("subspace", [None, [0, 3, 7], [11]])
def test_interchange_matches_reference(subspace):
    h, s = _pair(2, 5)
    out = Interchange(embed_dim=D, subspace=subspace)(h, s)
    ref = h.double().clone()
    idx = list(range(D)) if subspace is None else subspace
    ref[..., idx] = s.double()[..., idx]
    torch.testing.assert_close(out.double(), ref, atol=0, rtol=0)
    assert h.equal(_pair(2, 5)[0])  # h is not modified in place


@pytest.mark.parametrize("subspace", [None, [1, 2]])
def test_zero_and_mean_ablation_match_reference(subspace):
    h, _ = _pair(3, 4)
    idx = list(range(D)) if subspace is None else subspace
    ref = h.double().clone()
    ref[..., idx] = 0
    torch.testing.assert_close(ZeroAblation(embed_dim=D, subspace=subspace)(h).double(), ref, atol=0, rtol=0)

    mu = torch.randn(D)
    iv = MeanAblation(embed_dim=D, subspace=subspace).set_mean(mu)
    ref = h.double().clone()
    ref[..., idx] = mu.double()[idx]
    torch.testing.assert_close(iv(h).double(), ref, atol=0, rtol=0)


def test_mean_is_a_saved_frozen_weight():
    iv = MeanAblation(subspace=[0]).set_mean(torch.arange(D, dtype=torch.float64))  # materialises from width
    assert iv.embed_dim == D and iv.mean.dtype == torch.float32 and not iv.mean.requires_grad
    assert set(iv.state_dict()) == {"mean"}  # the coordinate mask is rebuilt from the config, not saved
    assert list(Interchange(embed_dim=D, subspace=[1]).state_dict()) == []
    rebuilt = MeanAblation(**iv.config())
    rebuilt.load_state_dict(iv.state_dict())
    h = torch.randn(2, D)
    assert rebuilt(h).equal(iv(h))
    with pytest.raises(InterventionError, match=f"mean has width 5, but the intervention has width {D}"):
        iv.set_mean(torch.zeros(5))
    with pytest.raises(InterventionError, match="mean must be a real 1-d vector"):
        iv.set_mean(torch.zeros(2, D))


@pytest.mark.parametrize("cls", [Interchange, ZeroAblation, MeanAblation])
def test_coordinate_classes_are_exact_in_bf16(cls):
    iv = cls(embed_dim=D, subspace=[0, 5])
    if cls is MeanAblation:
        iv.set_mean(torch.randn(D).bfloat16().float())  # representable, so the copy is exact
    h, s = (t.bfloat16() for t in _pair(2, 3))
    args = (h, s) if cls.uses_source else (h,)
    out = iv(*args)
    assert out.dtype == torch.bfloat16
    ref = iv(*(a.float() for a in args))
    assert out.float().equal(ref)


@pytest.mark.parametrize("cls", [Interchange, ZeroAblation, MeanAblation])
@pytest.mark.parametrize("subspace, message", [
    ([], r"subspace=\[\] must be None"),
    ([1, -1], r"subspace=\[1, -1\] must be None"),
    ([0.5], r"subspace=\[0\.5\] must be None"),
    ([True], r"subspace=\[True\] must be None"),
    ("0,1", r"subspace='0,1' must be None"),
    ([2, 2], r"subspace=\[2, 2\] repeats an index"),
])
def test_bad_subspace_is_refused(cls, subspace, message):
    with pytest.raises(InterventionError, match=message):
        cls(subspace=subspace)


@pytest.mark.parametrize("cls", [Interchange, ZeroAblation, MeanAblation])
def test_subspace_outside_the_width_is_refused_at_materialize(cls):
    iv = cls(subspace=[0, 20])  # fine until the width is known
    with pytest.raises(InterventionError, match=r"subspace=\[0, 20\] has index 20 outside the width 16"):
        iv.materialize(16)
    assert cls(subspace=range(3), embed_dim=D).hparams["subspace"] == [0, 1, 2]


def test_source_classes_need_a_source():
    for iv in (Interchange(embed_dim=D), LowRankRotatedSpace(embed_dim=D, low_rank_dimension=2),
               RotatedSpace(embed_dim=D)):
        with pytest.raises(InterventionError, match="needs the rows of a source run"):
            iv(torch.randn(2, D))


# -- steering ----------------------------------------------------------------------------------

@pytest.mark.parametrize("cls, sign", [(Addition, 1.0), (Subtraction, -1.0)])
def test_addition_and_subtraction_match_reference(cls, sign):
    v = torch.randn(D)
    iv = cls(embed_dim=D, scale=2.5).set_vector(v)
    h, _ = _pair(2, 3)
    torch.testing.assert_close(iv(h).double(), h.double() + sign * 2.5 * v.double(), atol=1e-6, rtol=1e-6)
    assert cls(embed_dim=D)(h).equal(h)  # zeros until a vector is set
    out = iv(h.bfloat16())
    assert out.dtype == torch.bfloat16
    ref = h.bfloat16().double() + sign * 2.5 * v.double()
    torch.testing.assert_close(out.double(), ref, atol=0, rtol=BF16)


def test_steering_vector_trains_only_when_asked():
    frozen = Addition(embed_dim=D).set_vector(torch.ones(D))
    assert not frozen.vector.requires_grad and frozen.vector.dtype == torch.float32
    assert sum(p.numel() for p in frozen.parameters() if p.requires_grad) == 0
    learned = Subtraction(embed_dim=D, trainable=True, scale=3.0)
    h = torch.randn(4, D, requires_grad=True)
    learned(h).sum().backward()
    torch.testing.assert_close(learned.vector.grad, torch.full((D,), -3.0 * 4))
    assert torch.equal(h.grad, torch.ones_like(h))
    rebuilt = Subtraction(**learned.config())
    assert rebuilt.vector.requires_grad and rebuilt.config() == learned.config()


@pytest.mark.parametrize("kwargs, message", [
    ({"scale": "2"}, "scale='2' must be a finite number"),
    ({"scale": float("nan")}, "scale=nan must be a finite number"),
    ({"scale": True}, "scale=True must be a finite number"),
    ({"trainable": 1}, "trainable=1 must be a bool"),
])
def test_bad_steering_arguments(kwargs, message):
    with pytest.raises(InterventionError, match=message):
        Addition(**kwargs)


def test_set_vector_checks_the_width():
    iv = Addition(embed_dim=D)
    with pytest.raises(InterventionError, match=f"vector has width {D + 1}, but the intervention has width {D}"):
        iv.set_vector(torch.zeros(D + 1))
    fresh = Addition().set_vector([1.0] * 7)  # a list works too, and fixes the width
    assert fresh.embed_dim == 7
    with pytest.raises(InterventionError, match="embed_dim=7 was given, but .* has width 8"):
        fresh.materialize(8)


# -- collect -----------------------------------------------------------------------------------

def test_collect_is_the_identity_and_flags_itself():
    iv = Collect(embed_dim=D)
    h = torch.randn(2, 3, D)
    assert iv(h) is h and iv.collects and not iv.uses_source and not iv.uses_subspaces
    assert list(iv.parameters()) == []


# -- DAS ---------------------------------------------------------------------------------------

def _das_reference(basis: torch.Tensor, h, s, mask=None):
    """pyvene's LowRankRotatedSpaceIntervention in float64: h + (R s − R h) R, mask on the rotated coords."""
    Rm = basis.double().T  # r x d, orthonormal rows
    h, s = h.double(), s.double()
    diff = s @ Rm.T - h @ Rm.T
    if mask is not None:
        diff = diff * mask.double()
    return h + diff @ Rm


def test_lowrank_das_matches_reference():
    iv = LowRankRotatedSpace(embed_dim=D, low_rank_dimension=R)
    _randomise(iv)
    basis = iv.rotation().detach()
    torch.testing.assert_close(basis.T @ basis, torch.eye(R), atol=1e-6, rtol=0)
    h, s = _pair(2, 5)
    torch.testing.assert_close(iv(h, s).double(), _das_reference(basis, h, s), atol=1e-5, rtol=1e-5)
    m = _mask(2, 5)
    torch.testing.assert_close(iv(h, s, m).double(), _das_reference(basis, h, s, m), atol=1e-5, rtol=1e-5)
    # a mask broadcast over positions, and the all-True / all-False masks
    m1 = _mask(2, 1)
    torch.testing.assert_close(iv(h, s, m1).double(), _das_reference(basis, h, s, m1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(iv(h, s, torch.ones(R, dtype=torch.bool)), iv(h, s))
    torch.testing.assert_close(iv(h, s, torch.zeros(R, dtype=torch.bool)), h, atol=1e-6, rtol=0)


def test_lowrank_das_mask_equals_pyvene_index_lists():
    """pyvene's subspaces: per example a list of rotated-coordinate indices, diff[..., idx] @ R[:, idx]^T."""
    iv = LowRankRotatedSpace(embed_dim=D, low_rank_dimension=R)
    _randomise(iv)
    basis = iv.rotation().detach().double()
    h, s = _pair(3, 2)
    subspaces = [[0, 2], [1, 3], [3, 0]]
    mask = torch.zeros(3, 1, R, dtype=torch.bool)
    for i, idx in enumerate(subspaces):
        mask[i, 0, idx] = True
    diff = (s.double() - h.double()) @ basis
    ref = torch.stack([h[i].double() + diff[i][:, idx] @ basis[:, idx].T for i, idx in enumerate(subspaces)])
    torch.testing.assert_close(iv(h, s, mask).double(), ref, atol=1e-5, rtol=1e-5)


def test_das_with_identity_rows_is_a_subspace_interchange():
    idx = [1, 4, 9]
    iv = LowRankRotatedSpace(embed_dim=D, low_rank_dimension=len(idx))
    iv.rotation.assign(torch.eye(D)[:, idx])
    torch.testing.assert_close(iv.rotation(), torch.eye(D)[:, idx], atol=0, rtol=0)
    h, s = _pair(2, 3)
    torch.testing.assert_close(iv(h, s), Interchange(embed_dim=D, subspace=idx)(h, s), atol=1e-6, rtol=0)
    # a rank mask keeps only the marked rows: the first and third here
    only = torch.tensor([True, False, True])
    torch.testing.assert_close(iv(h, s, only), Interchange(embed_dim=D, subspace=[1, 9])(h, s), atol=1e-6, rtol=0)

    full = RotatedSpace(embed_dim=D, interchange_dim=3)
    full.rotation.assign(torch.eye(D))
    torch.testing.assert_close(full(h, s), Interchange(embed_dim=D, subspace=[0, 1, 2])(h, s), atol=1e-6, rtol=0)
    mask = torch.zeros(D, dtype=torch.bool)
    mask[idx] = True
    torch.testing.assert_close(full(h, s, mask), Interchange(embed_dim=D, subspace=idx)(h, s), atol=1e-6, rtol=0)


@pytest.mark.parametrize("k", [None, 1, 5])
def test_rotated_space_matches_reference(k):
    """pyvene's RotatedSpaceIntervention in float64: rotate both, swap the first k, rotate back."""
    iv = RotatedSpace(embed_dim=D, interchange_dim=k)
    _randomise(iv)
    Q = iv.rotation().detach().double()  # d x d, orthogonal
    torch.testing.assert_close(Q.T @ Q, torch.eye(D, dtype=torch.float64), atol=1e-6, rtol=0)
    h, s = _pair(2, 4)
    rh, rs = h.double() @ Q, s.double() @ Q
    kk = D if k is None else k
    ref = torch.cat([rs[..., :kk], rh[..., kk:]], dim=-1) @ Q.T
    torch.testing.assert_close(iv(h, s).double(), ref, atol=1e-5, rtol=1e-5)
    if k is None:
        torch.testing.assert_close(iv(h, s), s, atol=1e-5, rtol=1e-5)
    m = _mask(2, 4, width=D)
    ref = torch.where(m, rs, rh) @ Q.T
    torch.testing.assert_close(iv(h, s, m).double(), ref, atol=1e-5, rtol=1e-5)


def test_rotated_space_first_columns_are_the_full_basis_columns():
    iv = RotatedSpace(embed_dim=D, interchange_dim=3)
    _randomise(iv)
    torch.testing.assert_close(iv.rotation(3), iv.rotation()[:, :3], atol=1e-5, rtol=0)


@pytest.mark.parametrize("cls, kwargs", [(LowRankRotatedSpace, {"low_rank_dimension": 8}),
                                         (RotatedSpace, {"interchange_dim": 20})])
def test_das_bf16_keeps_float32_math(cls, kwargs):
    iv = cls(embed_dim=64, **kwargs)
    _randomise(iv)
    h, s = torch.randn(3, 5, 64), torch.randn(3, 5, 64)
    hb, sb = h.bfloat16(), s.bfloat16()
    out = iv(hb, sb)
    assert out.dtype == torch.bfloat16 and iv.rotation.raw.dtype == torch.float32
    basis = iv.rotation(kwargs.get("interchange_dim")) if cls is RotatedSpace else iv.rotation()
    expected = _das_reference(basis.detach(), hb.float(), sb.float())
    torch.testing.assert_close(out.double(), expected, atol=1e-6, rtol=BF16)


@pytest.mark.parametrize("cls", [LowRankRotatedSpace, RotatedSpace])
def test_das_rotation_gets_gradients(cls):
    iv = cls(embed_dim=D, **({"low_rank_dimension": R} if cls is LowRankRotatedSpace else {"interchange_dim": R}))
    h, s = _pair(2, 3)
    iv(h, s).square().sum().backward()
    grad = iv.rotation.raw.grad
    assert grad is not None and torch.isfinite(grad).all() and grad[:, :R].abs().sum() > 0
    if cls is RotatedSpace:  # only the first interchange_dim columns enter the forward
        assert torch.count_nonzero(grad[:, R:]) == 0


@pytest.mark.parametrize("kwargs, message", [
    ({"low_rank_dimension": 0}, "low_rank_dimension=0 must be a positive int"),
    ({"low_rank_dimension": 1.5}, r"low_rank_dimension=1\.5 must be a positive int"),
])
def test_bad_das_arguments(kwargs, message):
    with pytest.raises(InterventionError, match=message):
        LowRankRotatedSpace(**kwargs)


def test_das_widths_are_checked():
    with pytest.raises(InterventionError, match="low_rank_dimension=20 exceeds the width 16"):
        LowRankRotatedSpace(embed_dim=16, low_rank_dimension=20)
    with pytest.raises(InterventionError, match="interchange_dim=17 exceeds the width 16"):
        RotatedSpace(embed_dim=16, interchange_dim=17)
    with pytest.raises(InterventionError, match="interchange_dim=0 must be None"):
        RotatedSpace(interchange_dim=0)
    iv = LowRankRotatedSpace(embed_dim=D, low_rank_dimension=R)
    h, s = _pair(2)
    with pytest.raises(InterventionError, match=rf"subspaces has shape \(2, 3\); its last dim must be the rank {R}"):
        iv(h, s, torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(InterventionError, match="subspaces must be a bool tensor"):
        iv(h, s, torch.ones(2, R))


# -- noise -------------------------------------------------------------------------------------

def test_noise_is_gaussian_with_the_given_scale():
    torch.manual_seed(0)
    h = torch.randn(64, 32, D)
    out = Noise(embed_dim=D, scale=0.5)(h)
    eps = (out.double() - h.double()) / 0.5
    assert abs(eps.mean().item()) < 0.02 and abs(eps.std().item() - 1.0) < 0.02
    assert Noise(embed_dim=D, scale=0.0)(h).equal(h)
    a, b = Noise(embed_dim=D)(h), Noise(embed_dim=D)(h)
    assert not a.equal(b)  # fresh noise every call


def test_noise_seed_reproduces_the_draw():
    h = torch.randn(2, 5, D)
    iv = Noise(embed_dim=D, scale=2.0, seed=7)
    eps = torch.randn(h.shape, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(iv(h).double(), h.double() + 2.0 * eps.double(), atol=1e-6, rtol=1e-6)
    assert iv(h).equal(iv(h))
    out = iv(h.bfloat16())
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), h.bfloat16().double() + 2.0 * eps.double(), atol=0, rtol=BF16)


@pytest.mark.parametrize("kwargs, message", [
    ({"scale": -1.0}, r"scale=-1\.0 must be a finite number >= 0"),
    ({"scale": "big"}, "scale='big' must be"),
    ({"seed": 1.5}, r"seed=1\.5 must be None or an int"),
])
def test_bad_noise_arguments(kwargs, message):
    with pytest.raises(InterventionError, match=message):
        Noise(**kwargs)


# -- LoReFT family subspaces -------------------------------------------------------------------

REFT = {cls.name: cls for cls in REFT_FAMILY}


def test_loreft_subspaces_match_pyreft_index_form():
    """pyreft's compositional ``SubloreftIntervention``: per example, h + diff[:, idx] @ R[:, idx]^T."""
    iv = LoReFT(embed_dim=D, low_rank_dimension=R, act_fn="relu").eval()
    _randomise(iv)
    h = torch.randn(3, 5, D)
    W, b, basis = iv.source.weight.double(), iv.source.bias.double(), iv.rotation().detach().double()
    diff = torch.relu(h.double() @ W.T + b) - h.double() @ basis
    subspaces = [[0, 1], [2, 3], [3, 1]]
    ref = torch.stack([h[i].double() + diff[i][:, idx] @ basis[:, idx].T for i, idx in enumerate(subspaces)])
    mask = torch.zeros(3, 1, R, dtype=torch.bool)
    for i, idx in enumerate(subspaces):
        mask[i, 0, idx] = True
    torch.testing.assert_close(iv(h, mask).double(), ref, atol=1e-5, rtol=1e-5)
    # and the masked formula written out: h + ((act(Wh+b) − Rh) ⊙ m) R^T
    torch.testing.assert_close(iv(h, mask).double(), h.double() + (diff * mask) @ basis.T, atol=1e-5, rtol=1e-5)
    assert iv.uses_subspaces and iv.rank == R


@pytest.mark.parametrize("name", sorted(REFT))
def test_reft_family_subspace_masks_are_linear_and_complete(name):
    """edit(m) = (e ⊙ m) B is linear in m: disjoint masks add up, all-True is the plain forward,
    all-False is the identity — for every class in the family."""
    iv = get_intervention_class(name)(embed_dim=D, low_rank_dimension=R).eval()
    _randomise(iv)
    h = torch.randn(2, 3, D)
    m = _mask(2, 3)
    edit = lambda mask: iv(h, mask).double() - h.double()  # noqa: E731
    torch.testing.assert_close(edit(m) + edit(~m), iv(h).double() - h.double(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(iv(h, torch.ones(R, dtype=torch.bool)), iv(h))
    torch.testing.assert_close(iv(h, torch.zeros(2, 3, R, dtype=torch.bool)), h, atol=0, rtol=0)
    assert iv.uses_subspaces and iv.rank == R
    out = iv(h.bfloat16(), m)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), iv(h.bfloat16().float(), m).double(), atol=1e-6, rtol=BF16)


def test_loreft_subspace_gradients_reach_only_the_used_rank_rows():
    iv = LoReFT(embed_dim=D, low_rank_dimension=R)
    _randomise(iv)
    used = torch.tensor([True, False, True, False])
    iv(torch.randn(2, 5, D), used).square().sum().backward()
    W, b, raw = iv.source.weight.grad, iv.source.bias.grad, iv.rotation.raw.grad
    assert W[~used].abs().max() == 0 and b[~used].abs().max() == 0
    assert W[used].abs().min() > 0 and b[used].abs().min() > 0
    # R = QR(raw): column k depends on raw[:, :k+1], so only the columns after the last used one (3)
    # get no gradient; column 1, unused but before a used one, still does
    assert raw[:, 3].abs().max() < 1e-6 and raw[:, 1].abs().max() > 1e-3

    # the same through the basis itself: unused columns of R get exactly zero
    basis = iv.rotation().detach().requires_grad_(True)
    x = torch.randn(2, 5, D)
    e = (iv.source(x) - x @ basis) * used
    (x + e @ basis.T).square().sum().backward()
    assert basis.grad[:, ~used].abs().max() == 0


# -- registry ----------------------------------------------------------------------------------

PYVENE = {"VanillaIntervention": Interchange, "AdditionIntervention": Addition,
          "SubtractionIntervention": Subtraction, "ZeroIntervention": ZeroAblation,
          "CollectIntervention": Collect, "LowRankRotatedSpaceIntervention": LowRankRotatedSpace,
          "RotatedSpaceIntervention": RotatedSpace, "NoiseIntervention": Noise}


def test_registry_names_aliases_and_flags():
    names = {"interchange": Interchange, "addition": Addition, "subtraction": Subtraction,
             "zero_ablation": ZeroAblation, "mean_ablation": MeanAblation, "collect": Collect,
             "lowrank_rotated_space": LowRankRotatedSpace, "rotated_space": RotatedSpace, "noise": Noise}
    assert {cls.name: cls for cls in FAMILY} == names
    for name, cls in names.items():
        assert INTERVENTIONS[name] is cls and get_intervention_class(cls.__name__) is cls
    for alias, cls in PYVENE.items():
        assert ALIASES[alias] is cls and get_intervention_class(alias) is cls
    assert {cls.name for cls in FAMILY if cls.uses_source} == {"interchange", "lowrank_rotated_space", "rotated_space"}
    assert {cls.name for cls in FAMILY if cls.uses_subspaces} == {"lowrank_rotated_space", "rotated_space"}
    assert {cls.name for cls in FAMILY if cls.collects} == {"collect"}
    assert LowRankRotatedSpace(embed_dim=D, low_rank_dimension=3).rank == 3
    assert RotatedSpace(embed_dim=D).rank == D and Interchange(embed_dim=D).rank is None


@pytest.mark.parametrize("cls", FAMILY)
def test_config_is_json_and_rebuilds(cls):
    kwargs = {Interchange: {"subspace": [0, 2]}, Addition: {"scale": 2, "trainable": True},
              LowRankRotatedSpace: {"low_rank_dimension": 2}, RotatedSpace: {"interchange_dim": 3},
              Noise: {"scale": 0.1, "seed": 3}}.get(cls, {})
    iv = cls(embed_dim=D, **kwargs)
    cfg = json.loads(json.dumps(iv.config()))
    rebuilt = cls(**cfg)
    assert rebuilt.config() == iv.config()
    rebuilt.load_state_dict(iv.state_dict(), strict=True)
    assert set(cfg) == {"embed_dim", *cls.arguments}
