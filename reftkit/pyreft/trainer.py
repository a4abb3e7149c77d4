"""pyreft 0.1.0's trainers on :class:`reftkit.training.ReftTrainer`.

* ``ReftTrainer`` / ``ReftTrainerForCausalLM``: pyreft's causal-LM loss (the HF model's own: mean cross
  entropy over every shifted label that is not -100) computed by reftkit's label-only loss, which never
  builds ``[B, T, vocab]`` logits. The batch adapter keeps what pyreft's ``compute_loss`` reads
  (``input_ids``, ``attention_mask``, ``labels``, ``intervention_locations`` ``[B, K, P]``, ``subspaces``)
  and drops the rest (pyreft's datasets add ``id``).
* ``ReftTrainerForSequenceClassification``: pyreft's loss by ``problem_type`` (regression: MSE;
  single-label: cross entropy; multi-label: BCE with logits) on the classifier's logits of the intervened
  run, and pyreft's ``evaluate`` (its own loop: logits and labels to ``compute_metrics``, ``eval_`` prefix).
* Constructors take pyreft's ``tokenizer=`` (transformers 5 renamed it ``processing_class=``; both work).
* ``save_model(output_dir)`` writes ``{output_dir}/intervenable_model`` as pyreft does, in the folder format
  of ``reftkit.pyreft.ReftModel.save`` (with ``pytorch_model.bin``, the base model's trainable weights:
  a classifier head), so ``ReftModel.load(f"{output_dir}/intervenable_model", model)`` reads it; checkpoints,
  resuming and ``load_best_model_at_end`` use the same layout, plus ``reft_trainer_state.safetensors`` beside
  it (the exact parameters, so a resumed run continues exactly where it stopped).
* A subclass whose ``compute_loss(self, intervenable, inputs, return_outputs=False)`` has pyreft's signature
  (no ``num_items_in_batch``, which transformers 5 passes) works unchanged.

A position that pyreft's padding lists more than once is edited once (the same forward; see ``once_each``).
Loss scaling is pyreft's: each micro-batch's loss is its own mean and gradient accumulation divides by the
number of steps (transformers 4.45's rule, which pyreft trained under), not reftkit's token-weighted
``num_items_in_batch``. Differences on purpose: training batches come from ``Trainer``'s own data loader
(pyreft's ``ReftTrainerForCausalLM`` builds a plain shuffled ``DataLoader``; both shuffle every epoch),
and regression labels are not rounded to bfloat16 before the MSE (pyreft casts them).
"""
from __future__ import annotations

import inspect
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn import BCEWithLogitsLoss, CrossEntropyLoss, MSELoss
from torch.utils.data import DataLoader
from transformers.trainer import TRAINING_ARGS_NAME
from transformers.trainer_utils import EvalPrediction, denumpify_detensorize
from transformers.utils import logging

from reftkit.training.trainer import ReftTrainer as CoreReftTrainer

from .call_forms import once_each
from .model import ReftModel

logger = logging.get_logger(__name__)

#: what pyreft's compute_loss reads from a batch
BATCH_KEYS = ("input_ids", "attention_mask", "labels", "intervention_locations")
#: the folder pyreft's save_model writes under output_dir
SAVE_FOLDER = "intervenable_model"
#: beside it: the exact trained tensors (reftkit's own parameters), which resuming reads
EXACT_STATE = "reft_trainer_state.safetensors"


def _locations(inputs: dict[str, Any]) -> torch.Tensor:
    locations = inputs.get("intervention_locations")
    if not isinstance(locations, torch.Tensor) or locations.dim() != 3:
        shape = None if locations is None else tuple(getattr(locations, "shape", ()))
        raise ValueError(f"the batch's intervention_locations has shape {shape}; reftkit.pyreft trains on [batch, "
                         "interventions, positions] locations (pyreft's data modules and ReftDataset give them; "
                         "pyreft's LoRA-only baseline without locations is not supported)")
    return locations


def _subspaces(subspaces: Any, count: int) -> torch.Tensor | None:
    """pyreft's ``subspaces`` column ``[B, K', s]`` for a model with ``count`` interventions: as is when
    ``K' == count``; one ``[B, s]`` row for all when ``K'`` differs but its rows agree (pyreft repeats the
    example's subspaces, halving ``K'`` under ``share_weights``)."""
    if subspaces is None:
        return None
    subspaces = torch.as_tensor(subspaces)
    if subspaces.dim() == 3 and subspaces.shape[1] != count:
        if not bool((subspaces == subspaces[:, :1]).all()):
            raise ValueError(f"the batch's subspaces has {subspaces.shape[1]} rows per example and the model has "
                             f"{count} interventions; give one row per intervention (or identical rows)")
        return subspaces[:, 0]
    return subspaces


def _pyreft_signature(method: Any) -> bool:
    """Whether a ``compute_loss`` override lacks ``num_items_in_batch`` (pyreft's, for transformers 4.45)."""
    params = inspect.signature(method).parameters
    return "num_items_in_batch" not in params and not any(p.kind is p.VAR_KEYWORD for p in params.values())


