"""Weight-space and prompt baselines: exact parameter counts (peft's own counts and formulas), the
trainer's loss against peft's own forward, training, saving, and giving the base back bit-identical."""
from __future__ import annotations

import pytest
import torch
from conftest import tiny_llama, tiny_tokenizer
from transformers import TrainingArguments

import reftkit
from reftkit.analysis.baselines import PROMPT_METHODS, WEIGHT_SPACE_METHODS, get_weight_space_model
from reftkit.training import ReftTrainer, causal_lm_loss

# tiny_llama: hidden 32, 4 heads of 8, 2 key/value heads (kv width 16), MLP 64, 3 layers
H, KV, MLP, L, N = 32, 16, 64, 3, 4
LINEARS = [(H, H), (H, KV), (H, KV), (H, H), (H, MLP), (H, MLP), (MLP, H)]  # q k v o gate up down (in, out)
OPTIONS = {"lora": {"r": 2}, "ia3": {}, "svf": {}, "fpft": {},
           **{m: {"num_virtual_tokens": N, "encoder_hidden_size": 16} for m in ("prefix_tuning", "p_tuning")},
           **{m: {"num_virtual_tokens": N} for m in ("p_tuning_v2", "prompt_tuning")}}
FORMULAS = {
    "lora": L * sum(2 * (i + o) for i, o in LINEARS),              # r·(in + out) per linear, r = 2
    "ia3": L * (KV + KV + MLP),                                     # peft's llama default: k, v, down (input side)
    "svf": L * 3 * min(H, MLP),                                     # Σ min(in, out) over the MLP matrices
    "prompt_tuning": N * H,                                         # one embedding per virtual token
    "p_tuning_v2": N * L * 2 * KV,                                  # a key and a value per layer per token
    # prefix tuning re-parametrised: token embeddings (kv width) -> MLP(16) -> L·2·kv
    "prefix_tuning": N * KV + (KV * 16 + 16) + (16 * L * 2 * KV + L * 2 * KV),
    # P-tuning: embeddings -> MLP encoder (in -> 16 -> 16 -> out) at the model width
    "p_tuning": N * H + (H * 16 + 16) + (16 * 16 + 16) + (16 * H + H),
}
BASE = sum(p.numel() for p in tiny_llama().parameters())
INPUTS = ["what is the capital of france ?", "define dog", "how many legs spider ?", "colour sky ?"] * 2
OUTPUTS = ["paris .", "animal that barks .", "eight .", "blue ."] * 2


@pytest.mark.parametrize("method", WEIGHT_SPACE_METHODS)
def test_parameter_counts_are_exact(method):
    adapted = get_weight_space_model(tiny_llama(), method, **OPTIONS[method])
    counts = adapted.parameter_counts()
    assert counts["model"] == BASE
    expected = BASE if method == "fpft" else FORMULAS[method]
    assert counts["trainable"] == expected
    if adapted.peft_model is not None:
        trainable, total = adapted.peft_model.get_nb_trainable_parameters()
        assert (trainable, total - trainable) == (counts["trainable"], BASE)


@pytest.mark.parametrize("method", ["lora", "ia3", "prompt_tuning", "prefix_tuning"])
def test_trainer_loss_equals_peft_forward_loss(method):
    """The label-only loss (LoRA, IA3) and the full-forward loss (prompt methods) both equal the loss
    peft's own model computes with its labels."""
    tok = tiny_tokenizer()
    torch.manual_seed(0)
    adapted = get_weight_space_model(tiny_llama(), method, **OPTIONS[method])
    with torch.no_grad():  # make the adaptation non-trivial
        for p in adapted.trained_parameters():
            p.add_(torch.randn_like(p) * 0.1)
    data = reftkit.make_last_position_supervised_data_module(tok, adapted, INPUTS[:4], OUTPUTS[:4])
    batch = data["data_collator"]([data["train_dataset"][i] for i in range(4)])
    ours = causal_lm_loss(adapted, **batch)["loss"]
    theirs = adapted.peft_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                labels=batch["labels"]).loss
    assert torch.allclose(ours, theirs, atol=1e-5), (float(ours), float(theirs))
    assert adapted.label_only_loss is (method not in PROMPT_METHODS)


