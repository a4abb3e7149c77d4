"""Weight-space and prompt baselines behind the interface of a :class:`reftkit.ReftModel`.

A :class:`WeightSpaceModel` wraps a base model adapted by LoRA, IA3, prefix tuning, P-Tuning v2,
P-tuning or prompt tuning (all through ``peft``), by SVF (:mod:`reftkit.analysis.svf`, written here) or
by full-parameter fine-tuning (FPFT, on a copy of the base). It trains with the same data modules and
:class:`reftkit.ReftTrainer` as the interventions (the intervention locations in a batch are ignored),
generates, counts its parameters exactly, saves only what was trained, and gives the base back.

Method names (:data:`WEIGHT_SPACE_METHODS`) and what they build:

==================  =====================================================================================
``lora``            ``peft.LoraConfig`` — Hu et al. 2021, "LoRA"
``ia3``             ``peft.IA3Config`` — Liu et al. 2022, "Few-Shot Parameter-Efficient Fine-Tuning ..."
``prefix_tuning``   ``peft.PrefixTuningConfig(prefix_projection=True)`` — Li & Liang 2021 (MLP re-parametrised)
``p_tuning_v2``     ``peft.PrefixTuningConfig(prefix_projection=False)`` — Liu et al. 2022, "P-Tuning v2":
                    deep prompts (a key/value prefix at every layer) without re-parametrisation
``p_tuning``        ``peft.PromptEncoderConfig`` — Liu et al. 2021, "GPT Understands, Too" (MLP prompt encoder)
``prompt_tuning``   ``peft.PromptTuningConfig`` — Lester et al. 2021, "The Power of Scale ..."
``svf``             :func:`reftkit.analysis.svf.apply_svf` — Sun et al. 2025, "Transformer²"
``fpft``            every base parameter trained, on a deep copy (the reference row of every paper table)
==================  =====================================================================================

P-tuning as published places its pseudo tokens in a template around the input, with anchor tokens and a
bidirectional-LSTM + MLP prompt encoder; peft's ``p_tuning`` above only prepends them. That form is
:func:`reftkit.analysis.ptuning.get_ptuning_model` (a template such as ``"[P*3] {input} [P*2] ? [P]
{output}"``, encoder ``"lstm"``, ``"mlp"`` or ``"none"``), the ``p_tuning_template`` method of
:func:`reftkit.analysis.compare`.
"""
from __future__ import annotations

import contextlib
import copy
import json
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from . import svf as svf_module

PEFT_METHODS = ("lora", "ia3", "prefix_tuning", "p_tuning_v2", "p_tuning", "prompt_tuning")
WEIGHT_SPACE_METHODS = PEFT_METHODS + ("svf", "fpft")
PROMPT_METHODS = ("prefix_tuning", "p_tuning_v2", "p_tuning", "prompt_tuning")
FPFT_CONFIG_NAME = "fpft_config.json"
# peft saves an encoder-based prompt (prefix tuning's MLP, P-tuning's encoder) as the prompt it computes,
# enough to run but not to resume training; the encoder's own weights go to this file too.
ENCODER_STATE_NAME = "prompt_encoder_training_state.safetensors"
_ENCODER_METHODS = ("prefix_tuning", "p_tuning")
# Inputs of a reftkit call that only interventions can use: a weight-space model ignores positions,
# but silently ignoring a task or a source would give wrong results, so those are refused.
_IGNORED_INPUTS = ("intervention_locations",)
_REFUSED_INPUTS = ("sources", "source_locations", "subspaces", "tasks")


def _peft_config(method: str, options: dict[str, Any]) -> Any:
    import peft

    options = dict(options)
    options.setdefault("task_type", "CAUSAL_LM")
    if method == "lora":
        options.setdefault("target_modules", "all-linear")
        return peft.LoraConfig(**options)
    if method == "ia3":
        return peft.IA3Config(**options)
    if method in ("prefix_tuning", "p_tuning_v2"):
        projection = method == "prefix_tuning"
        if options.get("prefix_projection", projection) != projection:
            raise ValueError(f"{method} means prefix_projection={projection}; "
                             f"use {'p_tuning_v2' if projection else 'prefix_tuning'} for the other")
        options["prefix_projection"] = projection
        options.setdefault("num_virtual_tokens", 10)
        return peft.PrefixTuningConfig(**options)
    if method == "p_tuning":
        options.setdefault("num_virtual_tokens", 10)
        return peft.PromptEncoderConfig(**options)
    if method == "prompt_tuning":
        options.setdefault("num_virtual_tokens", 10)
        return peft.PromptTuningConfig(**options)
    raise ValueError(f"method={method!r} is not a peft method; choose one of {PEFT_METHODS}")


