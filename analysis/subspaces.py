"""Subspaces that adaptation learns, and what they say.

* :func:`principal_angles` — angles between two column spaces (Björck & Golub 1973);
* :func:`subspace_similarity` — every pair of a dict of subspaces: mean cos² of their principal
  angles and the smallest angle; :func:`reft_subspaces` (LoReFT's ``R`` and relatives) and
  :func:`lora_subspaces` (LoRA's ``ΔW`` column space) build the dict — across seeds, tasks or layers;
* :func:`logit_lens` — each direction mapped through the final norm's elementwise weight and the
  unembedding: the tokens it promotes and suppresses (nostalgebraist 2020, "interpreting GPT: the
  logit lens").

Every ``plot_*`` returns a :class:`matplotlib.figure.Figure` (see :mod:`reftkit.analysis.representation_plots`).
"""
from __future__ import annotations

import math
from typing import Any, Callable, Mapping

import torch
from torch import nn

from reftkit.structure import find_layers

from .representation_plots import plot_logit_lens, plot_subspace_similarity
from .representations import _first, _hf, _is_reft

__all__ = ["principal_angles", "subspace_similarity", "reft_subspaces", "lora_subspaces", "logit_lens",
           "final_norm", "plot_subspace_similarity", "plot_logit_lens"]

def _orthonormal(a: torch.Tensor, what: str) -> torch.Tensor:
    if a.dim() == 1:
        a = a[:, None]
    if a.dim() != 2 or a.shape[1] == 0 or a.shape[1] > a.shape[0]:
        raise ValueError(f"{what} must be a [d, k] matrix with 1 <= k <= d (its columns span the subspace), "
                         f"got shape {tuple(a.shape)}")
    q, r = torch.linalg.qr(a.double())
    diag = r.diagonal().abs()
    eps = torch.finfo(a.dtype).eps if a.is_floating_point() else torch.finfo(torch.float64).eps
    rank = int((diag > max(a.shape) * eps * diag.max()).sum())
    if rank < a.shape[1]:
        raise ValueError(f"{what} has linearly dependent columns (rank {rank} < {a.shape[1]} columns); "
                         "give a basis of the subspace")
    return q