def load_intervenable_model(reft: ReftModel, folder: str | Path) -> None:
    """Load a ``save_model`` folder (``.../intervenable_model``) into ``reft`` in place (its interventions
    and the base model's trainable weights), as pyvene's ``load_intervention``."""
    reft.load_intervention(str(folder), include_model=True)


def save_exact_state(reft: nn.Module, path: str | Path) -> None:
    """The interventions' own tensors (e.g. LoReFT's free rotation parameter, which pyreft's folder format does
    not hold: it stores R, from which an equal R but not the same parameter is rebuilt, and an optimizer state
    resumed on a rebuilt parameter drifts) and the base model's trainable weights."""
    state = {f"interventions.{k}": v.detach().cpu().clone().contiguous()
             for k, v in reft.interventions.state_dict().items()}
    state |= {f"model.{n}": p.detach().cpu().clone().contiguous()
              for n, p in reft.model.named_parameters() if p.requires_grad}
    save_file(state, str(path))


def load_exact_state(reft: nn.Module, path: str | Path) -> None:
    """Load :func:`save_exact_state`'s file into ``reft`` in place (strict: every intervention tensor)."""
    tensors = load_file(str(path))
    prefix = "interventions."
    reft.interventions.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
    params = dict(reft.model.named_parameters())
    with torch.no_grad():
        for name, tensor in tensors.items():
            if name.startswith("model."):
                if name[6:] not in params:
                    raise ValueError(f"{path}: {name[6:]!r} is not a parameter of this model")
                params[name[6:]].copy_(tensor)


class ReftTrainer(CoreReftTrainer):
    """pyreft's ``ReftTrainer``: the causal-LM loss, pyreft's save layout; see the module docstring."""

    def __init__(self, model: nn.Module | None = None, args: Any = None, data_collator: Any = None,
                 train_dataset: Any = None, eval_dataset: Any = None, tokenizer: Any = None,
                 model_init: Any = None, compute_metrics: Any = None, callbacks: Any = None,
                 optimizers: tuple = (None, None), preprocess_logits_for_metrics: Any = None, *,
                 processing_class: Any = None, **kwargs: Any) -> None:
        if tokenizer is not None and processing_class is not None and tokenizer is not processing_class:
            raise ValueError("tokenizer= and processing_class= name two different objects; pass one (tokenizer= is "
                             "pyreft's name, processing_class= transformers 5's)")
        if not isinstance(model, ReftModel):
            raise TypeError(f"{type(self).__name__} trains a reftkit.pyreft.ReftModel (from get_reft_model), got "
                            f"{type(model).__name__}")
        super().__init__(model, args, data_collator=data_collator, train_dataset=train_dataset,
                         eval_dataset=eval_dataset, processing_class=processing_class or tokenizer,
                         model_init=model_init, compute_metrics=compute_metrics, callbacks=callbacks,
                         optimizers=optimizers, preprocess_logits_for_metrics=preprocess_logits_for_metrics, **kwargs)
        # pyreft's scaling: per-micro-batch means, divided by the accumulation steps (no num_items_in_batch)
        self.model_accepts_loss_kwargs = False
        if _pyreft_signature(type(self).compute_loss):
            legacy = self.compute_loss

            def compute_loss(model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                             num_items_in_batch: Any = None) -> Any:
                return legacy(model, inputs, return_outputs)

            self.compute_loss = compute_loss

    @property
    def tokenizer(self) -> Any:
        """pyreft's (transformers 4.x) name for ``processing_class``."""
        return self.processing_class

    def compute_loss(self, intervenable: nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        """pyreft's causal-LM loss on the intervened run: ``sum CE / labelled tokens`` over the shifted labels,
        by :func:`reftkit.training.causal_lm_loss` (label-only logits)."""
        batch = {key: inputs[key] for key in BATCH_KEYS if key in inputs}
        batch["intervention_locations"] = once_each(_locations(batch))
        reft = self._reft_module(intervenable)
        subspaces = _subspaces(inputs.get("subspaces"), len(reft.interventions))
        if subspaces is not None:
            batch["subspaces"] = subspaces
        return super().compute_loss(intervenable, batch, return_outputs, num_items_in_batch)

    # -- pyreft's save layout -----------------------------------------------------------------
    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """Write ``{output_dir}/intervenable_model`` (``ReftModel.save(..., include_model=True)``); as pyreft,
        a non-empty folder there is kept, with a warning, rather than overwritten."""
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        target = Path(output_dir) / SAVE_FOLDER
        if target.is_dir() and any(target.iterdir()):
            logger.warning(f"Directory {target} already exists and contains files. Skipping save to prevent "
                           "overwriting existing model.")
            return
        os.makedirs(output_dir, exist_ok=True)
        self._reft_module().save(save_directory=target, include_model=True)
        save_exact_state(self._reft_module(), Path(output_dir) / EXACT_STATE)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))  # Trainer's convention

    def _load_weights(self, folder: str, model: nn.Module | None = None) -> None:
        """Resume / best model, in place: the exact tensors of ``{folder}/reft_trainer_state.safetensors``
        when there, else ``{folder}/intervenable_model`` (e.g. a folder pyreft wrote)."""
        reft = self._reft_module(model)
        with self._full_trained_tensors(reft, loading=True):
            if (Path(folder) / EXACT_STATE).is_file():
                load_exact_state(reft, Path(folder) / EXACT_STATE)
            else:
                load_intervenable_model(reft, Path(folder) / SAVE_FOLDER)


