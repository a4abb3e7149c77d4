"""REINFORCE for expert vectors — Sun, Cetin & Tang 2025, "Transformer²: Self-adaptive LLMs", §3.1.

Transformer² trains its SVF expert vectors with a policy gradient: sample a completion ``y_j`` for
each prompt ``x_j`` from the adapted model ``π``, reward it (``r_j``; the released code uses +1 when
correct, -1 when wrong), and minimise

    L = −(1/N) Σ_j r_j · Σ_t log π(y_jt | x_j, y_j<t)  +  λ · (1/N) Σ_j KL_j,
    KL_j = Σ_t Σ_v π_ref(v | ·) (log π_ref(v | ·) − log π(v | ·))       (KL(π_ref ‖ π), summed)

where ``π_ref`` is the base model. This follows the released code (``optim_modules.Reinforce`` in
SakanaAI/self-adaptive-llms: ``F.kl_div(input=log_probs, target=ref_log_probs, log_target=True,
reduction="sum")`` per completion, each completion's loss divided by the batch size; optional reward
normalisation ``(r − mean) / max(std, 1e-7)`` and clipping to ``[−c, c]``; ``cfgs/optimization/
reinforce.yaml``: lr 2e-3, max_grad_norm 1e-3, KL coefficient 0). As there, ``log π`` is the model's
own (untempered) distribution, and sampling with ``temperature != 1`` is slightly off-policy.

Works for a :class:`reftkit.ReftModel` (its interventions act at their configured positions resolved
on the *prompt*, the tokens ``ReftModel.generate`` edits at prefill; positions ``"all"`` also edit
each completion token, as in decoding), a :class:`reftkit.analysis.baselines.WeightSpaceModel` (SVF,
LoRA, ...), or a plain Hugging Face causal LM (e.g. one with :func:`reftkit.analysis.svf.apply_svf`).
Dropout makes ``log π`` differ from the sampling policy: train in ``eval()`` mode, as the tests do.
"""
from __future__ import annotations

import contextlib
import math
import numbers
import types
from typing import TYPE_CHECKING, Any, Callable, Iterator, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from reftkit.analysis import svf as svf_module
from reftkit.analysis.baselines import PROMPT_METHODS, WeightSpaceModel
from reftkit.model import ReftModel
from reftkit.training.logprobs import continuation_logprobs, predicting_states

if TYPE_CHECKING:
    import pandas

RewardFn = Callable[[list, list], Any]


class CompletionLogprobs(NamedTuple):
    """``token_logprobs`` ``[N, T]`` (0 where ``mask`` is False); ``rows`` ``[M, V]``: the full
    log-softmax rows of the ``M = mask.sum()`` completion tokens (row-major), when asked for."""
    token_logprobs: torch.Tensor
    mask: torch.Tensor
    rows: torch.Tensor | None


def _device(model: nn.Module) -> torch.device:
    device = getattr(model, "device", None)
    return device if isinstance(device, torch.device) else next(model.parameters()).device


def _prompt_locations(reft: ReftModel, prompt_mask: torch.Tensor, full_mask: torch.Tensor) -> torch.Tensor:
    """``[N, K, P]`` positions in the prompt+completion batch: each intervention's configured positions
    inside the (left- or right-padded) prompt, and every real token for positions ``"all"``."""
    lengths, start = prompt_mask.sum(1), prompt_mask.argmax(1)
    rel = reft.prompt_locations(lengths.cpu()).to(prompt_mask.device)
    locs = torch.where(rel >= 0, rel + start[:, None, None], -1)
    every = [k for k, slot in enumerate(reft._hooks.slots) if slot.every_token]
    if every:
        width = full_mask.shape[1]
        cols = torch.arange(width, device=full_mask.device).expand_as(full_mask)
        every_pos = torch.where(full_mask.bool(), cols, -1)
        locs = F.pad(locs, (0, width - locs.shape[-1]), value=-1).clone()
        locs[:, every] = every_pos[:, None]
    return locs


