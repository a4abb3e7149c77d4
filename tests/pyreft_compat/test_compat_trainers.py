"""reftkit.pyreft's trainers: pyreft's losses (against a hand-written intervened forward and loss), training
that learns, pyreft's save layout read back by ReftModel.load, tokenizer=, pyreft-style subclasses, GLUE-style
classification with evaluate and load_best_model_at_end, and the subspaces column."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
import transformers
from _reference import (
    ANSWERS,
    GOLDEN_DATA,
    PROMPTS,
    args,
    base_model,
    golden_tokenizer,
    hand_intervened,
    hand_lm_loss,
    pyvene_call,
    reft_on,
)
from conftest import tiny_tokenizer
from transformers import DataCollatorForSeq2Seq, DataCollatorWithPadding

import reftkit.pyreft as pyreft
from reftkit.pyreft.dataset import (
    ReftDataCollator,
    ReftDataset,
    ReftSupervisedDataset,
    make_last_position_supervised_data_module,
    make_multiple_position_supervised_data_module,
)
from reftkit.pyreft.dataset_base import tokenize_text
from reftkit.pyreft.trainer import (
    ReftTrainer,
    ReftTrainerForCausalLM,
    ReftTrainerForSequenceClassification,
    classification_loss,
    load_intervenable_model,
    once_each,
)


# -- causal LM ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_causal_lm_loss_equals_the_hand_written_loss(arch, tmp_path):
    tok = tiny_tokenizer()
    model = base_model(arch)
    reft = reft_on(model, layers=(0, 0, 1, 1))  # pyreft's untied f1+l1 layout: first, last per layer
    module = make_multiple_position_supervised_data_module(tok, model, PROMPTS, ANSWERS, positions="f1+l1",
                                                           num_interventions=4, share_weights=False)
    batch = module["data_collator"]([module["train_dataset"][i] for i in range(3)])
    trainer = ReftTrainerForCausalLM(model=reft, tokenizer=tok, args=args(tmp_path), **module)
    with torch.no_grad():
        loss = trainer.compute_loss(reft, dict(batch))
        bare = reft.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                          labels=batch["labels"]).loss
        pyvene_loss = pyvene_call(reft, batch, labels=batch["labels"]).loss
    expected = hand_lm_loss(reft, batch)
    assert abs(loss.item() - expected.item()) < 1e-5
    assert abs(pyvene_loss.item() - expected.item()) < 1e-5
    assert abs(bare.item() - expected.item()) > 1e-3  # the interventions do act


def test_short_prompts_with_pyreft_padding_positions(tmp_path):
    """pyreft pads a short prompt's positions by repeating one (pad_mode "last": the first response token;
    "first": the prepended pad token): the loss is that of each listed position edited once."""
    tok = tiny_tokenizer()
    model = base_model()
    reft = reft_on(model, layers=(0, 1))
    prompts, answers = ["dog", "define dog ."], [" a dog", " an animal"]
    module = make_multiple_position_supervised_data_module(tok, model, prompts, answers, positions="f3+l3",
                                                           num_interventions=2, share_weights=False)
    batch = module["data_collator"]([module["train_dataset"][i] for i in range(2)])
    assert batch["intervention_locations"][0].tolist() == [[0, 2, 2], [1, 2, 2]]  # prompt "<s> dog": pads at 2
    trainer = ReftTrainerForCausalLM(model=reft, tokenizer=tok, args=args(tmp_path), **module)
    with torch.no_grad():
        assert abs(trainer.compute_loss(reft, dict(batch)).item() - hand_lm_loss(reft, batch).item()) < 1e-5


def test_gradient_accumulation_averages_micro_batch_means(tmp_path):
    """pyreft trained under transformers 4.45: each micro-batch's mean loss, divided by the accumulation
    steps (not transformers 5's token-weighted num_items_in_batch)."""
    tok = tiny_tokenizer()
    reft = reft_on(base_model())
    module = make_last_position_supervised_data_module(tok, reft.model, PROMPTS, ANSWERS)
    items = [module["train_dataset"][i] for i in range(3)]
    first, second = module["data_collator"](items[:1]), module["data_collator"](items[1:])
    trainer = ReftTrainerForCausalLM(model=reft, tokenizer=tok, args=args(tmp_path, gradient_accumulation_steps=2),
                                     **module)
    assert trainer._get_num_items_in_batch([first, second], torch.device("cpu")) is None
    trainer.current_gradient_accumulation_steps = 2
    params = list(reft.interventions.parameters())

    def grads(run):
        reft.zero_grad()
        run()
        return torch.cat([p.grad.flatten() for p in params])

    got = grads(lambda: [trainer.training_step(reft, dict(b), None) for b in (first, second)])
    means = grads(lambda: ((hand_lm_loss(reft, first, True) + hand_lm_loss(reft, second, True)) / 2).backward())
    counts = [int((b["labels"][:, 1:] != -100).sum()) for b in (first, second)]
    weighted = grads(lambda: ((hand_lm_loss(reft, first, True) * counts[0] + hand_lm_loss(reft, second, True)
                               * counts[1]) / sum(counts)).backward())
    torch.testing.assert_close(got, means, atol=1e-6, rtol=1e-4)
    assert (got - weighted).abs().max() > 1e-4


def test_once_each_keeps_the_first_listing():
    locations = torch.tensor([[[0, 2, 2, 2], [3, -1, 3, 1]]])
    assert once_each(locations).tolist() == [[[0, 2, -1, -1], [3, -1, -1, 1]]]


def test_readme_flow_learns_saves_and_loads(tmp_path):
    tok = tiny_tokenizer()
    model = base_model()
    reft = reft_on(model, rank=8)
    module = make_last_position_supervised_data_module(tok, model, PROMPTS, ANSWERS)
    trainer = ReftTrainerForCausalLM(model=reft, tokenizer=tok, args=args(tmp_path, num_train_epochs=30), **module)
    assert trainer.tokenizer is tok and trainer.processing_class is tok
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert losses[-1] < 0.75 * losses[0], losses

    out = tmp_path / "saved"
    trainer.save_model(str(out))
    folder = out / "intervenable_model"
    assert (folder / "config.json").is_file() and list(folder.glob("intkey_*.bin"))
    loaded = pyreft.ReftModel.load(str(folder), base_model())
    batch = module["data_collator"]([module["train_dataset"][i] for i in range(3)])
    with torch.no_grad():  # pyreft's files hold R itself, rebuilt to float32 rounding (logits to ~3e-6)
        torch.testing.assert_close(pyvene_call(loaded, batch).logits, pyvene_call(reft, batch).logits,
                                   atol=2e-5, rtol=0)
        bare = base_model()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        assert (bare - pyvene_call(reft, batch).logits).abs().max() > 1e-2  # what was trained matters
    # as pyreft: a second save into a non-empty folder is skipped, not overwritten
    before = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    trainer.save_model(str(out))
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == before


def test_resuming_from_a_checkpoint_continues_exactly(tmp_path):
    tok = tiny_tokenizer()
    module = make_last_position_supervised_data_module(tok, None, PROMPTS, ANSWERS)
    straight = reft_on(base_model())
    ReftTrainerForCausalLM(model=straight, tokenizer=tok, **module,
                           args=args(tmp_path, max_steps=4, save_strategy="steps", save_steps=2)).train()
    checkpoint = tmp_path / "run" / "checkpoint-2"
    assert (checkpoint / "intervenable_model" / "config.json").is_file()
    resumed = reft_on(base_model(), seed=7)  # other initial weights: all must come from the checkpoint
    ReftTrainerForCausalLM(model=resumed, tokenizer=tok, args=args(tmp_path, max_steps=4), **module).train(
        resume_from_checkpoint=str(checkpoint))
    batch = module["data_collator"]([module["train_dataset"][i] for i in range(3)])
    with torch.no_grad():
        assert torch.equal(pyvene_call(resumed, batch).logits, pyvene_call(straight, batch).logits)


def test_tokenizer_and_processing_class(tmp_path):
    tok = tiny_tokenizer()
    model = base_model()
    module = make_last_position_supervised_data_module(tok, model, PROMPTS, ANSWERS)
    by_new_name = ReftTrainer(model=reft_on(model), processing_class=tok, args=args(tmp_path), **module)
    assert by_new_name.tokenizer is tok
    with pytest.raises(ValueError, match="two different objects"):
        ReftTrainer(model=by_new_name.model, tokenizer=tok, processing_class=tiny_tokenizer(), args=args(tmp_path))
    with pytest.raises(TypeError, match="get_reft_model"):
        ReftTrainer(model=model, tokenizer=tok, args=args(tmp_path))


def test_a_pyreft_style_compute_loss_override_trains(tmp_path):
    """examples/reward/train.py subclasses ReftTrainer with compute_loss(self, intervenable, inputs,
    return_outputs=False) (no num_items_in_batch, which transformers 5 passes)."""
    calls = []

    class MyTrainer(ReftTrainer):
        def compute_loss(self, intervenable, inputs, return_outputs=False):
            calls.append(return_outputs)
            _, out = intervenable({"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"]},
                                  unit_locations={"sources->base": (
                                      None, inputs["intervention_locations"].permute(1, 0, 2).tolist())},
                                  labels=inputs["labels"])
            return (out.loss, out) if return_outputs else out.loss

    tok = tiny_tokenizer()
    model = base_model()
    module = make_last_position_supervised_data_module(tok, model, PROMPTS, ANSWERS)
    MyTrainer(model=reft_on(model), tokenizer=tok, args=args(tmp_path, max_steps=2), **module).train()
    assert calls == [False, False]


# -- against real pyreft: its trainers' compute_loss and the gradients on a golden batch ---------------------
@pytest.mark.parametrize("case", ["causal_lm", "classification"])
def test_loss_and_gradients_equal_real_pyreft(case, tmp_path):
    """tests/goldens/make_pyreft_data_goldens.py ran pyreft's own trainer on this batch, model and LoReFTs."""
    folder = GOLDEN_DATA / "training" / case
    golden = json.loads((folder / "golden.json").read_text())
    auto = transformers.AutoModelForCausalLM if case == "causal_lm" else transformers.AutoModelForSequenceClassification
    reft = pyreft.ReftModel.load(str(folder / "reft"), auto.from_pretrained(folder / "base", dtype=torch.float32))
    assert list(reft.interventions) == golden["keys"]
    trainer_class = ReftTrainerForCausalLM if case == "causal_lm" else ReftTrainerForSequenceClassification
    if case == "classification":
        reft.model.score.weight.requires_grad_(True)
    trainer = trainer_class(model=reft, args=args(tmp_path))
    batch = {k: torch.tensor(v["values"], dtype=getattr(torch, v["dtype"].split(".")[1]))
             for k, v in golden["batch"].items() if v is not None}
    loss = trainer.compute_loss(reft, batch)
    assert loss.item() == pytest.approx(golden["loss"], abs=1e-5)
    loss.backward()
    for key, grads in golden["grads"].items():
        source = reft.model.score if key == "score" else reft.interventions[key].learned_source
        for name, want in grads.items():
            torch.testing.assert_close(getattr(source, name).grad, torch.tensor(want), atol=1e-5, rtol=1e-4)


# -- a ReftDataset subclass in the style of examples/loreft/dataset.py, end to end ----------------------
class TemplateDataset(ReftDataset):
    """LoReftSupervisedDataset's pattern: a prompt template, prompt-only eval splits, last_position = prompt
    length; loading, locations and padding come from the base class."""

    def preprocess(self, kwargs):
        self.template = "### Instruction : %s ### Response :"

    def tokenize(self, data_item):
        prompt = self.template % data_item["instruction"]
        prompt_ids = tokenize_text(self.tokenizer, prompt)
        if self.data_split != "train":
            return {"input_ids": prompt_ids}, len(prompt_ids)
        ids = tokenize_text(self.tokenizer, prompt + data_item["output"] + self.tokenizer.eos_token)
        labels = ids.clone()
        labels[:len(prompt_ids)] = -100
        return {"input_ids": ids, "labels": labels}, len(prompt_ids)


def test_loreft_train_py_flow_with_a_dataset_subclass(tmp_path):
    tok = golden_tokenizer()
    rows = [{"instruction": p, "output": a} for p, a in zip(PROMPTS, ANSWERS)]
    layers = [0, 1]
    layers += layers  # train.py: "+" in position and not share_weights -> one intervention per half
    dataset = TemplateDataset("commonsense", None, tok, data_split="train", dataset=rows,
                              **{"num_interventions": len(layers), "position": "f1+l1", "share_weights": False})
    collator = ReftDataCollator(data_collator=DataCollatorForSeq2Seq(tokenizer=tok, model=None,
                                                                     label_pad_token_id=-100, padding="longest"))
    model = base_model()
    reft = reft_on(model, layers=layers, rank=4)
    trainer = ReftTrainerForCausalLM(model=reft, tokenizer=tok, train_dataset=dataset, eval_dataset=dataset,
                                     data_collator=collator,
                                     args=args(tmp_path, num_train_epochs=20, per_device_eval_batch_size=3))
    batch = collator([dataset[i] for i in range(3)])
    assert "id" in batch  # pyreft's datasets carry an id column, which the loss must ignore
    with torch.no_grad():
        assert abs(trainer.compute_loss(reft, dict(batch)).item() - hand_lm_loss(reft, batch).item()) < 1e-5
    assert trainer.evaluate()["eval_loss"] == pytest.approx(hand_lm_loss(reft, batch).item(), abs=1e-5)
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert losses[-1] < 0.8 * losses[0], losses


# -- subspaces ----------------------------------------------------------------------------------------
class SubspaceLoreft(pyreft.LoreftIntervention):
    """The composition example's idea: each example edits only its own rank coordinates."""

    def forward(self, base, source=None, subspaces=None):
        weight = self.rotate_layer.weight
        diff = self.act_fn(self.learned_source(base)) - self.rotate_layer(base)
        mask = torch.zeros(len(subspaces), weight.shape[1], dtype=diff.dtype, device=diff.device)
        for row, kept in enumerate(subspaces):
            mask[row, kept] = 1.0
        mask = mask.view(len(subspaces), *([1] * (diff.dim() - 2)), -1) if diff.dim() > 2 else mask
        return base + ((diff * mask) @ weight.T).to(base.dtype)


def test_subspaces_column_reaches_the_interventions(tmp_path):
    tok = golden_tokenizer()
    rows = [{"instruction": "define dog .", "input": "", "output": "an animal that barks .", "subspaces": [0, 1]},
            {"instruction": "how many legs ?", "input": "spider", "output": "eight", "subspaces": [2, 3]}]
    dataset = ReftSupervisedDataset("subloreft", None, tok, dataset=rows, input_field="input",
                                    instruction_field="instruction", output_field="output",
                                    **{"num_interventions": 1, "position": "l1", "share_weights": False})
    collator = ReftDataCollator(DataCollatorForSeq2Seq(tokenizer=tok, label_pad_token_id=-100, padding="longest"))
    batch = collator([dataset[0], dataset[1]])
    reft = reft_on(base_model(), rank=4, cls=SubspaceLoreft)
    trainer = ReftTrainerForCausalLM(model=reft, tokenizer=tok, args=args(tmp_path), train_dataset=dataset,
                                     data_collator=collator)
    with torch.no_grad():
        loss = trainer.compute_loss(reft, dict(batch))
        via_pyvene = pyvene_call(reft, batch, labels=batch["labels"],
                                 subspaces=batch["subspaces"].permute(1, 0, 2).tolist()).loss
        full_rank = pyvene_call(reft, batch, labels=batch["labels"], subspaces=[[[0, 1, 2, 3]] * 2]).loss
    assert abs(loss.item() - via_pyvene.item()) < 1e-5
    assert abs(loss.item() - full_rank.item()) > 1e-4  # the subspaces do restrict the edit


# -- sequence classification ----------------------------------------------------------------------------
class GlueStyleDataset(ReftDataset):
    def preprocess(self, kwargs):
        self.pad_mode = "last"
        self.fields_to_pad = ["input_ids"]

    def tokenize(self, data_item):
        ids = tokenize_text(self.tokenizer, data_item["sentence"])
        return {"input_ids": ids, "labels": data_item["label"]}, len(ids)


GLUE = [{"sentence": s, "label": y} for s, y in [("good movie !", 1), ("awful movie", 0), ("great great movie", 1),
                                                 ("bad bad movie .", 0), ("a good dog", 1), ("no , awful", 0)]]


def accuracy(prediction):
    return {"accuracy": float((prediction.predictions.argmax(-1) == prediction.label_ids).float().mean())}


