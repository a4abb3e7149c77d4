"""reftkit.training: label-only LM loss, ReftTrainer (optimizer, checkpoints, resume, DDP, FSDP2), classifier."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate.utils import FullyShardedDataParallelPlugin
from conftest import tiny_gpt2, tiny_llama
from ddp_worker import REFT_CONFIG, SGD, Collator, LMData, make_reft, train, train_classifier, training_args
from safetensors.torch import load_file
from transformers import TrainerCallback

import reftkit
from reftkit.anatomy import find_backbone_and_head
from reftkit.training import ReftForSequenceClassification, ReftTrainer, causal_lm_loss, load_interventions
from reftkit.training.distributed import check_fsdp_plugin

TESTS = Path(__file__).resolve().parent


def _weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def _trainer(reft, tmp_path, batch=2, steps=4, n=8, **overrides) -> ReftTrainer:
    return ReftTrainer(reft, training_args(str(tmp_path), batch, steps, **overrides), train_dataset=LMData(n),
                       data_collator=Collator(len(reft.interventions)))


# -- the label-only loss ----------------------------------------------------------------------
@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
def test_label_only_loss_equals_hf_loss(build, tmp_path):
    torch.manual_seed(1)
    reft = reftkit.get_reft_model(build(layers=2), REFT_CONFIG)
    trainer = _trainer(reft, tmp_path)
    batch = Collator(len(reft.interventions))([LMData(5, seed=3)[i] for i in range(5)])
    labelled = int((batch["labels"][:, 1:] != -100).sum())

    head = reft.model.get_output_embeddings()
    for _ in range(2):  # the suffix path checks its first batch and its first stored batch against the full path
        trainer.compute_loss(reft, batch)
    seen = []
    handle = head.register_forward_hook(lambda m, a, out: seen.append(tuple(out.shape)))
    ours = trainer.compute_loss(reft, batch)
    handle.remove()
    # the head ran once, on exactly the labelled rows: no vocabulary logits for other positions
    assert seen == [(labelled, head.out_features)]

    hf = reft(**batch).loss  # HF's own shifted loss, interventions active
    assert abs(ours.item() - hf.item()) <= 1e-6
    grads = torch.autograd.grad(ours, list(reft.interventions.parameters()))
    hf_grads = torch.autograd.grad(reft(**batch).loss, list(reft.interventions.parameters()))
    assert max((g - h).abs().max().item() for g, h in zip(grads, hf_grads)) <= 1e-6

    # gradient-accumulation-correct reduction: sum / num_items_in_batch, as HF does
    n = torch.tensor(labelled + 5)
    ours = trainer.compute_loss(reft, batch, num_items_in_batch=n)
    assert abs(ours.item() - reft(**batch, num_items_in_batch=n).loss.item()) <= 1e-6


def test_fallback_to_full_forward_matches(monkeypatch):
    reft = make_reft()
    batch = Collator(len(reft.interventions))([LMData(4)[i] for i in range(4)])
    label_only = causal_lm_loss(reft, **batch)["loss"]
    monkeypatch.setattr(reft.model, "get_output_embeddings", lambda: None)
    assert find_backbone_and_head(reft) is None
    full = causal_lm_loss(reft, **batch)
    assert full["logits"].dim() == 3  # all positions: the full forward ran
    assert abs(full["loss"].item() - label_only.item()) <= 1e-6


def test_no_labelled_token_gives_zero_not_nan():
    reft = make_reft()
    batch = Collator(len(reft.interventions))([LMData(2)[i] for i in range(2)])
    batch["labels"].fill_(-100)
    out = causal_lm_loss(reft, **batch)
    assert out["loss"].item() == 0.0 and out["logits"].shape[0] == 0


# -- trainer: optimizer, frozen base, checkpoints, resume --------------------------------------
def test_trains_only_interventions_and_checkpoints_hold_only_them(tmp_path):
    reft = make_reft()
    trainer = _trainer(reft, tmp_path, steps=4, save_strategy="steps", save_steps=2)
    assert trainer.args.remove_unused_columns is False
    base_before, iv_before = _weights(reft.model), _weights(reft.interventions)
    trainer.train()
    optimized = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert optimized == {id(p) for p in reft.interventions.parameters()}
    base_after = _weights(reft.model)
    assert all(torch.equal(base_before[k], base_after[k]) for k in base_before)  # bit-identical
    assert _max_diff(iv_before, _weights(reft.interventions)) > 1e-4
    ckpt = tmp_path / "checkpoint-4"
    files = set(os.listdir(ckpt))
    assert {"config.json", "interventions.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth",
            "trainer_state.json"} <= files
    assert not files & {"model.safetensors", "pytorch_model.bin"}
    assert load_file(str(ckpt / "interventions.safetensors")).keys() == reft.interventions.state_dict().keys()
    reloaded = reftkit.ReftModel.from_pretrained(tiny_llama(seed=0, layers=2), ckpt)
    assert _max_diff(_weights(reloaded.interventions), _weights(reft.interventions)) == 0.0
    trainer.eval_dataset = LMData(4, seed=7)
    assert "eval_loss" in trainer.evaluate()  # label_names fixed up: Trainer would find none


class _StopAt(TrainerCallback):
    """Simulates an interruption after `step` optimizer steps (the LR schedule is the full run's)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True
        return control


def test_resume_equals_uninterrupted(tmp_path):
    steps, stop, over = 7, 3, dict(gradient_accumulation_steps=2, n=12)  # 3 updates/epoch: crosses epochs
    full = make_reft()
    _trainer(full, tmp_path / "full", steps=steps, **over).train()

    first = make_reft()
    trainer = _trainer(first, tmp_path / "cut", steps=steps, save_strategy="steps", save_steps=stop, **over)
    trainer.add_callback(_StopAt(stop))
    trainer.train()
    assert trainer.state.global_step == stop

    resumed = make_reft(init_seed=123)  # other initial weights: they must come from the checkpoint
    trainer = _trainer(resumed, tmp_path / "cut", steps=steps, save_strategy="steps", save_steps=stop, **over)
    trainer.train(resume_from_checkpoint=str(tmp_path / "cut" / f"checkpoint-{stop}"))
    assert trainer.state.global_step == steps
    assert _max_diff(_weights(full.interventions), _weights(resumed.interventions)) <= 1e-6


def test_load_best_model_at_end_restores_best_interventions(tmp_path):
    reft = make_reft()
    args = training_args(str(tmp_path), 2, 4, eval_strategy="steps", eval_steps=1, save_strategy="steps",
                         save_steps=1, load_best_model_at_end=True, learning_rate=0.3)
    trainer = ReftTrainer(reft, args, train_dataset=LMData(8), eval_dataset=LMData(4, seed=7),
                          data_collator=Collator(len(reft.interventions)))
    trainer.train()
    best = trainer.state.best_model_checkpoint
    assert best is not None and not best.endswith("checkpoint-4")  # else the test would prove nothing
    saved = load_file(os.path.join(best, "interventions.safetensors"))
    assert _max_diff(saved, _weights(reft.interventions)) == 0.0


@pytest.mark.parametrize("batch,accumulate", [(4, 1), (2, 2)])
def test_update_is_sgd_on_the_token_mean_of_the_global_batch(batch, accumulate, tmp_path):
    reft = make_reft()
    _trainer(reft, tmp_path, batch=batch, steps=1, n=4, gradient_accumulation_steps=accumulate, **SGD,
             lr_scheduler_type="constant", warmup_steps=0).train()
    # reference: one SGD step on HF's own loss of the whole batch (mean over the shifted labels;
    # every third example labels position 0, which Trainer must not count)
    ref = make_reft()
    loss = ref(**Collator(len(ref.interventions))([LMData(4)[i] for i in range(4)])).loss
    names, params = zip(*ref.interventions.named_parameters())
    grads = torch.autograd.grad(loss, params)
    expected = {n: (p - SGD["learning_rate"] * g).detach() for n, p, g in zip(names, params, grads)}
    assert _max_diff(dict(reft.interventions.named_parameters()), expected) <= 1e-6


def test_ddp_two_processes_match_single_process(tmp_path):
    out = tmp_path / "ddp.safetensors"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(TESTS)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
           str(TESTS / "ddp_worker.py"), "--batch", "2", "--steps", "4", "--out", str(out), "--sgd"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    single = train(str(tmp_path / "single"), batch=4, steps=4, **SGD)  # same global batch, data order, steps
    assert _max_diff(load_file(str(out)), single) <= 1e-5


def test_fsdp2_two_processes_match_single_process_and_save_full_interventions(tmp_path):
    """FSDP2 over 2 CPU processes (gloo): training, checkpoints, resume, a classifier; see ddp_worker.fsdp_on_cpu."""
    out = tmp_path / "fsdp.safetensors"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(TESTS)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
           str(TESTS / "ddp_worker.py"), "--batch", "2", "--steps", "4", "--out", str(out), "--sgd",
           "--momentum", "0.5", "--fsdp"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # momentum gives the optimizer a state for resuming to restore; SGD keeps gradient-scale errors visible
    single = train(str(tmp_path / "single"), batch=4, steps=4, **SGD, optim_args="momentum=0.5")
    assert _max_diff(load_file(str(out)), single) <= 1e-5
    assert _max_diff(load_file(str(tmp_path / "fsdp.resumed.safetensors")), single) <= 1e-5  # from checkpoint-2

    ckpt = tmp_path / "checkpoint-4"
    files = set(os.listdir(ckpt))
    assert {"config.json", "interventions.safetensors", "optimizer.bin", "scheduler.pt"} <= files
    assert not [f for f in files if f.startswith(("pytorch_model", "model."))]  # the base model is never written
    saved = load_file(str(ckpt / "interventions.safetensors"))
    # full tensors, not one rank's shard (rotation.raw is [32, 4] in full, [16, 4] per rank)
    assert {k: v.shape for k, v in saved.items()} == {k: v.shape for k, v in single.items()}
    assert _max_diff(saved, single) <= 1e-5
    reloaded = reftkit.ReftModel.from_pretrained(tiny_llama(seed=0, layers=2), ckpt)
    assert _max_diff(_weights(reloaded.interventions), saved) == 0.0
    into = make_reft(init_seed=7)
    load_interventions(into, ckpt)
    assert _max_diff(_weights(into.interventions), saved) == 0.0

    # a classifier: the head is gathered and saved with the interventions
    train_classifier(str(tmp_path / "single_classifier"), batch=4, steps=4, **SGD, optim_args="momentum=0.5")
    for name in ("interventions.safetensors", "head.safetensors"):
        ours, ref = (load_file(str(tmp_path / folder / name)) for folder in ("classifier", "single_classifier"))
        assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in ref.items()}
        assert _max_diff(ours, ref) <= 1e-5, name
    clf = ReftForSequenceClassification.from_pretrained(tiny_llama(seed=0, layers=2), tmp_path / "classifier")
    assert clf.head.weight.shape == (3, 32)


