"""The anatomy of a Hugging Face transformer, found by structure: its layer stack, its widths, the
names its parts go by, the (backbone, LM head) pair a label-only loss can use, and what a resolved
site is (:class:`Site`: a module, a hook kind, a width, and for fused q/k/v projections the columns of the
requested component).

Nothing here runs the model, so it works on a model built on the ``meta`` device too. The names
below are the ones transformers uses across families (``self_attn``/``attn``/``attention``,
``mlp``/``feed_forward``, ``q_proj``/``query`` ...); :mod:`reftkit.structure` uses them to resolve
pyvene's component names to modules.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

__all__ = ["StructureError", "FusedSlice", "Site", "find_layers", "num_layers", "hidden_size",
           "find_backbone_and_head", "text_config", "config_int", "feature_sizes", "feature_sizes_at", "find_part",
           "is_activation", "arch_name", "hooked_paths", "max_positions", "STACKS", "is_encoder_decoder", "stack_root"]


class StructureError(ValueError):
    """A site cannot be resolved; the message names the offending field and value."""


@dataclass(frozen=True)
class FusedSlice:
    """Columns of a fused projection's output that belong to one of q, k or v.

    The last dim is viewed as ``[groups, group_width]``; inside each group the
    columns ``start:stop`` are taken and the groups flattened back, giving
    ``groups * (stop - start)`` features.
    """

    groups: int
    group_width: int
    start: int
    stop: int

    @property
    def width(self) -> int:
        """Number of features :meth:`extract` returns."""
        return self.groups * (self.stop - self.start)

    def _grouped(self, full: Tensor) -> Tensor:
        if full.shape[-1] != self.groups * self.group_width:
            raise StructureError(
                f"full.shape[-1]={full.shape[-1]} does not match the fused layout "
                f"groups={self.groups} x group_width={self.group_width}")
        return full.unflatten(-1, (self.groups, self.group_width))

    def extract(self, full: Tensor) -> Tensor:
        """``[..., groups*group_width] -> [..., width]`` (a view where possible)."""
        return self._grouped(full)[..., self.start:self.stop].flatten(-2)

    def insert(self, full: Tensor, part: Tensor) -> Tensor:
        """Return a new tensor equal to ``full`` with this slice replaced by ``part``.

        Built with ``torch.cat`` rather than in-place assignment so that it is safe
        inside autograd (``full`` may be a saved activation) and gradients reach
        both ``part`` and the untouched columns of ``full``.
        """
        if part.shape[-1] != self.width:
            raise StructureError(f"part.shape[-1]={part.shape[-1]} must equal width={self.width}")
        g = self._grouped(full)
        p = part.to(g.dtype).unflatten(-1, (self.groups, self.stop - self.start))
        p = p.expand(*g.shape[:-1], p.shape[-1])
        return torch.cat([g[..., :self.start], p, g[..., self.stop:]], dim=-1).flatten(-2)


@dataclass(frozen=True)
class Site:
    """Where and how to hook one intervention.

    ``hook="input"``: forward-pre-hook, the tensor is the module's first input
    (``hidden_states``, positional or keyword).  ``hook="output"``: forward hook,
    the tensor is the output (its first element if it is a tuple).  When ``fused``
    is set, the intervention sees ``fused.extract(output)`` only.  When ``heads`` is
    set (head-level components), the tensor is viewed as ``[..., num_heads, head_dim]``
    and the intervention sees the selected heads, each a row of width ``width`` (= head_dim).
    """

    layer: int | None
    component: str
    module_path: str
    hook: Literal["input", "output"]
    width: int
    fused: FusedSlice | None = None
    heads: tuple[int, ...] | None = None
    num_heads: int | None = None
    #: encoder-decoder models: the stack the site is in (``"encoder"`` / ``"decoder"``), and the sequence its
    #: tensor runs along, which its positions count over (the encoder's for a cross-attention key or value)
    stack: str | None = None
    sequence: str | None = None


#: config fields that give the longest sequence a model takes, across families (GPT-2's ``n_positions``,
#: ``n_ctx``, MPT's ``max_seq_len``, ChatGLM's ``seq_length`` ...)
MAX_POSITION_NAMES = ("max_position_embeddings", "n_positions", "max_sequence_length", "n_ctx", "max_seq_len",
                      "seq_length")

# Names of a block's parts across transformers' model families.
ATTENTION_NAMES = ("self_attn", "attn", "attention", "self_attention", "SelfAttention")
#: a decoder block's cross-attention over the encoder's output (T5's ``EncDecAttention``, BART's ``encoder_attn``)
CROSS_ATTENTION_NAMES = ("EncDecAttention", "encoder_attn", "crossattention", "cross_attn")
MLP_NAMES = ("mlp", "feed_forward", "ffn", "mlp_block", "DenseReluDense")
#: the stacks of an encoder-decoder model a representation names with ``stack=``
STACKS = ("encoder", "decoder")
#: config fields giving each stack's layer count (T5: num_layers / num_decoder_layers; BART: encoder_/decoder_layers)
_STACK_LAYERS = {"encoder": ("encoder_layers", "num_layers"),
                 "decoder": ("decoder_layers", "num_decoder_layers", "num_layers")}
QUERY_NAMES = ("q_proj", "query", "wq", "query_proj", "q")
KEY_NAMES = ("k_proj", "key", "wk", "key_proj", "k")
VALUE_NAMES = ("v_proj", "value", "wv", "value_proj", "v")
FUSED_QKV_NAMES = ("qkv_proj", "c_attn", "query_key_value", "Wqkv", "W_pack")
OUTPUT_PROJECTION_NAMES = ("o_proj", "out_proj", "c_proj", "dense", "wo", "o")
# Entries with a dot are path suffixes: BERT splits its MLP over two sub-modules.
UP_PROJECTION_NAMES = ("gate_up_proj", "gate_proj", "up_proj", "fc1", "c_fc", "dense_h_to_4h", "fc_in", "w1", "wi",
                       "intermediate.dense")
DOWN_PROJECTION_NAMES = ("down_proj", "fc2", "c_proj", "dense_4h_to_h", "fc_out", "w2", "wo", "output.dense")
ACTIVATION_NAMES = ("act_fn", "act", "activation_fn", "intermediate_act_fn", "activation", "act_layer")


# ----------------------------------------------------------------------------- helpers

def arch_name(model: nn.Module) -> str:
    """The model's class name, for messages."""
    return type(model).__name__


