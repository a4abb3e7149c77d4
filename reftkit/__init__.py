"""reftkit: representation fine-tuning (ReFT) and interpretability for Hugging Face models.

The core sits at the top of the package (config, structure and sites, attachment, positions, hooks, call inputs,
``ReftModel``, save/load, pyreft import); each other concept has its room: :mod:`reftkit.data`,
:mod:`reftkit.training`, :mod:`reftkit.models`, :mod:`reftkit.cli`, and the catalogue, analysis and
experts in :mod:`reftkit.interventions`, :mod:`reftkit.analysis`, :mod:`reftkit.experts`.

Importing reftkit has no side effects: no network, no writes, no nnsight import. Names from the
other rooms load on first use.
"""
from __future__ import annotations

from .config import ConfigError, ReftConfig, RepresentationConfig
from .lazy_exports import lazy_exports
from .model import ReftModel, get_reft_model
from .positions import PositionError, parse_positions
from .serialization import LoadError
from .structure import COMPONENTS, Site, StructureError, resolve_site

__version__ = "0.1.0"

# submodule (relative to reftkit) -> the names it lends the top level
_EXPORTS: dict[str, tuple[str, ...]] = {
    "models.embedded": ("load_model", "smollm2_path", "minilm_path"),
    "data.supervised": ("DataError", "ReftDataCollator", "make_last_position_supervised_data_module",
                        "make_multiple_position_supervised_data_module", "make_classification_data_module"),
    "data.multiple_choice": ("make_multiple_choice_data_module",),
    "training.trainer": ("ReftTrainer",),
    "training.classifier": ("ReftForSequenceClassification",),
}
__getattr__, __dir__, _ = lazy_exports(__name__, _EXPORTS, globals())

__all__ = [
    # the core, imported with the package
    "ReftConfig", "RepresentationConfig", "ReftModel", "get_reft_model", "ConfigError", "LoadError",
    "PositionError", "StructureError", "COMPONENTS", "Site", "resolve_site", "parse_positions",
    # lent by the other rooms, loaded on first use
    "load_model", "smollm2_path", "minilm_path", "DataError", "ReftDataCollator",
    "make_last_position_supervised_data_module", "make_multiple_position_supervised_data_module",
    "make_classification_data_module", "make_multiple_choice_data_module", "ReftTrainer",
    "ReftForSequenceClassification",
]
