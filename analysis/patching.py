"""Activation statistics, steering vectors and activation patching, built on reftkit's hooks.

* :func:`mean_activation` — the mean representation at a site over prompts (for mean ablation);
* :func:`steering_vector` — mean(positive) − mean(negative) at a site (contrastive activation
  addition: Rimsky et al. 2024, "Steering Llama 2 via Contrastive Activation Addition";
  Turner et al. 2023, "Activation Addition"); load it into an ``Addition`` intervention;
* :func:`activation_patching` — for each (layer, position), run the corrupted input with that
  one representation copied from the clean run and score the result (Meng et al. 2022, "Locating
  and Editing Factual Associations in GPT", causal tracing; Heimersheim & Nanda 2024, "How to use
  and interpret activation patching"); :func:`plot_patching` draws the heat map.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch import nn


def _batches(tokenizer: Any, prompts: Sequence[str], batch_size: int, device: torch.device):
    for start in range(0, len(prompts), batch_size):
        enc = tokenizer(list(prompts[start:start + batch_size]), return_tensors="pt", padding=True)
        yield {k: v.to(device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}


@torch.no_grad()
def mean_activation(model: nn.Module, tokenizer: Any, prompts: Sequence[str], layer: int,
                    component: str = "block_output", positions: str = "l1", batch_size: int = 16,
                    heads: list[int] | None = None) -> torch.Tensor:
    """Mean over ``prompts`` of the mean representation at ``positions`` — a float32 vector of the
    site's width (``[len(heads), head_dim]`` for a head-level component). ``model`` is left as it was."""
    import reftkit

    if not prompts:
        raise ValueError("prompts is empty: give at least one prompt")
    if getattr(tokenizer, "pad_token_id", None) is None:
        raise ValueError("the tokenizer has no pad token; set tokenizer.pad_token (e.g. to the eos token)")
    entry = {"layer": layer, "component": component, "positions": positions, "intervention": "collect"}
    if heads is not None:
        entry["heads"] = heads
    reft = reftkit.get_reft_model(model, [entry])
    try:
        total, count = None, 0
        for batch in _batches(tokenizer, prompts, batch_size, reft.device):
            got = reft.collect(**batch)
            rows, valid = next(iter(got.activations.values())).float(), next(iter(got.valid.values()))
            weights = valid.float() / valid.sum(1, keepdim=True).clamp_min(1)  # mean over each prompt's positions
            per_prompt = torch.einsum("bp,bp...->b...", weights, rows)
            total = per_prompt.sum(0) if total is None else total + per_prompt.sum(0)
            count += per_prompt.shape[0]
    finally:
        reft.detach()
    return total / count


def steering_vector(model: nn.Module, tokenizer: Any, positive: Sequence[str], negative: Sequence[str],
                    layer: int, component: str = "block_output", positions: str = "l1",
                    batch_size: int = 16) -> torch.Tensor:
    """``mean_activation(positive) - mean_activation(negative)`` at one site: the direction that
    separates the two prompt sets there. Add it with ``{"intervention": "addition"}`` and
    ``set_vector(v)``; ``scale`` sets its strength."""
    pos = mean_activation(model, tokenizer, positive, layer, component, positions, batch_size)
    neg = mean_activation(model, tokenizer, negative, layer, component, positions, batch_size)
    return pos - neg


@torch.no_grad()
def activation_patching(model: nn.Module, clean: dict[str, torch.Tensor], corrupt: dict[str, torch.Tensor],
                        metric: Callable[[Any], torch.Tensor], layers: Sequence[int] | None = None,
                        component: str = "block_output", positions: Sequence[int] | None = None,
                        progress: bool = True) -> "pandas.DataFrame":  # noqa: F821
    """Patch one (layer, position) at a time from the clean run into the corrupted run.

    ``clean`` and ``corrupt`` are token batches of the same shape (``input_ids``, optional
    ``attention_mask``): position ``t`` of one pairs with position ``t`` of the other.
    ``metric(output) -> [batch]`` scores a model output (e.g. a logit difference at the last token).
    Returns a DataFrame with ``layer``, ``position``, ``score`` (the batch mean), and the
    ``clean_score`` / ``corrupt_score`` of the unpatched runs; ``recovered`` =
    (score − corrupt) / (clean − corrupt), the share of the clean behaviour one patch restores.
    """
    import pandas as pd
    from tqdm.auto import tqdm

    import reftkit
    from reftkit.structure import num_layers

    ids, c_ids = corrupt["input_ids"], clean["input_ids"]
    if ids.shape != c_ids.shape:
        raise ValueError(f"clean input_ids {tuple(c_ids.shape)} and corrupt input_ids {tuple(ids.shape)} must have "
                         "the same shape: patching pairs position t of one with position t of the other")
    batch, length = ids.shape
    layers = list(range(num_layers(model))) if layers is None else list(layers)
    positions = list(range(length)) if positions is None else list(positions)
    bad = [p for p in positions if not 0 <= p < length]
    if bad:
        raise ValueError(f"positions: {bad[0]} is outside the sequence (0..{length - 1})")
    clean_score = float(metric(model(**clean)).float().mean())
    corrupt_score = float(metric(model(**corrupt)).float().mean())
    rows = []
    bar = tqdm(total=len(layers) * len(positions), desc="patching", disable=not progress)
    for layer in layers:
        reft = reftkit.get_reft_model(model, [{"layer": layer, "component": component, "positions": None,
                                               "intervention": "interchange"}])
        try:
            for pos in positions:
                where = torch.full((batch, 1), pos, dtype=torch.long, device=ids.device)
                out = reft(**corrupt, intervention_locations=where, sources=clean, source_locations=where)
                rows.append({"layer": layer, "position": pos, "score": float(metric(out).float().mean())})
                bar.update()
        finally:
            reft.detach()
    bar.close()
    frame = pd.DataFrame(rows)
    frame["clean_score"], frame["corrupt_score"] = clean_score, corrupt_score
    span = clean_score - corrupt_score
    frame["recovered"] = (frame["score"] - corrupt_score) / span if span != 0 else float("nan")
    return frame


def plot_patching(frame: "pandas.DataFrame", value: str = "recovered", tokens: Sequence[str] | None = None,  # noqa: F821
                  title: str | None = None) -> "matplotlib.figure.Figure":  # noqa: F821
    """Heat map of :func:`activation_patching`'s result: layers down, positions across."""
    from matplotlib.figure import Figure

    grid = frame.pivot(index="layer", columns="position", values=value)
    fig = Figure(figsize=(1.0 + 0.6 * grid.shape[1], 1.0 + 0.35 * grid.shape[0]))
    ax = fig.subplots()
    limit = float(grid.abs().max().max()) or 1.0
    image = ax.imshow(grid.values, cmap="RdBu_r", vmin=-limit, vmax=limit, aspect="auto")
    ax.set_xticks(range(grid.shape[1]))
    ax.set_xticklabels([tokens[p] for p in grid.columns] if tokens is not None else list(grid.columns),
                       rotation=60, ha="right")
    ax.set_yticks(range(grid.shape[0]))
    ax.set_yticklabels(list(grid.index))
    ax.set_xlabel("token position")
    ax.set_ylabel("layer")
    ax.set_title(title or f"activation patching ({value})")
    fig.colorbar(image, ax=ax, label=value)
    fig.tight_layout()
    return fig
