"""Train ReFT interventions with the Hugging Face ``Trainer`` (transformers 5.x).

* :class:`ReftTrainer` trains a :class:`~reftkit.ReftModel` on causal-LM batches (``input_ids``,
  ``attention_mask``, unshifted ``labels`` with -100 where unsupervised, ``intervention_locations``)
  or a :class:`ReftForSequenceClassification` on classification batches (``labels`` ``[B]``).
* The LM loss runs the backbone with the interventions active and applies the LM head only to the
  rows that carry a label (:func:`causal_lm_loss`): no ``[B, T, vocab]`` logits are ever built.
* Multiple-choice batches (:mod:`reftkit.data.multiple_choice`, they carry ``correct``) train on T-Few's
  ``L_LM + L_UL + L_LN`` (:func:`reftkit.training.objectives.multiple_choice_loss`), weighted by ``loss_terms``.
* Checkpoints hold only what is trained (``reft.save_pretrained``: ``config.json`` +
  ``interventions.safetensors``, plus ``head.safetensors`` / ``head_config.json`` for a classifier)
  next to the optimizer, scheduler, RNG and trainer state that ``Trainer`` writes; resuming loads them.
* Distributed: DDP, or FSDP2 (``fsdp=True, fsdp_config={"version": 2}`` or ``accelerate launch`` with
  ``fsdp_version: 2``), launched by ``torchrun`` / ``accelerate launch``; see :mod:`reftkit.training.distributed`.
"""
from __future__ import annotations

import contextlib
import copy
import os
import warnings
from typing import Any, Iterator

import torch
from accelerate.utils import save_fsdp_optimizer
from torch import nn
from transformers import Trainer, TrainingArguments
from transformers.trainer import SCHEDULER_NAME, TRAINING_ARGS_NAME
from transformers.trainer_pt_utils import reissue_pt_warnings
from transformers.utils import logging

from reftkit.anatomy import is_encoder_decoder
from reftkit.model import ReftModel

from .causal_lm import causal_lm_loss
from .classifier import ReftForSequenceClassification, load_interventions
from .distributed import check_fsdp_plugin, full_parameters, loading_into_shards
from .frozen_prefix import FrozenPrefixCache
from .objectives import TFEW_WEIGHTS, check_loss_terms, multiple_choice_loss
from .quantized_linear import has_weight_only_quantized, keep_quantized_weights
from .suffix import SuffixTraining, SuffixTrainingError

logger = logging.get_logger(__name__)


@contextlib.contextmanager
def _forward_replaced(module: nn.Module, forward: Any) -> Iterator[None]:
    """Let ``module(...)`` run ``forward`` for the duration of the block.

    A DDP wrapper reduces gradients only for graphs built through its own ``forward`` (which arms
    the reducer), and FSDP2 gathers the root's parameters (the interventions among them) in the
    forward pre-hook of ``module(...)``: routing the label-only loss through ``model(**inputs)`` keeps
    both correct.
    """
    had = "forward" in vars(module)
    saved = vars(module).get("forward")  # e.g. accelerate's autocast wrapper
    module.forward = forward
    try:
        yield
    finally:
        if had:
            module.forward = saved
        else:
            del module.forward


