"""Comparisons of interventions with weight-space methods, representation metrics and plots
(installed as ``reftkit.analysis``).

Names load on first use, so ``import reftkit.analysis`` imports neither peft nor nnsight nor matplotlib.
"""
from __future__ import annotations

from reftkit.lazy_exports import lazy_exports

_EXPORTS = {
    "baselines": ("WeightSpaceModel", "get_weight_space_model", "WEIGHT_SPACE_METHODS", "PEFT_METHODS",
                  "PROMPT_METHODS"),
    "svf": ("SVFLinear", "apply_svf", "remove_svf", "save_svf", "load_svf", "svf_parameter_count"),
    "methods": ("Method", "as_method", "method_kind", "reft_method_names"),
    "comparison": ("compare", "plot_comparison"),
    "layer_sweep": ("sweep", "plot_sweep"),
    "layer_shrink": ("shrink_layers", "plot_shrink"),
    "representations": ("hidden_states", "representation_changes", "fit_pca", "PCA", "pca_before_after",
                        "plot_representation_changes", "plot_pca"),
    "subspaces": ("principal_angles", "subspace_similarity", "reft_subspaces", "lora_subspaces", "logit_lens",
                  "final_norm", "plot_subspace_similarity", "plot_logit_lens"),
    "nnsight_tools": ("capture", "patch", "patching_grid"),
    "nnsight_interventions": ("trace_with_interventions", "apply_interventions", "intervention_editor"),
    "patching": ("mean_activation", "steering_vector", "activation_patching", "plot_patching"),
    "text_metrics": ("bleu4", "rouge", "exact_match", "text_scores", "generate_predictions",
                     "evaluate_generation", "generation_scores"),
    "ptuning": ("PTuningModel", "get_ptuning_model"),
    "ptuning_template": ("parse_template", "TemplateLayout", "PromptEncoder"),
    "prompt_ensemble": ("PromptEnsembleModel", "get_prompt_ensemble", "ensemble_rank_classify", "majority_vote",
                        "EnsemblePrediction"),
}
__getattr__, __dir__, __all__ = lazy_exports(__name__, _EXPORTS, globals())
