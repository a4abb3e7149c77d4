"""Deterministic ReftTrainer run on a tiny Llama, shared by tests/test_training.py.

Run under ``torchrun --nproc_per_node=2 --standalone tests/ddp_worker.py --batch B --steps S --out F``
(gloo on CPU): trains with per-device batch B and rank 0 writes the final intervention weights to F
(safetensors). The test runs ``train`` in-process with batch 2B and compares. Not collected by pytest.
"""
from __future__ import annotations

import argparse
import os
import random
import sys

import torch
from safetensors.torch import save_file
from torch.utils.data import Dataset
from transformers import TrainingArguments

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import reftkit  # noqa: E402
from conftest import tiny_llama  # noqa: E402
from reftkit.training import ReftTrainer  # noqa: E402

REFT_CONFIG = {"layer": [0, 1], "component": "block_output", "positions": "l1", "intervention": "loreft",
               "low_rank_dimension": 4}


# Adam is nearly invariant to a constant gradient scale and clipping hides it too: comparisons of
# gradient reductions (DDP, accumulation) use plain SGD so a wrongly scaled loss changes the result.
SGD = {"optim": "sgd", "learning_rate": 0.5, "max_grad_norm": 0.0}


class LMData(Dataset):
    """Prompt + completion token lists; labels on the completion, or on every token for each third
    example (so position 0 carries a label that no position can predict); one location (last prompt token)."""

    def __init__(self, n: int, seed: int = 0) -> None:
        rng = random.Random(seed)
        self.items = []
        for i in range(n):
            prompt = [rng.randrange(3, 101) for _ in range(rng.randrange(3, 7))]
            answer = [rng.randrange(3, 101) for _ in range(rng.randrange(1, 5))]
            labels = prompt + answer if i % 3 == 2 else [-100] * len(prompt) + answer
            self.items.append({"input_ids": prompt + answer, "labels": labels, "location": len(prompt) - 1})

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]


class Collator:
    """Right-pads with 0 / -100; ``intervention_locations`` ``[B, K, 1]`` (the same token for every intervention)."""

    def __init__(self, num_interventions: int) -> None:
        self.k = num_interventions

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        width = max(len(f["input_ids"]) for f in features)
        pad = [width - len(f["input_ids"]) for f in features]
        batch = {
            "input_ids": torch.tensor([f["input_ids"] + [0] * p for f, p in zip(features, pad)]),
            "attention_mask": torch.tensor([[1] * len(f["input_ids"]) + [0] * p for f, p in zip(features, pad)]),
            "labels": torch.tensor([f["labels"] + [-100] * p for f, p in zip(features, pad)]),
        }
        batch["intervention_locations"] = torch.tensor([[[f["location"]]] * self.k for f in features])
        return batch


def make_reft(init_seed: int = 0) -> reftkit.ReftModel:
    """Tiny 2-layer Llama (always the same weights) with interventions initialised from ``init_seed``."""
    model = tiny_llama(seed=0, layers=2)
    torch.manual_seed(init_seed)
    return reftkit.get_reft_model(model, REFT_CONFIG)


def training_args(output_dir: str, batch: int, steps: int, **overrides) -> TrainingArguments:
    """Deterministic CPU arguments: sequential sampling, no workers, no reporting, no dropout anywhere."""
    kwargs = dict(output_dir=output_dir, use_cpu=True, report_to=[], dataloader_num_workers=0,
                  per_device_train_batch_size=batch, max_steps=steps, learning_rate=2e-2, warmup_steps=1,
                  lr_scheduler_type="linear", train_sampling_strategy="sequential", seed=0, logging_steps=1000,
                  save_strategy="no", disable_tqdm=True)
    if "LOCAL_RANK" in os.environ:  # launched by torchrun: CPU processes talk over gloo
        kwargs["ddp_backend"] = "gloo"
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)


def train(output_dir: str, batch: int, steps: int, n: int = 16, **overrides) -> dict[str, torch.Tensor]:
    reft = make_reft()
    trainer = ReftTrainer(reft, training_args(output_dir, batch, steps, **overrides), train_dataset=LMData(n),
                          data_collator=Collator(len(reft.interventions)))
    trainer.train()
    return {k: v.detach().clone() for k, v in reft.interventions.state_dict().items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, required=True)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--sgd", action="store_true", help="plain SGD, no clipping: gradient scale errors show")
    args = parser.parse_args()
    torch.set_num_threads(1)
    weights = train(os.path.dirname(args.out) or ".", args.batch, args.steps, **(SGD if args.sgd else {}))
    if int(os.environ.get("RANK", "0")) == 0:
        save_file({k: v.contiguous() for k, v in weights.items()}, args.out)


if __name__ == "__main__":
    main()
