"""Scaling interventions: (IA)^3.

(IA)^3 — "Infused Adapter by Inhibiting and Amplifying Inner Activations" (Liu et al., 2022, "Few-Shot
Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context Learning", arXiv:2205.05638,
section 3.3, the T-Few recipe) — learns one vector per edited activation and multiplies it in,
elementwise, at every position: ``l_k`` on the attention keys, ``l_v`` on the values and ``l_ff`` on
the feed-forward activation (the input of the FFN's down projection), all initialised to ones so
training starts from the unchanged model.

As a reftkit intervention that is :class:`IA3` attached with positions ``"all"`` at those sites;
:func:`ia3_representations` writes the config entries with the placement peft uses by default, so
a reftkit IA3 model computes what ``peft.get_peft_model(model, IA3Config(...))`` computes (checked to
1e-5 against peft 0.21 in ``tests/test_ia3.py``).
"""
from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import nn

from .base import Intervention, InterventionError


class IA3(Intervention):
    """``IA3(h) = l ⊙ h`` — a learned vector ``l`` of width ``d`` rescales each coordinate of ``h``.

    Source: Liu et al., 2022, arXiv:2205.05638, section 3.3, where attention becomes
    ``softmax(Q (l_k ⊙ K^T) / sqrt(d_k)) (l_v ⊙ V)`` and the FFN ``(l_ff ⊙ γ(W_1 x)) W_2``; peft 0.21's
    ``ia3.Linear`` computes the same as a target module's output times ``ia3_l``, or a feed-forward
    module's input times ``ia3_l``.

    ``l`` (the parameter ``scale``) starts at ones, so the attached model starts as the base model;
    ``init_ia3_weights=False`` draws it from ``N(0, 1)`` instead, as peft does (for tests). The
    product is computed in float32 and cast back to ``h``'s dtype.
    """

    name = "ia3"
    mixing = "parameters"  # Σ α_k (l_k ⊙ h) = (Σ α_k l_k) ⊙ h: a mixture of IA3 experts is an IA3 expert

    def __init__(self, embed_dim: int | None = None, init_ia3_weights: bool = True) -> None:
        if not isinstance(init_ia3_weights, bool):
            raise InterventionError(f"IA3: init_ia3_weights={init_ia3_weights!r} must be True or False")
        Intervention.__init__(self, embed_dim, init_ia3_weights=init_ia3_weights)

    def build(self, embed_dim: int) -> None:
        init = torch.ones if self.hparams["init_ia3_weights"] else torch.randn
        self.scale = nn.Parameter(init(embed_dim))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return (h.float() * self.scale).to(h.dtype)

    @classmethod
    def routed(cls, members: list["IA3"], h: torch.Tensor, which: torch.Tensor) -> torch.Tensor:
        """Row ``b`` of ``h`` by ``members[which[b]]`` (``which[b] == len(members)``: unchanged), in one product:
        ``l_{which[b]} ⊙ h_b``. A mixed-task batch's hooks use it instead of one call per task."""
        scales = torch.stack([m.scale for m in members] + [torch.ones_like(members[0].scale)])
        per_row = scales[which].view(h.shape[0], *([1] * (h.dim() - 2)), h.shape[-1])
        return (h.float() * per_row).to(h.dtype)


FAMILY: tuple[type[Intervention], ...] = (IA3,)
ALIASES: dict[str, type[Intervention]] = {"IA3Intervention": IA3}


# ----------------------------------------------------------------------------- placement

