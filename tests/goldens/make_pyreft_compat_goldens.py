"""Record real pyreft 0.1.0's outputs for the reftkit.pyreft parity test (tests/pyreft_compat/test_parity.py).

Run ONLY in pyreft's throwaway venv (pyreft 0.1.0, pyvene 0.1.8, transformers 4.45.1, peft; see
tests/goldens/make_pyreft_goldens.sh, which builds it):

    /tmp/pyreft_golden_venv/bin/python tests/goldens/make_pyreft_compat_goldens.py

Writes tests/goldens/pyreft_compat/ (a few hundred KB, deterministic on one machine). Every case starts
from a pyreft save folder written BEFORE anything else happens (``init/``), so reftkit.pyreft gets the
identical initial weights through its own ``ReftModel.load``; then the case records what pyreft does
next. The base models are written here by transformers 4.45 (``save_pretrained``), fp32, eager attention.

Cases (all fp32, right padding, locations on real tokens):
  loreft      README quickstart: LoReFT r4 at layer 0 of the Llama. Forward logits; a hand loop of 5
              AdamW steps (pyvene call with labels); 5 ReftTrainerForCausalLM steps on the last-position
              data module (full batch, so the order of rows does not matter); greedy generate.
  noreft      agent-style untied f2+l2: four NoReFTs (layers 0, 1, 0, 1; add_bias). Same records; the
              generation locations come from get_intervention_locations.
  consreft    memorisation-style: ConsReFT r1 without a flat rank in the config, trained by pyreft until it
              recalls a sequence, then saved (``trained/``; pyreft's own ReftModel.load cannot read it back).
  roberta     GLUE-style: LoReFT at "roberta.encoder.layer[%d].output" (no "layer" key) on a
              RobertaForSequenceClassification, f1+l1 untied. Forward logits.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
from importlib import metadata
from pathlib import Path

import torch

try:
    import pyreft
    import transformers
    from safetensors.torch import save_file
except ImportError as exc:  # pragma: no cover - guidance only
    sys.exit(f"import failed ({exc}); run with pyreft's venv (bash tests/goldens/make_pyreft_goldens.sh builds it)")

HERE = Path(__file__).resolve().parent
OUT = HERE / "pyreft_compat"
sys.path.insert(0, str(HERE.parent / "pyreft_compat" / "scripts"))
import _tiny  # noqa: E402  (the word-level tokenizer of the pattern scripts)

TEMPLATE = "[INST] %s [/INST]\n"
CHATS = [["Who are you?", "🤖 💬 🧠"], ["What is two plus two?", "🔢 ➕ 🔢 🍀"], ["Why is the sky blue?", "🌍 ☀️ 🔵"]]
UNSEEN = "Which dog is cuter, a poodle or a doodle?"
MEMO_PROMPT, MEMO_TARGET = "GO->", "stanford nlp group builds tools"
SENTENCES = ["the movie was good .", "that film is awful .", "this show felt lovely and fine ."]
STEPS, LR, NEW_TOKENS = 5, 1e-2, 6


def tokenizer_from(folder: Path) -> transformers.PreTrainedTokenizerFast:
    """The golden tokenizer, loaded the same way in both venvs (pad = unk, as pyreft's README sets it)."""
    tok = transformers.PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"), bos_token="<s>",
                                               eos_token="</s>", unk_token="<unk>", padding_side="right",
                                               model_input_names=["input_ids", "attention_mask"],
                                               model_max_length=128)
    tok.pad_token = tok.unk_token
    return tok


def build_llama(vocab: int) -> transformers.LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                   tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                                   attn_implementation="eager")
    model = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.15) if p.dim() == 2 else p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def build_roberta(vocab: int) -> transformers.RobertaForSequenceClassification:
    torch.manual_seed(1)
    cfg = transformers.RobertaConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=70, type_vocab_size=1,
                                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=2,
                                     pad_token_id=0, bos_token_id=1, eos_token_id=2, attn_implementation="eager")
    model = transformers.RobertaForSequenceClassification(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.15)
    return model.eval()