def text_config(model: nn.Module) -> Any:
    """The model's config, or its text sub-config for a multimodal wrapper."""
    cfg = getattr(model, "config", None)
    if cfg is not None and hasattr(cfg, "get_text_config"):
        # Multimodal wrappers keep the decoder sizes in a text sub-config.
        cfg = cfg.get_text_config()
    return cfg


def config_int(model: nn.Module, *names: str) -> int | None:
    """The first of the config fields ``names`` that holds an int, else ``None``."""
    cfg = text_config(model)
    for name in names:
        value = getattr(cfg, name, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def feature_sizes(module: nn.Module) -> tuple[int, int] | None:
    """(in, out) feature sizes read from attributes, so meta tensors work too."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if hasattr(module, "nf") and hasattr(module, "nx"):  # transformers' Conv1D (weight [nx, nf])
        return int(module.nx), int(module.nf)
    if isinstance(module, nn.Embedding):
        return module.num_embeddings, module.embedding_dim
    if isinstance(module, nn.LayerNorm) and module.normalized_shape:
        return module.normalized_shape[-1], module.normalized_shape[-1]
    weight = getattr(module, "weight", None)
    if isinstance(weight, Tensor) and weight.dim() == 1:  # RMSNorm-style
        return weight.shape[0], weight.shape[0]
    return None


def feature_sizes_at(root: nn.Module, rel: str | None) -> tuple[int, int] | None:
    """:func:`feature_sizes` of ``root``'s submodule at the relative path ``rel`` (``None``: none)."""
    return feature_sizes(root.get_submodule(rel)) if rel else None


def find_part(root: nn.Module, names: tuple[str, ...], skip: tuple[str, ...] = ()) -> str | None:
    """Shallowest descendant whose path ends with one of ``names`` (earlier names win ties).

    ``skip`` prunes subtrees, e.g. the attention module when looking for MLP parts,
    so that BERT's ``attention.output.dense`` is never taken for the MLP's.
    """
    best: tuple[int, int, str] | None = None
    for path, _ in root.named_modules():
        if not path or any(path == s or path.startswith(s + ".") for s in skip):
            continue
        for rank, name in enumerate(names):
            if path == name or path.endswith("." + name):
                key = (path.count("."), rank, path)
                if best is None or key < best:
                    best = key
                break
    return None if best is None else best[2]


def is_activation(module: nn.Module) -> bool:
    """Whether ``module`` is an activation function module (transformers' or torch's)."""
    return type(module).__module__ in ("transformers.activations", "torch.nn.modules.activation")


# ----------------------------------------------------------------------------- layers

def is_encoder_decoder(model: nn.Module) -> bool:
    """Whether ``model`` is an encoder-decoder (T5, BART, mT5 ...): its config says ``is_encoder_decoder``."""
    return bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))