#: ``model_type -> (target_modules, feedforward_modules)``, copied from peft 0.21's
#: ``TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING`` and ``..._FEEDFORWARD_MODULES_MAPPING``
#: (decoder and encoder stacks reftkit resolves; peft's T5/BART/MoE entries are left out).
#: A target module's output is scaled; a feed-forward module's input is scaled.
PEFT_IA3_DEFAULTS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "llama": (("k_proj", "v_proj", "down_proj"), ("down_proj",)),
    "mistral": (("k_proj", "v_proj", "down_proj"), ("down_proj",)),
    "gemma": (("q_proj", "v_proj", "down_proj"), ("down_proj",)),
    "gemma2": (("q_proj", "v_proj", "down_proj"), ("down_proj",)),
    "gemma3_text": (("q_proj", "v_proj", "down_proj"), ("down_proj",)),
    "qwen2": (("q_proj", "v_proj", "down_proj"), ("down_proj",)),
    "qwen3": (("q_proj", "v_proj", "down_proj"), ("down_proj",)),
    "phi": (("q_proj", "v_proj", "fc2"), ("fc2",)),
    "gpt2": (("c_attn", "mlp.c_proj"), ("mlp.c_proj",)),
    "gpt_bigcode": (("c_attn", "mlp.c_proj"), ("mlp.c_proj",)),
    "gpt_neox": (("query_key_value", "dense_4h_to_h"), ("dense_4h_to_h",)),
    "gpt_neo": (("q_proj", "v_proj", "c_proj"), ("c_proj",)),
    "gptj": (("q_proj", "v_proj", "fc_out"), ("fc_out",)),
    "bloom": (("query_key_value", "mlp.dense_4h_to_h"), ("mlp.dense_4h_to_h",)),
    "falcon": (("query_key_value", "dense_4h_to_h"), ("dense_4h_to_h",)),
    "opt": (("q_proj", "k_proj", "fc2"), ("fc2",)),
    "bert": (("key", "value", "output.dense"), ("output.dense",)),
    # encoder-decoder models: both stacks, the decoder's cross-attention keys and values included
    "t5": (("k", "v", "wo"), ("wo",)),
    "mt5": (("k", "v", "wi_1"), ()),  # peft scales wi_1's output there, not an FFN input
    "bart": (("q_proj", "v_proj", "fc2"), ("fc2",)),
    "roberta": (("key", "value", "output.dense"), ("output.dense",)),
}


def _names(value: Any, field: str) -> tuple[str, ...]:
    if isinstance(value, str) or not isinstance(value, Iterable):
        raise InterventionError(f"ia3_representations: {field}={value!r} must be a list of module names "
                                "(peft's regex form is not supported)")
    names = tuple(value)
    if not all(isinstance(n, str) and n for n in names):
        raise InterventionError(f"ia3_representations: {field}={list(names)!r} must hold non-empty strings")
    return names