class ReftTrainerForCausalLM(ReftTrainer):
    """pyreft's causal-LM trainer (the same loss as :class:`ReftTrainer`)."""


class ReftTrainerForCausalLMDistributed(ReftTrainerForCausalLM):
    """pyreft's distributed variant: ``Trainer`` already shards the data and saves on the main process only."""


def classification_loss(model: nn.Module, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """pyreft's loss for ``model`` (the HF classifier): ``config.problem_type``, or when unset: one label ->
    regression (MSE), integer labels -> single-label (cross entropy), else multi-label (BCE with logits)."""
    num_labels = model.num_labels
    problem = model.config.problem_type
    if problem is None:
        if num_labels == 1:
            problem = "regression"
        elif labels.dtype in (torch.long, torch.int):
            problem = "single_label_classification"
        else:
            problem = "multi_label_classification"
    if problem == "regression":
        target = labels.to(logits.dtype)
        return MSELoss()(logits.squeeze(), target.squeeze()) if num_labels == 1 else MSELoss()(logits, target)
    if problem == "single_label_classification":
        return CrossEntropyLoss()(logits.view(-1, num_labels), labels.view(-1))
    if problem == "multi_label_classification":
        return BCEWithLogitsLoss()(logits, labels.to(logits.dtype))
    raise ValueError(f"config.problem_type={problem!r}; pyreft's losses are 'regression', "
                     "'single_label_classification' and 'multi_label_classification'")


class ReftTrainerForSequenceClassification(ReftTrainer):
    """pyreft's classification trainer: the loss of :func:`classification_loss` on the intervened logits of
    ``reft_model.model`` (an ``AutoModelForSequenceClassification``; its head trains when its parameters
    have ``requires_grad``, as pyreft's ``allow_cls_grad``), and pyreft's ``evaluate`` loop."""

    def _intervened(self, intervenable: nn.Module, inputs: dict[str, Any], labels: Any = None) -> Any:
        """pyreft's call: ``intervenable(base, unit_locations={"sources->base": (None, [K][B][P])}, ...)``."""
        locations = once_each(_locations(inputs))
        reft = self._reft_module(intervenable)
        subspaces = _subspaces(inputs.get("subspaces"), len(reft.interventions))
        if subspaces is not None and subspaces.dim() == 2:
            subspaces = subspaces[:, None].expand(-1, len(reft.interventions), -1)
        _, output = intervenable({"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"]},
                                 unit_locations={"sources->base": (None, locations.permute(1, 0, 2).tolist())},
                                 labels=labels,
                                 subspaces=None if subspaces is None else subspaces.permute(1, 0, 2).tolist())
        return output

    def compute_loss(self, intervenable: nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        output = self._intervened(intervenable, inputs, inputs["labels"])
        loss = classification_loss(self._reft_module(intervenable).model, output.logits, inputs["labels"])
        return (loss, output) if return_outputs else loss

    def evaluate(self, eval_dataset: Any = None, ignore_keys: list[str] | None = None,
                 metric_key_prefix: str = "eval") -> dict[str, float]:
        """pyreft's evaluation: the intervened logits of every ``eval_dataset`` batch (in order) and its labels,
        as float32, to ``compute_metrics``; metrics prefixed ``eval_``, logged and passed to the callbacks."""
        if self.compute_metrics is None:
            raise ValueError("ReftTrainerForSequenceClassification.evaluate needs compute_metrics (pyreft's loop "
                             "reports only what it computes)")
        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        if dataset is None:
            raise ValueError("evaluate() needs an eval_dataset (given to the trainer or to evaluate)")
        reft = self._reft_module()
        was_training = reft.training
        reft.eval()
        loader = DataLoader(dataset, batch_size=self.args.eval_batch_size, shuffle=False,
                            collate_fn=self.data_collator)
        predictions, labels = [], []
        try:
            with torch.no_grad():
                for inputs in loader:
                    inputs = {k: v.to(reft.device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
                    predictions.append(self._intervened(reft, inputs).logits)
                    labels.append(inputs["labels"])
        finally:
            reft.train(was_training)
        metrics = self.compute_metrics(EvalPrediction(predictions=torch.cat(predictions).cpu().float(),
                                                      label_ids=torch.cat(labels).cpu().float()))
        metrics = denumpify_detensorize(metrics)
        for key in list(metrics):
            if not key.startswith(f"{metric_key_prefix}_"):
                metrics[f"{metric_key_prefix}_{key}"] = metrics.pop(key)
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics
