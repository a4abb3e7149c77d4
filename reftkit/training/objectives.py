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

On a model: :func:`choice_token_logprobs` gives ``token_logprobs`` for a multiple-choice batch
(:mod:`reftkit.data.multiple_choice`) with vocabulary logits for the choice tokens only; :func:`tfew_loss` weighs
the three terms; :func:`multiple_choice_loss` is both, what ``ReftTrainer(loss_terms=...)`` trains on.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import torch

from reftkit.anatomy import is_encoder_decoder
from reftkit.call_inputs import CALL_INPUTS

from .logprobs import continuation_logprobs, label_positions, predicting_states, seq2seq_logprobs


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


# -- the full T-Few objective over a multiple-choice batch (reftkit.data.multiple_choice) ----------------------------
#: T-Few's terms: L_LM (``lm``), L_UL (``ul``), L_LN (``ln``); the paper trains on their plain sum.
TFEW_TERMS = ("lm", "ul", "ln")
TFEW_WEIGHTS = {"lm": 1.0, "ul": 1.0, "ln": 1.0}


def check_loss_terms(terms: Mapping[str, float] | Sequence[str] | None) -> dict[str, float]:
    """Weights of :data:`TFEW_TERMS` from ``{"lm": 1.0, "ln": 0.5}`` (terms not named weigh 0) or a list of
    names (weight 1 each); ``None`` gives T-Few's ``1 / 1 / 1``."""
    if terms is None:
        return dict(TFEW_WEIGHTS)
    if isinstance(terms, str):
        terms = [terms]
    given = dict(terms) if isinstance(terms, Mapping) else {name: 1.0 for name in terms}
    unknown = [name for name in given if name not in TFEW_TERMS]
    if unknown:
        raise ValueError(f"loss_terms has unknown term {unknown[0]!r}; the terms are {TFEW_TERMS} "
                         "(L_LM, unlikelihood L_UL, length-normalised L_LN)")
    weights = {name: 0.0 for name in TFEW_TERMS}
    for name, weight in given.items():
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight < 0:
            raise ValueError(f"loss_terms[{name!r}]={weight!r}; a weight is a finite number >= 0")
        weights[name] = float(weight)
    if not any(weights.values()):
        raise ValueError(f"loss_terms={given!r} weighs every term 0: nothing would be trained")
    return weights


def tfew_loss(token_logprobs: torch.Tensor, mask: torch.Tensor, correct: torch.Tensor,
              choice_mask: torch.Tensor | None = None,
              weights: Mapping[str, float] | Sequence[str] | None = None) -> dict[str, torch.Tensor]:
    """``loss = w_lm·L_LM + w_ul·L_UL + w_ln·L_LN`` (T-Few, §3.2; default weights 1 / 1 / 1), with the parts.

    ``L_LM = −Σ_b Σ_t log p(y⁽ᵇ⁾_t | x⁽ᵇ⁾, y⁽ᵇ⁾_<t) / Σ_b T(y⁽ᵇ⁾)`` over the correct choices' tokens (the token
    mean a Hugging Face LM loss with those labels gives, as T-Few's code computes it); L_UL and L_LN are
    :func:`unlikelihood_loss` and :func:`length_normalized_loss`. ``choice_mask`` ``[B, C]`` marks the real
    choices of examples with fewer than C (a prefix of each row, as the collator pads them): L_UL and L_LN
    are computed per group of examples with the same number of choices and recombined exactly (L_UL
    weighted by each group's incorrect tokens, L_LN by its examples). Returns ``{"loss", "lm", "ul", "ln",
    "scores"}``, ``scores`` ``[B, C]`` the length-normalised β (``-inf`` for padded choices).
    """
    weights = check_loss_terms(weights)
    mask = mask.bool()
    batch, choices = token_logprobs.shape[:2]
    counts = torch.full((batch,), choices, device=mask.device) if choice_mask is None else choice_mask.sum(1)
    if choice_mask is not None:
        prefix = torch.arange(choices, device=mask.device)[None, :] < counts[:, None]
        if choice_mask.shape != (batch, choices) or not torch.equal(choice_mask.bool(), prefix):
            raise ValueError(f"choice_mask must be [batch, choices]=[{batch}, {choices}] and mark a prefix of each "
                             f"row (the real choices first), got shape {tuple(choice_mask.shape)}")
        if bool((correct >= counts).any()):
            b = int((correct >= counts).nonzero()[0, 0])
            raise ValueError(f"correct[{b}]={int(correct[b])} but example {b} has {int(counts[b])} choices")
    rows = torch.arange(batch, device=mask.device)
    right, right_mask = token_logprobs[rows, correct], mask[rows, correct]
    lm = -(right * right_mask).sum() / right_mask.sum().clamp_min(1)
    ul_sum = token_logprobs.new_zeros(())
    ln_sum = token_logprobs.new_zeros(())
    wrong_tokens = 0
    for n in counts.unique().tolist():  # one group per distinct choice count, not a loop over examples
        group = counts == n
        lp, m, c = token_logprobs[group, :n], mask[group, :n], correct[group]
        wrong = m.sum() - m[torch.arange(len(c), device=m.device), c].sum()
        ul_sum = ul_sum + unlikelihood_loss(lp, m, c) * wrong
        ln_sum = ln_sum + length_normalized_loss(lp, m, c) * len(c)
        wrong_tokens = wrong_tokens + wrong
    ul = ul_sum / torch.as_tensor(wrong_tokens).clamp_min(1)
    ln = ln_sum / batch
    beta = (token_logprobs * mask).sum(-1) / mask.sum(-1).clamp_min(1)
    scores = beta.masked_fill(torch.arange(choices, device=mask.device)[None, :] >= counts[:, None], float("-inf"))
    loss = weights["lm"] * lm + weights["ul"] * ul + weights["ln"] * ln
    return {"loss": loss, "lm": lm, "ul": ul, "ln": ln, "scores": scores}


