"""Train one expert: a ReftModel on prompt → answer pairs with :class:`reftkit.ReftTrainer`."""
from __future__ import annotations

import tempfile
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from reftkit.config import ReftConfig
from reftkit.model import ReftModel


def train_expert(model: nn.Module, tokenizer: Any, inputs: Sequence[str], outputs: Sequence[str],
                 config: ReftConfig | Mapping[str, Any] | list, *, epochs: float = 1.0, learning_rate: float = 4e-3,
                 batch_size: int = 8, seed: int = 0, progress: bool = True,
                 training: Mapping[str, Any] | None = None) -> ReftModel:
    """Attach ``config`` to ``model``, train it on ``inputs`` → ``outputs`` (loss on the outputs only,
    interventions at each entry's own positions over the prompt) and return the trained ReftModel.
    ``training``: further ``TrainingArguments`` fields."""
    from transformers import TrainingArguments, set_seed

    import reftkit
    from reftkit.training import ReftTrainer

    set_seed(seed)
    reft = reftkit.get_reft_model(model, config)
    module = reftkit.make_multiple_position_supervised_data_module(tokenizer, reft, inputs, outputs, positions=None)
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(**{
            "output_dir": out, "report_to": [], "save_strategy": "no", "logging_steps": 10,
            "logging_strategy": "steps" if progress else "no",
            "num_train_epochs": epochs, "learning_rate": learning_rate, "per_device_train_batch_size": batch_size,
            "lr_scheduler_type": "linear", "warmup_steps": 0, "seed": seed, "disable_tqdm": not progress,
            "use_cpu": not torch.cuda.is_available(), **(training or {})})
        ReftTrainer(model=reft, args=args, train_dataset=module["train_dataset"],
                    data_collator=module["data_collator"]).train()
    reft.eval()
    return reft
