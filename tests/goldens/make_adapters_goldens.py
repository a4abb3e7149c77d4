"""Generate `adapters` 1.3 golden files for reftkit's bottleneck-adapter / AdapterFusion tests.

Run ONLY inside the throwaway venv created by ``make_adapters_goldens.sh`` (adapters==1.3.0,
transformers~=4.57.6, torch==2.13.0 CPU). Nothing is downloaded: the tiny base models are built
from configs with fixed seeds, and their weights are saved, so the test does not depend on
transformers 4.57 and 5.x initialising alike.

Every weight that matters is perturbed away from its near-identity init (LayerNorm weights and
biases of the base model included, adapters' up-projections, fusion query/key/value), so a wrong
placement, a forgotten LayerNorm or a mis-mapped tensor fails the test by a wide margin.

Output layout (tests/goldens/adapters/):

    manifest.json                 model configs, inputs, every case's adapters/fusion config,
                                  active setup and the max |adapters - base| of its output
    <arch>/base.safetensors       the tiny base model's state dict (before ``adapters.init``)
    <arch>/golden.safetensors     input_ids, attention_mask (right-padded), "base" output and
                                  one output per case (last_hidden_state of BertModel / LlamaModel)
    <arch>/<case>.safetensors     the case's adapter and fusion tensors, named as in adapters'
                                  ``model.state_dict()``
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys

import torch

try:
    import adapters
    import transformers
    from adapters import AdapterFusionConfig, DoubleSeqBnConfig, SeqBnConfig
    from adapters.composition import Fuse
    from safetensors.torch import save_file
except ImportError as exc:  # pragma: no cover - guidance only
    sys.exit(f"import failed ({exc}); run via `bash tests/goldens/make_adapters_goldens.sh`, which builds the "
             "throwaway venv with adapters==1.3.0")

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_OUT = os.path.join(HERE, "adapters")

SEED = 20250
VOCAB = 96
PAD_ID = 0
SEQ_LENS = [7, 5, 3]  # right-padded to 7

MODEL_CONFIGS = {
    "bert": dict(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                 intermediate_size=32, max_position_embeddings=32, type_vocab_size=2, hidden_act="gelu",
                 layer_norm_eps=1e-12, pad_token_id=PAD_ID),
    "llama": dict(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                  num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64, rms_norm_eps=1e-6,
                  pad_token_id=PAD_ID, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False),
}

# case -> (adapters: [(name, config class, kwargs)], fusion: None | (config name, overrides))
CASES = {
    "houlsby": ([("h", DoubleSeqBnConfig, dict(reduction_factor=8))], None),
    "pfeiffer": ([("p", SeqBnConfig, dict(reduction_factor=8))], None),
    "houlsby_variant": ([("hv", DoubleSeqBnConfig, dict(reduction_factor=4, non_linearity="gelu", ln_before=True,
                                                       ln_after=True, adapter_residual_before_ln=True,
                                                       scaling="channel"))], None),
    "pfeiffer_variant": ([("pv", SeqBnConfig, dict(reduction_factor=4, non_linearity="tanh", ln_after=True,
                                                   scaling="learned", leave_out=[0]))], None),
    "fusion_pfeiffer": ([("a", SeqBnConfig, dict(reduction_factor=8)),
                         ("b", SeqBnConfig, dict(reduction_factor=4, non_linearity="gelu")),
                         ("c", SeqBnConfig, dict(reduction_factor=8, non_linearity="swish"))],
                        ("dynamic", {})),
    "fusion_houlsby": ([("a", DoubleSeqBnConfig, dict(reduction_factor=8)),
                        ("b", DoubleSeqBnConfig, dict(reduction_factor=4, non_linearity="relu"))],
                       ("static", {})),
    "fusion_residual_before": ([("a", DoubleSeqBnConfig, dict(reduction_factor=8)),
                                ("b", DoubleSeqBnConfig, dict(reduction_factor=4, non_linearity="relu"))],
                               ("dynamic", dict(residual_before=True, value_before_softmax=False))),
}


def build_base(arch: str) -> torch.nn.Module:
    torch.manual_seed(SEED)
    if arch == "bert":
        cfg = transformers.BertConfig(**MODEL_CONFIGS[arch])
        cfg._attn_implementation = "eager"
        model = transformers.BertModel(cfg, add_pooling_layer=False)
    else:
        cfg = transformers.LlamaConfig(**MODEL_CONFIGS[arch])
        cfg._attn_implementation = "eager"
        model = transformers.LlamaModel(cfg)
    with torch.no_grad():  # norms away from weight=1, bias=0, so a forgotten LayerNorm copy shows
        for name, param in model.named_parameters():
            if "norm" in name.lower():
                if name.endswith("weight"):
                    param.copy_(1.0 + 0.3 * torch.randn_like(param))
                else:
                    param.copy_(0.2 * torch.randn_like(param))
    return model.eval()


def make_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(SEED + 1)
    width = max(SEQ_LENS)
    ids = torch.full((len(SEQ_LENS), width), PAD_ID, dtype=torch.long)
    mask = torch.zeros((len(SEQ_LENS), width), dtype=torch.long)
    for i, n in enumerate(SEQ_LENS):
        ids[i, :n] = torch.randint(3, VOCAB, (n,), generator=g)
        mask[i, :n] = 1
    return ids, mask


def run(model: torch.nn.Module, arch: str, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask)
    return out.last_hidden_state.float().contiguous()


@torch.no_grad()
def randomise(model: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """Give every adapter / fusion tensor a non-trivial random value; return them by state-dict name."""
    g = torch.Generator().manual_seed(seed)

    def rand(shape):
        return torch.randn(shape, generator=g)

    norms = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.LayerNorm)}
    norms |= {id(m.bias) for m in model.modules() if isinstance(m, torch.nn.LayerNorm)}
    for name, param in model.named_parameters():
        if "adapters." not in name and "adapter_fusion_layer." not in name:
            continue
        if "adapter_fusion_layer." in name:
            if ".value." in name:
                param.copy_(torch.eye(param.shape[0]) + 0.2 * rand(param.shape))
            else:
                param.copy_(0.1 * rand(param.shape))
        elif name.endswith("scaling"):
            param.copy_(1.0 + 0.3 * rand(param.shape))
        elif id(param) in norms:
            param.copy_((1.0 + 0.3 * rand(param.shape)) if name.endswith("weight") else 0.2 * rand(param.shape))
        elif param.dim() == 2:
            param.copy_(0.3 * rand(param.shape))
        else:
            param.copy_(0.1 * rand(param.shape))
    # state_dict, not named_parameters: a module registered twice (adapters' LayerNorm before the
    # bottleneck is both adapter_norm_before and adapter_down.0) appears under both names there.
    return {name: tensor.detach().float().contiguous().clone() for name, tensor in model.state_dict().items()
            if "adapters." in name or "adapter_fusion_layer." in name}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=DEFAULT_OUT)
    args = parser.parse_args()
    torch.set_num_threads(1)
    # set_active_adapters() runs a dummy forward context before activating and warns about it
    logging.getLogger("adapters.model_mixin").setLevel(logging.ERROR)
    ids, mask = make_inputs()
    manifest = {
        "generator": "tests/goldens/make_adapters_goldens.py",
        "versions": {"adapters": adapters.__version__, "transformers": transformers.__version__,
                     "torch": torch.__version__},
        "seed": SEED, "pad_id": PAD_ID, "seq_lens": SEQ_LENS, "model_configs": MODEL_CONFIGS,
        "output": {"bert": "BertModel(add_pooling_layer=False).last_hidden_state",
                   "llama": "LlamaModel.last_hidden_state"},
        "attn_implementation": "eager",
        "cases": {},
    }
    for arch in ("bert", "llama"):
        folder = os.path.join(args.out, arch)
        os.makedirs(folder, exist_ok=True)
        base = build_base(arch)
        base_state = {k: v.detach().contiguous().clone() for k, v in base.state_dict().items()}
        save_file(base_state, os.path.join(folder, "base.safetensors"))
        golden = {"input_ids": ids, "attention_mask": mask, "base": run(base, arch, ids, mask)}
        manifest["cases"][arch] = {}
        for ci, (case, (specs, fusion)) in enumerate(CASES.items()):
            model = build_base(arch)
            model.load_state_dict({k: v for k, v in base_state.items()}, strict=True)
            adapters.init(model)
            configs = {}
            for name, cls, kwargs in specs:
                config = cls(**kwargs)
                model.add_adapter(name, config=config)
                configs[name] = config.to_dict()
            names = [name for name, _, _ in specs]
            fusion_config = None
            if fusion is None:
                model.set_active_adapters(names[0])
                setup = names[0]
            else:
                fusion_config = AdapterFusionConfig.load(fusion[0], **fusion[1])
                model.add_adapter_fusion(Fuse(*names), config=fusion_config)
                model.set_active_adapters(Fuse(*names))
                setup = "Fuse(" + ",".join(names) + ")"
            model.eval()
            tensors = randomise(model, SEED + 100 + ci)
            out = run(model, arch, ids, mask)
            real = mask.bool()
            change = float((out - golden["base"])[real].abs().max())
            assert change > 0.05, f"{arch}/{case}: adapters barely change the output ({change})"
            golden[case] = out
            save_file(tensors, os.path.join(folder, f"{case}.safetensors"))
            manifest["cases"][arch][case] = {
                "adapters": configs, "order": names, "active_setup": setup,
                "fusion_name": ",".join(names) if fusion is not None else None,
                "fusion_config": fusion_config.to_dict() if fusion_config is not None else None,
                "max_abs_change_vs_base": change, "num_tensors": len(tensors),
            }
            print(f"{arch}/{case}: {len(tensors)} tensors, max |adapters - base| = {change:.4f}")
        save_file({k: v.contiguous() for k, v in golden.items()}, os.path.join(folder, "golden.safetensors"))
    with open(os.path.join(args.out, "manifest.json"), "w") as handle:
        json.dump(manifest, handle, indent=1, sort_keys=True, default=str)
        handle.write("\n")


if __name__ == "__main__":
    main()