@pytest.mark.parametrize("method", WEIGHT_SPACE_METHODS)
def test_trains_saves_loads_and_detaches(method, tmp_path):
    tok = tiny_tokenizer()
    model = tiny_llama()
    reference = {k: v.clone() for k, v in model.state_dict().items()}
    adapted = get_weight_space_model(model, method, **OPTIONS[method])
    data = reftkit.make_last_position_supervised_data_module(tok, adapted, INPUTS, OUTPUTS)
    batch = data["data_collator"]([data["train_dataset"][i] for i in range(len(INPUTS))])
    with torch.no_grad():
        before = float(causal_lm_loss(adapted, **batch)["loss"])
    args = TrainingArguments(output_dir=str(tmp_path / "run"), per_device_train_batch_size=4, num_train_epochs=15,
                             learning_rate={"fpft": 1e-3, "prompt_tuning": 0.3, "svf": 0.3}.get(method, 3e-2),
                             report_to=[], use_cpu=True,
                             save_strategy="no", disable_tqdm=True, seed=0)
    ReftTrainer(model=adapted, args=args, train_dataset=data["train_dataset"],
                data_collator=data["data_collator"]).train()
    adapted.eval()
    with torch.no_grad():
        after = float(causal_lm_loss(adapted, **batch)["loss"])
        logits = adapted(**batch).logits
    assert after < before - 0.05, (before, after)
    if method != "fpft":  # the frozen base never moves
        assert all(torch.equal(reference[k], v) for k, v in model.state_dict().items() if k in reference)
    adapted.save_pretrained(tmp_path / "saved")
    assert adapted.saved_size(tmp_path / "saved") > 0
    fresh = get_weight_space_model(tiny_llama(), method, **OPTIONS[method])
    fresh.load_trained(tmp_path / "saved")
    fresh.eval()
    with torch.no_grad():
        assert torch.allclose(fresh(**batch).logits, logits, atol=1e-5)
    generated = adapted.generate(input_ids=batch["input_ids"][:1, :3], attention_mask=batch["attention_mask"][:1, :3],
                                 max_new_tokens=2, do_sample=False, pad_token_id=0)
    assert generated.shape[1] >= 4
    base = adapted.detach()
    assert base is model
    assert set(base.state_dict()) == set(reference)
    assert all(torch.equal(reference[k], v) for k, v in base.state_dict().items())
    with pytest.raises(RuntimeError, match="detached"):
        adapted(**batch)


@pytest.mark.parametrize("method", ["lora", "svf", "prompt_tuning"])
def test_disabled_is_the_base_model(method):
    model = tiny_llama()
    ids = torch.randint(3, 100, (2, 6))
    with torch.no_grad():
        base = model(input_ids=ids).logits
        adapted = get_weight_space_model(model, method, **OPTIONS[method])
        for p in adapted.trained_parameters():
            p.add_(torch.randn_like(p) * 0.5)
        assert not torch.allclose(adapted(input_ids=ids).logits[:, -6:], base, atol=1e-4)
        with adapted.disabled():
            assert torch.allclose(adapted(input_ids=ids).logits[:, -6:], base, atol=1e-6)


def test_errors_name_the_value():
    with pytest.raises(ValueError, match="method='dora'"):
        get_weight_space_model(tiny_llama(), "dora")
    model = tiny_llama()
    get_weight_space_model(model, "lora", r=2)
    with pytest.raises(ValueError, match="already adapted"):
        get_weight_space_model(model, "svf")
    adapted = get_weight_space_model(tiny_llama(), "svf")
    with pytest.raises(ValueError, match="tasks= is an intervention input"):
        adapted(input_ids=torch.ones(1, 3, dtype=torch.long), tasks=["a"])
    with pytest.raises(ValueError, match="p_tuning_v2 means prefix_projection=False"):
        get_weight_space_model(tiny_llama(), "p_tuning_v2", prefix_projection=True)
    with pytest.raises(TypeError, match="fpft takes no options"):
        get_weight_space_model(tiny_llama(), "fpft", r=4)
    with pytest.raises(NotImplementedError, match="base_model"):
        with get_weight_space_model(tiny_llama(), "fpft").disabled():
            pass


def test_importing_analysis_loads_no_peft_nnsight_or_matplotlib():
    import subprocess
    import sys

    code = ("import sys, reftkit, reftkit.analysis as a; a.compare; a.sweep; a.representation_changes; "
            "print(sorted(m for m in ('peft', 'nnsight', 'matplotlib') if m in sys.modules))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip().splitlines()[-1] == "[]"