def ia3_representations(model: nn.Module, target_modules: Iterable[str] | None = None,
                        feedforward_modules: Iterable[str] | None = None, layers: Any = "all",
                        positions: str = "all", stack: str | None = None) -> list[dict[str, Any]]:
    """``ReftConfig`` entries that place :class:`IA3` where peft's ``IA3Config`` would.

    ``target_modules`` / ``feedforward_modules`` are module names matched as peft matches them (a
    module whose path is a name or ends with ``"." + name`` is a target; a target whose path ends with
    a feed-forward name has its *input* scaled, the others their output). Left out, they are peft
    0.21's defaults for the model's ``model_type`` (:data:`PEFT_IA3_DEFAULTS`): for Llama
    ``k_proj``, ``v_proj`` and ``down_proj``'s input — T-Few's keys, values and FFN activation; for
    GPT-2 the whole fused ``c_attn`` output (queries included, as peft does) and ``mlp.c_proj``'s input.

    Outputs of separate q/k/v projections get reftkit's component names (``key_output``, ...); every
    other site is a raw module path with a ``{layer}`` placeholder (e.g.
    ``"model.layers.{layer}.mlp.down_proj:input"``), which is exactly the tensor peft scales — not
    ``mlp_activation``, which for a gated MLP is ``act(gate)`` before ``* up`` and so equal only up
    to rounding. ``layers`` is ``"all"`` or a list of block indices (peft's ``layers_to_transform``);
    ``positions`` defaults to ``"all"`` (every real token), which is what IA3 means.

    Encoder-decoder models (T5, BART): ``stack="encoder"`` / ``"decoder"`` places IA3 in one stack; left out, in
    both, as peft does (the decoder's cross-attention keys and values get ``cross_key_output`` /
    ``cross_value_output``, whose positions count over the encoder input).
    """
    from reftkit.structure import StructureError, find_layers, is_encoder_decoder, resolve_site, stack_root

    if stack is None and is_encoder_decoder(model):
        return [entry for which in ("encoder", "decoder") for entry in ia3_representations(
            model, target_modules, feedforward_modules, layers, positions, which)]

    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if target_modules is None:
        if feedforward_modules is not None:
            raise InterventionError("ia3_representations: feedforward_modules was given without target_modules")
        if model_type not in PEFT_IA3_DEFAULTS:
            raise InterventionError(
                f"ia3_representations: model_type={model_type!r} has no IA3 default placement (known: "
                f"{sorted(PEFT_IA3_DEFAULTS)}); pass target_modules=[...] and feedforward_modules=[...]")
        targets, feedforward = PEFT_IA3_DEFAULTS[model_type]
    else:
        targets = _names(target_modules, "target_modules")
        feedforward = _names(feedforward_modules if feedforward_modules is not None else (), "feedforward_modules")
    if not targets:
        raise InterventionError("ia3_representations: target_modules=[] is empty")
    stray = [f for f in feedforward if f not in targets]
    if stray:  # peft's IA3Config rule
        raise InterventionError(f"ia3_representations: feedforward_modules={list(feedforward)!r} must be a subset "
                                f"of target_modules={list(targets)!r}; {stray[0]!r} is not in it")
    if not isinstance(positions, str):
        raise InterventionError(f"ia3_representations: positions={positions!r} must be a position string")

    try:
        layers_path, blocks = find_layers(model, stack)
        root = stack_root(model, stack)[0]
    except StructureError as err:
        raise InterventionError(f"ia3_representations: {err}") from None
    if layers == "all":
        chosen = list(range(len(blocks)))
    elif (isinstance(layers, (list, tuple)) and layers and all(
            isinstance(i, int) and not isinstance(i, bool) and 0 <= i < len(blocks) for i in layers)):
        chosen = sorted(set(layers))
    else:
        raise InterventionError(f"ia3_representations: layers={layers!r} must be 'all' or a non-empty list of "
                                f"block indices in [0, {len(blocks)})")

    def is_target(key: str) -> bool:
        return any(key == t or key.endswith("." + t) for t in targets)

    prefix = f"{layers_path}." if layers_path else ""
    in_stack = [key for key, _ in model.named_modules() if key and (not root or key.startswith(root + "."))]
    outside = [key for key in in_stack
               if is_target(key) and not any(key.startswith(f"{prefix}{i}.") for i in range(len(blocks)))]
    if outside:
        raise InterventionError(f"ia3_representations: target_modules={list(targets)!r} matches {outside[0]!r}, "
                                f"which is outside the layer stack {layers_path!r}; reftkit places IA3 per layer")

    # (relative path, hook) -> layers where it occurs, in module order
    sites: dict[tuple[str, str], list[int]] = {}
    for i in chosen:
        block_path = f"{prefix}{i}"
        for rel, _ in blocks[i].named_modules():
            if not rel or not is_target(f"{block_path}.{rel}"):
                continue
            hook = "input" if any(f"{block_path}.{rel}".endswith(f) for f in feedforward) else "output"
            sites.setdefault((rel, hook), []).append(i)
    if not sites:
        raise InterventionError(f"ia3_representations: target_modules={list(targets)!r} matches no module in the "
                                f"layers {chosen} of {type(model).__name__}")

    entries = []
    for (rel, hook), where in sites.items():
        component = f"{layers_path}.{{layer}}.{rel}:{hook}" if layers_path else f"{{layer}}.{rel}:{hook}"
        if hook == "output":
            cross = ("cross_query_output", "cross_key_output", "cross_value_output") if stack == "decoder" else ()
            for name in ("query_output", "key_output", "value_output", *cross):
                try:
                    named = [resolve_site(model, i, name, stack=stack) for i in where]
                except StructureError:
                    continue
                if all(s.fused is None and s.hook == "output" and s.module_path == f"{prefix}{i}.{rel}"
                       for s, i in zip(named, where)):
                    component = name
                    break
        layer: Any = "all" if where == list(range(len(blocks))) else list(where)
        entries.append({"layer": layer, "component": component, "positions": positions, "intervention": "ia3",
                        **({"stack": stack} if stack else {})})
    return entries