def choice_token_logprobs(reft: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                          choice_labels: torch.Tensor, choice_mask: torch.Tensor,
                          intervention_locations: torch.Tensor | None = None,
                          **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """``(token_logprobs, mask)``, both ``[R·B, C, T]``: ``log p(y_t | x, y_<t)`` of each choice's tokens
    under ``reft`` (a ReftModel, or a weight-space / prompt model with the same surface), from a batch of
    :class:`reftkit.data.multiple_choice.MultipleChoiceDataCollator` (B·C rows).

    An encoder-decoder model (T5, BART) reads the batch differently: ``input_ids`` / ``attention_mask`` are
    the prompt (the encoder's input) and ``choice_labels`` the choice as the decoder's targets (unshifted,
    -100 padded), which :func:`~reftkit.training.logprobs.seq2seq_logprobs` scores; the choices are scored by
    the decoder given the encoder input.

    As :func:`reftkit.training.causal_lm_loss`, only the rows predicting a choice token (``hidden[:, :-1]``
    where ``choice_labels[:, 1:]`` is not -100) go through the LM head and a log-softmax, or, without a
    trustworthy (backbone, head) pair, the same rows of the full forward's logits
    (:mod:`reftkit.training.logprobs`). The interventions act at ``intervention_locations`` (the
    prompt's positions), or, without them, at the config's positions resolved on the prompt alone (the
    attention mask less the choice tokens), as rank classification does.

    ``R`` is 1 except for a model whose forward returns R replicas of the batch, replica-major (a
    :class:`reftkit.analysis.prompt_ensemble.PromptEnsembleModel`: row ``r·B + b`` is example ``b`` under
    prompt ``r``). Logits longer than the input (virtual tokens in front) are read from the right.
    """
    batch, choices = choice_mask.shape
    seq2seq = is_encoder_decoder(getattr(reft, "model", reft))
    if input_ids.shape[0] != batch * choices or choice_labels.shape[0] != input_ids.shape[0] or (
            not seq2seq and choice_labels.shape != input_ids.shape):
        raise ValueError(f"a multiple-choice batch has B·C rows: choice_mask is [{batch}, {choices}], input_ids "
                         f"{tuple(input_ids.shape)}, choice_labels {tuple(choice_labels.shape)}")
    given = [k for k in CALL_INPUTS if kwargs.get(k) is not None]
    if given:  # per-example inputs would need repeating over the B·C rows; not supported here
        raise ValueError(f"{given[0]}= is not supported with a multiple-choice batch")
    kwargs = {k: v for k, v in kwargs.items() if k not in CALL_INPUTS}
    real = (choice_labels[:, 0 if seq2seq else 1:] != -100).sum(1).view(batch, choices) > 0
    if not torch.equal(real, choice_mask.to(real.device).bool()):
        b, c = (int(i) for i in (real != choice_mask.to(real.device).bool()).nonzero()[0])
        raise ValueError(f"choice_mask[{b}, {c}]={bool(choice_mask[b, c])} but choice_labels has "
                         f"{'no' if not real[b, c] else 'some'} labelled tokens there")
    if seq2seq:  # encoder input = the prompt alone; choice_labels = the decoder's targets (B·C rows)
        out = seq2seq_logprobs(reft, input_ids, attention_mask, choice_labels, intervention_locations, **kwargs)
        shape = (batch, choices, out.mask.shape[1])
        return out.token_logprobs.view(shape), out.mask.view(shape)
    prompt_mask = None if attention_mask is None else attention_mask * (choice_labels == -100)
    if prompt_mask is None and intervention_locations is None:
        prompt_mask = (choice_labels == -100).long()
    with reft.intervening(input_ids, prompt_mask, intervention_locations, kwargs.get("inputs_embeds")):
        states, head = predicting_states(reft, input_ids, attention_mask, **kwargs)
    replicas = states.shape[0] // input_ids.shape[0]
    if replicas * input_ids.shape[0] != states.shape[0]:
        raise ValueError(f"the model returned {states.shape[0]} rows for {input_ids.shape[0]} inputs")
    positions, targets, mask = (t.repeat(replicas, 1) for t in label_positions(choice_labels.to(states.device)))
    out = continuation_logprobs(states, positions, targets, mask, head)
    shape = (replicas * batch, choices, mask.shape[1])
    return out.token_logprobs.view(shape), out.mask.view(shape)


def multiple_choice_loss(reft: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                         choice_labels: torch.Tensor, choice_mask: torch.Tensor, correct: torch.Tensor,
                         intervention_locations: torch.Tensor | None = None,
                         weights: Mapping[str, float] | Sequence[str] | None = None,
                         num_items_in_batch: Any = None, **kwargs: Any) -> dict[str, torch.Tensor]:
    """T-Few's ``L_LM + L_UL + L_LN`` (weighted, :func:`tfew_loss`) of ``reft`` on a multiple-choice batch,
    through :func:`choice_token_logprobs`. Every term is a mean over this batch, so
    ``num_items_in_batch`` (Trainer's token count, which a multiple-choice batch does not produce) is not
    used; a replicated model (R prompts) averages over its replicas. Returns :func:`tfew_loss`'s dict."""
    token_logprobs, mask = choice_token_logprobs(reft, input_ids, attention_mask, choice_labels, choice_mask,
                                                 intervention_locations, **kwargs)
    replicas = token_logprobs.shape[0] // choice_mask.shape[0]
    correct = correct.to(token_logprobs.device)
    return tfew_loss(token_logprobs, mask, correct.repeat(replicas), choice_mask.to(mask.device).repeat(replicas, 1),
                     weights)
