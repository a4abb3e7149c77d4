"""reftkit: representation fine-tuning (ReFT) and interpretability for Hugging Face models.

Importing reftkit has no side effects: no network, no writes, no nnsight import.
"""
from __future__ import annotations

from .config import ConfigError, ReftConfig, RepresentationConfig
from .data import (DataError, ReftDataCollator, make_classification_data_module,
                   make_last_position_supervised_data_module, make_multiple_position_supervised_data_module)
from .model import ReftModel, get_reft_model
from .positions import PositionError, parse_positions
from .serialization import LoadError
from .structure import COMPONENTS, Site, StructureError, resolve_site

__version__ = "0.1.0"


def __getattr__(name: str):
    # heavy or optional pieces load on first use
    if name in ("load_model", "smollm2_path", "minilm_path"):
        from . import embedded
        return getattr(embedded, name)
    if name in ("ReftTrainer", "ReftForSequenceClassification"):  # imports transformers.Trainer / accelerate
        from . import training
        return getattr(training, name)
    if name == "make_multiple_choice_data_module":
        from .choice_data import make_multiple_choice_data_module
        return make_multiple_choice_data_module
    raise AttributeError(f"module 'reftkit' has no attribute {name!r}")


__all__ = [
    "ReftConfig", "RepresentationConfig", "ReftModel", "get_reft_model", "ConfigError", "LoadError",
    "PositionError", "StructureError", "COMPONENTS", "Site", "resolve_site", "parse_positions",
    "load_model", "smollm2_path", "minilm_path", "DataError", "ReftDataCollator",
    "make_last_position_supervised_data_module", "make_multiple_position_supervised_data_module",
    "make_classification_data_module", "make_multiple_choice_data_module", "ReftTrainer",
    "ReftForSequenceClassification",
]