def _base_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


class WeightSpaceModel(nn.Module):
    """A base model adapted in weight space (or by learned virtual tokens), used like a ``ReftModel``.

    ``model`` is the module the forward runs: the HF model itself (LoRA, IA3, SVF and FPFT adapt its
    layers in place or on a copy) or peft's wrapper (prompt methods prepend virtual tokens or a
    key/value prefix, so the full forward is needed). Build one with :func:`get_weight_space_model`.
    """

    def __init__(self, model: nn.Module, method: str, base: nn.Module, base_parameter_count: int,
                 peft_model: Any = None) -> None:
        super().__init__()
        self.model = model
        self.method = method
        # Not registered as submodules: `base` is the untouched original for FPFT (never trained)
        # and `peft_model` wraps `model` (its parameters would be listed twice).
        self._refs = {"base": base, "peft": peft_model}
        self.base_parameter_count = base_parameter_count
        self._detached = False

    # -- what ReftTrainer and the loss look for ------------------------------------------------------
    @property
    def label_only_loss(self) -> bool:
        """False for the prompt methods: their virtual tokens enter through peft's own forward."""
        return self.method not in PROMPT_METHODS

    @property
    def config(self) -> Any:
        return self.model.config

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def peft_model(self) -> Any:
        return self._refs["peft"]

    @property
    def base_model(self) -> nn.Module:
        """The unadapted model (for FPFT the original, which training never touches)."""
        return self._refs["base"]

    def _check_live(self) -> None:
        if self._detached:
            raise RuntimeError("this WeightSpaceModel was detached; build a new one with get_weight_space_model")

    @staticmethod
    def _drop_reft_inputs(kwargs: dict[str, Any]) -> dict[str, Any]:
        refused = [k for k in _REFUSED_INPUTS if kwargs.get(k) is not None]
        if refused:
            raise ValueError(f"{refused[0]}= is an intervention input; a weight-space model has no interventions "
                             "to route or feed")
        return {k: v for k, v in kwargs.items() if k not in _IGNORED_INPUTS + _REFUSED_INPUTS}

    @contextlib.contextmanager
    def intervening(self, input_ids: Any = None, attention_mask: Any = None, intervention_locations: Any = None,
                    inputs_embeds: Any = None, **call: Any) -> Iterator[None]:
        """No interventions to arm (the adaptation is in the weights); kept so the training loss and
        evaluation code treat both kinds of model alike."""
        self._check_live()
        self._drop_reft_inputs(call)
        yield

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                **kwargs: Any) -> Any:
        self._check_live()
        return self.model(input_ids=input_ids, attention_mask=attention_mask, **self._drop_reft_inputs(kwargs))

    def generate(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                 **kwargs: Any) -> torch.Tensor:
        """Like the model's ``generate``: returns the prompt followed by the new tokens. The prompt methods
        feed their virtual tokens or key/value prefix to the base model's ``generate`` themselves: peft's own
        ``generate`` drops them with transformers >= 5.24 (``cache`` renamed ``past_key_values``)."""
        self._check_live()
        kwargs = self._drop_reft_inputs(kwargs)
        if self.method in PROMPT_METHODS:
            return _generate_with_prompt(self.peft_model, self.method, input_ids, attention_mask, kwargs)
        return self.model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    # -- parameters ------------------------------------------------------------------------------------
    def trained_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def parameter_counts(self) -> dict[str, int]:
        """``trainable``: parameters the optimizer updates; ``model``: the base model's own parameters
        (adapter tensors excluded), so ``trainable / model`` is the share every PEFT table reports."""
        return {"trainable": sum(p.numel() for p in self.trained_parameters()), "model": self.base_parameter_count}

    def print_trainable_parameters(self) -> str:
        counts = self.parameter_counts()
        text = (f"{self.method}: trainable params: {counts['trainable']:,} || model params: {counts['model']:,} || "
                f"trainable%: {100.0 * counts['trainable'] / max(counts['model'], 1):.6f}")
        print(text)
        return text

    # -- adapting on and off -----------------------------------------------------------------------------
    @contextlib.contextmanager
    def disabled(self) -> Iterator[None]:
        """Behave as the base model for the duration of the block (for representation comparisons)."""
        self._check_live()
        if self.method == "fpft":
            raise NotImplementedError("full fine-tuning trained a copy; the base is .base_model — compare "
                                      "against it (base=adapted.base_model)")
        if self.method == "svf":
            with svf_module.svf_disabled(self.model):
                yield
            return
        with self.peft_model.disable_adapter():
            yield

    def detach(self) -> nn.Module:
        """Remove the adaptation and return the base model, bit-identical to before (LoRA/IA3 layers are
        unloaded without merging, SVF's original linears put back, FPFT's copy dropped)."""
        self._check_live()
        base = self.base_model
        if self.method == "svf":
            svf_module.remove_svf(self.model)
        elif self.method in PEFT_METHODS and self.method not in PROMPT_METHODS:
            self.peft_model.unload()
        self._detached = True
        return base

    # -- saving ---------------------------------------------------------------------------------------------
    def save_pretrained(self, path: str | Path) -> Path:
        """Only what was trained: peft's ``adapter_model.safetensors`` + ``adapter_config.json``, SVF's
        z vectors, or (FPFT) the whole model in safetensors."""
        self._check_live()
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        if self.method == "svf":
            svf_module.save_svf(self.model, path)
        elif self.method == "fpft":
            self.model.save_pretrained(path, safe_serialization=True)
            (path / FPFT_CONFIG_NAME).write_text(json.dumps({"method": "fpft"}))
        else:
            self.peft_model.save_pretrained(str(path), safe_serialization=True)
            if self.method in _ENCODER_METHODS:
                from safetensors.torch import save_file

                encoder = self.peft_model.prompt_encoder[self.peft_model.active_adapter]
                save_file({k: v.detach().cpu().contiguous() for k, v in encoder.state_dict().items()},
                          str(path / ENCODER_STATE_NAME))
        return path

    def load_trained(self, path: str | Path) -> None:
        """Load weights saved by :meth:`save_pretrained` of the same method (trainer resume, best model)."""
        self._check_live()
        path = Path(path)
        if self.method == "svf":
            svf_module.load_svf(self.model, path)
        elif self.method == "fpft":
            from safetensors.torch import load_file

            files = sorted(path.glob("*.safetensors"))
            if not files:
                raise FileNotFoundError(f"{path}: no safetensors weights of a fully fine-tuned model")
            state = {}
            for file in files:
                state.update(load_file(str(file)))
            missing, unexpected = self.model.load_state_dict(state, strict=False)
            if unexpected:
                raise ValueError(f"{path}: weights {unexpected[:3]} do not belong to {type(self.model).__name__}")
        elif self.method in _ENCODER_METHODS:
            from safetensors.torch import load_file

            state_file = path / ENCODER_STATE_NAME
            if not state_file.is_file():
                raise FileNotFoundError(f"{state_file} not found: {self.method} resumes from its encoder's weights")
            encoder = self.peft_model.prompt_encoder[self.peft_model.active_adapter]
            encoder.load_state_dict(load_file(str(state_file)))
        else:
            from peft import set_peft_model_state_dict
            from peft.utils import load_peft_weights

            set_peft_model_state_dict(self.peft_model, load_peft_weights(str(path)))

    def saved_size(self, path: str | Path) -> int:
        """Bytes of the weights a deployment needs, in a folder written by :meth:`save_pretrained` (the
        prompt encoders' training state is not counted: peft's file alone runs the model)."""
        return saved_weights_size(path)


