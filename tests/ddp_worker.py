"""Deterministic ReftTrainer run on a tiny Llama, shared by tests/test_training.py.

Run under ``torchrun --nproc_per_node=2 --standalone tests/ddp_worker.py --batch B --steps S --out F``
(gloo on CPU): trains with per-device batch B and rank 0 writes the final intervention weights to F
(safetensors). The test runs ``train`` in-process with batch 2B and compares. Not collected by pytest.
With ``--fsdp`` the model is sharded with FSDP2 instead of replicated by DDP (see :func:`fsdp_on_cpu`).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import random
import sys
from typing import Iterator

import torch
from accelerate.state import PartialState
from accelerate.utils import DistributedType
from safetensors.torch import save_file
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor
from torch.utils.data import Dataset
from transformers import TrainingArguments

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from conftest import tiny_llama  # noqa: E402

import reftkit  # noqa: E402
from reftkit.training import ReftForSequenceClassification, ReftTrainer  # noqa: E402
from reftkit.training.distributed import full_parameters  # noqa: E402

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


# FSDP2 (`fully_shard`), layers sharded per LlamaDecoderLayer: ReftTrainer takes the class from the base
# model's `_no_split_modules` when no `transformer_layer_cls_to_wrap` is given.
FSDP = {"fsdp": True, "fsdp_config": {"version": 2}}


@contextlib.contextmanager
def fsdp_on_cpu() -> Iterator[None]:
    """Let accelerate select FSDP for CPU processes while a Trainer builds its Accelerator.

    accelerate 1.x turns the FSDP plugin on only for accelerator device types (MULTI_GPU, MULTI_XPU, ...):
    for MULTI_CPU it silently keeps DDP. torch's FSDP2 itself runs on CPU over gloo, so the test presents
    the process group as MULTI_GPU for the one decision; the device stays the CPU and everything after
    (fully_shard, DTensor collectives, Trainer's FSDP paths) is the real FSDP code.
    """
    state = PartialState()
    saved = state.distributed_type
    state.distributed_type = DistributedType.MULTI_GPU
    try:
        yield
    finally:
        state.distributed_type = saved


def train(output_dir: str, batch: int, steps: int, n: int = 16, resume: str | None = None,
          **overrides) -> dict[str, torch.Tensor]:
    reft = make_reft(init_seed=123 if resume else 0)  # on resume the weights must come from the checkpoint
    args = training_args(output_dir, batch, steps, **overrides)
    with fsdp_on_cpu() if args.fsdp else contextlib.nullcontext():
        trainer = ReftTrainer(reft, args, train_dataset=LMData(n), data_collator=Collator(len(reft.interventions)))
    trainer.train(resume_from_checkpoint=resume)
    if args.fsdp:  # else a silent fallback to DDP would pass every comparison
        assert trainer.is_fsdp_enabled and isinstance(reft, FSDPModule), "the model was not sharded by FSDP2"
        assert all(isinstance(layer, FSDPModule) for layer in reft.model.model.layers), "layers are not FSDP units"
        assert all(isinstance(p, DTensor) for p in reft.interventions.parameters()), "interventions are not sharded"
    with full_parameters([reft.interventions], root=reft):  # FSDP: gather the shards (a no-op otherwise)
        return {k: v.detach().clone() for k, v in reft.interventions.state_dict().items()}


def classifier_batch(features: list[dict]) -> dict[str, torch.Tensor]:
    """LMData examples as a 3-class task: the class is the first token mod 3."""
    batch = Collator(len(REFT_CONFIG["layer"]))(features)
    batch["labels"] = batch["input_ids"][:, 0] % 3
    return batch


def train_classifier(output_dir: str, batch: int, steps: int, **overrides) -> None:
    """Train a ReftForSequenceClassification and ``save_model`` it to ``output_dir``."""
    torch.manual_seed(0)  # the head's initialisation
    clf = ReftForSequenceClassification(make_reft(), num_labels=3)
    args = training_args(output_dir, batch, steps, **overrides)
    with fsdp_on_cpu() if args.fsdp else contextlib.nullcontext():
        trainer = ReftTrainer(clf, args, train_dataset=LMData(16), data_collator=classifier_batch)
    trainer.train()
    trainer.save_model(output_dir)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, required=True)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--sgd", action="store_true", help="plain SGD, no clipping: gradient scale errors show")
    parser.add_argument("--momentum", type=float, default=0.0, help="SGD momentum: gives the optimizer a state")
    parser.add_argument("--fsdp", action="store_true", help="FSDP2 instead of DDP; also saves checkpoints at "
                        "steps/2 and steps in the --out folder, resumes a second run from the first and writes "
                        "its weights next to --out (NAME.resumed.safetensors), and saves a classifier trained "
                        "the same way to the folder classifier/")
    args = parser.parse_args()
    torch.set_num_threads(1)
    folder = os.path.dirname(args.out) or "."
    overrides = {**(SGD if args.sgd else {}), **(FSDP if args.fsdp else {})}
    if args.momentum:
        overrides["optim_args"] = f"momentum={args.momentum}"
    if args.fsdp:
        overrides.update(save_strategy="steps", save_steps=args.steps // 2)
    weights = train(folder, args.batch, args.steps, **overrides)
    if args.fsdp:
        # resume from the middle: the interventions load into the shards, the optimizer state through FSDP
        resumed = train(folder, args.batch, args.steps, resume=os.path.join(folder, f"checkpoint-{args.steps // 2}"),
                        **{**overrides, "save_strategy": "no"})
        train_classifier(os.path.join(folder, "classifier"), args.batch, args.steps,
                         **{**overrides, "save_strategy": "no"})
    if int(os.environ.get("RANK", "0")) == 0:
        save_file({k: v.contiguous() for k, v in weights.items()}, args.out)
        if args.fsdp:
            stem, ext = os.path.splitext(args.out)
            save_file({k: v.contiguous() for k, v in resumed.items()}, f"{stem}.resumed{ext}")


if __name__ == "__main__":
    main()