def completion_logprobs(model: nn.Module, prompt_ids: torch.Tensor, completion_ids: torch.Tensor,
                        prompt_mask: torch.Tensor | None = None, completion_mask: torch.Tensor | None = None, *,
                        intervention_locations: torch.Tensor | None = None,
                        return_rows: bool = False) -> CompletionLogprobs:
    """Per-token ``log π(y_t | x, y_<t)`` of ``completion_ids`` ``[N, T]`` after ``prompt_ids`` ``[N, P]``.

    Prompts may be left- or right-padded (``prompt_mask``), completions right-padded
    (``completion_mask``); position ids come from the joint mask, so padding never shifts a token.
    Only the completion positions go through the LM head when the model allows it.
    ``intervention_locations``: explicit ReftModel positions in the joint ``[N, P + T]`` batch
    (needed for a config with ``positions=None``); default: the config's positions on the prompt."""
    device = _device(model)
    prompt_ids, completion_ids = prompt_ids.to(device), completion_ids.to(device)
    prompt_mask = torch.ones_like(prompt_ids) if prompt_mask is None else prompt_mask.to(device).long()
    completion_mask = torch.ones_like(completion_ids) if completion_mask is None else completion_mask.to(device).long()
    if prompt_ids.shape != prompt_mask.shape or completion_ids.shape != completion_mask.shape or \
            prompt_ids.shape[0] != completion_ids.shape[0]:
        raise ValueError(f"prompt_ids {tuple(prompt_ids.shape)}, prompt_mask {tuple(prompt_mask.shape)}, "
                         f"completion_ids {tuple(completion_ids.shape)} and completion_mask "
                         f"{tuple(completion_mask.shape)} must be [N, P], [N, P], [N, T], [N, T]")
    if bool((prompt_mask.sum(1) == 0).any()):
        raise ValueError("a prompt has no tokens: its first completion token would have no context")
    width, length = prompt_ids.shape[1], completion_ids.shape[1]
    ids = torch.cat([prompt_ids, completion_ids], 1)
    mask = torch.cat([prompt_mask, completion_mask], 1)
    position_ids = (mask.cumsum(1) - 1).clamp_min(0)  # what generate uses for left padding

    prompt_method = isinstance(model, WeightSpaceModel) and model.method in PROMPT_METHODS
    extra = {} if prompt_method else {"position_ids": position_ids}  # peft ignores them with a warning
    wrapped = model if isinstance(model, (ReftModel, WeightSpaceModel)) else \
        types.SimpleNamespace(model=model, label_only_loss=True)  # the shape predicting_states reads
    arm: Any = contextlib.nullcontext()
    if isinstance(model, ReftModel):
        if intervention_locations is None:
            intervention_locations = _prompt_locations(model, prompt_mask, mask)
        arm = model.intervening(ids, mask, intervention_locations)
    elif intervention_locations is not None:
        raise ValueError(f"intervention_locations applies to a ReftModel only, not {type(model).__name__}")
    # completion token t is predicted at the previous real column: the prompt's last real token for
    # t = 0 (column P - 1 only when the prompt is left-padded), else column P + t - 1
    last = width - 1 - prompt_mask.flip(1).argmax(1)
    src = torch.arange(width - 1, width - 1 + length, device=device).expand(len(ids), -1).clone()
    src[:, 0] = last
    with arm:
        states, head = predicting_states(wrapped, ids, mask, **extra)
    out = continuation_logprobs(states, src, completion_ids, completion_mask, head)
    return CompletionLogprobs(out.token_logprobs, out.mask, out.rows if return_rows else None)