def stack_root(model: nn.Module, stack: str | None) -> tuple[str, nn.Module]:
    """``(path, module)`` of the named stack of an encoder-decoder model (``get_encoder()`` / ``get_decoder()``);
    ``("", model)`` for ``stack=None`` on a decoder-only model. Refuses a stack the model does not have, and a
    missing one on an encoder-decoder model (picking one silently would put the edit in the wrong stack)."""
    enc_dec = is_encoder_decoder(model)
    if stack is None:
        if enc_dec:
            raise StructureError(f"stack=None: {arch_name(model)} is an encoder-decoder model; give stack='encoder' "
                                 "or stack='decoder' (which of its two stacks the entry is in)")
        return "", model
    if stack not in STACKS:
        raise StructureError(f"stack={stack!r} is not a stack; give 'encoder' or 'decoder'")
    if not enc_dec:
        raise StructureError(f"stack={stack!r}: {arch_name(model)} is not an encoder-decoder model (its config has no "
                             "is_encoder_decoder=True), so it has one layer stack; leave stack out")
    get = getattr(model, "get_encoder" if stack == "encoder" else "get_decoder", None)
    root = get() if callable(get) else None
    path = None if not isinstance(root, nn.Module) else _module_path(model, root)
    if path is None or root is model:
        raise StructureError(f"stack={stack!r}: {arch_name(model)} has no get_{stack}() module inside it")
    return path, root


def find_layers(model: nn.Module, stack: str | None = None) -> tuple[str, nn.ModuleList]:
    """Return the dotted path and the ``nn.ModuleList`` of decoder/encoder blocks (of the named ``stack`` of an
    encoder-decoder model, see :func:`stack_root`).

    Preference order: a list whose length equals the config's layer count, whose
    children share one class and contain an attention module; relaxing those
    checks one at a time; finally (no config, or pruned layers) the longest
    homogeneous list of blocks with an attention module.
    """
    prefix, root = stack_root(model, stack)
    want = config_int(model, *(_STACK_LAYERS[stack] if stack else ("num_hidden_layers", "n_layer", "num_layers",
                                                                    "n_layers")))
    lists = [(f"{prefix}.{p}" if prefix and p else p or prefix, m) for p, m in root.named_modules()
             if isinstance(m, nn.ModuleList) and len(m)]

    def homogeneous(ml: nn.ModuleList) -> bool:
        return len({type(c) for c in ml}) == 1

    def has_attention(ml: nn.ModuleList) -> bool:
        return find_part(ml[0], ATTENTION_NAMES) is not None

    sized = [(p, m) for p, m in lists if len(m) == want]
    for pick in ([x for x in sized if homogeneous(x[1]) and has_attention(x[1])],
                 [x for x in sized if homogeneous(x[1])], sized):
        if pick:
            return pick[0]
    pick = [x for x in lists if homogeneous(x[1]) and has_attention(x[1])]
    if pick:
        return max(pick, key=lambda x: len(x[1]))
    seen = ", ".join(f"{p or '<root>'}[{len(m)}]" for p, m in lists) or "none"
    raise StructureError(
        f"could not find the layer stack of {arch_name(model)}: no nn.ModuleList with "
        f"num_hidden_layers={want} blocks (ModuleLists found: {seen})")


