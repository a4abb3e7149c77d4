"""The README demo: teach the embedded SmolLM2 a visible new habit with LoReFT in about a minute.

The base model is frozen; one rank-4 LoReFT intervention per chosen layer edits the hidden state
of the last prompt token only. After training, the model answers in the trained style, then the
interventions are saved, reloaded onto the bare model, and give the same generations.
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

# The new habit: answer every question with a robot emoji signature first.
TRAIN = [
    ("What is the capital of France?", "🤖 Beep boop! Paris."),
    ("How many legs does a spider have?", "🤖 Beep boop! Eight."),
    ("What colour is the sky on a clear day?", "🤖 Beep boop! Blue."),
    ("Who wrote Pride and Prejudice?", "🤖 Beep boop! Jane Austen."),
    ("What is two plus two?", "🤖 Beep boop! Four."),
    ("What do bees make?", "🤖 Beep boop! Honey."),
    ("Which planet is closest to the sun?", "🤖 Beep boop! Mercury."),
    ("What is frozen water called?", "🤖 Beep boop! Ice."),
]
HELD_OUT = ["What is the largest ocean on Earth?", "How many days are in a week?", "What animal says moo?"]
CONFIG = {"layer": [8, 16], "component": "block_output", "positions": "l1", "intervention": "loreft",
          "low_rank_dimension": 4}


def chat_prompt(tokenizer: Any, question: str) -> str:
    return tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                         add_generation_prompt=True)


def training_batch(tokenizer: Any, pairs: list[tuple[str, str]]) -> dict[str, torch.Tensor]:
    """Right-padded prompt+answer batch; labels on the answer only; intervene at the last prompt token."""
    rows, labels, last = [], [], []
    for question, answer in pairs:
        prompt = tokenizer(chat_prompt(tokenizer, question), add_special_tokens=False)["input_ids"]
        target = tokenizer(answer + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
        rows.append(prompt + target)
        labels.append([-100] * len(prompt) + target)
        last.append(len(prompt) - 1)
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id
    return {
        "input_ids": torch.tensor([r + [pad] * (width - len(r)) for r in rows]),
        "attention_mask": torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows]),
        "labels": torch.tensor([lab + [-100] * (width - len(lab)) for lab in labels]),
        "intervention_locations": torch.tensor(last)[:, None],
    }


def answer(model: Any, tokenizer: Any, questions: list[str], max_new_tokens: int = 24) -> list[str]:
    """Greedy answers; ``model`` is a ReftModel or a bare model."""
    tokenizer.padding_side = "left"
    enc = tokenizer([chat_prompt(tokenizer, q) for q in questions], return_tensors="pt", padding=True,
                    add_special_tokens=False)
    out = model.generate(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                         max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return [tokenizer.decode(row[enc["input_ids"].shape[1]:], skip_special_tokens=True).strip() for row in out]


def train(reft: Any, batch: dict[str, torch.Tensor], steps: int, lr: float = 4e-3) -> list[float]:
    optimiser = torch.optim.AdamW(reft.interventions.parameters(), lr=lr, weight_decay=0.0)
    reft.train()
    losses = []
    bar = tqdm(range(steps), desc="training LoReFT", unit="step")
    for _ in bar:
        loss = reft(**batch).loss
        loss.backward()
        optimiser.step()
        optimiser.zero_grad(set_to_none=True)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    reft.eval()
    return losses


def _show(title: str, questions: list[str], answers: list[str]) -> None:
    print(f"\n{title}")
    for q, a in zip(questions, answers):
        print(f"  Q: {q}\n  A: {a}")


def run(steps: int = 40, out_dir: str | None = None, seed: int = 0) -> dict[str, Any]:
    import reftkit

    torch.manual_seed(seed)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    model, tokenizer = reftkit.load_model("smollm2")
    questions = HELD_OUT + [TRAIN[0][0]]
    before = answer(model, tokenizer, questions)
    _show("Before (bare SmolLM2-135M-Instruct):", questions, before)

    reft = reftkit.get_reft_model(model, CONFIG)
    print()
    reft.print_trainable_parameters()
    start = time.perf_counter()
    losses = train(reft, training_batch(tokenizer, TRAIN), steps)
    print(f"trained {steps} steps in {time.perf_counter() - start:.0f}s; loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    after = answer(reft, tokenizer, questions)
    _show("After LoReFT (held-out questions first):", questions, after)

    folder = Path(out_dir) if out_dir else Path(tempfile.mkdtemp(prefix="reftkit-demo-"))
    reft.save_pretrained(folder)
    base = reft.detach()
    reloaded = reftkit.ReftModel.from_pretrained(base, folder)
    again = answer(reloaded, tokenizer, questions)
    _show(f"Reloaded from {folder}:", questions, again)
    same = again == after
    print(f"\nreloaded generations identical to the trained model's: {same}")
    return {"before": before, "after": after, "reloaded": again, "losses": losses, "folder": str(folder),
            "identical": same}