def _plugin(**overrides) -> FullyShardedDataParallelPlugin:
    return FullyShardedDataParallelPlugin(**{"fsdp_version": 2, "auto_wrap_policy": "transformer_based_wrap",
                                             **overrides})


def test_fsdp_plugin_defaults_to_the_decoder_layers_and_refuses_what_cannot_work():
    base = tiny_llama(layers=1)
    plugin = _plugin()
    check_fsdp_plugin(plugin, base)
    assert plugin.transformer_cls_names_to_wrap == ["LlamaDecoderLayer"]  # a ReftModel has no _no_split_modules
    with pytest.raises(ValueError, match=r"supports FSDP2 only, got fsdp_config\['version'\]=1"):
        check_fsdp_plugin(_plugin(fsdp_version=1, sync_module_states=False), base)
    with pytest.raises(ValueError, match=r"fsdp_config\['activation_checkpointing'\]=True"):
        check_fsdp_plugin(_plugin(activation_checkpointing=True), base)
    with pytest.raises(ValueError, match=r"names \['LlamaForCausalLM'\]"):
        check_fsdp_plugin(_plugin(transformer_cls_names_to_wrap=["LlamaForCausalLM"]), base)


# -- sequence classification -----------------------------------------------------------------
class ClsData(torch.utils.data.Dataset):
    """The class is the first token's residue mod 3: learnable from the last token's state."""

    def __init__(self, n: int) -> None:
        g = torch.Generator().manual_seed(0)
        self.items = []
        for _ in range(n):
            ids = torch.randint(3, 101, (int(torch.randint(3, 7, (1,), generator=g)),), generator=g).tolist()
            self.items.append({"input_ids": ids, "label": ids[0] % 3})

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]