# -- the trainer ------------------------------------------------------------------------------
class ReftTrainer(Trainer):
    """``transformers.Trainer`` for a :class:`ReftModel` (causal LM, label-only logits) or a
    :class:`ReftForSequenceClassification`.

    Differences from ``Trainer``, each forced on purpose:

    * ``remove_unused_columns=False``: ``intervention_locations`` is not a named argument of the
      forward, so ``Trainer`` would silently drop it (the args object is copied, not mutated).
    * ``ddp_find_unused_parameters=False`` unless set: every intervention (and the head) is in the
      graph of every step, and the default for non-``PreTrainedModel`` models (True) costs a traversal.
    * The optimizer gets exactly the trainable parameters: ``Trainer`` keeps ``requires_grad`` ones,
      and the base model is frozen by ``get_reft_model``.
    * Checkpoints hold only the interventions (and head); the base model is never written. Under FSDP2
      every rank gathers just those tensors for the writer (rank 0), never the sharded base.
    * Refused: DeepSpeed, ``nn.DataParallel``, FSDP1 and FSDP's own activation checkpointing
      (:func:`reftkit.training.distributed.check_fsdp_plugin` says why).

    ``loss_terms``: the weights of T-Few's terms for multiple-choice batches, e.g. ``{"lm": 1, "ul": 1,
    "ln": 1}`` (the default) or ``("lm", "ln")`` (see :func:`reftkit.training.objectives.check_loss_terms`);
    causal-LM batches keep the LM loss whatever it says. Evaluation of multiple-choice batches returns
    the choices' length-normalised scores ``[B, C]`` as predictions and ``correct`` as labels.

    ``cache_frozen_prefix``: opt in to a :class:`~reftkit.training.frozen_prefix.FrozenPrefixCache` for the training
    LM batches (``True``: no byte limit; an int: ``max_bytes``), so that epochs after the first run only
    the layers from the earliest intervention on. Evaluation and multiple-choice batches never use it.
    Needs right-padded batches; refused for classifiers, weight-space baselines and FSDP.

    ``suffix_training``: run autograd only from each example's first intervened or supervised token, on a KV
    cache of the prefix before it, stored per example for later epochs
    (:class:`~reftkit.training.suffix.SuffixTraining`; same loss and gradients, checked on the first batch).
    ``"auto"`` (default): on whenever the model allows it, else off with the reason logged; ``True``: required
    (an error says why it cannot run); ``False``: off; or a ``SuffixTraining`` built with your own byte
    budget / storage device. Batches it cannot take (left padding, f-positions, ...) run the full path with
    a warning naming the reason, then ``cache_frozen_prefix`` applies to them.
    """

    def __init__(self, model: ReftModel | ReftForSequenceClassification,
                 args: TrainingArguments | None = None, *,
                 loss_terms: dict[str, float] | tuple[str, ...] | list[str] | None = None,
                 cache_frozen_prefix: bool | int = False,
                 suffix_training: bool | str | SuffixTraining = "auto", **kwargs: Any) -> None:
        if loss_terms is not None and isinstance(model, ReftForSequenceClassification):
            raise ValueError(f"loss_terms={loss_terms!r} weigh T-Few's losses over answer choices of a causal LM; a "
                             "ReftForSequenceClassification trains on its head's cross entropy")
        #: the T-Few term weights used on multiple-choice batches
        self.loss_terms = check_loss_terms(loss_terms) if loss_terms is not None else dict(TFEW_WEIGHTS)
        # A weight-space baseline (reftkit.analysis.WeightSpaceModel) trains here too, with the same
        # loss and loop; it is recognised by its load_trained method (core does not import analysis).
        self.is_weight_space = hasattr(model, "load_trained") and hasattr(model, "label_only_loss")
        if not isinstance(model, (ReftModel, ReftForSequenceClassification)) and not self.is_weight_space:
            raise TypeError(f"ReftTrainer trains a ReftModel, ReftForSequenceClassification or weight-space "
                            f"baseline, got {type(model).__name__}; build one with reftkit.get_reft_model")
        if kwargs.get("model_init") is not None:
            raise ValueError("ReftTrainer does not support model_init; pass the ReftModel")
        args = copy.copy(args) if args is not None else TrainingArguments(output_dir="tmp_trainer")
        if args.remove_unused_columns:
            logger.info("ReftTrainer: remove_unused_columns set to False (intervention_locations must reach the model)")
            args.remove_unused_columns = False
        if args.ddp_find_unused_parameters is None:
            args.ddp_find_unused_parameters = False
        super().__init__(model=model, args=args, **kwargs)
        if self.is_deepspeed_enabled:
            raise ValueError("ReftTrainer does not support DeepSpeed (TrainingArguments.deepspeed / accelerate's "
                             "DeepSpeed plugin); use DDP or FSDP2 (fsdp=True, fsdp_config={'version': 2})")
        if self.args.n_gpu > 1:
            raise ValueError(f"ReftTrainer does not support nn.DataParallel (n_gpu={self.args.n_gpu} visible to one "
                             "process); launch one process per device with torchrun or accelerate launch")
        self.is_classifier = isinstance(model, ReftForSequenceClassification)
        base = model.reft.model if self.is_classifier else model.model
        if self.is_weight_space and (self.is_fsdp_enabled or self.args.fsdp):
            raise ValueError(f"ReftTrainer does not shard weight-space baselines ({model.method}); train them "
                             "in one process or with DDP")
        if self.is_fsdp_enabled:
            check_fsdp_plugin(self.accelerator.state.fsdp_plugin, base)
        elif self.args.fsdp:
            # accelerate enables FSDP only on accelerator devices (not MULTI_CPU): say so rather than
            # letting a requested FSDP run silently as DDP.
            mode = getattr(self.accelerator.distributed_type, "value", self.accelerator.distributed_type)
            logger.warning(f"ReftTrainer: fsdp is set, but accelerate enables FSDP only on accelerator devices (CUDA, "
                           f"XPU, ...) and runs {mode} on {self.args.device.type} here: the base model is replicated "
                           "on every process")
        # Our compute_loss honours num_items_in_batch, so let Trainer count it ...
        self.model_accepts_loss_kwargs = True
        # ... over the shifted labels for the LM (Trainer infers this from `loss_type`, which a
        # ReftModel lacks) and over all labels for a classifier.
        # (an encoder-decoder model's labels are not shifted: the decoder reads them shifted right instead)
        self._loss_shifts_labels = not self.is_classifier and not is_encoder_decoder(base)
        # `find_labels` inspects forward's signature, which has no `labels`: without this the
        # evaluation loop would believe the batches carry no labels and report no loss.
        if self.args.label_names is None:
            self.label_names = ["labels"]
        self.prefix_cache = self._build_prefix_cache(model, cache_frozen_prefix)
        self.suffix_training = self._build_suffix_training(model, suffix_training)
        self._quantized_base = not self.is_classifier and has_weight_only_quantized(model)

    def _build_prefix_cache(self, model: nn.Module, setting: bool | int) -> FrozenPrefixCache | None:
        if setting is False or setting is None:
            return None
        if self.is_classifier or self.is_weight_space:
            raise ValueError(f"cache_frozen_prefix={setting!r}: the prefix cache serves the causal-LM loss of a "
                             f"ReftModel, not a {type(model).__name__}")
        if is_encoder_decoder(model.model):
            raise ValueError(f"cache_frozen_prefix={setting!r}: {type(model.model).__name__} is an encoder-decoder "
                             "model; the prefix cache serves causal decoders only")
        if self.is_fsdp_enabled or self.args.fsdp:
            raise ValueError(f"cache_frozen_prefix={setting!r} with fsdp={self.args.fsdp!r}: sharded layers are "
                             "gathered by the full forward, which the cached path skips; train without one of them")
        if not isinstance(setting, (bool, int)) or (setting is not True and setting < 0):
            raise ValueError(f"cache_frozen_prefix={setting!r}: give True (no byte limit) or a byte count >= 0")
        return FrozenPrefixCache(model, max_bytes=None if setting is True else int(setting))

    def _build_suffix_training(self, model: nn.Module, setting: bool | str | SuffixTraining
                               ) -> SuffixTraining | None:
        if isinstance(setting, SuffixTraining):
            if setting.reft is not model:
                raise ValueError("suffix_training was built for another ReftModel; build it on the trained model")
            required = True
        elif setting is False or setting is None:
            return None
        elif setting is True or setting == "auto":
            required = setting is True
        else:
            raise ValueError(f"suffix_training={setting!r}: give 'auto', True, False or a SuffixTraining")
        why = None
        if self.is_classifier or self.is_weight_space:
            why = f"it serves the causal-LM loss of a ReftModel, not a {type(model).__name__}"
        elif self.is_fsdp_enabled or self.args.fsdp:
            why = f"fsdp={self.args.fsdp!r}: sharded layers are gathered by the full forward only"
        elif getattr(self.args, "activation_checkpointing", False):  # transformers 5 name of gradient_checkpointing
            why = "activation checkpointing re-runs layers in backward, which would extend the KV cache twice"
        if why is None and isinstance(setting, SuffixTraining):
            return setting
        if why is None:
            try:
                return SuffixTraining(model, strict=required)
            except SuffixTrainingError as err:
                why = str(err)
        if required:
            raise ValueError(f"suffix_training={setting!r} cannot run: {why}")
        logger.info(f"ReftTrainer: suffix training is off because {why}")
        return None

    def get_decay_parameter_names(self, model: nn.Module) -> list[str]:
        """``Trainer``'s list, less the free matrices of orthonormal bases (``...rotation.raw``): ``R = QR(raw)``
        ignores the length of ``raw``'s columns, so decay there regularises nothing and only shortens them, which
        raises the step ``R`` takes (see :class:`reftkit.interventions.Orthonormal`)."""
        return [name for name in super().get_decay_parameter_names(model) if not name.endswith("rotation.raw")]

    def _reft_module(self, model: nn.Module | None = None) -> ReftModel | ReftForSequenceClassification:
        return self.accelerator.unwrap_model(model if model is not None else self.model, keep_torch_compile=False)

    def compute_loss(self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: torch.Tensor | int | None = None) -> Any:
        """LM: :func:`causal_lm_loss`; multiple choice (the batch carries ``correct``): T-Few's
        :func:`~reftkit.training.objectives.multiple_choice_loss` with ``loss_terms``; classifier: the head's cross
        entropy. All are called through ``model`` (possibly the DDP wrapper, or the FSDP2 root) so DDP / FSDP
        see the forward."""
        multiple_choice = "correct" in inputs
        if multiple_choice and self.is_classifier:
            raise ValueError("a multiple-choice batch (it carries 'correct') was given to a "
                             "ReftForSequenceClassification; T-Few's losses score answer choices with a causal LM "
                             "(train a ReftModel)")
        if multiple_choice and "labels" in inputs:
            raise ValueError("a multiple-choice batch carries 'choice_labels' and 'correct', not 'labels' (its "
                             "loss is a mean per batch, and Trainer would rescale it by a count of 'labels')")
        inputs = {**inputs, "num_items_in_batch": num_items_in_batch}
        if self.is_classifier:
            outputs = model(**inputs)
        else:
            reft = self._reft_module(model)

            def forward(**kw: Any) -> dict[str, torch.Tensor]:
                # keeps mixed precision: our forward replaces accelerate's autocast wrapper
                with self.accelerator.autocast():
                    if multiple_choice:
                        return multiple_choice_loss(reft, **kw, weights=self.loss_terms)
                    return causal_lm_loss(reft, **kw, prefix_cache=cache, suffix_training=suffix)

            # training LM batches only: evaluation must not fill (or depend on) the caches
            training = model.training and torch.is_grad_enabled()
            cache = self.prefix_cache if training else None
            suffix = self.suffix_training if training else None

            # a torchao weight-only base: backward keeps its weights quantized, not a float copy per layer
            quantized = keep_quantized_weights() if training and self._quantized_base else contextlib.nullcontext()
            with _forward_replaced(reft, forward), quantized:
                outputs = model(**inputs)
        loss = outputs["loss"]
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            # As Trainer.compute_loss: num_items_in_batch is the global count, and DDP / FSDP average
            # the gradients over processes, so scale back up to get sum / global count exactly.
            loss = loss * self.accelerator.num_processes
        return (loss, outputs) if return_outputs else loss

    def prediction_step(self, model: nn.Module, inputs: dict[str, Any], prediction_loss_only: bool,
                        ignore_keys: list[str] | None = None) -> tuple[Any, Any, Any]:
        """Multiple-choice batches: ``(loss, scores [B, C], correct [B])`` (their labels are not under
        ``labels``, so ``Trainer`` would skip the loss); other batches as ``Trainer``."""
        if "correct" not in inputs:
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss, outputs = self.compute_loss(model, inputs, return_outputs=True)
        if prediction_loss_only:
            return loss.detach(), None, None
        return loss.detach(), outputs["scores"].detach(), inputs["correct"]

    # -- checkpoints --------------------------------------------------------------------------
    def _trained_modules(self, module: ReftModel | ReftForSequenceClassification) -> list[nn.Module]:
        return [module.reft.interventions, module.head] if self.is_classifier else [module.interventions]

    def _full_trained_tensors(self, module: ReftModel | ReftForSequenceClassification,
                              loading: bool = False) -> contextlib.AbstractContextManager:
        """Under FSDP the trained tensors are shards outside the forward: for saving, gather them (and only
        them, not the frozen base) for the block; for ``loading``, let full tensors load into the shards.
        Elsewhere a no-op. Every rank must enter it."""
        if not self.is_fsdp_enabled:
            return contextlib.nullcontext()
        if loading:
            return loading_into_shards(self._trained_modules(module), root=module)
        return full_parameters(self._trained_modules(module), root=module)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """As ``Trainer.save_model``; under FSDP, all ranks gather the interventions (Trainer would gather
        the whole model, base included, or with a sharded state dict save nothing) and the writer saves."""
        if not self.is_fsdp_enabled:
            return super().save_model(output_dir, _internal_call)
        with self._full_trained_tensors(self._reft_module()):
            self._save(output_dir)
        if self.args.push_to_hub and not _internal_call:
            self.push_to_hub(commit_message="Model save", revision=self.args.hub_revision)

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        """Under FSDP, Trainer would also write the whole model here (``save_fsdp_model``, the frozen base
        included); resuming needs only the optimizer, the scheduler and the interventions."""
        if not self.is_fsdp_enabled:
            return super()._save_optimizer_and_scheduler(output_dir)
        save_fsdp_optimizer(self.accelerator.state.fsdp_plugin, self.accelerator, self.optimizer, self.model,
                            output_dir)
        if self.args.should_save:
            with warnings.catch_warnings(record=True) as caught:
                torch.save(self.lr_scheduler.state_dict(), os.path.join(output_dir, SCHEDULER_NAME))
            reissue_pt_warnings(caught)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """Write only the trained tensors (``save_pretrained``), the tokenizer and the args."""
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        self._reft_module().save_pretrained(output_dir)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))  # Trainer's convention

    def _load_weights(self, folder: str, model: nn.Module | None = None) -> None:
        module = self._reft_module(model)
        with self._full_trained_tensors(module, loading=True):
            if isinstance(module, ReftForSequenceClassification):
                module.load_weights(folder)
            elif self.is_weight_space:
                module.load_trained(folder)
            else:
                load_interventions(module, folder)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        """Resume: load the interventions (and head); Trainer then loads optimizer/scheduler/RNG."""
        logger.info(f"Loading interventions from {resume_from_checkpoint}")
        self._load_weights(resume_from_checkpoint, model)

    def _load_best_model(self) -> None:
        """``load_best_model_at_end``: reload the interventions (and head) of the best checkpoint."""
        logger.info(f"Loading best interventions from {self.state.best_model_checkpoint} "
                    f"(score: {self.state.best_metric}).")
        self._load_weights(self.state.best_model_checkpoint)
