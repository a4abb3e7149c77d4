"""How a training step moves LoReFT's ``R`` (``Orthonormal``), against torch's own orthogonal
parametrisation (pyreft's ``R``) and first-order arithmetic; weight decay; save, reload, resume."""
from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from conftest import pad_batch, tiny_llama
from safetensors.torch import load_file, save_file
from torch import nn

import reftkit
from reftkit.interventions import LoReFT, Orthonormal
from reftkit.interventions.interpret import LowRankRotatedSpace, RotatedSpace
from reftkit.serialization import CONFIG_NAME, WEIGHTS_NAME, file_sha256

D, R = 48, 4


def _basis(seed: int, d: int = D, r: int = R) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(d, r, generator=torch.Generator().manual_seed(seed)))[0]


class _Householder(nn.Module):
    """pyreft's ``R``: ``torch.nn.utils.parametrizations.orthogonal`` on a ``d x r`` weight."""

    def __init__(self, basis: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty_like(basis))
        torch.nn.utils.parametrizations.orthogonal(self)
        with torch.no_grad():
            self.weight = basis          # right_inverse: base = a completion of basis, original = -I

    def forward(self) -> torch.Tensor:
        return self.weight


def _orthonormal(basis: torch.Tensor, scale: float | None = None) -> Orthonormal:
    rot = Orthonormal(*basis.shape)
    rot.assign(basis)
    if scale is not None:  # the old storage (scale 1: unit columns)
        with torch.no_grad():
            rot.raw.copy_(basis * scale)
    return rot


def _step(module: nn.Module, target: torch.Tensor, opt: str, lr: float, **kw) -> torch.Tensor:
    """One optimiser step on ``sum(target * R)``; returns ``R_after - R_before``."""
    before = module().detach().clone()
    params = [p for p in module.parameters() if p.requires_grad]
    optim = torch.optim.SGD(params, lr=lr) if opt == "sgd" else torch.optim.Adam(params, lr=lr, **kw)
    (module() * target).sum().backward()
    optim.step()
    return module().detach() - before


def test_storage_scale():
    """raw holds scale * R: 1/2 for a tall basis (torch's Householder gain 2), 1 for a square one."""
    assert torch.allclose(LoReFT(embed_dim=D, low_rank_dimension=R).rotation.raw.norm(dim=0), torch.full((R,), 0.5))
    assert torch.allclose(LowRankRotatedSpace(embed_dim=D, low_rank_dimension=2).rotation.raw.norm(dim=0),
                          torch.full((2,), 0.5))
    assert torch.allclose(RotatedSpace(embed_dim=8).rotation.raw.norm(dim=0), torch.ones(8))
    basis = _basis(0)
    rot = _orthonormal(basis)
    torch.testing.assert_close(rot.raw.detach(), 0.5 * basis)
    torch.testing.assert_close(rot(), basis, atol=1e-6, rtol=0)


def test_sgd_step_equals_torch_orthogonal_to_first_order():
    """Under SGD, QR at scale 1/2 and torch's Householder map give the same step in R (their first-order
    maps differ only by a rotation of the parameter's coordinates); unit columns (before) gave 1/4 of it."""
    basis, target = _basis(1), torch.randn(D, R, generator=torch.Generator().manual_seed(2))
    lr = 1e-4
    ref = _step(_Householder(basis), target, "sgd", lr)
    ours = _step(_orthonormal(basis), target, "sgd", lr)
    old = _step(_orthonormal(basis, scale=1.0), target, "sgd", lr)
    assert ref.norm() > 1e-4
    assert (ours - ref).norm() / ref.norm() < 1e-2
    assert (old - ref / 4).norm() / ref.norm() < 1e-2


def test_first_adam_step_moves_r_as_far_as_torch_orthogonal():
    """Adam's first step moves every free coordinate by exactly lr (m/sqrt(v) = sign(g)); through a
    map of gain 2 that is |dR| = 2 lr sqrt(r (d - 1)) to first order for torch's Householder map (r(d-1)
    weighted free entries) and, in expectation over sign patterns, for QR at scale 1/2."""
    lr, expected = 1e-3, 2e-3 * math.sqrt(R * (D - 1))
    for seed in range(3):
        basis, target = _basis(10 + seed), torch.randn(D, R, generator=torch.Generator().manual_seed(20 + seed))
        ref = _step(_Householder(basis), target, "adam", lr).norm()
        ours = _step(_orthonormal(basis), target, "adam", lr).norm()
        old = _step(_orthonormal(basis, scale=1.0), target, "adam", lr).norm()
        assert abs(ref / expected - 1) < 0.01
        assert abs(ours / expected - 1) < 0.1
        assert abs(old / (expected / 2) - 1) < 0.1


def _regression(seed: int):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(256, D, generator=g)
    w = torch.randn(D, D, generator=g) / math.sqrt(D)
    return h, h + 0.3 * (h @ w) @ _basis(seed + 1) @ _basis(seed + 1).T


def _train(module_r, params, h, y, forward, steps, wd, lr=1e-2):
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=wd)
    losses = []
    for i in range(steps):
        idx = torch.arange(32) + (32 * i) % 224
        loss = (forward(h[idx]) - y[idx]).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


