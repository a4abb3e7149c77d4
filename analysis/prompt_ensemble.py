"""Prompt ensembling — Lester et al. 2021, "The Power of Scale for Parameter-Efficient Prompt Tuning",
§ "Prompt Ensembling": N soft prompts on one frozen model, trained and run in a single batch by replicating
each example N times with a different prompt, their predictions combined by majority vote.

Prompt tuning (their §2): a prompt ``P ∈ R^{n×d}`` of ``n`` virtual token embeddings is prepended to the
embedded input, ``[P; E(x)]``, and only ``P`` is trained; each prompt is initialised from the embeddings of
vocabulary tokens sampled from the first ``sample_from`` ids (they sample from the 5,000 most common
tokens; BPE and SentencePiece vocabularies list frequent tokens first).

One forward of :class:`PromptEnsembleModel` on a batch of B rows runs N·B rows, replica-major (row
``r·B + b`` is example ``b`` under prompt ``r``): a training loss is then the mean over all N prompts, so
one step trains all of them. It trains with :class:`reftkit.ReftTrainer` (its surface is that of
:class:`reftkit.analysis.baselines.WeightSpaceModel`), with the LM data modules or with T-Few's
multiple-choice losses (:mod:`reftkit.data.multiple_choice`). :func:`ensemble_rank_classify` scores answer
choices under every prompt at once and votes (:func:`majority_vote`).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from .common import PromptModelSurface, model_device

__all__ = ["PromptEnsembleModel", "get_prompt_ensemble", "ensemble_rank_classify", "majority_vote",
           "EnsemblePrediction"]

WEIGHTS_NAME = "prompt_ensemble.safetensors"
CONFIG_NAME = "prompt_ensemble_config.json"


class PromptReplicas(nn.Module):
    """The module a :class:`PromptEnsembleModel` runs: the frozen ``base`` and ``prompts`` ``[N, n, d]``.

    ``forward(input_ids | inputs_embeds, attention_mask, labels)`` builds ``[P_r; E(x_b)]`` for every prompt
    ``r`` (or those in ``prompt``), extends the attention mask with ones and the labels with -100 over the
    virtual tokens, and returns the base's output with ``logits`` for the real tokens only (``[R·B, T,
    vocab]``, aligned with ``input_ids``). The loss is the base's over all R·B rows; a given
    ``num_items_in_batch`` (a count over the B rows) is multiplied by R to match.
    """

    def __init__(self, base: nn.Module, prompts: torch.Tensor) -> None:
        super().__init__()
        self.base = base
        self.prompts = nn.Parameter(prompts)
        self.enabled = True

    @property
    def config(self) -> Any:
        return self.base.config

    def get_input_embeddings(self) -> nn.Module:
        return self.base.get_input_embeddings()

    def _which(self, prompt: int | Sequence[int] | None) -> torch.Tensor:
        count = self.prompts.shape[0]
        which = list(range(count)) if prompt is None else [prompt] if isinstance(prompt, int) else list(prompt)
        bad = [i for i in which if not isinstance(i, int) or not 0 <= i < count]
        if bad or not which:
            raise ValueError(f"prompt={prompt!r}: give prompt indices in 0..{count - 1}")
        return torch.tensor(which, device=self.prompts.device)

    def prepend(self, input_ids: torch.Tensor | None, attention_mask: torch.Tensor | None,
                inputs_embeds: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                prompt: int | Sequence[int] | None = None) -> dict[str, torch.Tensor]:
        """``inputs_embeds`` ``[R·B, n + T, d]``, ``attention_mask`` and (if given) ``labels`` of the replicas."""
        if inputs_embeds is None:
            if input_ids is None:
                raise ValueError("pass input_ids or inputs_embeds")
            inputs_embeds = self.get_input_embeddings()(input_ids)
        batch, length, width = inputs_embeds.shape
        prompts = self.prompts[self._which(prompt)].to(inputs_embeds.dtype)  # [R, n, d]
        replicas, n = prompts.shape[:2]
        embeds = torch.cat([prompts[:, None].expand(replicas, batch, n, width),
                            inputs_embeds[None].expand(replicas, batch, length, width)], dim=2)
        if attention_mask is None:
            attention_mask = torch.ones(batch, length, dtype=torch.long, device=inputs_embeds.device)
        ones = attention_mask.new_ones(batch, n)
        out = {"inputs_embeds": embeds.reshape(replicas * batch, n + length, width),
               "attention_mask": torch.cat([ones, attention_mask], 1).repeat(replicas, 1)}
        if labels is not None:
            out["labels"] = torch.cat([labels.new_full((batch, n), -100), labels], 1).repeat(replicas, 1)
        return out

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, inputs_embeds: torch.Tensor | None = None,
                prompt: int | Sequence[int] | None = None, num_items_in_batch: Any = None, **kwargs: Any) -> Any:
        for name in ("position_ids", "past_key_values"):
            if kwargs.get(name) is not None:
                raise ValueError(f"{name}= is not supported by a prompt ensemble (the virtual tokens shift positions)")
        loss_kwargs = {} if num_items_in_batch is None else {"num_items_in_batch": num_items_in_batch}
        if not self.enabled:
            return self.base(input_ids=input_ids, attention_mask=attention_mask, labels=labels,
                             inputs_embeds=inputs_embeds, **loss_kwargs, **kwargs)
        call = self.prepend(input_ids, attention_mask, inputs_embeds, labels, prompt)
        replicas = call["inputs_embeds"].shape[0] // (input_ids if input_ids is not None else inputs_embeds).shape[0]
        if num_items_in_batch is not None:
            loss_kwargs["num_items_in_batch"] = num_items_in_batch * replicas
        out = self.base(**call, **loss_kwargs, **kwargs)
        out.logits = out.logits[:, self.prompts.shape[1]:]
        return out


class PromptEnsembleModel(PromptModelSurface, nn.Module):
    """N soft prompts on one frozen causal LM, used like a :class:`reftkit.ReftModel` (see the module
    docstring). Build one with :func:`get_prompt_ensemble`; ``prompts`` ``[N, n, d]`` are the trained
    tensor, ``model`` the :class:`PromptReplicas` the forward runs."""

    _kind, _builder = "a prompt ensemble", "get_prompt_ensemble"

    method = "prompt_ensemble"
    #: False: the virtual tokens enter through this model's own forward, so losses run it whole
    label_only_loss = False

    def __init__(self, base: nn.Module, prompts: torch.Tensor, *, seed: int | None = None,
                 sample_from: int | None = None) -> None:
        super().__init__()
        self._requires_grad = {name: p.requires_grad for name, p in base.named_parameters()}
        base.requires_grad_(False)
        self.model = PromptReplicas(base, prompts)
        self.init_options = {"seed": seed, "sample_from": sample_from}
        self._detached = False

    # -- the surface ReftTrainer, the losses and the analysis code use ------------------------------------
    @property
    def prompts(self) -> nn.Parameter:
        return self.model.prompts

    @property
    def num_prompts(self) -> int:
        return self.model.prompts.shape[0]

    @property
    def base_model(self) -> nn.Module:
        return self.model.base


    @property
    def device(self) -> torch.device:
        return self.model.prompts.device




    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                **kwargs: Any) -> Any:
        """:meth:`PromptReplicas.forward`: ``R·B`` rows (``prompt=`` picks the prompts; default all)."""
        self._check_live()
        return self.model(input_ids=input_ids, attention_mask=attention_mask, **self._reft_inputs(kwargs))

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                 prompt: int | Sequence[int] | None = None, **kwargs: Any) -> torch.Tensor:
        """``base.generate`` under each prompt (``prompt=`` picks them): ``[R·B, T + new]``, replica-major,
        the input tokens followed by the new ones (as generating from ``input_ids`` returns)."""
        self._check_live()
        kwargs = self._reft_inputs(kwargs)
        if not self.model.enabled:
            return self.model.base.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        call = self.model.prepend(input_ids, attention_mask, prompt=prompt)
        new = self.model.base.generate(**call, **kwargs)  # from embeddings HF returns only the new tokens
        replicas = call["inputs_embeds"].shape[0] // input_ids.shape[0]
        return torch.cat([input_ids.repeat(replicas, 1), new.to(input_ids.device)], 1)

    def trained_parameters(self) -> list[nn.Parameter]:
        return [self.model.prompts]

    def parameter_counts(self) -> dict[str, int]:
        """``trainable``: the prompts' N·n·d numbers; ``model``: the base model's parameters."""
        return {"trainable": self.model.prompts.numel(), "model": sum(p.numel() for p in self.model.base.parameters())}

    def print_trainable_parameters(self) -> str:
        counts = self.parameter_counts()
        share = 100.0 * counts["trainable"] / max(counts["model"], 1)
        text = (f"prompt_ensemble ({self.num_prompts} prompts): trainable params: {counts['trainable']:,} || model "
                f"params: {counts['model']:,} || trainable%: {share:.6f}")
        print(text)
        return text



    # -- saving: safetensors + JSON, never pickle -------------------------------------------------------------
    def save_pretrained(self, path: str | Path) -> Path:
        """``prompt_ensemble.safetensors`` (the prompts) and ``prompt_ensemble_config.json``."""
        from safetensors.torch import save_file

        self._check_live()
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        save_file({"prompts": self.model.prompts.detach().cpu().contiguous()}, str(path / WEIGHTS_NAME))
        count, n, width = self.model.prompts.shape
        config = {"method": self.method, "num_prompts": count, "num_virtual_tokens": n, "hidden_size": width}
        (path / CONFIG_NAME).write_text(json.dumps({**config, **self.init_options}))
        return path

    def load_trained(self, path: str | Path) -> None:
        """Load prompts saved by :meth:`save_pretrained` (trainer resume, best model); shapes must match."""
        from safetensors.torch import load_file

        self._check_live()
        path = Path(path)
        for name in (WEIGHTS_NAME, CONFIG_NAME):
            if not (path / name).is_file():
                raise FileNotFoundError(f"{path / name} not found: not a prompt-ensemble save folder")
        prompts = load_file(str(path / WEIGHTS_NAME)).get("prompts")
        if prompts is None or prompts.shape != self.model.prompts.shape:
            shape = None if prompts is None else tuple(prompts.shape)
            raise ValueError(f"{path / WEIGHTS_NAME}: prompts has shape {shape}, this ensemble's is "
                             f"{tuple(self.model.prompts.shape)} (num_prompts, num_virtual_tokens, hidden_size)")
        with torch.no_grad():
            self.model.prompts.copy_(prompts.to(self.model.prompts.device))

    @classmethod
    def from_pretrained(cls, model: nn.Module, path: str | Path) -> "PromptEnsembleModel":
        """An ensemble on ``model`` with the prompts saved in ``path``."""
        config = json.loads((Path(path) / CONFIG_NAME).read_text())
        if config.get("method") != cls.method:
            raise ValueError(f"{path}: method={config.get('method')!r}, expected {cls.method!r}")
        ensemble = get_prompt_ensemble(model, config["num_prompts"], config["num_virtual_tokens"],
                                       seed=config.get("seed") or 0, sample_from=config.get("sample_from"))
        ensemble.load_trained(path)
        return ensemble


def get_prompt_ensemble(model: nn.Module, num_prompts: int = 3, num_virtual_tokens: int = 10, *, seed: int = 0,
                        sample_from: int | None = 5000) -> PromptEnsembleModel:
    """Freeze ``model`` and attach ``num_prompts`` prompts of ``num_virtual_tokens`` each, initialised from
    the input embeddings of token ids drawn uniformly (seeded) from ``0..sample_from - 1`` (the whole
    vocabulary when ``None`` or larger), independently per prompt and position."""
    for name, value in (("num_prompts", num_prompts), ("num_virtual_tokens", num_virtual_tokens)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r} must be a positive int")
    embedding = model.get_input_embeddings().weight
    vocab = embedding.shape[0] if sample_from is None else min(int(sample_from), embedding.shape[0])
    if vocab < 1:
        raise ValueError(f"sample_from={sample_from!r} must be a positive int")
    ids = torch.randint(0, vocab, (num_prompts, num_virtual_tokens), generator=torch.Generator().manual_seed(seed))
    prompts = embedding.detach()[ids.to(embedding.device)].float().clone()  # float32 whatever the base's dtype
    return PromptEnsembleModel(model, prompts, seed=seed, sample_from=sample_from)


# -- prediction: rank classification under every prompt, majority vote ---------------------------------------
@dataclass
class EnsemblePrediction:
    """``predictions[e]``: the vote; ``per_prompt[r][e]``: prompt r's choice; ``scores[r][e][k]``: the mean
    token log-probability of choice k under prompt r (T-Few's length-normalised rank classification)."""

    predictions: list[int]
    per_prompt: list[list[int]]
    scores: list[list[list[float]]]


def majority_vote(per_prompt: Sequence[Sequence[int]], scores: Sequence[Sequence[Sequence[float]]]) -> list[int]:
    """Per example, the choice most prompts picked; a tie goes to the tied choice with the highest mean
    (over prompts) length-normalised score, then to the lowest index."""
    if len(per_prompt) != len(scores) or not per_prompt:
        raise ValueError(f"per_prompt has {len(per_prompt)} prompts, scores {len(scores)}; give one row per prompt")
    examples = len(per_prompt[0])
    if any(len(row) != examples for row in list(per_prompt) + list(scores)):
        raise ValueError("every prompt needs a prediction and scores for every example")
    out = []
    for e in range(examples):
        choices = len(scores[0][e])
        votes = [0] * choices
        for row in per_prompt:
            votes[row[e]] += 1
        mean = [sum(s[e][k] for s in scores) / len(scores) for k in range(choices)]
        out.append(max(range(choices), key=lambda k: (votes[k], mean[k], -k)))
    return out


@torch.no_grad()
def ensemble_rank_classify(ensemble: PromptEnsembleModel, tokenizer: Any, prompts: Sequence[str],
                           choices: Sequence[Sequence[str]], *, batch_size: int = 8,
                           add_special_tokens: bool = True) -> EnsemblePrediction:
    """Rank classification of each prompt's ``choices`` under every soft prompt at once (one forward of
    N·B·C rows per batch of B examples), then :func:`majority_vote`. Tokenisation and scoring are those
    of :func:`reftkit.analysis.multiple_choice.choice_logprobs` (prompt with ``add_special_tokens``, each
    choice alone without, right padding, the mean log-probability of the choice's tokens)."""
    from reftkit.data.multiple_choice import MultipleChoiceDataCollator, tokenize_choices
    from reftkit.training.objectives import choice_token_logprobs

    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} must be a positive int")
    encoded = tokenize_choices(tokenizer, prompts, choices, add_special_tokens=add_special_tokens)
    collate = MultipleChoiceDataCollator(tokenizer, padding_side="right")
    device = model_device(ensemble)
    count = ensemble.num_prompts
    scores: list[list[list[float]]] = [[] for _ in range(count)]
    for start in range(0, len(encoded), batch_size):
        chunk = encoded[start:start + batch_size]
        batch = collate([{"input_ids": p, "choices": c, "correct": 0} for p, c in chunk])
        logprobs, mask = choice_token_logprobs(ensemble, batch["input_ids"].to(device),
                                               batch["attention_mask"].to(device),
                                               batch["choice_labels"].to(device), batch["choice_mask"].to(device))
        mean = ((logprobs * mask).sum(-1) / mask.sum(-1).clamp_min(1)).view(count, len(chunk), -1).cpu()
        for r in range(count):
            scores[r].extend(mean[r, b, :len(c)].tolist() for b, (_, c) in enumerate(chunk))
    per_prompt = [[max(range(len(s)), key=s.__getitem__) for s in row] for row in scores]
    return EnsemblePrediction(majority_vote(per_prompt, scores), per_prompt, scores)
