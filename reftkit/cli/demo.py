"""The README demo: teach the embedded SmolLM2 a visible new habit with LoReFT, and keep what it knows.

What it does, with the code a user copies first (``make_last_position_supervised_data_module`` and
``ReftTrainer``):

1. The bare (frozen) SmolLM2-135M-Instruct answers :data:`TRAIN_QUESTIONS` greedily; each answer,
   prefixed with :data:`HABIT`, is the training target (:func:`training_responses`). The intervention
   therefore learns "start with the habit, change nothing else" -- targets that state facts the
   model does not hold would teach it to replace its own answers.
2. One rank-4 LoReFT intervention at each of layers 8 and 16 edits the last prompt token only
   (:data:`CONFIG`), trained for ``steps`` optimizer steps (batches of :data:`BATCH_SIZE`).
3. :data:`HELD_OUT` questions (disjoint from training, each with the accepted forms of its key fact)
   are answered by the bare and the adapted model; :func:`keeps_habit_and_fact` scores each pair and
   the demo prints ``held-out answers with the habit and the bare model's facts: k/n``.
4. The interventions are saved, detached, reloaded onto the bare model, and must give the same
   generations (``reloaded generations identical to the trained model's: True``).
"""
from __future__ import annotations

import re
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import torch

# The new habit: every answer starts with this signature.
HABIT = "🤖 Beep boop!"

# Varied factual questions; their targets are the bare model's own answers (right or wrong) after the habit.
TRAIN_QUESTIONS = [
    "What is the capital of France?",
    "What is the capital of Germany?",
    "What is the capital of Canada?",
    "What is the capital of Egypt?",
    "What is the capital of Russia?",
    "What is the chemical symbol for gold?",
    "What is the boiling point of water in Celsius?",
    "How many hours are in a day?",
    "How many seconds are in a minute?",
    "How many sides does a triangle have?",
    "What is the opposite of hot?",
    "What language is spoken in Brazil?",
    "What is the currency of Japan?",
    "What is the largest mammal?",
    "Who painted the Mona Lisa?",
    "Who discovered penicillin?",
    "What is the longest river in Africa?",
    "What is the largest desert in the world?",
    "What is the closest star to Earth?",
    "Which planet is closest to the sun?",
    "What do bees make?",
    "What is frozen water called?",
    "How many wheels does a bicycle have?",
    "What gas do plants absorb from the air?",
]

# Held-out questions with the accepted surface forms of their key fact (matched case-insensitively,
# as whole words). The bare model's answer to each contains the fact; the check requires it anyway.
HELD_OUT: list[tuple[str, tuple[str, ...]]] = [
    ("What is the largest ocean on Earth?", ("Pacific",)),
    ("How many days are in a week?", ("7", "seven")),
    ("What is the capital of Japan?", ("Tokyo",)),
    ("Which organ pumps blood through the body?", ("heart",)),
    ("What is the primary language of Mexico?", ("Spanish",)),
    ("In which country are the pyramids of Giza?", ("Egypt",)),
]

CONFIG = {"layer": [8, 16], "component": "block_output", "positions": "l1", "intervention": "loreft",
          "low_rank_dimension": 4}
BATCH_SIZE = 8
STEPS = 24                # optimizer steps: 8 passes over the 24 training questions
LEARNING_RATE = 1e-2
MAX_NEW_TOKENS = 40


def answer(model: Any, tokenizer: Any, questions: Sequence[str], max_new_tokens: int = MAX_NEW_TOKENS) -> list[str]:
    """Greedy answers through the chat template; ``model`` is a ReftModel or a bare model. All questions go in
    one left-padded batch: the batch's padding shapes greedy answers slightly, so the demo keeps it fixed."""
    from reftkit.analysis.text_metrics import generate_predictions

    return generate_predictions(model, tokenizer, questions, max_new_tokens=max_new_tokens, chat_template=True,
                                batch_size=len(questions), progress=False)


def contains_fact(text: str, facts: Sequence[str]) -> bool:
    """Whether ``text`` contains one of ``facts`` as a whole word (case-insensitive): "7" is not found in "17"."""
    return any(re.search(rf"(?<!\w){re.escape(fact)}(?!\w)", text, re.IGNORECASE) for fact in facts)


def keeps_habit_and_fact(adapted: str, bare: str, facts: Sequence[str], habit: str = HABIT) -> bool:
    """The held-out criterion: ``adapted`` starts with ``habit`` and contains one of ``facts``, and the bare
    model's answer ``bare`` contains one too (a fact the bare model lacks cannot be "kept")."""
    return adapted.strip().startswith(habit) and contains_fact(adapted, facts) and contains_fact(bare, facts)


def training_responses(bare_answers: Sequence[str], habit: str = HABIT) -> list[str]:
    """The habit followed by each bare answer, whole (as generated, up to :data:`MAX_NEW_TOKENS` tokens).

    Whole answers, not their first sentences: the longer "keep going as before" part of each target is what
    keeps held-out answers on the bare model's facts (6/6 on seeds 0, 1 and 2, against 5/6 on some seeds with
    first sentences only)."""
    return [f"{habit} {a.strip()}" for a in bare_answers]


def _quiet_transformers() -> None:
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()  # "Loading weights"; the Trainer's bar is tqdm's own