def test_weight_decay_keeps_r_orthonormal_where_torch_orthogonal_collapses():
    h, y = _regression(3)
    iv = LoReFT(embed_dim=D, low_rank_dimension=R)
    start = (iv(h) - y).pow(2).mean().item()
    losses = _train(iv.rotation, list(iv.parameters()), h, y, iv, steps=600, wd=0.5)
    rot = iv.rotation().detach().double()
    assert (rot.T @ rot - torch.eye(R, dtype=torch.float64)).abs().max() < 1e-5
    assert losses[-1] < 0.7 * start                       # and it learnt
    # the same loop on torch's map (pyreft's R): its -1 diagonal decays to -(1 - lr wd), .int() reads 0
    hh = _Householder(_basis(4))
    _train(hh, list(hh.parameters()), h, y, lambda x: x + (x @ hh()) @ hh().T, steps=1, wd=0.5)
    assert hh().detach().abs().max() == 0


def test_save_reload_gives_same_r_and_resumes_identically(tmp_path):
    cfg = [{"layer": 1, "component": "block_output", "positions": "l2", "intervention": "loreft",
            "low_rank_dimension": R}]
    ids, mask = pad_batch([[5, 9, 14, 3, 22, 8, 40], [7, 11, 19, 4]], "right")
    labels = ids.masked_fill(mask == 0, -100)

    def steps(reft, opt, n):
        for _ in range(n):
            opt.zero_grad()
            reft(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
            opt.step()

    torch.manual_seed(0)
    reft = reftkit.get_reft_model(tiny_llama(), cfg)
    opt = torch.optim.AdamW(reft.interventions.parameters(), lr=5e-2, weight_decay=0.1)
    steps(reft, opt, 3)
    reft.save_pretrained(tmp_path / "run")
    state = copy.deepcopy(opt.state_dict())
    steps(reft, opt, 3)
    loaded = reftkit.ReftModel.from_pretrained(tiny_llama(), tmp_path / "run")
    key = next(iter(loaded.interventions))
    saved = load_file(tmp_path / "run" / WEIGHTS_NAME)
    torch.testing.assert_close(loaded.interventions[key].rotation(),
                               _qr_reference(saved[f"{key}.rotation.raw"]), atol=1e-6, rtol=0)
    opt2 = torch.optim.AdamW(loaded.interventions.parameters(), lr=5e-2, weight_decay=0.1)
    opt2.load_state_dict(state)
    steps(loaded, opt2, 3)
    for (name, a), b in zip(reft.interventions.named_parameters(), loaded.interventions.parameters()):
        assert torch.equal(a, b), name


def _qr_reference(raw: torch.Tensor) -> torch.Tensor:
    """Gram-Schmidt by hand (float64): column j of R is raw_j minus its projection on R_<j, normalised."""
    cols: list[torch.Tensor] = []
    for j in range(raw.shape[1]):
        v = raw[:, j].double()
        for c in cols:
            v = v - (c @ v) * c
        cols.append(v / v.norm())
    return torch.stack(cols, 1).float()


@pytest.mark.parametrize("grown", [1.0, 1.7])
def test_old_save_loads_to_same_r_and_keeps_its_storage(tmp_path, grown):
    """A save from before the fix stored raw with unit columns (``grown`` = 1), or longer ones after
    training: it loads to the same R, and raw is kept as saved, so its training resumes as it would have."""
    cfg = [{"layer": 0, "component": "block_output", "positions": "l1", "intervention": "loreft",
            "low_rank_dimension": R}]
    reft = reftkit.get_reft_model(tiny_llama(), cfg)
    reft.save_pretrained(tmp_path / "old")
    key = next(iter(reft.interventions))
    tensors = load_file(tmp_path / "old" / WEIGHTS_NAME)
    old_raw = _basis(5, d=32) * grown + 0.05 * torch.randn(32, R, generator=torch.Generator().manual_seed(6))
    tensors[f"{key}.rotation.raw"] = old_raw.contiguous()
    save_file(tensors, tmp_path / "old" / WEIGHTS_NAME)
    config = json.loads((tmp_path / "old" / CONFIG_NAME).read_text())
    config["weights_sha256"] = file_sha256(tmp_path / "old" / WEIGHTS_NAME)
    (tmp_path / "old" / CONFIG_NAME).write_text(json.dumps(config))
    loaded = reftkit.ReftModel.from_pretrained(tiny_llama(), tmp_path / "old")
    assert torch.equal(loaded.interventions[key].rotation.raw.detach(), old_raw)
    torch.testing.assert_close(loaded.interventions[key].rotation(), _qr_reference(old_raw), atol=1e-6, rtol=0)


def test_trainer_leaves_orthonormal_bases_out_of_weight_decay(tmp_path):
    """Decay on raw cannot change R (QR ignores column lengths) and only raises the step: ReftTrainer's
    AdamW groups must hold raw without decay, and every other weight as Trainer would."""
    from transformers import TrainingArguments

    from reftkit.training import ReftTrainer
    reft = reftkit.get_reft_model(tiny_llama(), {"layer": [0, 1], "component": "block_output", "positions": "l1",
                                                 "intervention": "loreft", "low_rank_dimension": 2})
    args = TrainingArguments(output_dir=str(tmp_path), weight_decay=0.1, report_to=[], use_cpu=True)
    trainer = ReftTrainer(reft, args)
    optimizer = trainer.create_optimizer()
    decayed = {id(p) for group in optimizer.param_groups if group["weight_decay"] > 0 for p in group["params"]}
    names = {id(p): n for n, p in reft.named_parameters()}
    assert sorted(names[i] for i in decayed) == sorted(
        n for n, p in reft.named_parameters() if p.requires_grad and n.endswith("source.weight"))
    raws = [p for n, p in reft.named_parameters() if n.endswith("rotation.raw")]
    assert len(raws) == 2 and not any(id(p) in decayed for p in raws)