def _cache_argument(model: nn.Module) -> str:
    """The name under which this transformers' ``generate`` takes a ready KV cache: ``cache`` since it was
    renamed (``past_key_values`` is then a deprecated alias), ``past_key_values`` before."""
    import inspect

    parameters = inspect.signature(type(model).prepare_inputs_for_generation).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def _versions() -> str:
    import peft
    import transformers

    return f"transformers {transformers.__version__}, peft {peft.__version__}"


@torch.no_grad()  # generation is not differentiated; the prompt encoders would build a graph
def _generate_with_prompt(peft_model: Any, method: str, input_ids: torch.Tensor | None,
                          attention_mask: torch.Tensor | None, kwargs: dict[str, Any]) -> torch.Tensor:
    """Generate with a prompt method's virtual tokens (prompt tuning, P-tuning) or key/value prefix (prefix
    tuning, P-Tuning v2) through the base model's own ``generate``.

    Why not ``peft_model.generate``: peft (0.21) injects the prefix and the virtual tokens in
    ``prepare_inputs_for_generation`` under the key ``past_key_values``, while transformers 5.x (from the
    release that renamed the argument to ``cache``) hands its cache over as ``cache``. peft then never sees
    the cache: the prefix it injects is ignored (prefix tuning and P-Tuning v2 generate what the bare model
    generates, with a shifted mask), and the virtual tokens are fed again at every decoding step (prompt
    tuning and P-tuning drift after the first tokens) — all without an error. Building the inputs here
    keeps generation equal to greedy decoding by peft's own forward, the one training uses.
    """
    if input_ids is None:
        raise ValueError(f"{method} generates from input_ids=; pass the tokenized prompts (inputs_embeds is not "
                         "supported for the prompt methods)")
    taken = [k for k in ("inputs_embeds", "cache", "past_key_values", "position_ids") if kwargs.get(k) is not None]
    if taken:
        raise ValueError(f"{taken[0]}= cannot be passed to a {method} model's generate: its virtual tokens or "
                         "prefix fill the cache and set the positions; pass input_ids and attention_mask only")
    config = peft_model.active_peft_config
    batch, virtual = input_ids.shape[0], config.num_virtual_tokens
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    # every row sees all virtual tokens, as in peft's forward
    mask = torch.cat([attention_mask.new_ones(batch, virtual), attention_mask], dim=1)
    base = peft_model.get_base_model()
    if method in ("prefix_tuning", "p_tuning_v2"):
        from transformers import Cache

        cache = peft_model.get_prompt(batch_size=batch)
        if not isinstance(cache, Cache) or cache.get_seq_length() != virtual:
            raise RuntimeError(f"{method}: peft's prefix for {type(base).__name__} is a {type(cache).__name__} "
                               f"holding {getattr(cache, 'get_seq_length', lambda: '?')()} positions, not a "
                               f"transformers Cache of {virtual} ({_versions()}); this model type is not supported "
                               "for generation here")
        out = base.generate(input_ids=input_ids, attention_mask=mask, **{_cache_argument(base): cache}, **kwargs)
        # The cache must have grown by the prompt (and all but the last new token): if generate set up a
        # cache of its own, the prefix was silently dropped.
        if cache.get_seq_length() < virtual + input_ids.shape[1]:
            raise RuntimeError(f"{method}: generate did not use the key/value prefix (its cache holds "
                               f"{cache.get_seq_length()} positions, expected at least {virtual + input_ids.shape[1]}) "
                               f"with {_versions()}; the generations would be the bare model's")
        return out
    embeds = peft_model.word_embeddings(input_ids)
    prompts = peft_model.get_prompt(batch_size=batch).to(embeds.dtype)
    # from embeddings alone HF's generate returns only the new tokens
    new = base.generate(inputs_embeds=torch.cat([prompts, embeds], dim=1), attention_mask=mask, **kwargs)
    return torch.cat([input_ids, new.to(input_ids.device)], dim=1)


