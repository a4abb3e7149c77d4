"""The frozen base models the benchmarks run on: a tiny random Llama, SmolLM2-135M-Instruct, and a
random-weight model of Llama-2-7B's shape.

Random weights are enough for speed and memory: the cost of a step does not depend on the values.
"""
from __future__ import annotations

import torch

# the tiny model of every benchmark: 4 layers of width 64, about 0.4 M parameters
TINY_LLAMA = dict(
    vocab_size=1024, hidden_size=64, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False, initializer_range=0.1,
    pad_token_id=0, bos_token_id=1, eos_token_id=2)


def build_step_model(size: str) -> tuple[torch.nn.Module, int]:
    """``(model, pad token id)`` of the step benchmark, float32 on CPU: ``tiny`` or ``smollm2``."""
    import transformers
    if size == "tiny":
        cfg = transformers.LlamaConfig(**TINY_LLAMA)
        torch.manual_seed(0)
        model = transformers.LlamaForCausalLM(cfg).eval()
        return model, 0
    import reftkit
    model, tok = reftkit.load_model("smollm2")
    return model.float().eval(), tok.pad_token_id


def build_epoch_model(size: str, device: str, layers_override: int | None = None) -> tuple[torch.nn.Module, int]:
    """``(model, pad token id)`` of the epoch benchmark on ``device``: ``tiny`` and ``smollm2`` in float32,
    ``llama7b`` (Llama-2-7B's shape, ``layers_override`` layers if given) in bf16."""
    import transformers
    if size == "smollm2":
        import reftkit
        model, tok = reftkit.load_model("smollm2", dtype=torch.float32)
        return model.to(device).eval(), tok.pad_token_id
    if size == "tiny":
        cfg = transformers.LlamaConfig(**TINY_LLAMA)
        dtype = torch.float32
    else:  # Llama-2-7B's shape (meta-llama/Llama-2-7b-hf config.json), random weights, bf16
        cfg = transformers.LlamaConfig(
            vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=layers_override or 32,
            num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096, rms_norm_eps=1e-5,
            tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2)
        dtype = torch.bfloat16
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.LlamaForCausalLM._from_config(cfg, dtype=dtype)
    return model.eval(), 0