def test_glue_flow_loss_evaluate_best_checkpoint_and_head_save(tmp_path):
    tok = tiny_tokenizer()
    kwargs = {"num_interventions": 2, "position": "f3+l3", "share_weights": False}  # short texts: repeated pads
    train = GlueStyleDataset("glue", None, tok, dataset=GLUE, **kwargs)
    evaluation = GlueStyleDataset("glue", None, tok, data_split="validation", dataset=GLUE[:4], **kwargs)
    collator = ReftDataCollator(data_collator=DataCollatorWithPadding(tokenizer=tok, padding="longest"))
    reft = reft_on(base_model(classes=2), layers=(0, 0), rank=2)
    for param in reft.model.score.parameters():  # train.py's allow_cls_grad
        param.requires_grad = True
    trainer = ReftTrainerForSequenceClassification(
        model=reft, tokenizer=tok, train_dataset=train, eval_dataset=evaluation, data_collator=collator,
        compute_metrics=accuracy,
        args=args(tmp_path, num_train_epochs=3, eval_strategy="epoch", save_strategy="epoch",
                  load_best_model_at_end=True, metric_for_best_model="accuracy", save_total_limit=1))

    batch = collator([train[i] for i in range(len(train))])
    assert batch["intervention_locations"][1].tolist() == [[0, 3, 3], [2, 3, 3]]  # "<s> awful movie" + pad
    with torch.no_grad():
        loss = trainer.compute_loss(reft, dict(batch))
        with hand_intervened(reft, batch["intervention_locations"]):
            logits = reft.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert abs(loss.item() - F.cross_entropy(logits, batch["labels"]).item()) < 1e-5

    trainer.train()
    assert list((tmp_path / "run").glob("checkpoint-*/intervenable_model/config.json"))
    assert any("eval_accuracy" in entry for entry in trainer.state.log_history)
    metrics = trainer.evaluate()
    eval_batch = collator([evaluation[i] for i in range(len(evaluation))])
    with torch.no_grad(), hand_intervened(reft, eval_batch["intervention_locations"]):
        logits = reft.model(input_ids=eval_batch["input_ids"], attention_mask=eval_batch["attention_mask"]).logits
    expected = (logits.argmax(-1) == eval_batch["labels"]).float().mean().item()
    assert metrics["eval_accuracy"] == pytest.approx(expected)

    assert trainer.state.best_model_checkpoint is not None  # load_best_model_at_end went through _load_weights
    trainer.save_model(str(tmp_path / "final"))
    with torch.no_grad():
        trained = pyvene_call(reft, eval_batch).logits
        for param in [*reft.interventions.parameters(), *reft.model.score.parameters()]:
            param.add_(0.5)
        assert (pyvene_call(reft, eval_batch).logits - trained).abs().max() > 1e-2
    trainer._load_from_checkpoint(str(tmp_path / "final"))  # resuming: in place, the exact tensors
    with torch.no_grad():
        assert torch.equal(pyvene_call(reft, eval_batch).logits, trained)
        for param in [*reft.interventions.parameters(), *reft.model.score.parameters()]:
            param.add_(0.5)
    load_intervenable_model(reft, tmp_path / "final" / "intervenable_model")  # a folder as pyreft writes it
    with torch.no_grad():
        torch.testing.assert_close(pyvene_call(reft, eval_batch).logits, trained, atol=2e-5, rtol=0)
    assert reft.model.score.weight.requires_grad and not reft.model.model.embed_tokens.weight.requires_grad
    fresh = base_model(classes=2)
    assert not torch.equal(fresh.score.weight, reft.model.score.weight)  # the head trained
    loaded = pyreft.ReftModel.load(str(tmp_path / "final" / "intervenable_model"), fresh, include_model=True)
    with torch.no_grad():
        torch.testing.assert_close(pyvene_call(loaded, eval_batch).logits, pyvene_call(reft, eval_batch).logits,
                                   atol=2e-5, rtol=0)


def test_classification_loss_by_problem_type():
    torch.manual_seed(0)
    model = base_model(classes=1)
    logits, labels = torch.randn(4, 1), torch.tensor([0.5, 1.0, 2.0, 3.5])
    assert torch.allclose(classification_loss(model, logits, labels), ((logits[:, 0] - labels) ** 2).mean())
    model = base_model(classes=3)
    logits, targets = torch.randn(4, 3), torch.tensor([[1.0, 0, 1], [0, 0, 1], [1, 1, 1], [0, 0, 0]])
    bce = -(targets * F.logsigmoid(logits) + (1 - targets) * F.logsigmoid(-logits)).mean()
    assert torch.allclose(classification_loss(model, logits, targets), bce)
    ids = torch.tensor([0, 2, 1, 1])
    assert torch.allclose(classification_loss(model, logits, ids), -F.log_softmax(logits, -1)[range(4), ids].mean())
    model.config.problem_type = "regression"
    assert torch.allclose(classification_loss(model, logits, targets), ((logits - targets) ** 2).mean())