def cls_collate(features: list[dict]) -> dict[str, torch.Tensor]:
    width = max(len(f["input_ids"]) for f in features)
    return {"input_ids": torch.tensor([f["input_ids"] + [0] * (width - len(f["input_ids"])) for f in features]),
            "attention_mask": torch.tensor([[1] * len(f["input_ids"]) + [0] * (width - len(f["input_ids"]))
                                            for f in features]),
            "labels": torch.tensor([f["label"] for f in features])}


def test_classifier_learns_and_round_trips(tmp_path):
    torch.manual_seed(0)
    reft = reftkit.get_reft_model(tiny_llama(seed=0, layers=2), REFT_CONFIG)
    clf = ReftForSequenceClassification(reft, num_labels=3, pooling="last")
    data = ClsData(24)
    args = training_args(str(tmp_path), 8, 30, learning_rate=5e-2, warmup_steps=0)
    trainer = ReftTrainer(clf, args, train_dataset=data, eval_dataset=data, data_collator=cls_collate)
    before = trainer.evaluate()["eval_loss"]
    base_before = _weights(reft.model)
    trainer.train()
    after = trainer.evaluate()["eval_loss"]
    assert after < before - 0.1, (before, after)
    assert all(torch.equal(v, reft.model.state_dict()[k]) for k, v in base_before.items())
    assert {id(p) for g in trainer.optimizer.param_groups for p in g["params"]} == \
        {id(p) for p in [*reft.interventions.parameters(), *clf.head.parameters()]}

    trainer.save_model(str(tmp_path / "final"))
    files = set(os.listdir(tmp_path / "final"))
    assert {"head.safetensors", "head_config.json", "interventions.safetensors", "config.json"} <= files
    loaded = ReftForSequenceClassification.from_pretrained(tiny_llama(seed=0, layers=2), tmp_path / "final")
    batch = cls_collate([data[i] for i in range(5)])
    assert torch.allclose(loaded(**batch).logits, clf(**batch).logits, atol=1e-6)
    # the resume path loads into an existing classifier
    torch.manual_seed(9)
    fresh = ReftForSequenceClassification(
        reftkit.get_reft_model(tiny_llama(seed=0, layers=2), REFT_CONFIG), 3)
    ReftTrainer(fresh, args)._load_from_checkpoint(str(tmp_path / "final"))
    assert torch.allclose(fresh(**batch).logits, clf(**batch).logits, atol=1e-6)


def test_classifier_label_out_of_range():
    clf = ReftForSequenceClassification(make_reft(), num_labels=3)
    batch = cls_collate([{"input_ids": [5, 6, 7], "label": 0}, {"input_ids": [8, 9], "label": 5}])
    with pytest.raises(ValueError, match="label 5 is out of range for 3 classes"):
        clf(**batch)


@pytest.mark.parametrize("pooling,expected", [("last", [2.0, 1.0]), ("first", [0.0, 0.0]), ("mean", [1.0, 0.5])])
def test_pooling(pooling, expected):
    clf = ReftForSequenceClassification(make_reft(), num_labels=2, pooling=pooling)
    hidden = torch.arange(3.0)[None, :, None].expand(2, 3, 4)
    pooled = clf.pool(hidden, torch.tensor([[1, 1, 1], [1, 1, 0]]))
    assert pooled[:, 0].tolist() == expected