def principal_angles(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Principal angles (radians, ascending, float64) between the column spaces of ``a`` ``[d, p]`` and
    ``b`` ``[d, q]``; there are ``min(p, q)`` of them.

    Björck & Golub 1973 ("Numerical methods for computing angles between linear subspaces"):
    orthonormalise with QR, then cos θᵢ are the singular values of ``Q_aᵀ Q_b``. Small angles, where
    arccos loses precision, are taken from sin θᵢ = the singular values of ``Q_b − Q_a Q_aᵀ Q_b``
    (Knyazev & Argentati 2002); each angle uses whichever of the two is below 1/√2.
    """
    qa, qb = _orthonormal(a, "a"), _orthonormal(b, "b")
    if qa.shape[0] != qb.shape[0]:
        raise ValueError(f"a and b live in different spaces: a has {qa.shape[0]} rows, b has {qb.shape[0]}")
    if qb.shape[1] > qa.shape[1]:
        qa, qb = qb, qa
    cross = qa.T @ qb
    cos = torch.linalg.svdvals(cross).clamp(0, 1)  # descending
    sin = torch.linalg.svdvals(qb - qa @ cross).clamp(0, 1).flip(0)  # ascending
    return torch.where(cos > math.sqrt(0.5), torch.arcsin(sin), torch.arccos(cos))


def subspace_similarity(subspaces: Mapping[str, torch.Tensor]) -> "pandas.DataFrame":  # noqa: F821
    """Every ordered pair (``a``, ``b``) of named subspaces (``[d, k]`` bases; diagonal included):
    ``mean_cos2`` = mean of cos²θᵢ over their principal angles (:func:`principal_angles`) —
    ‖Q_aᵀQ_b‖_F² / min(k_a, k_b), 1 when one contains the other, 0 when orthogonal;
    ``min_angle_deg`` / ``max_angle_deg``; ``dim_a`` / ``dim_b``. Pairs in spaces of different widths
    (e.g. LoRA on q_proj and k_proj under GQA) get NaN. ``attrs["names"]`` keeps the input order.
    """
    import pandas as pd

    names = list(subspaces)
    if not names:
        raise ValueError("subspaces is empty: give a dict of name -> [d, k] basis")
    rows = []
    for i, a in enumerate(names):
        for b in names:
            sa, sb = subspaces[a], subspaces[b]
            sa, sb = (sa[:, None] if sa.dim() == 1 else sa), (sb[:, None] if sb.dim() == 1 else sb)
            row = {"a": a, "b": b, "dim_a": sa.shape[1], "dim_b": sb.shape[1], "mean_cos2": math.nan,
                   "min_angle_deg": math.nan, "max_angle_deg": math.nan}
            if sa.shape[0] == sb.shape[0]:
                theta = principal_angles(sa.detach().cpu(), sb.detach().cpu())
                row.update(mean_cos2=float((theta.cos() ** 2).mean()), min_angle_deg=math.degrees(float(theta[0])),
                           max_angle_deg=math.degrees(float(theta[-1])))
            rows.append(row)
    frame = pd.DataFrame(rows)
    frame.attrs["names"] = names
    return frame


@torch.no_grad()
def reft_subspaces(reft: Any, prefix: str = "") -> dict[str, torch.Tensor]:
    """The subspace each low-rank intervention of a ``ReftModel`` writes into, ``{prefix + key: [d, r]}``.

    LoReFT, DiReFT, ConsReFT, LobiReFT and DAS (``lowrank_rotated_space``): ``R = rotation()``
    (orthonormal columns). NoReFT, NodiReFT: ``Pᵀ``, the rows of the ``r x d`` projection they write
    through (not orthonormal). ``rotated_space`` with ``interchange_dim=k``: its first ``k`` rotated
    directions. Others (IA3, adapters, additions ...) have no low-rank subspace and are skipped;
    ``prefix`` (e.g. ``"seed1/"``) keeps keys apart when merging several models' dicts.
    """
    from reftkit.interventions import DiReFT, NodiReFT, NoReFT, Orthonormal
    from reftkit.interventions.interpret import RotatedSpace

    if not _is_reft(reft):
        raise TypeError(f"reft_subspaces needs a reftkit.ReftModel, got {type(reft).__name__}")
    out: dict[str, torch.Tensor] = {}
    for key, iv in reft.interventions.items():
        if isinstance(iv, RotatedSpace):
            k = iv.hparams.get("interchange_dim")
            if k is not None:
                out[prefix + key] = iv.rotation(k).detach().float()
        elif isinstance(iv, (NoReFT, NodiReFT)):
            out[prefix + key] = iv.projection.weight.detach().float().T.clone()
        elif isinstance(getattr(iv, "rotation", None), Orthonormal) or isinstance(iv, DiReFT):
            out[prefix + key] = iv.rotation().detach().float()
    if not out:
        kinds = {key: type(iv).__name__ for key, iv in reft.interventions.items()}
        raise ValueError(f"no intervention of this ReftModel has a low-rank subspace ({kinds}); reft_subspaces "
                         "reads LoReFT, NoReFT, DiReFT, NodiReFT, ConsReFT, LobiReFT and DAS interventions")
    return out


@torch.no_grad()
def lora_subspaces(model: Any, adapter: str = "default", prefix: str = "") -> dict[str, torch.Tensor]:
    """Orthonormal bases ``[out, rank]`` of the column space of each LoRA update ``ΔW = B A · scaling``.

    ``model``: a peft ``PeftModel``, any module holding peft LoRA layers, or a weight-space baseline
    (its ``.model`` is read). With ``Aᵀ = Q R`` (QR, ``Q`` ``[in, r]``), ``ΔW = (B Rᵀ · scaling) Qᵀ``
    and ``Qᵀ`` has orthonormal rows, so ``ΔW`` and ``B Rᵀ · scaling`` (``[out, r]``) share their column space and
    singular values: the basis is the left singular vectors of the latter whose singular value exceeds
    ``max(out, r) · eps · σ_max``, ordered by singular value. Keys are module paths without peft's
    ``base_model.model.`` prefix. Modules whose ``ΔW`` is zero (LoRA initialises ``B = 0``) are skipped;
    DoRA's magnitude vector is not part of ``ΔW`` here.
    """
    wrapped = hasattr(model, "disabled") or not isinstance(model, nn.Module)
    root = getattr(model, "model", None) if wrapped else model
    if not isinstance(root, nn.Module):
        raise TypeError(f"lora_subspaces needs a model with peft LoRA layers, got {type(model).__name__}")
    out: dict[str, torch.Tensor] = {}
    found = 0
    for path, module in root.named_modules():
        lora_a, lora_b = getattr(module, "lora_A", None), getattr(module, "lora_B", None)
        if not isinstance(lora_a, nn.ModuleDict) or not isinstance(lora_b, nn.ModuleDict) or adapter not in lora_a:
            continue
        found += 1
        a = lora_a[adapter].weight.detach().double()  # [r, in]
        b = lora_b[adapter].weight.detach().double()  # [out, r]
        _, r = torch.linalg.qr(a.T)
        u, s, _ = torch.linalg.svd(b @ r.T * float(module.scaling[adapter]), full_matrices=False)
        if not len(s) or float(s[0]) == 0.0:
            continue
        rank = int((s > max(u.shape[0], len(s)) * torch.finfo(torch.float32).eps * s[0]).sum())
        name = path.removeprefix("base_model.model.")
        out[prefix + name] = u[:, :rank].float()
    if not found:
        raise ValueError(f"no peft LoRA layer with adapter {adapter!r} in {type(root).__name__}")
    if not out:
        raise ValueError(f"every LoRA update ΔW = B A of adapter {adapter!r} is zero (peft initialises B to 0): "
                         "train the adapter first")
    return out


# ----------------------------------------------------------------------------- logit lens

_NORM_NAMES = ("norm", "ln_f", "final_layer_norm", "final_layernorm", "norm_f", "final_norm", "final_ln")


def final_norm(model: nn.Module) -> tuple[str | None, nn.Module | None]:
    """``(path, module)`` of the norm applied after the last block (``model.norm``, ``transformer.ln_f``,
    ``gpt_neox.final_layer_norm`` ...): the shallowest module with one of those names outside the
    layer stack; ``(None, None)`` when there is none (e.g. post-norm encoders)."""
    layers_path, _ = find_layers(model)
    best: tuple[int, str, nn.Module] | None = None
    for path, module in model.named_modules():
        if not path or path == layers_path or path.startswith(layers_path + ".") or layers_path.startswith(path + "."):
            continue
        if path.split(".")[-1] in _NORM_NAMES and (best is None or path.count(".") < best[0]):
            best = (path.count("."), path, module)
    return (None, None) if best is None else (best[1], best[2])


def _norm_map(norm: nn.Module | None, d: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """The part of the final norm that applies to a direction (see :func:`logit_lens`).

    Probed on a float32 copy of the norm with the constant vector ``1e4 · 1``: an RMS-style norm
    (weight ``w``, or ``1 + w`` in Gemma's) returns its elementwise gain there (the RMS is 1e4 up to
    eps / 1e8), a centring norm (LayerNorm) returns its bias (zero without one) since the centred
    input is 0; the latter's gain is then its ``weight``."""
    import copy

    if norm is None:
        return lambda v: v
    probe_norm = copy.deepcopy(norm).float()
    param = next(probe_norm.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    out = _first(probe_norm(torch.full((1, d), 1e4, device=device))).double()[0]
    bias = getattr(norm, "bias", None)
    bias = bias.detach().double() if isinstance(bias, torch.Tensor) else torch.zeros(d, dtype=torch.float64)
    if isinstance(norm, nn.LayerNorm) or torch.allclose(out, bias.to(out.device), atol=1e-6):
        weight = getattr(norm, "weight", None)
        gain = weight.detach().double() if isinstance(weight, torch.Tensor) else torch.ones(d, dtype=torch.float64)
        return lambda v: (v - v.mean(0, keepdim=True)) * gain.to(v.device)[:, None]
    return lambda v: v * out.to(v.device)[:, None]


@torch.no_grad()
def logit_lens(directions: Any, model: nn.Module | None = None, tokenizer: Any = None,
               top_k: int = 10) -> "pandas.DataFrame":  # noqa: F821
    """The tokens each direction promotes and suppresses when written into the last residual stream.

    ``directions``: a ``ReftModel`` (its :func:`reft_subspaces`, one direction per column; ``model``
    defaults to ``reft.model``), a dict ``name -> [d, r]`` (or ``[d]``), or one tensor. Each column
    ``v`` scores the vocabulary as ``W_U (g ⊙ v)``, ``W_U`` the output embedding
    (``model.get_output_embeddings()``). A direction is not a hidden state, so of the final norm only
    the part that acts on directions is applied: its elementwise gain ``g`` (RMSNorm's weight, Gemma's
    1 + weight), and for LayerNorm also the centring ``v − mean(v)``, which is linear; the division by
    the state's RMS/std (a positive scalar that never changes the ranking) and the norm's and the
    head's biases (the same for every direction) are left out. ``promoted`` are the ``top_k`` largest
    scores, ``suppressed`` the ``top_k`` smallest (those ``−v`` promotes). Rows: ``name``,
    ``direction`` (column index), ``kind``, ``rank`` (0 = strongest), ``token_id``, ``token``, ``score``.
    """
    import pandas as pd

    if _is_reft(directions):
        model = directions.model if model is None else model
        directions = reft_subspaces(directions)
    elif isinstance(directions, torch.Tensor):
        directions = {"direction": directions}
    if not isinstance(directions, Mapping) or not directions:
        raise TypeError("directions must be a ReftModel, a non-empty dict name -> [d, r] tensor, or a tensor")
    if model is None:
        raise ValueError("pass model= (the model whose unembedding reads the directions)")
    hf = _hf(model)
    unembed = hf.get_output_embeddings()
    if unembed is None:
        raise ValueError(f"{type(hf).__name__} has no output embedding (get_output_embeddings() is None)")
    w_u = unembed.weight.detach()
    vocab, d = w_u.shape
    if not isinstance(top_k, int) or not 1 <= top_k <= vocab:
        raise ValueError(f"top_k={top_k!r} must be between 1 and the vocabulary size {vocab}")
    apply_norm = _norm_map(final_norm(hf)[1], d)
    rows = []
    for name, v in directions.items():
        v = v.detach()
        v = v[:, None] if v.dim() == 1 else v
        if v.dim() != 2 or v.shape[0] != d:
            raise ValueError(f"directions[{name!r}] has shape {tuple(v.shape)}; expected [{d}, r] for this "
                             f"model's hidden size {d}")
        scores = (apply_norm(v.to(w_u.device).double()).T @ w_u.double().T).float().cpu()  # [r, vocab]
        for j, row in enumerate(scores):
            for kind, largest in (("promoted", True), ("suppressed", False)):
                vals, ids = row.topk(top_k, largest=largest)
                for rank, (val, tid) in enumerate(zip(vals.tolist(), ids.tolist())):
                    token = tokenizer.convert_ids_to_tokens(tid) if tokenizer is not None else None
                    token = f"<id {tid}>" if token is None else token  # ids beyond the tokenizer's vocabulary
                    rows.append({"name": name, "direction": j, "kind": kind, "rank": rank, "token_id": tid,
                                 "token": token, "score": val})
    return pd.DataFrame(rows)