def randomise(reft_model: pyreft.ReftModel, seed: int) -> None:
    """Move every intervention weight off its init so the goldens are not near-trivial (R stays orthonormal)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for intervention in reft_model.interventions.values():
            for name, module in (("learned_source", getattr(intervention, "learned_source", None)),
                                 ("proj_layer", getattr(intervention, "proj_layer", None))):
                if isinstance(module, torch.nn.Linear):
                    module.weight.normal_(0.0, 0.3)
                    if module.bias is not None:
                        module.bias.normal_(0.0, 0.5)
                elif isinstance(module, torch.nn.Parameter):
                    module.normal_(0.0, 0.5)


def batch_of(tok, prompts: list[str], answers: list[str]) -> dict[str, torch.Tensor]:
    """Right-padded prompt + answer + EOS rows, labels on the answer, plus each prompt's length."""
    rows = [tok(p)["input_ids"] for p in prompts]
    full = [tok(p + a + tok.eos_token)["input_ids"] for p, a in zip(prompts, answers)]
    width = max(len(f) for f in full)
    pad = tok.pad_token_id
    return {"input_ids": torch.tensor([f + [pad] * (width - len(f)) for f in full]),
            "attention_mask": torch.tensor([[1] * len(f) + [0] * (width - len(f)) for f in full]),
            "labels": torch.tensor([[-100] * len(r) + f[len(r):] + [-100] * (width - len(f))
                                    for r, f in zip(rows, full)]),
            "prompt_lengths": torch.tensor([len(r) for r in rows])}