def saved_weights_size(path: str | Path) -> int:
    """Bytes of the ``*.safetensors`` files in ``path`` (a ReftModel's or a baseline's save folder), less
    the prompt encoders' training state."""
    return sum(f.stat().st_size for f in Path(path).glob("*.safetensors") if f.name != ENCODER_STATE_NAME)


def get_weight_space_model(model: nn.Module, method: str, **options: Any) -> WeightSpaceModel:
    """Adapt ``model`` by ``method`` (see the module docstring) with the method's options (peft config
    fields for the peft methods; :func:`~reftkit.analysis.svf.apply_svf` arguments for ``svf``; none for
    ``fpft``). LoRA, IA3 and SVF change ``model`` in place until :meth:`WeightSpaceModel.detach`."""
    if method not in WEIGHT_SPACE_METHODS:
        raise ValueError(f"method={method!r} is not a weight-space method; choose one of {WEIGHT_SPACE_METHODS}")
    if getattr(model, "peft_config", None) is not None or svf_module.svf_modules(model):
        raise ValueError(f"{type(model).__name__} is already adapted (peft or SVF layers found); detach that "
                         "adaptation first")
    count = _base_count(model)
    if method == "fpft":
        if options:
            raise TypeError(f"fpft takes no options, got {sorted(options)}")
        trained = copy.deepcopy(model)
        for p in trained.parameters():
            p.requires_grad_(True)
        return WeightSpaceModel(trained, method, base=model, base_parameter_count=count)
    if method == "svf":
        svf_module.apply_svf(model, **options)
        return WeightSpaceModel(model, method, base=model, base_parameter_count=count)
    from peft import get_peft_model

    for p in model.parameters():
        p.requires_grad_(False)
    peft_model = get_peft_model(model, _peft_config(method, options))
    runs = peft_model if method in PROMPT_METHODS else peft_model.base_model.model
    return WeightSpaceModel(runs, method, base=model, base_parameter_count=count,
                            peft_model=peft_model)
