"""Training interventions: :class:`ReftTrainer` (a ``transformers.Trainer``), its objectives, the
frozen-prefix cache, distributed support and the classification head.

* :mod:`~reftkit.training.trainer` — :class:`ReftTrainer`;
* :mod:`~reftkit.training.causal_lm` — the label-only causal-LM loss;
* :mod:`~reftkit.training.objectives` — T-Few's unlikelihood and length-normalised losses;
* :mod:`~reftkit.training.logprobs` — a continuation's per-token log-probabilities given its prompt;
* :mod:`~reftkit.training.frozen_prefix` — :class:`FrozenPrefixCache`;
* :mod:`~reftkit.training.suffix` — :class:`SuffixTraining`: autograd only over what the interventions change;
* :mod:`~reftkit.training.distributed` — which DDP / FSDP setups can train a ReftModel;
* :mod:`~reftkit.training.classifier` — :class:`ReftForSequenceClassification`.

Names load on first use, so ``import reftkit.training`` does not import ``transformers.Trainer``.
"""
from __future__ import annotations

from reftkit.lazy_exports import lazy_exports

_EXPORTS: dict[str, tuple[str, ...]] = {
    "trainer": ("ReftTrainer",),
    "causal_lm": ("causal_lm_loss",),
    "objectives": ("unlikelihood_loss", "length_normalized_loss", "tfew_loss", "check_loss_terms",
                   "choice_token_logprobs", "multiple_choice_loss", "TFEW_TERMS", "TFEW_WEIGHTS"),
    "logprobs": ("continuation_logprobs", "label_positions", "predicting_states", "ContinuationLogprobs"),
    "frozen_prefix": ("FrozenPrefixCache", "PrefixCacheError"),
    "suffix": ("SuffixTraining", "SuffixTrainingError"),
    "distributed": ("check_fsdp_plugin", "full_parameters", "loading_into_shards"),
    "classifier": ("ReftForSequenceClassification", "load_interventions", "HEAD_CONFIG", "HEAD_WEIGHTS",
                   "POOLINGS"),
}
__getattr__, __dir__, __all__ = lazy_exports(__name__, _EXPORTS, globals())