def reinforce_loss(model: nn.Module, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor | None,
                   completion_ids: torch.Tensor, completion_mask: torch.Tensor | None, rewards: torch.Tensor, *,
                   ref_rows: torch.Tensor | None = None, kl_coef: float = 0.0,
                   intervention_locations: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """``{"loss", "pg", "kl"}`` of the module docstring for given completions and ``rewards`` ``[N]``.

    ``ref_rows``: the base model's log-softmax rows of the same completion tokens
    (``completion_logprobs(..., return_rows=True).rows``), needed when ``kl_coef > 0``. Rewards and
    reference rows are treated as constants: gradients reach only the model's trainable parameters."""
    if kl_coef < 0 or not math.isfinite(kl_coef):
        raise ValueError(f"kl_coef must be a finite number >= 0, got {kl_coef}")
    if kl_coef > 0 and ref_rows is None:
        raise ValueError("kl_coef > 0 needs ref_rows, the base model's log-softmax rows of the completions")
    out = completion_logprobs(model, prompt_ids, completion_ids, prompt_mask, completion_mask,
                              intervention_locations=intervention_locations, return_rows=ref_rows is not None)
    rewards = torch.as_tensor(rewards, dtype=torch.float32).detach().to(out.token_logprobs.device)
    if rewards.shape != (out.token_logprobs.shape[0],):
        raise ValueError(f"rewards has shape {tuple(rewards.shape)}; expected ({out.token_logprobs.shape[0]},)")
    count = out.token_logprobs.shape[0]
    pg = -(rewards * out.token_logprobs.sum(1)).sum() / count
    kl = pg.new_zeros(())
    if ref_rows is not None:
        ref_rows = ref_rows.detach().to(out.rows.device, out.rows.dtype)
        if ref_rows.shape != out.rows.shape:
            raise ValueError(f"ref_rows has shape {tuple(ref_rows.shape)}, "
                             f"the completions' rows {tuple(out.rows.shape)}")
        kl = F.kl_div(out.rows, ref_rows, log_target=True, reduction="sum") / count
    return {"loss": pg + kl_coef * kl, "pg": pg, "kl": kl}


def _describe(value: Any) -> str:
    if hasattr(value, "shape") and hasattr(value, "dtype"):  # torch or numpy
        return f"a {type(value).__name__} of shape {tuple(value.shape)} and dtype {value.dtype}"
    if isinstance(value, (str, bytes)):
        return f"a {type(value).__name__} {value[:40]!r}"
    try:
        return f"a {type(value).__name__} of length {len(value)}"
    except TypeError:
        return f"{type(value).__name__} {value!r}"


def check_rewards(value: Any, count: int) -> torch.Tensor:
    """``reward_fn``'s return as a float32 ``[count]`` tensor, or a ValueError saying what it returned."""
    expected = f"one finite number per completion (a sequence of {count} numbers or a tensor of shape ({count},))"
    if torch.is_tensor(value):
        numeric = not value.dtype.is_complex
    else:
        numeric = not isinstance(value, (str, bytes)) and hasattr(value, "__len__") and all(
            isinstance(v, numbers.Real) or (torch.is_tensor(v) and v.dim() == 0) for v in value)
    if not numeric:
        raise ValueError(f"reward_fn must return {expected}; it returned {_describe(value)}")
    rewards = value.detach() if torch.is_tensor(value) else torch.tensor([float(v) for v in value])
    if rewards.shape != (count,):
        raise ValueError(f"reward_fn must return {expected}; it returned {_describe(value)}")
    rewards = rewards.float()
    bad = ~torch.isfinite(rewards)
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(f"reward_fn must return {expected}; it returned {float(rewards[i])} at index {i}")
    return rewards


def shape_rewards(rewards: torch.Tensor, norm: bool = False, clip: float | None = None) -> torch.Tensor:
    """The released code's options: ``(r − mean) / max(std, 1e-7)`` (population std), then ``[−clip, clip]``."""
    if norm:
        rewards = (rewards - rewards.mean()) / rewards.std(unbiased=False).clamp_min(1e-7)
    if clip is not None and clip > 0:
        rewards = rewards.clamp(-clip, clip)
    return rewards


@contextlib.contextmanager
def _base_of(model: nn.Module) -> Iterator[nn.Module]:
    """The model to score completions under ``π_ref``: the bare HF model, adaptations switched off."""
    if isinstance(model, ReftModel):
        yield model.model  # hooks are inert outside a call, so this is the base model
    elif isinstance(model, WeightSpaceModel):
        if model.method == "fpft":
            yield model.base_model
        else:
            with model.disabled():
                yield model
    elif svf_module.svf_modules(model):
        with svf_module.svf_disabled(model):
            yield model
    else:
        raise ValueError(f"kl_coef > 0 needs the base model, but {type(model).__name__} is neither a ReftModel, a "
                         "WeightSpaceModel nor a model with SVF layers; set kl_coef=0")


def _pad_id(tokenizer: Any) -> int:
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return int(tid)
    return 0


def _eos_ids(model: nn.Module, tokenizer: Any) -> list[int]:
    eos = None
    for candidate in (model, getattr(model, "model", None)):  # the HF model, or the one a wrapper runs
        eos = getattr(getattr(candidate, "generation_config", None), "eos_token_id", None)
        if eos is not None:
            break
    eos = tokenizer.eos_token_id if eos is None else eos
    return [] if eos is None else [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]


def policy_gradient_step(model: nn.Module, tokenizer: Any, prompts: Sequence[str], reward_fn: RewardFn, *,
                         samples_per_prompt: int = 1, max_new_tokens: int = 32, temperature: float = 1.0,
                         kl_coef: float = 0.0, reward_norm: bool = False, reward_clip: float | None = None,
                         seed: int | None = None, add_special_tokens: bool = True,
                         **generation_kwargs: Any) -> tuple[torch.Tensor, dict[str, float]]:
    """Sample completions of ``prompts`` from ``model``, reward them with ``reward_fn(prompts,
    completions)`` (each prompt repeated ``samples_per_prompt`` times, in order) and return the REINFORCE
    loss (call ``.backward()`` on it) and metrics ``reward_mean``, ``pg``, ``kl``, ``loss``,
    ``completion_tokens``. ``seed`` seeds the sampling without touching the global RNG."""
    if not prompts:
        raise ValueError("prompts is empty: nothing to sample")
    if samples_per_prompt < 1:
        raise ValueError(f"samples_per_prompt must be >= 1, got {samples_per_prompt}")
    device, pad = _device(model), _pad_id(tokenizer)
    prompts = [p for p in prompts for _ in range(samples_per_prompt)]
    tokens = [tokenizer(p, add_special_tokens=add_special_tokens)["input_ids"] for p in prompts]
    if not all(tokens):
        raise ValueError(f"prompt {next(i for i, t in enumerate(tokens) if not t)} has no tokens")
    width = max(len(t) for t in tokens)  # left padding: every prompt ends where generation starts
    prompt_ids = torch.tensor([[pad] * (width - len(t)) + t for t in tokens], device=device)
    prompt_mask = torch.tensor([[0] * (width - len(t)) + [1] * len(t) for t in tokens], device=device)

    options = {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0,
               "max_new_tokens": max_new_tokens, "pad_token_id": pad} | generation_kwargs
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        if seed is not None:
            torch.manual_seed(seed)
        with torch.no_grad():
            sequences = model.generate(input_ids=prompt_ids, attention_mask=prompt_mask, **options)
    completion_ids = sequences[:, width:]
    # a completion ends with its first end-of-sequence token (kept: sampling it was an action)
    is_eos = torch.isin(completion_ids, torch.tensor(_eos_ids(model, tokenizer), device=device, dtype=torch.long))
    completion_mask = (is_eos.long().cumsum(1) - is_eos.long()) == 0
    texts = tokenizer.batch_decode(completion_ids.masked_fill(~completion_mask, pad), skip_special_tokens=True)
    raw = check_rewards(reward_fn(list(prompts), texts), len(prompts)).to(device)
    rewards = shape_rewards(raw, reward_norm, reward_clip)

    ref_rows = None
    if kl_coef > 0:
        with torch.no_grad(), _base_of(model) as base:
            ref_rows = completion_logprobs(base, prompt_ids, completion_ids, prompt_mask, completion_mask,
                                           return_rows=True).rows
    parts = reinforce_loss(model, prompt_ids, prompt_mask, completion_ids, completion_mask, rewards,
                           ref_rows=ref_rows, kl_coef=kl_coef)
    metrics = {"reward_mean": float(raw.mean()), "pg": parts["pg"].item(), "kl": parts["kl"].item(),
               "loss": parts["loss"].item(), "completion_tokens": float(completion_mask.sum(1).float().mean())}
    return parts["loss"], metrics


def train_policy_gradient(model: nn.Module, tokenizer: Any, prompts: Sequence[str], reward_fn: RewardFn, *,
                          steps: int | None = None, epochs: int | None = None, batch_size: int = 8,
                          learning_rate: float = 2e-3, max_grad_norm: float = 1e-3, weight_decay: float = 0.0,
                          kl_coef: float = 0.0, seed: int = 0, progress: bool = True,
                          **step_kwargs: Any) -> "pandas.DataFrame":
    """Train ``model``'s trainable parameters with :func:`policy_gradient_step` (AdamW, gradient norm
    clipped to ``max_grad_norm``; defaults are the released code's). Runs ``steps`` batches of
    ``batch_size`` prompts, or ``epochs`` passes over ``prompts`` (reshuffled each pass with ``seed``);
    ``step_kwargs`` go to :func:`policy_gradient_step`. ``weight_decay`` defaults to 0: decay would pull
    SVF's ``z`` (identity at 1) towards 0. Returns one row of metrics per step."""
    import pandas as pd
    from tqdm.auto import tqdm

    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError(f"{type(model).__name__} has no trainable parameters (requires_grad=True): nothing to "
                         "train; build it with get_reft_model, get_weight_space_model or apply_svf")
    if not prompts:
        raise ValueError("prompts is empty: give at least one training prompt")
    if (steps is None) == (epochs is None):
        raise ValueError(f"give exactly one of steps and epochs (got steps={steps}, epochs={epochs})")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    per_epoch = math.ceil(len(prompts) / batch_size)
    total = steps if steps is not None else epochs * per_epoch
    if total < 1:
        raise ValueError(f"steps/epochs must be >= 1, got steps={steps}, epochs={epochs}")
    optimizer = torch.optim.AdamW(params, lr=learning_rate, weight_decay=weight_decay)
    generator = torch.Generator().manual_seed(seed)
    batches: list[list[int]] = []
    if epochs is not None:  # each pass reshuffled; its last batch may be short
        for _ in range(epochs):
            perm = torch.randperm(len(prompts), generator=generator).tolist()
            batches += [perm[i:i + batch_size] for i in range(0, len(perm), batch_size)]
    else:  # a stream of reshuffled passes, cut into full batches
        stream: list[int] = []
        while len(stream) < total * batch_size:
            stream += torch.randperm(len(prompts), generator=generator).tolist()
        batches = [stream[i * batch_size:(i + 1) * batch_size] for i in range(total)]
    records = []
    bar = tqdm(batches, desc="policy gradient", unit="step", disable=not progress)
    for step, chosen in enumerate(bar):
        batch = [prompts[i] for i in chosen]
        loss, metrics = policy_gradient_step(model, tokenizer, batch, reward_fn, kl_coef=kl_coef,
                                             seed=seed * 1_000_003 + step, **step_kwargs)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        metrics["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(params, max_grad_norm))
        optimizer.step()
        records.append({"step": step, **metrics})
        bar.set_postfix(reward=f"{metrics['reward_mean']:.3f}", kl=f"{metrics['kl']:.3g}")
    return pd.DataFrame.from_records(records)
