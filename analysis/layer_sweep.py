"""``sweep(...)``: where does intervening help? Train one small intervention per candidate (layer,
positions) on a subset and report the held-out loss it reaches against the base model's.

The ReFT paper's advice for choosing sites (Wu et al. 2024, "ReFT", §4 and Appendix C: hyper-parameter
search) is to start from interventions at all layers and shrink; ``layers`` therefore accepts
``"all"`` next to single layers, so the all-layer row is the reference each single layer is read against.
"""
from __future__ import annotations

import tempfile
import time
from typing import Any, Callable, Sequence

import pandas as pd
import torch
from torch import nn
from torch.nn import functional as F

from .common import model_device


@torch.no_grad()
def _eval_loss(model: Any, dataset: Any, collator: Any, batch_size: int) -> float:
    """Mean next-token cross entropy over the labelled tokens of ``dataset`` (token-weighted)."""
    total, count = 0.0, 0
    device = model_device(model)
    for start in range(0, len(dataset), batch_size):
        batch = collator([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
        labels = batch.pop("labels")
        if not hasattr(model, "interventions"):
            batch.pop("intervention_locations", None)
        logits = model(**batch).logits[:, :-1].float()
        targets = labels[:, 1:]
        keep = targets != -100
        total += float(F.cross_entropy(logits[keep], targets[keep], reduction="sum"))
        count += int(keep.sum())
    return total / max(count, 1)


def _base_eval_loss(model: Any, tokenizer: Any, eval_inputs: Sequence[str], eval_outputs: Sequence[str],
                    chat_template: bool, batch_size: int) -> float:
    """The bare model's ``_eval_loss`` on the held-out pairs."""
    import reftkit

    module = reftkit.make_last_position_supervised_data_module(
        tokenizer, model, eval_inputs, eval_outputs, chat_template=chat_template)
    return _eval_loss(model, module["train_dataset"], module["data_collator"], batch_size)


def _train_and_score(model: nn.Module, tokenizer: Any, representations: list[dict[str, Any]],
                     train_inputs: Sequence[str], train_outputs: Sequence[str], eval_inputs: Sequence[str],
                     eval_outputs: Sequence[str], *, learning_rate: float, training: dict[str, Any] | None,
                     chat_template: bool, seed: int, eval_batch_size: int,
                     inspect: Callable[[Any, Callable[[], float]], Any] | None = None) -> dict[str, Any]:
    """Attach ``representations`` to ``model`` (seeded with ``seed``), train them with ``ReftTrainer`` on the
    training pairs and score them on the held-out pairs; the model is detached again whatever happens.

    Returns ``eval_loss``, ``num_trainable_params``, ``train_time`` (seconds in ``trainer.train()``) and, when
    ``inspect`` is given, ``inspected``: what ``inspect(reft, held_out_loss)`` returns, called after
    training while the interventions are still attached (``held_out_loss()`` re-scores the model as it is
    then, e.g. with some interventions switched off)."""
    from transformers import TrainingArguments

    import reftkit
    from reftkit.training import ReftTrainer

    torch.manual_seed(seed)
    reft = reftkit.get_reft_model(model, representations)
    try:
        module = reftkit.make_multiple_position_supervised_data_module(
            tokenizer, reft, train_inputs, train_outputs, positions=None, chat_template=chat_template,
            eval_inputs=eval_inputs, eval_outputs=eval_outputs)
        with tempfile.TemporaryDirectory() as scratch:
            args = TrainingArguments(**{"report_to": [], "save_strategy": "no", "disable_tqdm": True,
                                        "use_cpu": not torch.cuda.is_available(), "seed": seed,
                                        **(training or {}), "output_dir": scratch,
                                        "learning_rate": learning_rate})
            trainer = ReftTrainer(model=reft, args=args, train_dataset=module["train_dataset"],
                                  data_collator=module["data_collator"])
            start = time.perf_counter()
            trainer.train()
            seconds = time.perf_counter() - start
        reft.eval()

        def held_out_loss() -> float:
            return _eval_loss(reft, module["eval_dataset"], module["data_collator"], eval_batch_size)
        cell = {"eval_loss": held_out_loss(), "num_trainable_params": reft.parameter_counts()["trainable"],
                "train_time": seconds}
        if inspect is not None:
            cell["inspected"] = inspect(reft, held_out_loss)
        return cell
    finally:
        reft.detach()


def sweep(model: nn.Module, tokenizer: Any, train_inputs: Sequence[str], train_outputs: Sequence[str],
          eval_inputs: Sequence[str], eval_outputs: Sequence[str], *, layers: Sequence[int | str] = ("all",),
          positions: Sequence[str] = ("l1",), intervention: str = "loreft", component: str = "block_output",
          low_rank_dimension: int = 4, learning_rate: float = 2e-3, training: dict[str, Any] | None = None,
          subset: int | None = None, chat_template: bool = False, seed: int = 0, eval_batch_size: int = 16,
          progress: bool = True) -> pd.DataFrame:
    """Train ``intervention`` at every (layer, positions) of the grid on the first ``subset`` training
    examples and score each on the held-out pairs. Returns one row per cell: ``layer`` (an int, or
    ``"all"``), ``positions``, ``eval_loss``, ``base_eval_loss``, ``improvement`` (base − eval loss, in
    nats per token; higher is better), ``num_trainable_params`` and ``train_time``. ``model`` is left
    as it was."""
    from tqdm.auto import tqdm

    import reftkit

    if not layers or not positions:
        raise ValueError(f"layers={list(layers)} and positions={list(positions)} must both be non-empty")
    if len(train_inputs) != len(train_outputs) or len(eval_inputs) != len(eval_outputs):
        raise ValueError("inputs and outputs must pair up one to one (train and eval)")
    n_layers = model.config.num_hidden_layers
    for layer in layers:
        if layer != "all" and not (isinstance(layer, int) and 0 <= layer < n_layers):
            raise ValueError(f"layers contains {layer!r}; use layer indices 0..{n_layers - 1} or 'all'")
    for spec in positions:
        reftkit.parse_positions(spec)  # raises PositionError naming the bad spec
    train_inputs, train_outputs = list(train_inputs)[:subset], list(train_outputs)[:subset]
    base_loss = _base_eval_loss(model, tokenizer, eval_inputs, eval_outputs, chat_template, eval_batch_size)
    rows = []
    grid = [(layer, spec) for layer in layers for spec in positions]
    for layer, spec in tqdm(grid, desc="sweep", disable=not progress):
        cell = _train_and_score(model, tokenizer, [{"layer": layer, "component": component, "positions": spec,
                                                    "intervention": intervention,
                                                    "low_rank_dimension": low_rank_dimension}],
                                train_inputs, train_outputs, eval_inputs, eval_outputs,
                                learning_rate=learning_rate, training=training, chat_template=chat_template,
                                seed=seed, eval_batch_size=eval_batch_size)
        rows.append({"layer": layer, "positions": spec, "eval_loss": cell["eval_loss"], "base_eval_loss": base_loss,
                     "improvement": base_loss - cell["eval_loss"],
                     "num_trainable_params": cell["num_trainable_params"], "train_time": cell["train_time"]})
    return pd.DataFrame(rows)


def plot_sweep(frame: pd.DataFrame, value: str = "improvement") -> Any:
    """Heat map of ``value`` with a row per layer and a column per position spec, each cell annotated.
    Returns the matplotlib Figure."""
    from matplotlib.figure import Figure

    for column in ("layer", "positions", value):
        if column not in frame.columns:
            raise ValueError(f"frame has no column {column!r}; its columns are {list(frame.columns)}")
    layers = list(dict.fromkeys(frame["layer"].astype(str)))
    specs = list(dict.fromkeys(frame["positions"]))
    grid = torch.full((len(layers), len(specs)), float("nan"))
    for _, row in frame.iterrows():
        grid[layers.index(str(row["layer"])), specs.index(row["positions"])] = float(row[value])
    fig = Figure(figsize=(1.6 + 1.1 * len(specs), 1.2 + 0.45 * len(layers)), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(grid.numpy(), cmap="viridis", aspect="auto")
    for i in range(len(layers)):
        for j in range(len(specs)):
            if not torch.isnan(grid[i, j]):
                ax.text(j, i, f"{grid[i, j]:.3f}", ha="center", va="center", color="white", fontsize=8)
    ax.set_xticks(range(len(specs)), specs)
    ax.set_yticks(range(len(layers)), layers)
    ax.set_xlabel("positions")
    ax.set_ylabel("layer")
    ax.set_title(f"{value} by intervention site")
    fig.colorbar(image, ax=ax, label=value)
    return fig