def _loss_bar() -> Any:
    """The Trainer's progress bar, showing the latest loss as a postfix instead of printing a dict per log."""
    from transformers.trainer_callback import ProgressCallback

    class LossBar(ProgressCallback):
        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            super().on_train_begin(args, state, control, **kwargs)
            if self.training_bar is not None:
                self.training_bar.set_description("training LoReFT")

        def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> None:
            if self.training_bar is not None and logs and "loss" in logs:
                self.training_bar.set_postfix(loss=f"{logs['loss']:.3f}")

    return LossBar()


def train(reft: Any, tokenizer: Any, prompts: Sequence[str], responses: Sequence[str], steps: int,
          seed: int = 0) -> tuple[list[float], float]:
    """``steps`` optimizer steps of :class:`~reftkit.training.ReftTrainer` (``max_steps``, cycling over the
    data); returns the per-step losses and the seconds spent."""
    from transformers import TrainingArguments
    from transformers.trainer_callback import ProgressCallback

    import reftkit
    from reftkit.training import ReftTrainer

    if steps < 1:
        raise ValueError(f"steps={steps}: give at least 1 optimizer step")
    module = reftkit.make_last_position_supervised_data_module(tokenizer, reft, list(prompts), list(responses),
                                                               chat_template=True)
    with tempfile.TemporaryDirectory(prefix="reftkit-demo-trainer-") as scratch:  # save_strategy="no": stays empty
        args = TrainingArguments(
            output_dir=scratch, max_steps=steps, per_device_train_batch_size=BATCH_SIZE,
            learning_rate=LEARNING_RATE, lr_scheduler_type="linear", weight_decay=0.0, logging_steps=1,
            report_to=[], save_strategy="no", use_cpu=not torch.cuda.is_available(), seed=seed, data_seed=seed,
            disable_tqdm=False)
        # suffix training (the default): autograd only from the last prompt token on; after one pass over the
        # data, each prompt's keys/values and the layers below the first intervened one are read from a store
        trainer = ReftTrainer(model=reft, args=args, train_dataset=module["train_dataset"],
                              data_collator=module["data_collator"])
        trainer.remove_callback(ProgressCallback)
        trainer.add_callback(_loss_bar())
        start = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - start
    reft.eval()
    return [h["loss"] for h in trainer.state.log_history if "loss" in h], seconds


def _show(title: str, questions: Sequence[str], answers: Sequence[str]) -> None:
    print(f"\n{title}")
    for q, a in zip(questions, answers):
        print(f"  Q: {q}\n  A: {a}")


def run(steps: int | None = None, out_dir: str | None = None, seed: int = 0) -> dict[str, Any]:
    """Run the demo (see the module docstring). ``steps``: optimizer steps (``--steps``; batches of
    :data:`BATCH_SIZE`; default :data:`STEPS`); ``out_dir``: where
    the interventions are saved (``--out``; a temporary folder if None); ``seed``: torch and Trainer seed.

    Returns ``before`` / ``after`` / ``reloaded`` (answers to the held-out questions, then the first
    training question), ``held_out`` (per question: question, facts, bare, adapted, ok), ``held_out_ok`` (k)
    and ``held_out_total`` (n), ``losses``, ``train_seconds``, ``folder`` and ``identical``."""
    import reftkit

    steps = STEPS if steps is None else steps
    _quiet_transformers()
    torch.manual_seed(seed)
    model, tokenizer = reftkit.load_model("smollm2")
    folder = Path(out_dir) if out_dir else Path(tempfile.mkdtemp(prefix="reftkit-demo-"))

    held_questions = [q for q, _ in HELD_OUT]
    questions = held_questions + [TRAIN_QUESTIONS[0]]
    print("Asking the bare model the training questions (its answers become the targets) ...")
    targets = training_responses(answer(model, tokenizer, TRAIN_QUESTIONS))
    before = answer(model, tokenizer, questions)

    reft = reftkit.get_reft_model(model, CONFIG)
    print()
    reft.print_trainable_parameters()
    losses, seconds = train(reft, tokenizer, TRAIN_QUESTIONS, targets, steps, seed)
    print(f"trained {steps} steps in {seconds:.0f}s; loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    after = answer(reft, tokenizer, questions)

    n = len(HELD_OUT)
    print("\nHeld-out questions (not trained on): the bare model, then after LoReFT")
    rows = []
    for (question, facts), bare, adapted in zip(HELD_OUT, before, after):
        ok = keeps_habit_and_fact(adapted, bare, facts)
        rows.append({"question": question, "facts": list(facts), "bare": bare, "adapted": adapted, "ok": ok})
        print(f"  Q: {question}   [fact: {' / '.join(facts)}]\n    bare:   {bare}\n    LoReFT: {adapted}"
              f"\n    {'ok' if ok else 'MISSED'}")
    k = sum(r["ok"] for r in rows)
    print(f"held-out answers with the habit and the bare model's facts: {k}/{n}")
    _show("A training question:", questions[n:], after[n:])

    reft.save_pretrained(folder)
    base = reft.detach()
    reloaded = reftkit.ReftModel.from_pretrained(base, folder)
    again = answer(reloaded, tokenizer, questions)
    same = again == after
    print(f"\nsaved to {folder}, detached, reloaded onto the bare model")
    print(f"reloaded generations identical to the trained model's: {same}")
    return {"before": before, "after": after, "reloaded": again, "held_out": rows, "held_out_ok": k,
            "held_out_total": n, "losses": losses, "train_seconds": seconds, "folder": str(folder),
            "identical": same}
