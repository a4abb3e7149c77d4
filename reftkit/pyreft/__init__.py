"""pyreft 0.1.0's API on reftkit: ``import reftkit.pyreft as pyreft`` is the one change pyreft code needs.

A thin layer: every name here maps pyreft's surface (constructor keywords, pyvene's call forms, the
save folder, the data modules and trainers) onto reftkit's core, which does the work. What differs
on purpose, and the native equivalent of each call, is in docs/migrating_from_pyreft.md.

Names load on first use, so ``import reftkit.pyreft`` stays cheap.
"""
from __future__ import annotations

from reftkit.lazy_exports import lazy_exports

_EXPORTS: dict[str, tuple[str, ...]] = {
    "interventions": ("LoreftIntervention", "NoreftIntervention", "DireftIntervention", "NodireftIntervention",
                      "ConsreftIntervention", "LobireftIntervention"),
    "config": ("ReftConfig", "TaskType"),
    "model": ("ReftModel", "get_reft_model", "IntervenableModelOutput"),
    "dataset": ("ReftDataCollator", "ReftDataset", "ReftRawDataset", "ReftSupervisedDataset", "ReftGenerationDataset",
                "ReftClassificationDataset", "ReftPreferenceDataset", "ReftRewardDataset", "ReftRewardCollator",
                "make_last_position_supervised_data_module", "make_multiple_position_supervised_data_module",
                "make_last_position_supervised_chat_data_module", "get_intervention_locations", "parse_positions",
                "IGNORE_INDEX"),
    "trainer": ("ReftTrainer", "ReftTrainerForCausalLM", "ReftTrainerForCausalLMDistributed",
                "ReftTrainerForSequenceClassification"),
}
__getattr__, __dir__, __all__ = lazy_exports(__name__, _EXPORTS, globals())
