"""``shrink_layers(...)``: start with interventions at all layers, then shrink.

The ReFT paper's advice for choosing sites (Wu et al. 2024, "ReFT", Appendix C) is to train at all layers
first and remove layers while the result holds. ``sweep`` (``reftkit.analysis.layer_sweep``) is the
one-shot grid — one small intervention per candidate layer — and reads each layer alone; this module is
the iterative search beside it: train a set of layers together, remove the least useful one, retrain the
rest, and stop once the held-out loss rises past a tolerance over the starting set's. Training and scoring
are the sweep's own (same data modules, trainer, seed handling and held-out loss), so a row here and a
sweep cell trained on the same layers agree.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import pandas as pd
from torch import nn

from .layer_sweep import _base_eval_loss, _train_and_score

CRITERIA = ("ablation", "retrain")


def _pass_through(module: nn.Module, args: tuple, output: Any) -> Any:
    """A forward hook that turns an intervention into the identity (its rows go back unedited)."""
    return args[0]


def _keys_by_layer(reft: Any, layers: Sequence[int], component: str) -> dict[int, list[str]]:
    """The keys of ``reft.interventions`` that sit at each layer (one per layer, or a first and a last
    one under ``share_weights=False``)."""
    from reftkit.attachment import intervention_key

    found = {}
    for layer in layers:
        stem = intervention_key(layer, component)
        found[layer] = [key for key in reft.interventions if key == stem or key.startswith(stem + "_")]
        if not found[layer]:
            raise RuntimeError(f"no intervention of layer {layer} among {list(reft.interventions)}")
    return found


def _ablated_losses(layers: Sequence[int], component: str):
    """An ``inspect`` for ``_train_and_score``: the held-out loss with each layer's interventions switched
    off in turn (the others as trained), as ``{layer: loss}``."""
    def inspect(reft: Any, held_out_loss: Any) -> dict[int, float]:
        out = {}
        for layer, keys in _keys_by_layer(reft, layers, component).items():
            modules = {id(reft.interventions[k]): reft.interventions[k] for k in keys}
            handles = [m.register_forward_hook(_pass_through) for m in modules.values()]
            try:
                out[layer] = held_out_loss()
            finally:
                for handle in handles:
                    handle.remove()
        return out
    return inspect


def _check(model: nn.Module, layers: Sequence[int] | str, train_inputs: Sequence[str], train_outputs: Sequence[str],
           eval_inputs: Sequence[str], eval_outputs: Sequence[str], tolerance: float, min_layers: int,
           criterion: str, positions: str) -> list[int]:
    """Validate the arguments (each error names the field and value); returns the starting layer set."""
    import reftkit

    if len(train_inputs) != len(train_outputs) or len(eval_inputs) != len(eval_outputs):
        raise ValueError(f"inputs and outputs must pair up one to one: train_inputs has {len(train_inputs)} and "
                         f"train_outputs {len(train_outputs)}, eval_inputs {len(eval_inputs)} and "
                         f"eval_outputs {len(eval_outputs)}")
    if len(train_inputs) == 0:
        raise ValueError("train_inputs is empty: training needs at least one pair")
    if len(eval_inputs) == 0:
        raise ValueError("eval_inputs is empty: the held-out loss that decides each step needs at least one pair")
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or math.isnan(tolerance) \
            or tolerance < 0:
        raise ValueError(f"tolerance={tolerance!r}: use a number >= 0 (the allowed relative rise of the held-out "
                         f"loss over the starting set's; 0.01 allows 1 %)")
    if criterion not in CRITERIA:
        raise ValueError(f"criterion={criterion!r}; use one of {list(CRITERIA)}")
    reftkit.parse_positions(positions)  # raises PositionError naming the bad spec
    n_layers = model.config.num_hidden_layers
    if isinstance(layers, str):
        if layers != "all":
            raise ValueError(f"layers={layers!r}; use 'all' or a list of layer indices 0..{n_layers - 1}")
        start = list(range(n_layers))
    else:
        start = []
        for layer in layers:
            if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < n_layers:
                raise ValueError(f"layers contains {layer!r}; use layer indices 0..{n_layers - 1} or 'all'")
            if layer in start:
                raise ValueError(f"layers lists {layer} twice: {list(layers)}")
            start.append(layer)
    if not start:
        raise ValueError("layers is empty: give the starting set, or 'all'")
    if isinstance(min_layers, bool) or not isinstance(min_layers, int) or not 1 <= min_layers <= len(start):
        raise ValueError(f"min_layers={min_layers!r} is out of range: use 1..{len(start)} (the starting set "
                         f"{start} has {len(start)} layers)")
    return start


def shrink_layers(model: nn.Module, tokenizer: Any, train_inputs: Sequence[str], train_outputs: Sequence[str],
                  eval_inputs: Sequence[str], eval_outputs: Sequence[str], *, layers: Sequence[int] | str = "all",
                  positions: str = "l1", intervention: str = "loreft", component: str = "block_output",
                  low_rank_dimension: int = 4, learning_rate: float = 2e-3, training: dict[str, Any] | None = None,
                  criterion: str = "ablation", tolerance: float = 0.01, min_layers: int = 1,
                  subset: int | None = None, chat_template: bool = False, seed: int = 0, eval_batch_size: int = 16,
                  progress: bool = True) -> pd.DataFrame:
    """Train ``intervention`` at every layer of ``layers`` together (``"all"``, or a starting list), then remove
    the least useful layer and retrain the rest, step by step, while the held-out loss holds.

    Each training is a fresh one, as in :func:`reftkit.analysis.sweep`: seeded with ``seed``, on the first
    ``subset`` training pairs, with ``learning_rate`` and the ``TrainingArguments`` fields in ``training``;
    the held-out loss is the mean next-token cross entropy over the response tokens of the eval pairs
    (nats per token). ``model`` is left as it was.

    **Least useful** (``criterion``), for a current set of *k* layers:

    * ``"ablation"`` (the default) — after training the set, switch off one layer's interventions at a time
      (they pass their rows through unedited; the others keep their trained weights) and measure the held-out
      loss; the layer whose removal raises it least goes, and the remaining set is retrained from scratch to
      confirm (that retrained loss is the step's ``eval_loss``). Cost per step: one training and *k*
      held-out evaluations, so about *L* trainings for *L* layers.
    * ``"retrain"`` — exact greedy backward elimination: retrain every set with one layer left out and keep the
      one with the lowest held-out loss. Cost per step: *k* trainings, so about *L²/2* in all; it sees what
      the other layers can take over once one is gone, which ablation (the others trained with it present)
      does not.

    Ties go to the lower layer. The size of a layer's edit is deliberately not a criterion: an edit can be
    large and change nothing the loss reads (e.g. an edit of the first token at the last layer).

    **Stopping**: ``tolerance`` is *relative* to the starting set's held-out loss ``L0``: a step is accepted
    while ``eval_loss <= L0 * (1 + tolerance)`` (0 allows no rise at all; ``math.inf`` never stops). The
    search ends at the first rejected step (kept in the path, ``accepted=False``) or when ``min_layers``
    layers are left.

    Returns the path, one row per step: ``step`` (0 = the starting set), ``layers`` (the tuple trained at
    this step), ``num_layers``, ``removed`` (the layer dropped at this step; ``<NA>`` at step 0),
    ``eval_loss``, ``relative_rise`` (``eval_loss / L0 - 1``), ``accepted``, ``base_eval_loss`` (the bare
    model's), ``num_trainable_params``, ``train_time`` (seconds of training in the step, every candidate
    included), ``trainings`` and ``scores`` (``{layer: value}`` that chose ``removed``: the held-out loss with
    that layer switched off minus the trained set's, for ``"ablation"``; the retrained loss without it, for
    ``"retrain"``). ``frame.attrs`` holds ``criterion``, ``tolerance``, ``start_loss``, ``limit`` and
    ``kept`` (the layers of the last accepted step). Plot it with :func:`reftkit.analysis.plot_shrink`."""
    from tqdm.auto import tqdm

    start = _check(model, layers, train_inputs, train_outputs, eval_inputs, eval_outputs, tolerance, min_layers,
                   criterion, positions)
    train_inputs, train_outputs = list(train_inputs)[:subset], list(train_outputs)[:subset]
    base_loss = _base_eval_loss(model, tokenizer, eval_inputs, eval_outputs, chat_template, eval_batch_size)

    def train(subset_layers: list[int], scored: bool) -> dict[str, Any]:
        rep = {"layer": list(subset_layers), "component": component, "positions": positions,
               "intervention": intervention, "low_rank_dimension": low_rank_dimension}
        inspect = _ablated_losses(subset_layers, component) if scored else None
        return _train_and_score(model, tokenizer, [rep], train_inputs, train_outputs, eval_inputs, eval_outputs,
                                learning_rate=learning_rate, training=training, chat_template=chat_template,
                                seed=seed, eval_batch_size=eval_batch_size, inspect=inspect)

    def row(step: int, kept: list[int], removed: int | None, cell: dict[str, Any], seconds: float, trainings: int,
            scores: dict[int, float] | None, accepted: bool) -> dict[str, Any]:
        return {"step": step, "layers": tuple(kept), "num_layers": len(kept), "removed": removed,
                "eval_loss": cell["eval_loss"], "relative_rise": cell["eval_loss"] / start_loss - 1
                if start_loss else math.nan, "accepted": accepted, "base_eval_loss": base_loss,
                "num_trainable_params": cell["num_trainable_params"], "train_time": seconds,
                "trainings": trainings, "scores": scores}

    bar = tqdm(total=len(start) - min_layers + 1, desc="shrink", disable=not progress)
    ablation = criterion == "ablation"
    cell = train(start, scored=ablation and len(start) > min_layers)
    start_loss = cell["eval_loss"]
    limit = start_loss * (1 + tolerance) if math.isfinite(tolerance) else math.inf
    rows = [row(0, start, None, cell, cell["train_time"], 1, None, True)]
    bar.update(1)
    bar.set_postfix(layers=len(start), loss=f"{start_loss:.4f}")
    current = list(start)
    while len(current) > min_layers:
        if ablation:
            scores = {layer: loss - cell["eval_loss"] for layer, loss in cell["inspected"].items()}
            drop = min(current, key=lambda layer: (scores[layer], layer))
            kept = [layer for layer in current if layer != drop]
            cell = train(kept, scored=len(kept) > min_layers)
            seconds, trainings = cell["train_time"], 1
        else:
            candidates = {layer: train([x for x in current if x != layer], scored=False) for layer in current}
            scores = {layer: c["eval_loss"] for layer, c in candidates.items()}
            drop = min(current, key=lambda layer: (scores[layer], layer))
            kept = [layer for layer in current if layer != drop]
            cell = candidates[drop]
            seconds, trainings = sum(c["train_time"] for c in candidates.values()), len(candidates)
        accepted = cell["eval_loss"] <= limit
        rows.append(row(len(rows), kept, drop, cell, seconds, trainings, scores, accepted))
        bar.update(1)
        bar.set_postfix(layers=len(kept), loss=f"{cell['eval_loss']:.4f}")
        if not accepted:
            break
        current = kept
    bar.close()
    frame = pd.DataFrame(rows)
    frame["removed"] = pd.array(frame["removed"].tolist(), dtype="Int64")
    frame.attrs.update(criterion=criterion, tolerance=tolerance, start_loss=start_loss, limit=limit,
                       kept=tuple(current))
    return frame


def plot_shrink(frame: pd.DataFrame, value: str = "eval_loss") -> Any:
    """The shrinking path: ``value`` (the held-out loss by default) against the number of layers left, read
    left to right from the starting set, each point annotated with the layer removed to reach it; a rejected
    last step is marked with a cross, and the tolerance limit (``frame.attrs["limit"]``, when plotting
    ``eval_loss``) is a dashed line. Returns the matplotlib Figure."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    for column in ("num_layers", "removed", "accepted", value):
        if column not in frame.columns:
            raise ValueError(f"frame has no column {column!r}; its columns are {list(frame.columns)}")
    if frame.empty:
        raise ValueError("frame has no rows: nothing to plot")
    x = [int(n) for n in frame["num_layers"]]
    y = [float(v) for v in frame[value]]
    accepted = [bool(a) for a in frame["accepted"]]
    fig = Figure(figsize=(6.4, 3.8), layout="constrained")
    ax = fig.subplots()
    ax.plot(x, y, color="C0", marker="o", label="held-out loss" if value == "eval_loss" else value)
    rejected = [i for i, ok in enumerate(accepted) if not ok]
    if rejected:
        ax.plot([x[i] for i in rejected], [y[i] for i in rejected], linestyle="", marker="X", markersize=11,
                color="C3", label="rejected (over the tolerance)")
    for i, removed in enumerate(frame["removed"]):
        label = f"all {x[i]}" if pd.isna(removed) else f"−{int(removed)}"
        ax.annotate(label, (x[i], y[i]), textcoords="offset points", xytext=(0, 7), ha="center", fontsize=8)
    limit = frame.attrs.get("limit")
    if value == "eval_loss" and limit is not None and math.isfinite(limit):
        ax.axhline(limit, color="grey", linestyle="--", linewidth=1,
                   label=f"limit (+{frame.attrs.get('tolerance', 0):.1%} over all layers)")
    ax.margins(y=0.15)  # room for the labels above the points
    ax.set_xlim(max(x) + 0.5, min(x) - 0.5)  # from the starting set towards fewer layers
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("layers with an intervention")
    ax.set_ylabel("held-out loss [nats/token]" if value == "eval_loss" else value)
    ax.set_title(f"shrinking the layer set ({frame.attrs.get('criterion', 'greedy')})")
    ax.legend(fontsize=8)
    return fig