def num_layers(model: nn.Module, stack: str | None = None) -> int:
    """Number of blocks in the layer stack returned by :func:`find_layers`."""
    return len(find_layers(model, stack)[1])


def max_positions(model: nn.Module) -> tuple[str, int] | None:
    """``(field, value)`` of the config field that bounds a sequence's length, or ``None`` when the config
    has none (relative-position models such as T5, or a model without a config)."""
    cfg = text_config(model)
    for name in MAX_POSITION_NAMES:
        value = getattr(cfg, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return name, value
    return None


def hidden_size(model: nn.Module) -> int:
    """Residual-stream width: from the config, else the input embedding width."""
    size = config_int(model, "hidden_size", "n_embd", "d_model", "dim", "embed_dim")
    if size is not None:
        return size
    get_emb = getattr(model, "get_input_embeddings", None)
    emb = get_emb() if callable(get_emb) else None
    if isinstance(emb, nn.Embedding):
        return emb.embedding_dim
    raise StructureError(f"cannot tell the hidden size of {arch_name(model)}: no hidden_size in its config")


# ----------------------------------------------------------------------------- backbone and head

# Config fields of causal LMs whose forward transforms the logits after the head (Gemma 2/3 soft
# capping, Cohere and Granite scaling): `lm_head(hidden)` alone would give a different loss there.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")


def _module_path(root: nn.Module, target: nn.Module) -> str | None:
    for name, module in root.named_modules():
        if module is target:
            return name
    return None


def find_backbone_and_head(adapted: Any) -> tuple[nn.Module, nn.Module] | None:
    """``(backbone, lm_head)`` of the causal LM an adapted model wraps (``adapted.model``: a ReftModel,
    a weight-space model, or anything with that attribute), or ``None`` when running the backbone and
    applying the head to a few rows would not reproduce the model's own logits, and the full forward
    must be used.

    The backbone is ``get_decoder()`` (else ``base_model``); as in every HF causal LM its
    ``last_hidden_state`` already has the final norm applied, so the head follows it directly.
    ``adapted.label_only_loss = False`` (prompt tuning: virtual tokens enter through the wrapper's own
    forward) opts out; so does a hooked module outside the backbone (its intervention would be skipped).
    """
    if not getattr(adapted, "label_only_loss", True):
        return None
    hf = adapted.model
    config = getattr(hf, "config", None)
    if config is None or getattr(config, "is_encoder_decoder", False):
        return None
    if getattr(config, "final_logit_softcapping", None) is not None or any(
            getattr(config, name, None) not in (None, 1, 1.0) for name in _LOGIT_TRANSFORMS[1:]):
        return None
    head = hf.get_output_embeddings() if hasattr(hf, "get_output_embeddings") else None
    backbone = hf.get_decoder() if hasattr(hf, "get_decoder") else None
    if backbone is None or backbone is hf:
        backbone = getattr(hf, "base_model", None)
    if head is None or backbone is None or backbone is hf:
        return None
    prefix = _module_path(hf, backbone)
    if prefix is None:
        return None
    if prefix and any(not (path == prefix or path.startswith(prefix + ".")) for path in hooked_paths(adapted)):
        return None
    return backbone, head


def hooked_paths(adapted: Any) -> list[str]:
    """Module paths (from the base model's root) where ``adapted`` has intervention hooks; ``[]`` for a
    model without hooks (a weight-space model)."""
    hooks = getattr(adapted, "_hooks", None)  # a ReftModel's HookManager
    return [slot.site.module_path for slot in getattr(hooks, "slots", ())]
