"""``pyreft.dataset``'s names in one module, as pyreft has them (``from reftkit.pyreft.dataset import ...``).

The code lives in :mod:`reftkit.pyreft.dataset_base` (positions, collator, loading, the ``ReftDataset``
base class) and :mod:`reftkit.pyreft.dataset_modules` (the ready-made datasets and data modules).
"""
from __future__ import annotations

from .dataset_base import (
    IGNORE_INDEX,
    ReftDataCollator,
    ReftDataset,
    Rows,
    get_intervention_locations,
    no_header_prompt_template,
    parse_positions,
    prompt_input,
    prompt_no_input,
)
from .dataset_modules import (
    ReftClassificationDataset,
    ReftGenerationDataset,
    ReftPreferenceDataset,
    ReftRawDataset,
    ReftRewardCollator,
    ReftRewardDataset,
    ReftSupervisedDataset,
    make_last_position_supervised_chat_data_module,
    make_last_position_supervised_data_module,
    make_multiple_position_supervised_data_module,
)

__all__ = ["IGNORE_INDEX", "ReftDataCollator", "ReftDataset", "Rows", "get_intervention_locations",
           "no_header_prompt_template", "parse_positions", "prompt_input", "prompt_no_input",
           "ReftClassificationDataset", "ReftGenerationDataset", "ReftPreferenceDataset", "ReftRawDataset",
           "ReftRewardCollator", "ReftRewardDataset", "ReftSupervisedDataset",
           "make_last_position_supervised_chat_data_module", "make_last_position_supervised_data_module",
           "make_multiple_position_supervised_data_module"]