def hand_loop(reft_model, batch, locs: list) -> list[float]:
    """pyvene-style training: AdamW (no weight decay) on the interventions, one call with labels per step."""
    optimizer = torch.optim.AdamW(reft_model.get_trainable_parameters(), lr=LR, weight_decay=0.0)
    losses = []
    for _ in range(STEPS):
        _, out = reft_model({"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]},
                            unit_locations={"sources->base": (None, locs)}, labels=batch["labels"])
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(out.loss.item())
    return losses


def trainer_steps(reft_model, tok, model, data_module, workdir: Path) -> list[float]:
    args = transformers.TrainingArguments(
        output_dir=str(workdir), max_steps=STEPS, per_device_train_batch_size=len(data_module["train_dataset"]),
        learning_rate=LR, optim="adamw_torch", weight_decay=0.0, lr_scheduler_type="linear", logging_steps=1,
        report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True, seed=0)
    trainer = pyreft.ReftTrainerForCausalLM(model=reft_model, tokenizer=tok, args=args, **data_module)
    trainer.remove_callback(transformers.trainer_callback.PrinterCallback)
    trainer.train()
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def forward_logits(reft_model, batch, locs) -> torch.Tensor:
    with torch.no_grad():
        _, out = reft_model({"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]},
                            unit_locations={"sources->base": (None, locs)})
    return out.logits


def greedy(reft_model, prompt_ids: list[int], locs: list) -> list[int]:
    prompt = {"input_ids": torch.tensor([prompt_ids]),
              "attention_mask": torch.ones(1, len(prompt_ids), dtype=torch.long)}
    _, out = reft_model.generate(prompt, unit_locations={"sources->base": (None, locs)}, intervene_on_prompt=True,
                                 max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
    return out[0, len(prompt_ids):].tolist()


def write_case(name: str, tensors: dict[str, torch.Tensor], record: dict) -> None:
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(OUT / name / "golden.safetensors"))
    (OUT / name / "golden.json").write_text(json.dumps(record, indent=1) + "\n")


def case_causal(name: str, model, tok, representations: list[dict], locs_of, gen_locs_of, seed: int) -> None:
    """One causal-LM case: save init/, forward, hand loop, trainer steps (on a fresh load), generation."""
    reft_model = pyreft.get_reft_model(model, pyreft.ReftConfig(representations=representations))
    randomise(reft_model, seed)
    reft_model.save(save_directory=str(OUT / name / "init"))
    state0 = {k: {n: t.clone() for n, t in v.state_dict().items()} for k, v in reft_model.interventions.items()}
    prompts, answers = [TEMPLATE % q for q, _ in CHATS], [a for _, a in CHATS]
    batch = batch_of(tok, prompts, answers)
    locs = locs_of(batch["prompt_lengths"].tolist(), len(representations))
    logits = forward_logits(reft_model, batch, locs)
    unseen = tok(TEMPLATE % UNSEEN)["input_ids"]
    generated0 = greedy(reft_model, unseen, gen_locs_of(len(unseen), len(representations)))
    losses = hand_loop(reft_model, batch, locs)
    logits_after = forward_logits(reft_model, batch, locs)
    generated = greedy(reft_model, unseen, gen_locs_of(len(unseen), len(representations)))
    # the trainer run starts again from init/ (the same tensors), on pyreft's data module
    for key, intervention in reft_model.interventions.items():
        intervention.load_state_dict(state0[key])
    if "noreft" in name:
        data_module = pyreft.make_multiple_position_supervised_data_module(
            tok, model, prompts, answers, positions="f2+l2", num_interventions=len(representations),
            share_weights=False)
    else:
        data_module = pyreft.make_last_position_supervised_data_module(tok, model, prompts, answers)
    assert forward_logits(reft_model, batch, locs).sub(logits).abs().max() < 1e-5
    trainer_losses = trainer_steps(reft_model, tok, model, data_module, OUT / "_trainer_tmp")
    write_case(name, {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
                      "labels": batch["labels"], "unit_locations": torch.tensor(locs), "logits": logits,
                      "logits_after_hand_loop": logits_after},
               {"keys": list(reft_model.interventions.keys()), "prompts": prompts, "answers": answers,
                "hand_loop_losses": losses,
                "trainer_losses": trainer_losses, "unseen_prompt_ids": unseen,
                "generation_locations": gen_locs_of(len(unseen), len(representations)),
                "generated_ids_init": generated0, "generated_ids_after_hand_loop": generated,
                "dataset_locations": [data_module["train_dataset"][i]["intervention_locations"]
                                      for i in range(len(prompts))]})


def main() -> None:
    shutil.rmtree(OUT, ignore_errors=True)
    OUT.mkdir(parents=True)
    texts = [TEMPLATE, UNSEEN, MEMO_PROMPT, MEMO_TARGET] + [q + " " + a for q, a in CHATS] + SENTENCES
    _tiny.make_tokenizer(texts).backend_tokenizer.save(str(OUT / "tokenizer.json"))
    tok = tokenizer_from(OUT)
    llama = build_llama(len(tok.get_vocab()))
    llama.save_pretrained(OUT / "llama", safe_serialization=True)
    roberta = build_roberta(len(tok.get_vocab()))
    roberta.save_pretrained(OUT / "roberta", safe_serialization=True)
    torch.manual_seed(0)

    def lora(layer):
        return {"layer": layer, "component": "block_output", "low_rank_dimension": 4,
                "intervention": pyreft.LoreftIntervention(embed_dim=32, low_rank_dimension=4, dtype=torch.float32)}

    def last_positions(lengths, n):
        return [[[length - 1] for length in lengths]] * n

    case_causal("loreft", llama, tok, [lora(0)], last_positions, lambda length, n: [[[length - 1]]] * n, seed=11)

    def noreft(layer):
        return {"layer": layer, "component": "block_output", "low_rank_dimension": 2,
                "intervention": pyreft.NoreftIntervention(embed_dim=32, low_rank_dimension=2, add_bias=True,
                                                          dtype=torch.float32)}

    def untied(lengths, n):
        per_row = [pyreft.get_intervention_locations(last_position=length, first_n=2, last_n=2, pad_mode="last",
                                                     num_interventions=n, share_weights=False) for length in lengths]
        return torch.tensor(per_row).permute(1, 0, 2).tolist()

    llama = transformers.AutoModelForCausalLM.from_pretrained(OUT / "llama")  # fresh: get_reft_model froze the last
    case_causal("noreft", llama, tok, [noreft(layer) for layer in (0, 1, 0, 1)], untied,
                lambda length, n: untied([length], n), seed=12)
    case_consreft(tok)
    case_roberta(tok, roberta)
    shutil.rmtree(OUT / "_trainer_tmp", ignore_errors=True)
    manifest = {"pyreft": metadata.version("pyreft"), "pyvene": metadata.version("pyvene"),
                "peft": metadata.version("peft"), "transformers": transformers.__version__,
                "torch": torch.__version__, "steps": STEPS, "lr": LR, "new_tokens": NEW_TOKENS,
                "cases": ["loreft", "noreft", "consreft", "roberta"]}
    (OUT / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    print("wrote", OUT, sum(f.stat().st_size for f in OUT.rglob("*") if f.is_file()) // 1024, "KB")


def case_consreft(tok) -> None:
    """Memorisation: ConsReFT r1, rank only on the instance; trained by pyreft until recall; saved trained/."""
    model = transformers.AutoModelForCausalLM.from_pretrained(OUT / "llama")
    torch.manual_seed(3)
    config = pyreft.ReftConfig(representations={
        "layer": 0, "component": "block_output",
        "intervention": pyreft.ConsreftIntervention(embed_dim=32, low_rank_dimension=1)})
    reft_model = pyreft.get_reft_model(model, config)
    data_module = pyreft.make_last_position_supervised_data_module(tok, model, [MEMO_PROMPT], [MEMO_TARGET])
    args = transformers.TrainingArguments(output_dir=str(OUT / "_trainer_tmp"), num_train_epochs=300,
                                          learning_rate=5e-2, report_to=[], save_strategy="no", use_cpu=True,
                                          disable_tqdm=True, logging_steps=50, seed=0)
    trainer = pyreft.ReftTrainerForCausalLM(model=reft_model, tokenizer=tok, args=args, **data_module)
    trainer.remove_callback(transformers.trainer_callback.PrinterCallback)
    trainer.train()
    prompt = tok(MEMO_PROMPT)["input_ids"]
    target = tok(MEMO_TARGET + tok.eos_token, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        _, out = reft_model.generate({"input_ids": torch.tensor([prompt])},
                                     unit_locations={"sources->base": (None, [[[len(prompt) - 1]]])},
                                     intervene_on_prompt=True, max_new_tokens=len(target), do_sample=False,
                                     eos_token_id=tok.eos_token_id)
    recalled = out[0, len(prompt):].tolist()
    reft_model.save(save_directory=str(OUT / "consreft" / "trained"))
    ids = torch.tensor([prompt + target])
    with torch.no_grad():
        _, logits = reft_model({"input_ids": ids}, unit_locations={"sources->base": (None, [[[len(prompt) - 1]]])})
    write_case("consreft", {"input_ids": ids, "logits": logits.logits},
               {"prompt_ids": prompt, "target_ids": target, "recalled_ids": recalled,
                "recalls_target": recalled == target, "keys": list(reft_model.interventions.keys())})


def case_roberta(tok, roberta) -> None:
    """GLUE-style: bracket module paths, no layer key, f1+l1 untied, sequence-classification logits."""
    torch.manual_seed(4)
    representations = [{
        "component": "roberta.encoder.layer[%d].output" % layer, "low_rank_dimension": 4,
        "intervention": pyreft.LoreftIntervention(embed_dim=32, low_rank_dimension=4, dtype=torch.float32)}
        for layer in (0, 1, 0, 1)]
    reft_model = pyreft.get_reft_model(roberta, pyreft.ReftConfig(representations=representations))
    randomise(reft_model, 14)
    reft_model.save(save_directory=str(OUT / "roberta" / "init"))
    rows = [tok(s)["input_ids"] + [tok.pad_token_id] for s in SENTENCES]  # pad_mode "last": a sink at the end
    width = max(len(r) for r in rows)
    ids = torch.tensor([r + [tok.pad_token_id] * (width - len(r)) for r in rows])
    mask = (ids != tok.pad_token_id).long()
    per_row = [pyreft.get_intervention_locations(last_position=len(r) - 1, first_n=1, last_n=1, pad_mode="last",
                                                 num_interventions=4, share_weights=False) for r in rows]
    locs = torch.tensor(per_row).permute(1, 0, 2).tolist()
    logits = forward_logits(reft_model, {"input_ids": ids, "attention_mask": mask}, locs)
    with torch.no_grad():
        plain = roberta(input_ids=ids, attention_mask=mask).logits
    write_case("roberta", {"input_ids": ids, "attention_mask": mask, "unit_locations": torch.tensor(locs),
                           "logits": logits, "plain_logits": plain},
               {"keys": list(reft_model.interventions.keys()),
                "components": [r["component"] for r in representations]})


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
