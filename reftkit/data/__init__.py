"""Data modules: examples with their intervention positions, ready for :class:`reftkit.ReftTrainer`.

* :mod:`~reftkit.data.supervised` — last-position, multiple-position, chat-template and classification
  data modules, the padding collator and length-grouped batch order;
* :mod:`~reftkit.data.multiple_choice` — multiple-choice examples for T-Few's losses;
* :mod:`~reftkit.data.datasets` — data sets that ship in installed packages (WordNet glosses, labelled
  reviews and news, the three short-answer task families); nothing is downloaded.

Names load on first use, so ``import reftkit.data`` stays cheap.
"""
from __future__ import annotations

from reftkit.lazy_exports import lazy_exports

_EXPORTS: dict[str, tuple[str, ...]] = {
    "supervised": ("DataError", "ReftDataset", "ReftDataCollator", "IGNORE_INDEX", "tokenize_pairs",
                   "make_last_position_supervised_data_module", "make_multiple_position_supervised_data_module",
                   "make_classification_data_module", "length_grouped_order"),
    "multiple_choice": ("MultipleChoiceDataset", "MultipleChoiceDataCollator", "tokenize_choices",
                        "make_multiple_choice_data_module"),
    "datasets": ("wordnet_glosses", "define_word_dataset", "labelled_texts", "task_families"),
}
__getattr__, __dir__, __all__ = lazy_exports(__name__, _EXPORTS, globals())
