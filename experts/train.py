"""Train one expert: a ReftModel on prompt → answer pairs, with cross entropy (:class:`reftkit.ReftTrainer`)
or with Transformer²'s REINFORCE objective (:mod:`reftkit.experts.policy_gradient`)."""
from __future__ import annotations

import re
import tempfile
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from reftkit.config import ReftConfig

OBJECTIVES = ("supervised", "reinforce")


def _normal(text: str) -> str:
    return " ".join(text.lower().split())


def answer_reward(prompts: Sequence[str], answers: Sequence[str]) -> Callable[[list, list], list[float]]:
    """Transformer²'s reward for prompt → answer data: +1 when the completion starts with the prompt's
    answer (case and runs of whitespace ignored; the answer must end at a word boundary), −1 otherwise."""
    from .library import ExpertError

    gold: dict[str, str] = {}
    for i, (prompt, answer) in enumerate(zip(prompts, answers)):
        if not _normal(answer):
            raise ExpertError(f"answers[{i}] = {answer!r} is empty: nothing to reward")
        if gold.setdefault(prompt, _normal(answer)) != _normal(answer):
            raise ExpertError(f"prompts[{i}] = {prompt!r} appears with two answers; a reward needs one")

    def reward(texts: list[str], completions: list[str]) -> list[float]:
        out = []
        for text, completion in zip(texts, completions):
            want, got = gold[text], _normal(completion)
            out.append(1.0 if got.startswith(want) and not re.match(r"\w", got[len(want):len(want) + 1]) else -1.0)
        return out

    return reward


def train_expert(model: nn.Module, tokenizer: Any, inputs: Sequence[str], outputs: Sequence[str],
                 config: ReftConfig | Mapping[str, Any] | list, *, objective: str = "supervised",
                 epochs: float = 1.0, learning_rate: float | None = None, batch_size: int = 8, seed: int = 0,
                 progress: bool = True, training: Mapping[str, Any] | None = None,
                 reward: Callable[[list, list], Any] | None = None, return_history: bool = False) -> Any:
    """Attach ``config`` to ``model``, train it on ``inputs`` → ``outputs`` and return the trained ReftModel
    (with ``return_history``, ``(reft, history)``: one row per logged step).

    ``objective="supervised"``: cross entropy on the outputs (interventions at each entry's own positions
    over the prompt); ``learning_rate`` default 4e-3; ``training``: further ``TrainingArguments`` fields.
    ``objective="reinforce"``: Transformer²'s policy gradient on the expert's own sampled completions,
    ``L = −(1/N) Σ r_j log π(y_j | x_j) + λ KL(π_ref ‖ π)`` (:func:`~reftkit.experts.train_policy_gradient`),
    rewarded by ``reward(prompts, completions)`` (default :func:`answer_reward`: +1 when the completion
    starts with the output, −1 otherwise); ``epochs`` passes (a whole number) unless ``training`` gives
    ``steps``; ``learning_rate`` default 2e-3 (the released code's); ``training``: the policy gradient's
    options — ``kl_coef`` (λ, default 0 as the released code), ``max_new_tokens``, ``samples_per_prompt``,
    ``max_grad_norm``, ``reward_norm``, generation keywords..."""
    import reftkit

    from .policy_gradient import train_policy_gradient

    if objective not in OBJECTIVES:
        raise ValueError(f"objective={objective!r}; choose one of {OBJECTIVES}")
    if objective == "supervised" and reward is not None:
        raise ValueError("reward= applies to objective='reinforce' only; cross entropy reads the outputs")
    if len(inputs) != len(outputs):
        raise ValueError(f"{len(inputs)} inputs but {len(outputs)} outputs")
    if objective == "reinforce":
        options = dict(training or {})
        if "steps" not in options:
            if float(epochs) != int(epochs) or int(epochs) < 1:
                raise ValueError(f"epochs={epochs!r}: REINFORCE runs whole passes; give a whole number or "
                                 "training={'steps': n}")
            options["epochs"] = int(epochs)
        reward = answer_reward(inputs, outputs) if reward is None else reward
        torch.manual_seed(seed)
        reft = reftkit.get_reft_model(model, config)
        reft.eval()  # dropout would make log π differ from the sampling policy
        history = train_policy_gradient(reft, tokenizer, list(inputs), reward, batch_size=batch_size,
                                        learning_rate=2e-3 if learning_rate is None else learning_rate, seed=seed,
                                        progress=progress, **options)
        return (reft, history) if return_history else reft
    from transformers import TrainingArguments, set_seed

    from reftkit.training import ReftTrainer

    set_seed(seed)
    reft = reftkit.get_reft_model(model, config)
    module = reftkit.make_multiple_position_supervised_data_module(tokenizer, reft, inputs, outputs, positions=None)
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(**{
            "output_dir": out, "report_to": [], "save_strategy": "no", "logging_steps": 10,
            "logging_strategy": "steps" if progress or return_history else "no",
            "num_train_epochs": epochs, "learning_rate": 4e-3 if learning_rate is None else learning_rate,
            "per_device_train_batch_size": batch_size, "lr_scheduler_type": "linear", "warmup_steps": 0,
            "seed": seed, "disable_tqdm": not progress, "use_cpu": not torch.cuda.is_available(), **(training or {})})
        trainer = ReftTrainer(model=reft, args=args, train_dataset=module["train_dataset"],
                              data_collator=module["data_collator"])
        trainer.train()
    reft.eval()
    if not return_history:
        return reft
    import pandas as pd

    return reft, pd.DataFrame([row for row in trainer.state.log_history if "loss" in row])
