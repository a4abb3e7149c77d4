"""T-Few's extra training losses over answer choices — Liu et al. 2022, "Few-Shot Parameter-Efficient
Fine-Tuning is Better and Cheaper than In-Context Learning", §3.2.

Both read the per-token log-probabilities ``log p(y_t | x, y_<t)`` of each answer choice (``token_logprobs``
``[B, C, T]``, with ``mask`` ``[B, C, T]`` marking each choice's real tokens) and the index of the correct
choice (``correct`` ``[B]``):

* unlikelihood, pushing the incorrect choices' tokens down::

      L_UL = − Σ_{n≠correct} Σ_t log(1 − p(ŷ⁽ⁿ⁾_t | x, ŷ⁽ⁿ⁾_<t)) / Σ_{n≠correct} T(ŷ⁽ⁿ⁾)

* length-normalised, a softmax over the choices' mean token log-probabilities
  ``β(x, y) = (1/T(y)) Σ_t log p(y_t | x, y_<t)``::

      L_LN = − log( exp β(x, y_correct) / Σ_n exp β(x, ŷ⁽ⁿ⁾) )

T-Few trains on ``L_LM + L_UL + L_LN``. Both losses are means over the batch (L_UL over all incorrect
tokens of the batch, as the paper's normalisation by their count).
"""
from __future__ import annotations

import torch


def _check(token_logprobs: torch.Tensor, mask: torch.Tensor, correct: torch.Tensor) -> None:
    if token_logprobs.dim() != 3:
        raise ValueError(f"token_logprobs must be [batch, choices, tokens], got shape {tuple(token_logprobs.shape)}")
    if mask.shape != token_logprobs.shape:
        raise ValueError(f"mask has shape {tuple(mask.shape)}, token_logprobs {tuple(token_logprobs.shape)}")
    batch, choices = token_logprobs.shape[:2]
    if correct.shape != (batch,):
        raise ValueError(f"correct must be [batch]={batch}, got shape {tuple(correct.shape)}")
    if bool(((correct < 0) | (correct >= choices)).any()):
        raise ValueError(f"correct has an index outside 0..{choices - 1}: {correct.tolist()}")
    if bool((mask.sum(-1) == 0).any()):
        raise ValueError("every choice needs at least one real token (a row of mask is all False)")


def unlikelihood_loss(token_logprobs: torch.Tensor, mask: torch.Tensor, correct: torch.Tensor) -> torch.Tensor:
    """``L_UL``: mean over the incorrect choices' tokens of ``−log(1 − p)`` (see the module docstring)."""
    mask = mask.bool()
    _check(token_logprobs, mask, correct)
    wrong = torch.ones(token_logprobs.shape[:2], dtype=torch.bool, device=mask.device)
    wrong[torch.arange(len(correct)), correct] = False
    keep = mask & wrong[..., None]
    # log(1 − p) from log p, stable near p = 1 (log1p(−exp(l)) loses precision there; expm1 does not)
    log_not = torch.log(-torch.expm1(token_logprobs.clamp(max=-1e-12)))
    return -(log_not * keep).sum() / keep.sum().clamp_min(1)


def length_normalized_loss(token_logprobs: torch.Tensor, mask: torch.Tensor, correct: torch.Tensor) -> torch.Tensor:
    """``L_LN``: cross entropy of the correct choice under a softmax of the choices' mean token
    log-probabilities (see the module docstring)."""
    mask = mask.bool()
    _check(token_logprobs, mask, correct)
    beta = (token_logprobs * mask).sum(-1) / mask.sum(-1)
    return torch.nn.functional.cross_entropy(beta, correct)
